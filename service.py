"""The BentoML service: a thin shell around the HTTP app and the model runtime.

Resources and traffic live in the decorator; the model loads on a background thread after the server starts, so
`/livez` answers during a long load and `/readyz` turns ready only after the engine's warm-up. On SIGTERM the
engine stops admitting at once (503 with Retry-After), in-flight requests finish, then the engine drains.
Jobs (`/v1/jobs`) are claimed from the shared queue once the model is ready; on SIGTERM the replica stops claiming,
and the jobs it runs finish and store their results before it exits.
The gRPC server (`DSD_GRPC_PORT`, 0 disables it) shares the runtime and listens from the start; its health is
SERVING only between the warm-up and SIGTERM, and it stops after the engine drained.

    BENTOML_DO_NOT_TRACK=True bentoml serve service:DSDService --port 3000
"""

from __future__ import annotations

import logging
import signal
import threading

import bentoml

from dsd_model.settings import Settings
from dsd_serve.grpc_server import GrpcServer
from dsd_serve.http import create_app
from dsd_serve.jobs import Jobs

logger = logging.getLogger("dsd_serve")
app = create_app()


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="dsd", workers=1, traffic={"timeout": 900, "concurrency": 256})
class DSDService:
    def __init__(self) -> None:
        self.settings = Settings()
        self.runtime = None
        self.load_failed = False
        self.jobs = Jobs(self.settings)
        app.state.jobs = self.jobs
        self.grpc = GrpcServer(self.settings, self.jobs) if self.settings.grpc_port else None
        if self.grpc is not None:
            self.grpc.start()
        threading.Thread(target=self._load, name="dsd-load", daemon=True).start()
        previous = signal.getsignal(signal.SIGTERM)

        def stop_admitting(signum, frame):
            if self.grpc is not None:
                self.grpc.stop_serving()
            self.jobs.stop_claiming()
            if self.runtime is not None:
                self.runtime.engine.stop_admitting()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, stop_admitting)

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
        self.jobs.start_worker(runtime)
        logger.info("ready: profile %s, adapters %s", runtime.profile, runtime.pipe.adapters.names)

    def __is_ready__(self) -> bool:
        return self.runtime is not None and self.runtime.engine.ready

    def __is_alive__(self) -> bool:
        return not self.load_failed

    @bentoml.on_shutdown
    def drain(self) -> None:
        if self.grpc is not None:
            self.grpc.stop_serving()
        if self.runtime is not None:
            clean = self.runtime.drain()
            logger.info("engine drained (%s)", "clean" if clean else "timed out; the rest was cancelled")
        self.jobs.stop(timeout=self.settings.drain_timeout_s)
        if self.grpc is not None:
            self.grpc.stop()
