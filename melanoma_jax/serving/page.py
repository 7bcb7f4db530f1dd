"""The review page served at `/`: one HTML document, its script and style inline (no external asset: it
works offline). Filled in below."""

HTML = """<!doctype html><html><head><meta charset="utf-8"><title>melanoma_jax review</title></head>
<body><p id="notice">Not a diagnosis.</p><script>const MODEL = __MODEL_NAME__;</script></body></html>"""
