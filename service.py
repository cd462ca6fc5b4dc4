"""The BentoML service: a thin shell around the HTTP app and the model runtime.

Resources and traffic live in the decorator; the model loads on a background thread after the server starts, so
`/livez` answers during a long load and `/readyz` turns ready only after the engine's warm-up. The settings (and the
gRPC TLS files they name) are read when this module is imported, so `bentoml serve` exits at once, naming the
setting, when one is invalid; so does a job store whose Redis may evict jobs (`DSD_JOBS_REDIS_URL`).

On SIGTERM the engine stops admitting at once and `/readyz` fails; the HTTP server keeps accepting connections and
answers new requests 503 with Retry-After while queued and running requests finish (at most `DSD_DRAIN_TIMEOUT_S`);
only then does uvicorn's own shutdown run, which lets the last responses go out. The gRPC server
(`DSD_GRPC_PORT`, 0 disables it) shares the runtime and listens from the start; its health is SERVING only between
the warm-up and SIGTERM, and it stops after the engine drained. Jobs (`/v1/jobs`) are claimed from the shared queue
once the model is ready; on SIGTERM the replica stops claiming, and the jobs it runs finish and store their results
before it exits. Clients that trickle a request's head are cut off by the HTTP protocol `dsd_serve.connections`
installs into uvicorn before BentoML starts it.

    BENTOML_DO_NOT_TRACK=True bentoml serve service:DSDService --port 3000
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import bentoml

from dsd_model.settings import Settings
from dsd_serve import connections
from dsd_serve.grpc_server import GrpcServer, tls_files
from dsd_serve.http import LineBreakPaths, create_app
from dsd_serve.image_urls import ImageURLs
from dsd_serve.job_store import EvictingJobStore, open_store
from dsd_serve.jobs import Jobs

logger = logging.getLogger("dsd_serve")
try:
    settings = Settings()
    tls_files(settings)
except ValueError as exc:  # pydantic's ValidationError is one
    raise SystemExit(f"invalid DSD_* setting: {exc}") from exc
try:
    if settings.resolved_jobs_redis_url:
        open_store(settings).close()
except EvictingJobStore as exc:
    raise SystemExit(f"invalid job store: {exc}") from exc
connections.install(settings.header_read_timeout_s)
app = create_app()


@app.get("/docs.json", include_in_schema=False)
def openapi_document() -> dict:
    """BentoML's OpenAPI document of the service (its probes and metrics beside the routes of `app`), declared as the
    version its schemas are written in: FastAPI writes OpenAPI 3.1 (`anyOf` with `null`, numeric
    `exclusiveMinimum`), which BentoML would label 3.0.2. The mounted app answers this path before BentoML does."""
    return {**DSDService.openapi_spec.asdict(), "openapi": "3.1.0"}


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="dsd", workers=1, traffic={"timeout": 900, "concurrency": 256})
class DSDService:
    def __init__(self) -> None:
        self.settings = settings
        self.runtime = None
        self.load_failed = False
        self.jobs = Jobs(self.settings)
        app.state.jobs = self.jobs
        app.state.image_urls = ImageURLs(self.settings)
        self.grpc = GrpcServer(self.settings, self.jobs) if self.settings.grpc_port else None
        if self.grpc is not None:
            self.grpc.start()
        self._drain_started = threading.Event()
        threading.Thread(target=self._load, name="dsd-load", daemon=True).start()
        server_exit = signal.getsignal(signal.SIGTERM)

        def drain_then_exit(signum, frame):
            """Drain the engine and let the last responses go out; only then run the server's own exit handler
            (uvicorn's), so the server answers every request meanwhile."""
            if self._drain_started.is_set():
                return
            self._drain_started.set()

            def wait_for_drain():
                end = time.monotonic() + self.settings.drain_timeout_s
                self.drain_engine()
                app.state.in_flight.wait_until_none(max(0.0, end - time.monotonic()))
                if callable(server_exit):
                    server_exit(signum, None)

            threading.Thread(target=wait_for_drain, name="dsd-drain", daemon=True).start()

        signal.signal(signal.SIGTERM, drain_then_exit)

    def _load(self) -> None:
        from dsd_serve.runtime import Runtime

        try:
            runtime = Runtime(self.settings)
            runtime.start()
        except Exception:
            logger.exception("loading the model failed")
            self.load_failed = True
            return
        self.runtime = runtime
        app.state.runtime = runtime
        if self.grpc is not None:
            self.grpc.attach(runtime)
            runtime.engine.on_failure(lambda reason: self.grpc.stop_serving())
        self.jobs.start_worker(runtime)
        logger.info("ready: profile %s, adapters %s", runtime.profile, runtime.pipe.adapters.names)

    def __is_ready__(self) -> bool:
        return self.runtime is not None and self.runtime.engine.ready

    def __is_alive__(self) -> bool:
        """False when the model failed to load or an engine thread died: Kubernetes then restarts the replica."""
        return not self.load_failed and (self.runtime is None or self.runtime.engine.alive)

    def drain_engine(self) -> None:
        """Stop claiming jobs and admitting requests, let the engine finish its work and the jobs store their
        results."""
        self.jobs.stop_claiming()
        if self.runtime is not None:  # first, so a caller told NOT_SERVING is refused as draining, never queued
            self.runtime.engine.stop_admitting()
        if self.grpc is not None:
            self.grpc.stop_serving()
        if self.runtime is not None:
            clean = self.runtime.drain()
            logger.info("engine drained (%s)", "clean" if clean else "timed out; the rest was cancelled")
        self.jobs.stop(timeout=self.settings.drain_timeout_s)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        if not self._drain_started.is_set():
            self.drain_engine()
        if self.grpc is not None:
            self.grpc.stop()


DSDService.add_asgi_middleware(LineBreakPaths, target=app)
