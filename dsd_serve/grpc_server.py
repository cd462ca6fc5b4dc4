"""The gRPC transport: `dsd.v1.DSDService` on grpc.aio, in the process of the HTTP server and sharing its runtime.

    call → StatusInterceptor (request id, API key, decoding, error → status, latency metric)
         → DSDServicer (proto → GenerateParams → Runtime.submit → result or progress events → proto)

The server runs on its own thread and event loop, so it answers health checks while the model loads and while the
HTTP side drains. The contract, status codes included, is `proto/dsd/v1/dsd.proto`. With `DSD_GRPC_TLS_CERT` and
`DSD_GRPC_TLS_KEY` it serves TLS, and with `DSD_GRPC_TLS_CLIENT_CA` it requires client certificates that CA signed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from contextlib import aclosing, asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import SecretStr, ValidationError

from dsd_model import limits
from dsd_model.errors import ContentPolicyError, DeadlineExceeded, Draining, InputError, QueueFull, RequestCancelled
from dsd_model.serving import metrics
from dsd_model.settings import Settings

from . import grpc_convert as convert
from . import ids
from .grpc_stubs import dsd_pb2, dsd_pb2_grpc
from .jobs import TERMINAL, JobEnded, JobNotFound, Jobs, JobSpec, JobStoreError, caller_of
from .webhooks import EVENTS

if TYPE_CHECKING:
    from .runtime import Runtime, Submission

logger = logging.getLogger(__name__)

SERVICE_NAME = dsd_pb2.DESCRIPTOR.services_by_name["DSDService"].full_name
RETRY_UNAVAILABLE_S = "5"
"""Retry hint while loading or draining: about a readiness-probe period."""
REQUEST_OVERHEAD = 64 * 1024
"""Room beside the reference image for the other request fields (two prompts of at most 2000 characters)."""
IMAGE_BYTES = 3 * limits.MAX_SIZE**2 + 64 * 1024
"""Largest encoded output image: raw RGB at the largest size plus PNG's row filters and zlib framing."""
DEADLINE_SLACK_S = 0.25
"""A call cancelled this close to its deadline counts as timed out: the client's side of the deadline fires first, and
its cancellation reaches the server up to one network delay before the server's own copy of the deadline passes."""
WATCH_TIMEOUT_S = 1.0
"""Longest wait of WatchJob for a job change before reading the job anyway (change notices are best-effort)."""
STOP_GRACE_S = 10.0
"""Stopping waits this long for calls in flight; it comes after the engine drained, so they only encode and send.
Health Watch streams stay open until it ends."""

current_request_id: ContextVar[str] = ContextVar("current_request_id")
"""The request id of the call being handled, set by the interceptor for the servicer."""


class RpcFault(Exception):
    """A refusal decided by this transport itself (authentication, readiness)."""

    def __init__(self, code: grpc.StatusCode, message: str, outcome: str, metadata: tuple = ()):
        self.code, self.message, self.outcome, self.metadata = code, message, outcome, metadata
        super().__init__(message)


def cancel_reason(context) -> str:
    """Why a call ended before its handler: `timeout` when its deadline has (all but) passed, else `cancelled`."""
    remaining = context.time_remaining()
    return "timeout" if remaining is not None and remaining < DEADLINE_SLACK_S else "cancelled"


