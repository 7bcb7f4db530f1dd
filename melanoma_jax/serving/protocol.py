"""Request bodies -> encoded images, and the answers' shapes, for the TF Serving REST API, the Open Inference
Protocol v2 and the patient endpoint. Pure functions of parsed JSON: every refusal is an `ApiError` with its
HTTP status and one line naming the field, so a client sees what to fix.

TF Serving (https://www.tensorflow.org/tfx/serving/api_rest): the signature is the exported SavedModel's
(`image_bytes` string -> `probability` float, `inference/tf_export.py`). Row format: {"instances": [x, ...]},
column format: {"inputs": [x, ...]} or {"inputs": {"image_bytes": [x, ...]}}, where x is {"b64": "..."} or
{"image_bytes": {"b64": "..."}}. Open Inference Protocol v2 (KServe, Triton, MLServer): one BYTES input
tensor whose elements are the images in base64 (MLServer's "base64" content type), or {"b64": ...}.
"""
import base64
import binascii

INPUT, OUTPUT = "image_bytes", "probability"  # The SavedModel's signature names (inference/tf_export.py).


class ApiError(Exception):
  """A refused request: HTTP `status` and a one-line `message`."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status, self.message = int(status), " ".join(str(message).split())


def _b64(value, where):
  """The bytes of {"b64": "..."}, {"image_bytes": {"b64": "..."}} or a bare base64 string; else ApiError naming
  `where`."""
  if isinstance(value, dict) and set(value) == {INPUT}:
    value = value[INPUT]
  if isinstance(value, dict) and set(value) == {"b64"}:
    value = value["b64"]
  elif not isinstance(value, str):
    raise ApiError(400, f'{where}: expected {{"b64": "<base64 of a JPEG or PNG>"}}, got {type(value).__name__}')
  try:
    return base64.b64decode(value, validate=True)
  except (binascii.Error, ValueError):
    raise ApiError(400, f"{where}: not valid base64") from None


def _images(values, where, max_images):
  if not isinstance(values, list) or not values:
    raise ApiError(400, f"{where}: expected a non-empty list of images")
  if len(values) > max_images:
    raise ApiError(413, f"{where}: {len(values)} images, at most {max_images} per request (--max_instances)")
  return [_b64(v, f"{where}[{i}]") for i, v in enumerate(values)]


def tf_predict(body, max_images):
  """(images bytes, "row" or "column") of a TF Serving :predict body."""
  if not isinstance(body, dict):
    raise ApiError(400, 'the body must be a JSON object with "instances" or "inputs"')
  if ("instances" in body) == ("inputs" in body):
    raise ApiError(400, 'the body must hold exactly one of "instances" (row format) or "inputs" (column format)')
  if "instances" in body:
    return _images(body["instances"], "instances", max_images), "row"
  inputs = body["inputs"]
  if isinstance(inputs, dict):
    if set(inputs) != {INPUT}:
      raise ApiError(400, f'inputs: the only input is "{INPUT}", got {sorted(inputs)}')
    inputs = inputs[INPUT]
  return _images(inputs, "inputs", max_images), "column"


def tf_answer(probabilities, form):
  return {"predictions": probabilities} if form == "row" else {"outputs": probabilities}


def v2_infer(body, max_images):
  """(images bytes, request id) of an Open Inference Protocol v2 infer body."""
  if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
    raise ApiError(400, f'the body must be a JSON object whose "inputs" holds one tensor ("{INPUT}", BYTES)')
  tensor = body["inputs"][0]
  if not isinstance(tensor, dict) or tensor.get("datatype") != "BYTES":
    raise ApiError(400, f'inputs[0]: expected a BYTES tensor named "{INPUT}"')
  data, shape = tensor.get("data"), tensor.get("shape")
  if not isinstance(data, list) or shape != [len(data)]:
    raise ApiError(400, f"inputs[0]: shape {shape!r} does not match {len(data) if isinstance(data, list) else 0} "
                        "data elements (expected [n])")
  return _images(data, "inputs[0].data", max_images), body.get("id")


def v2_answer(name, version, probabilities, request_id):
  answer = {"model_name": name, "model_version": version,
            "outputs": [{"name": OUTPUT, "datatype": "FP64", "shape": [len(probabilities)],
                         "data": probabilities}]}
  if request_id is not None:
    answer["id"] = request_id
  return answer


def patient(body, max_images):
  """(images bytes, names, metadata or None, saliency) of a patient body:
  {"images": [{"b64": "...", "name": "...", "sex": "...", "age": 45, "site": "..."}, ...], "saliency": false}.
  Metadata is None when no image gives sex, age or site."""
  if not isinstance(body, dict) or not isinstance(body.get("images"), list) or not body["images"]:
    raise ApiError(400, 'the body must be a JSON object whose "images" lists the patient\'s images')
  items = body["images"]
  if len(items) > max_images:
    raise ApiError(413, f"images: {len(items)} images, at most {max_images} per request (--max_instances)")
  data, names, metadata = [], [], []
  for i, item in enumerate(items):
    if not isinstance(item, dict) or "b64" not in item:
      raise ApiError(400, f'images[{i}]: expected {{"b64": "...", "name": ..., "sex": ..., "age": ..., "site": ...}}')
    unknown = set(item) - {"b64", "name", "sex", "age", "site"}
    if unknown:
      raise ApiError(400, f"images[{i}]: unknown field(s) {sorted(unknown)}")
    data.append(_b64({"b64": item["b64"]}, f"images[{i}].b64"))
    name = item.get("name", f"image_{i}")
    if not isinstance(name, str) or not name.strip():
      raise ApiError(400, f"images[{i}].name: expected a non-empty string")
    names.append(name)
    for field in ("sex", "age", "site"):
      value = item.get(field)
      if value is not None and not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ApiError(400, f"images[{i}].{field}: expected a string or number")
    metadata.append({f: item.get(f) for f in ("sex", "age", "site")})
  saliency = body.get("saliency", False)
  if not isinstance(saliency, bool):
    raise ApiError(400, "saliency: expected true or false")
  given = any(v is not None for m in metadata for v in m.values())
  return data, names, metadata if given else None, saliency
