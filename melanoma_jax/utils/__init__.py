"""Small shared helpers: host-side TensorFlow, results.json, plots, errors."""