def status_for(exc: Exception, request_id: str) -> tuple[grpc.StatusCode, str, tuple, str]:
    """The status code, message, extra trailing metadata and metrics outcome of a failed call: the one error mapping
    of this transport. Server faults are logged with the request id."""
    if isinstance(exc, RpcFault):
        return exc.code, exc.message, exc.metadata, exc.outcome
    if isinstance(exc, InputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), (("field", exc.field),), "invalid_argument"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        return grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {first['msg']}", (("field", field),), "invalid_argument"
    if isinstance(exc, ContentPolicyError):
        metadata = (("check", exc.check),) + ((("field", exc.field),) if exc.field else ())
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), metadata, "content_policy"
    if isinstance(exc, JobNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc), (("field", "id"),), "not_found"
    if isinstance(exc, JobEnded):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), (("field", "id"),), "conflict"
    if isinstance(exc, JobStoreError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), (("retry-after-s", RETRY_UNAVAILABLE_S),), "rejected"
    if isinstance(exc, QueueFull):
        retry = (("retry-after-s", str(int(exc.retry_after))),)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), retry, "rejected"
    if isinstance(exc, Draining):
        return grpc.StatusCode.UNAVAILABLE, str(exc), (("retry-after-s", RETRY_UNAVAILABLE_S),), "rejected"
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), (), "timeout"
    if isinstance(exc, RequestCancelled):
        return grpc.StatusCode.CANCELLED, str(exc), (), "cancelled"
    logger.error("request %s failed", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error; quote request id {request_id} when reporting it", (), "error"


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Around every DSDService call (health and reflection pass untouched): names the request, checks the API key,
    decodes the request message, turns any failure into its status with `status_for`, and records the latency by
    outcome. Decoding happens here rather than in gRPC, so that bytes which are not a request message get a status
    of ours and a metric like every other refusal."""

    def __init__(self, api_key: SecretStr | None):
        self.api_key = api_key

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        decode = handler.request_deserializer
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, decode), None, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            self._wrap_unary(handler.unary_unary, decode), None, handler.response_serializer
        )

    def _wrap_unary(self, behavior, decode):
        async def unary(message: bytes, context):
            async with self._call(message, decode, context) as request:
                return await behavior(request, context)

        return unary

    def _wrap_stream(self, behavior, decode):
        async def stream(message: bytes, context):
            async with self._call(message, decode, context) as request:
                async with aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

        return stream

    @asynccontextmanager
    async def _call(self, message: bytes, decode, context):
        started = time.monotonic()
        request_id = ids.request_id(dict(context.invocation_metadata()).get("x-request-id"))
        current_request_id.set(request_id)
        trailing = (("x-request-id", request_id),)
        context.set_trailing_metadata(trailing)
        outcome = "ok"
        request = None
        try:
            self._authenticate(context)
            request = self._decode(message, decode)
            yield request
        except (asyncio.CancelledError, GeneratorExit):
            outcome = cancel_reason(context)
            raise
        except Exception as exc:
            code, details, metadata, outcome = status_for(exc, request_id)
            await context.abort(code, details, trailing_metadata=trailing + metadata)
        finally:
            if not isinstance(request, convert.NOT_GENERATING):
                mode = convert.mode_label(request) if request is not None else "unknown"
                labels = dict(transport="grpc", mode=mode, outcome=outcome)
                metrics.REQUEST_DURATION.labels(**labels).observe(time.monotonic() - started)

    @staticmethod
    def _decode(message: bytes, decode):
        try:
            return decode(message)
        except DecodeError as exc:
            descriptor = decode.__self__.DESCRIPTOR
            try:
                field = convert.invalid_utf8_field(message, descriptor)
            except DecodeError:
                field = None
            if field is not None:
                raise InputError(field, "is not valid UTF-8") from exc
            raise RpcFault(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the request ({len(message)} bytes) is not a serialized {descriptor.full_name} message",
                           "invalid_argument") from exc

    def _authenticate(self, context) -> None:
        if self.api_key is None:
            return
        scheme, _, token = dict(context.invocation_metadata()).get("authorization", "").partition(" ")
        key = self.api_key.get_secret_value()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
            raise RpcFault(grpc.StatusCode.UNAUTHENTICATED,
                           "missing or wrong API key; send metadata `authorization: Bearer <key>`", "unauthenticated")


class DSDServicer(dsd_pb2_grpc.DSDServiceServicer):
    """Converts, submits to the runtime, converts back; every failure is raised for the interceptor to map."""

    def __init__(self, settings: Settings, jobs: Jobs | None = None):
        self.settings = settings
        self.jobs = jobs
        self.runtime: Runtime | None = None
        """Set by `GrpcServer.attach` once the model is loaded."""

    def _ready_runtime(self) -> Runtime:
        runtime = self.runtime
        if runtime is None or not runtime.engine.ready:
            raise RpcFault(grpc.StatusCode.UNAVAILABLE, "the model is loading or the server is draining", "unavailable",
                           (("retry-after-s", RETRY_UNAVAILABLE_S),))
        return runtime

    async def _submit(self, request: dsd_pb2.GenerateRequest, context) -> tuple[Runtime, Submission]:
        runtime = self._ready_runtime()
        params = convert.to_params(request, context.time_remaining(), self.settings.max_deadline_s)
        submission = await runtime.submit(params, request.image, request_id=current_request_id.get())
        return runtime, submission

    async def Generate(self, request, context):
        runtime, submission = await self._submit(request, context)
        result = await submission.result(cancel_reason=lambda: cancel_reason(context))
        return convert.to_response(result, submission, runtime)

    async def GenerateStream(self, request, context):
        runtime, submission = await self._submit(request, context)
        try:
            async with aclosing(submission.events()) as events:
                async for index, event in events:
                    if event.kind == "failed":
                        break
                    message = convert.to_event(index, event)
                    if message is not None:
                        yield message
            result = await submission.result(cancel_reason=lambda: cancel_reason(context))
        except BaseException:
            submission.cancel(cancel_reason(context))
            raise
        yield convert.to_result_event(result, submission, runtime)

    def _jobs(self) -> Jobs:
        if self.jobs is None:
            raise RpcFault(grpc.StatusCode.UNAVAILABLE, "jobs are not available on this server", "unavailable")
        return self.jobs

    async def _job(self, job_id: str) -> dsd_pb2.Job:
        jobs = self._jobs()
        view = await jobs.view(ids.check_job_id(job_id))
        return convert.to_job(view, await jobs.images(view) if view["status"] == "succeeded" else None)

    async def SubmitJob(self, request, context):
        runtime = self._ready_runtime()
        params = convert.to_params(request.request, None, self.settings.max_deadline_s)
        spec = JobSpec(params, request.webhook or None, list(request.webhook_events) or list(EVENTS))
        credential = dict(context.invocation_metadata()).get("authorization")
        job_id, _ = await self._jobs().submit(runtime, spec, request.request.image, request.idempotency_key or None,
                                              caller_of(credential))
        return await self._job(job_id)

    async def GetJob(self, request, context):
        return await self._job(request.id)

    async def WatchJob(self, request, context):
        jobs, last = self._jobs(), None
        ids.check_job_id(request.id)
        async with jobs.watch(request.id) as changed:
            while True:
                view = await jobs.view(request.id)
                key = (view["status"], view["position"], view["progress"]["step"])
                if view["status"] in TERMINAL:
                    yield convert.to_job(view, await jobs.images(view) if view["status"] == "succeeded" else None)
                    return
                if key != last:
                    last = key
                    yield convert.to_job(view)
                await changed(WATCH_TIMEOUT_S)

    async def CancelJob(self, request, context):
        return convert.to_job(await self._jobs().cancel(ids.check_job_id(request.id)))

    async def ListAdapters(self, request, context):
        runtime = self._ready_runtime()
        return convert.to_adapters(runtime, await asyncio.to_thread(runtime.adapters))


def read_pem(setting: str, path: Path, kind: str, load: Callable[[bytes], object]) -> tuple[bytes, object]:
    """The bytes of the PEM file `path` and what `load` makes of them; a `ValueError` naming `setting` when the file
    cannot be read or loaded."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting} {str(path)!r} cannot be read: {exc.strerror}") from exc
    try:
        return data, load(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{setting} {str(path)!r} is not a PEM {kind} ({exc})") from exc


def tls_files(settings: Settings) -> tuple[bytes, bytes, bytes | None] | None:
    """The PEM private key, certificate chain and client CA bundle (or None) the settings name, checked: each file
    readable and loadable, and the key that of the chain's first certificate; None for plaintext. A `ValueError`
    names the setting at fault. `service.py` calls it before the server starts, so a bad file stops the start
    instead of failing every start of the worker."""
    if settings.grpc_tls_cert is None or settings.grpc_tls_key is None:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    chain, certificates = read_pem("DSD_GRPC_TLS_CERT", settings.grpc_tls_cert, "certificate chain",
                                   x509.load_pem_x509_certificates)
    key, private_key = read_pem("DSD_GRPC_TLS_KEY", settings.grpc_tls_key, "unencrypted private key",
                                lambda data: serialization.load_pem_private_key(data, password=None))
    public = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private_key.public_key().public_bytes(*public) != certificates[0].public_key().public_bytes(*public):
        raise ValueError(f"DSD_GRPC_TLS_KEY {str(settings.grpc_tls_key)!r} is not the private key of the first "
                         f"certificate in DSD_GRPC_TLS_CERT {str(settings.grpc_tls_cert)!r}")
    client_ca = None
    if settings.grpc_tls_client_ca is not None:
        client_ca, _ = read_pem("DSD_GRPC_TLS_CLIENT_CA", settings.grpc_tls_client_ca, "CA bundle",
                                x509.load_pem_x509_certificates)
    return key, chain, client_ca


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (`tls_files`), requiring client certificates when a client CA is
    set; None for plaintext."""
    files = tls_files(settings)
    if files is None:
        return None
    key, chain, client_ca = files
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class GrpcServer:
    """The gRPC server on its own thread and event loop. `start` listens at once with health NOT_SERVING; `attach`
    hands it the loaded runtime and turns health SERVING; `stop_serving` turns health NOT_SERVING for good (on
    SIGTERM); `stop` lets calls in flight finish and closes. Every method may be called from any thread."""

    def __init__(self, settings: Settings, jobs: Jobs | None = None):
        self.settings = settings
        self.servicer = DSDServicer(settings, jobs)
        self.port: int | None = None
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._credentials: grpc.ServerCredentials | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dsd-grpc", daemon=True)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self) -> int:
        """Listen on `grpc_host:grpc_port`, over TLS when the settings name a certificate; returns the bound port."""
        self._credentials = server_credentials(self.settings)
        self._thread.start()
        self.port = self._run(self._start())
        security = "plaintext" if self._credentials is None else "TLS"
        if self.settings.grpc_tls_client_ca is not None:
            security = "mutual TLS"
        logger.info("gRPC %s listening on %s:%d (%s)", SERVICE_NAME, self.settings.grpc_host, self.port, security)
        return self.port

    async def _start(self) -> int:
        self._server = grpc.aio.server(
            interceptors=[StatusInterceptor(self.settings.api_key)],
            options=[
                ("grpc.max_receive_message_length", self.settings.max_upload_bytes + REQUEST_OVERHEAD),
                ("grpc.max_send_message_length", self.settings.max_images * IMAGE_BYTES + REQUEST_OVERHEAD),
            ],
        )
        dsd_pb2_grpc.add_DSDServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        if self._credentials is None:
            port = self._server.add_insecure_port(address)
        else:
            port = self._server.add_secure_port(address, self._credentials)
        await self._server.start()
        return port

    async def _set_health(self, status) -> None:
        for name in (health.OVERALL_HEALTH, SERVICE_NAME):
            await self._health.set(name, status)

    def attach(self, runtime: Runtime) -> None:
        """Serve `runtime` (loaded and warmed up) from now on."""
        self.servicer.runtime = runtime
        self._run(self._set_health(health_pb2.HealthCheckResponse.SERVING))

    def stop_serving(self) -> None:
        """Health NOT_SERVING from now on, so balancers send no new calls; calls still reach the servicer. It does not
        wait for the server's loop, so a signal handler may call it at any moment, even while `stop` runs."""
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._health.enter_graceful_shutdown(), self._loop)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Refuse new calls, give those in flight `grace` seconds, then close the server and its loop."""
        self._run(self._health.enter_graceful_shutdown())
        self._run(self._server.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
