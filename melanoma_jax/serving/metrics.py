"""The server's Prometheus metrics (`prometheus_client`), in a registry of its own: GET /metrics renders it.

  melanoma_requests_total{route,status}   requests answered, by route template (never the raw path: a
                                           client cannot make new series) and HTTP status
  melanoma_request_seconds{route}         latency histogram, from the request's arrival to its answer
  melanoma_requests_in_flight             requests being answered
  melanoma_batch_size                     images per scored batch (dynamic batching: fewer batches than requests)
  melanoma_batches_total                  batches scored
  melanoma_images_scored_total            images scored (predict, v2 infer and patient requests)
  melanoma_queue_depth                    images waiting for the model
  melanoma_model_load_seconds             loading the checkpoint; melanoma_warmup_seconds: compiling every step
  melanoma_model_ready                    1 once warmed up
"""
import prometheus_client as prom

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
  """The metrics above; `render()` -> (body bytes, content type)."""

  def __init__(self):
    self.registry = r = prom.CollectorRegistry()
    self.requests = prom.Counter("melanoma_requests", "HTTP requests answered", ["route", "status"], registry=r)
    self.latency = prom.Histogram("melanoma_request_seconds", "Request latency", ["route"],
                                  buckets=LATENCY_BUCKETS, registry=r)
    self.in_flight = prom.Gauge("melanoma_requests_in_flight", "Requests being answered", registry=r)
    self.batch_size = prom.Histogram("melanoma_batch_size", "Images per scored batch", buckets=BATCH_BUCKETS,
                                     registry=r)
    self.batches = prom.Counter("melanoma_batches", "Batches scored", registry=r)
    self.images = prom.Counter("melanoma_images_scored", "Images scored", registry=r)
    self.queue_depth = prom.Gauge("melanoma_queue_depth", "Images waiting for the model", registry=r)
    self.load_seconds = prom.Gauge("melanoma_model_load_seconds", "Seconds to load the checkpoint", registry=r)
    self.warmup_seconds = prom.Gauge("melanoma_warmup_seconds", "Seconds to compile every step", registry=r)
    self.ready = prom.Gauge("melanoma_model_ready", "1 once the model is warmed up", registry=r)

  def render(self):
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
