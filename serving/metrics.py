"""Per-tenant Prometheus metrics and payload-free request logs.

Metrics go through `ray.serve.metrics`, so they are exported by every Ray node's metrics agent next to
Serve's own (`ray_serve_*`), with the application/deployment/replica labels added by Serve; scrape the
node's metrics export port (`ray start --metrics-export-port`, 8080 in the Helm chart's pods). Names
(Prometheus adds the `ray_` prefix):

- `cxrfm_requests_total{tenant, task, model, status}`: finished API requests by HTTP status
- `cxrfm_request_latency_seconds{tenant, task}`: wall time in the ingress, successful requests
- `cxrfm_rejections_total{tenant, task, reason}`: auth, forbidden_task, forbidden_model, rate,
  concurrency, too_large, bad_input, unsupported_type, overloaded, unavailable, not_deployed, timeout,
  internal
- `cxrfm_batch_size{task}` / `cxrfm_model_loads_total{task, model}`: in the task deployments

Label values come from the tenant store and the model catalog (bounded sets), never from request text:
an unauthenticated caller is the tenant "-".

The log line of a request carries ids, sizes, statuses and timings only. `log_request` takes named
fields from a fixed list and refuses others, so image bytes, prompts and generated text cannot be
handed to it by accident.
"""

from __future__ import annotations

import logging

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
LOG_FIELDS = ("request_id", "tenant", "task", "model", "status", "code", "latency_ms", "images", "upload_bytes",
              "tokens", "stream", "reason")
logger = logging.getLogger("ray.serve")  # Serve routes it to the replica's log file with request context


class IngressMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("cxrfm_requests_total", description="API requests by tenant, task, model and status",
                                tag_keys=("tenant", "task", "model", "status"))
        self.latency = Histogram("cxrfm_request_latency_seconds", description="ingress latency of successful requests",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("tenant", "task"))
        self.rejections = Counter("cxrfm_rejections_total", description="requests refused, by tenant, task and reason",
                                  tag_keys=("tenant", "task", "reason"))

    def finished(self, tenant: str, task: str, model: str, status: int, latency_s: float) -> None:
        self.requests.inc(tags={"tenant": tenant, "task": task, "model": model or "-", "status": str(status)})
        if status < 400:
            self.latency.observe(latency_s, tags={"tenant": tenant, "task": task})

    def rejected(self, tenant: str, task: str, reason: str) -> None:
        self.rejections.inc(tags={"tenant": tenant, "task": task, "reason": reason})


class TaskMetrics:
    def __init__(self, task: str):
        from ray.serve.metrics import Counter, Histogram

        self.task = task
        self.batch = Histogram("cxrfm_batch_size", description="requests per model call in a task deployment",
                               boundaries=BATCH_BOUNDARIES, tag_keys=("task",))
        self.loads = Counter("cxrfm_model_loads_total", description="model loads into a replica (multiplexing misses)",
                             tag_keys=("task", "model"))

    def batch_ran(self, size: int) -> None:
        self.batch.observe(size, tags={"task": self.task})

    def model_loaded(self, model: str) -> None:
        self.loads.inc(tags={"task": self.task, "model": model})


def log_request(**fields) -> None:
    unknown = set(fields) - set(LOG_FIELDS)
    if unknown:  # a programming error, caught by the tests: never log free-form payload fields
        raise ValueError(f"log_request got fields {sorted(unknown)}; allowed: {LOG_FIELDS}")
    logger.info(" ".join(f"{k}={fields[k]}" for k in LOG_FIELDS if k in fields and fields[k] is not None))
