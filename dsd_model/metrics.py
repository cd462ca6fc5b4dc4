"""Every Prometheus metric of the service, declared once (prefix `dsd_`, base units, `_total` for counters).

The engine and the transports record them where one stage ends and the next begins; `/metrics` exposes them.
"""

from prometheus_client import Counter, Gauge, Histogram

SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
"""Buckets for seconds-long generation work."""
STEP_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

REQUEST_DURATION = Histogram(
    "dsd_request_duration_seconds", "End-to-end request latency.", ["transport", "mode", "outcome"], buckets=SECONDS
)
QUEUE_WAIT = Histogram("dsd_queue_wait_seconds", "Time from admission to the first denoising step.", buckets=SECONDS)
STEP_DURATION = Histogram(
    "dsd_step_duration_seconds", "Time of one batched denoising step (one transformer forward).", buckets=STEP_SECONDS
)
BATCH_ROWS = Histogram("dsd_batch_rows", "Transformer rows per batched forward (batch occupancy).", buckets=ROWS)
QUEUE_DEPTH = Gauge(
    "dsd_queue_depth", "Requests waiting for a batch slot: the autoscaling signal.", multiprocess_mode="livesum"
)
REQUESTS_REJECTED = Counter("dsd_requests_rejected_total", "Requests refused at admission.", ["reason"])
REQUESTS_CANCELLED = Counter("dsd_requests_cancelled_total", "Requests cancelled by the client before finishing.")
REQUESTS_TIMED_OUT = Counter("dsd_requests_timed_out_total", "Requests that passed their deadline.")
