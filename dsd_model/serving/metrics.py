"""Every Prometheus metric of the service, declared once (prefix `dsd_`, base units, `_total` for counters).

The engine and the transports record them where one stage ends and the next begins; `/metrics` exposes them.
"""

from prometheus_client import Counter, Gauge, Histogram

SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
"""Buckets for seconds-long generation work."""
STEP_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CACHE_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Buckets for one Redis round trip (the official canvas's cached latents are 1 MiB in float32)."""

REQUEST_DURATION = Histogram(
    "dsd_request_duration_seconds", "End-to-end request latency.", ["transport", "mode", "outcome"], buckets=SECONDS
)
QUEUE_WAIT = Histogram(
    "dsd_queue_wait_seconds", "Time from admission to the first denoising step, by priority class (`interactive`: "
    "REST and gRPC; `batch`: queued jobs).", ["priority_class"], buckets=SECONDS,
)
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
CACHE_HITS = Counter("dsd_cache_hits_total", "Condition-latent cache lookups that found a usable entry (no encode).")
CACHE_MISSES = Counter("dsd_cache_misses_total", "Condition-latent cache lookups that found no entry.")
CACHE_ERRORS = Counter(
    "dsd_cache_errors_total",
    "Condition-latent cache calls served without the cache, by operation (get, put) and kind (unavailable, timeout, "
    "error, corrupt, too_large, skipped: during the back-off after a failure).",
    ["operation", "kind"],
)
CACHE_READ_BYTES = Counter("dsd_cache_read_bytes_total", "Bytes read from the condition-latent cache.")
CACHE_WRITTEN_BYTES = Counter("dsd_cache_written_bytes_total", "Bytes written to the condition-latent cache.")
CACHE_DURATION = Histogram(
    "dsd_cache_duration_seconds", "Time of one condition-latent cache round trip to Redis.", ["operation"],
    buckets=CACHE_SECONDS,
)
PROMPT_CACHE_HITS = Counter("dsd_prompt_cache_hits_total", "Prompts whose embeddings were reused in-process.")
PROMPT_CACHE_MISSES = Counter("dsd_prompt_cache_misses_total", "Prompts that went through the text encoders.")
WATERMARKS = Counter(
    "dsd_watermarks_total",
    "Output images by watermark result: embedded, or too_small (under 256 px on a side: left unmarked), or disabled.",
    ["result"],
)
C2PA_SIGNING_ENABLED = Gauge(
    "dsd_c2pa_signing_enabled", "1 when outputs carry signed C2PA Content Credentials, 0 when the service runs "
    "unsigned (no key and certificate chain configured).", multiprocess_mode="livemax",
)
C2PA_MANIFESTS = Counter("dsd_c2pa_manifests_total", "Output images by C2PA result: signed or unsigned.", ["result"])
SAFETY_DECISIONS = Counter(
    "dsd_safety_decisions_total",
    "Safety check decisions by check (input, output) and decision (pass, block, blur, consented).",
    ["check", "decision"],
)
PROVENANCE_DURATION = Histogram(
    "dsd_output_stage_duration_seconds",
    "Time of one output stage per image: check (output classifier), watermark, encode, sign (C2PA).",
    ["stage"], buckets=STEP_SECONDS,
)
PROMPT_ENHANCEMENTS = Counter(
    "dsd_prompt_enhancements_total",
    "Requests that asked for prompt enhancement, by outcome: `enhanced` (asked the model), `cached` (an earlier "
    "answer), `failed` (timeout, error or unconfigured: the prompt was used as given) or `too_long` (the enhanced "
    "prompt was cut off at the reply's token limit, or exceeded 2000 characters or the T5 window: the prompt was "
    "used as given).",
    ["outcome"],
)
STEP_CACHE_ROWS = Counter(
    "dsd_step_cache_rows_total",
    "Transformer rows under the per-row step cache, by outcome: `reused` ran only the first block and reused its "
    "cached remainder, `computed` ran every block.",
    ["outcome"],
)
JOBS_BACKLOG = Gauge(
    "dsd_jobs_backlog", "Jobs in the shared queue that no replica has claimed yet (the same value on every replica, "
    "read from Redis): the autoscaling signal of asynchronous work.", multiprocess_mode="livemax",
)
JOBS_FINISHED = Counter("dsd_jobs_finished_total", "Jobs this replica ended, by state (succeeded, failed, canceled).",
                        ["state"])
JOBS_RECLAIMED = Counter("dsd_jobs_reclaimed_total", "Jobs this replica took over from a replica that stopped sending "
                         "heartbeats.")
JOB_DURATION = Histogram("dsd_job_duration_seconds", "From submission to the stored result of a job.", ["state"],
                         buckets=SECONDS)
WEBHOOK_ATTEMPTS = Counter(
    "dsd_webhook_attempts_total", "Webhook delivery attempts, by outcome (delivered, rejected: a non-2xx answer, "
    "unreachable: no answer, refused: the address is not allowed).", ["outcome"],
)
WEBHOOK_ABANDONED = Counter("dsd_webhook_abandoned_total", "Webhook events given up after DSD_WEBHOOK_RETRY_FOR_S.")
WEBHOOK_LATENCY = Histogram("dsd_webhook_latency_seconds", "From a job's end to the receiver's 2xx answer.",
                            buckets=SECONDS)
FORWARD_ROWS = Counter(
    "dsd_forward_rows_total", "Transformer rows run in batched forwards, by adapter (`none`: the base model) and "
    "canvas size in pixels.", ["adapter", "size"],
)
FORWARDS = Counter(
    "dsd_forwards_total", "Batched denoising forwards by kind: `single` (every row of one adapter, the folded fast "
    "path when folding is on) or `mixed` (rows of several adapters; each adapter's LoRA applied to its own rows).",
    ["kind"],
)
SIZE_GROUPS = Gauge(
    "dsd_running_sizes", "Canvas sizes being denoised at once; each is a batch of its own, stepped in turn.",
    multiprocess_mode="livemax",
)
ADAPTER_LOADS = Counter(
    "dsd_adapter_loads_total", "Adapter store loads by outcome: `loaded`, or `failed` (unreadable, malformed or for "
    "another base; the requests naming it fail, or its earlier version keeps serving).", ["outcome"],
)
ADAPTER_CACHE_HITS = Counter("dsd_adapter_cache_hits_total", "Requests whose store adapter was already loaded.")
ADAPTER_EVICTIONS = Counter(
    "dsd_adapter_evictions_total", "Store adapters dropped to stay within DSD_ADAPTER_CACHE_BYTES.",
)
ADAPTER_LOAD_SECONDS = Histogram(
    "dsd_adapter_load_seconds", "Time to read, check and load one store adapter (on the preparing thread).",
    buckets=STEP_SECONDS,
)
ADAPTER_CACHE_BYTES = Gauge(
    "dsd_adapter_cache_bytes", "Bytes of loaded store adapters (pinned ones not counted).", multiprocess_mode="livemax",
)
ENGINE_FAILURES = Counter(
    "dsd_engine_failures_total", "Engine threads that died of an unexpected fault, by thread; the replica then fails "
    "its liveness probe and is restarted.", ["thread"],
)
IDENTITY_SCORES = Counter(
    "dsd_identity_scores_total", "Images scored against their reference, by scorer (dlib-resnet-v1, dino:<dir>, ...) "
    "and status (ok, no_face).", ["scorer", "status"],
)
IDENTITY_DURATION = Histogram(
    "dsd_identity_duration_seconds", "Time to score one request's images (every best-of candidate) on the scoring "
    "thread, waiting for it included.", buckets=SECONDS,
)
