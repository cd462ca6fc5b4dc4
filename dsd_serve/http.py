"""The HTTP transport: `POST /generate` (JSON with a base64 image, or a multipart upload).

Thin by design: read the body within its limit, authenticate, validate, submit to the runtime, wait while watching
for the client going away, encode. Every failure goes through `error_response`, the one mapping of this transport.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import json
import logging
import re
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from dsd_model.errors import ContentPolicyError, DeadlineExceeded, Draining, InputError, QueueFull, RequestCancelled
from dsd_model.serving import metrics

from . import ids
from . import jobs as job_queue
from . import webhooks
from .schemas import (
    AdapterEntry, AdapterList, ErrorResponse, GenerateJSON, GenerateParams, GenerateResponse, JobJSON, JobParams,
    Timings,
)

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
FORM_OVERHEAD = 64 * 1024
"""Room for the other fields and multipart boundaries beside the image; also the limit of one non-file part."""
VERIFY_TYPES = ("image/png", "image/jpeg", "image/webp")
MAX_NUMBER_DIGITS = 100
"""No accepted number has more digits (seeds have 19); a longer JSON integer is read as a float, so the field's
range refuses it instead of Python's int-string limit (4300 digits) raising."""
DATA_URI = re.compile(r"^data:[\w.+\-]+/[\w.+\-]+(;[\w.+\-]+=[\w.+\-]+)*;base64,", re.IGNORECASE)
CONSTRAINT_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                     "string_too_short", "string_too_long", "string_pattern_mismatch", "literal_error"}
"""Pydantic errors whose message already states the limit."""
REQUEST_FIELDS = GenerateJSON.model_json_schema()["properties"]


class ClientFault(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers=None):
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers
        super().__init__(message)


def error_response(exc: BaseException, request_id: str) -> tuple[JSONResponse, str]:
    """The response and the metrics outcome for any failure of a request. It closes the connection: the body may be
    unread (a client that keeps sending it would otherwise hold the connection), and a client retries on a new one."""
    headers = {"X-Request-ID": request_id, "Connection": "close"}
    if isinstance(exc, ClientFault):
        status, code, message, field, outcome = exc.status, exc.code, exc.message, exc.field, exc.code
        headers.update(exc.headers or {})
    elif isinstance(exc, InputError):
        status, code, message, field, outcome = 422, "invalid_argument", str(exc), exc.field, "invalid_argument"
    elif isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        status, code, outcome = 422, "invalid_argument", "invalid_argument"
        message = f"{field}: {first['msg']}" if field else first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"{field}: unknown field; accepted fields: {', '.join(sorted(GenerateJSON.model_fields))}"
        elif first["type"] not in CONSTRAINT_ERRORS and (expected := accepted_values(field)):
            message = f"{message}; accepted: {expected}"
    elif isinstance(exc, ContentPolicyError):
        status, code, message, field, outcome = 422, "content_policy", str(exc), exc.field, "content_policy"
    elif isinstance(exc, job_queue.JobNotFound):
        status, code = (410, "expired") if exc.expired else (404, "not_found")
        message, field, outcome = str(exc), "job_id", code
    elif isinstance(exc, job_queue.JobEnded):
        status, code, message, field, outcome = 409, "conflict", str(exc), "job_id", "conflict"
    elif isinstance(exc, job_queue.JobStoreError):
        status, code, message, field, outcome = 503, "unavailable", str(exc), None, "rejected"
        headers["Retry-After"] = "5"
    elif isinstance(exc, QueueFull):
        status, code, message, field, outcome = 429, "resource_exhausted", str(exc), None, "rejected"
        headers["Retry-After"] = str(int(exc.retry_after))
    elif isinstance(exc, Draining):
        status, code, message, field, outcome = 503, "unavailable", str(exc), None, "rejected"
        headers["Retry-After"] = "5"
    elif isinstance(exc, DeadlineExceeded):
        status, code, message, field, outcome = 504, "deadline_exceeded", str(exc), "deadline_s", "timeout"
    elif isinstance(exc, RequestCancelled):
        status, code, message, field, outcome = 499, "cancelled", str(exc), None, "cancelled"
    elif isinstance(exc, ClientDisconnect):
        status, code, field, outcome = 499, "cancelled", None, "cancelled"
        message = "the client closed the connection while sending the body"
    else:
        logger.error("request %s failed", request_id, exc_info=exc)
        status, code, field, outcome = 500, "internal", None, "error"
        message = f"internal error; quote request id {request_id} when reporting it"
    body = ErrorResponse(error=dict(code=code, message=message, field=field, request_id=request_id))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers), outcome


def error_responses(*codes: int) -> dict:
    """The OpenAPI `responses` of a route that answers these error statuses (`ErrorResponse` bodies)."""
    return {code: {"model": ErrorResponse} for code in sorted(codes)}


def accepted_values(field: str | None) -> str | None:
    """What the request schema accepts for `field`, e.g. `integer from 1 to 100`."""
    schema = REQUEST_FIELDS.get(field or "")
    if schema is None:
        return None
    (kind,) = [option for option in schema.get("anyOf", [schema]) if option.get("type") != "null"]
    if "enum" in kind:
        return " or ".join(repr(value) for value in kind["enum"])
    if kind["type"] == "string":
        if "pattern" in kind:
            return f"string matching {kind['pattern']}"
        if "maxLength" in kind:
            return f"string of {kind.get('minLength', 0)} to {kind['maxLength']} characters"
        return "string"
    words = [kind["type"]]
    if "minimum" in kind:
        words.append(f"from {kind['minimum']}")
    if "exclusiveMinimum" in kind:
        words.append(f"above {kind['exclusiveMinimum']}")
    if "maximum" in kind:
        words.append(f"to {kind['maximum']}")
    if "multipleOf" in kind:
        words.append(f"in multiples of {kind['multipleOf']}")
    return " ".join(words)


def authenticate(request: Request, runtime) -> None:
    """Check the API key of `runtime.settings` (the runtime, or the jobs before the model has loaded)."""
    key = runtime.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        raise ClientFault(401, "unauthenticated", "missing or wrong API key; send `Authorization: Bearer <key>`",
                          headers={"WWW-Authenticate": "Bearer"})


class Uploads:
    """Bounds the request bodies being read: how many at once, how long each may take to arrive and how slowly, so
    clients that trickle bytes cannot hold connections, memory and /tmp, nor the upload slots for long."""

    def __init__(self):
        self.reading = 0

    async def read(self, request: Request, limit: int, settings) -> bytes:
        if self.reading >= settings.max_concurrent_uploads:
            metrics.REQUESTS_REJECTED.labels(reason="uploads_full").inc()
            raise ClientFault(503, "unavailable", f"{self.reading} request bodies are being received, the limit of "
                              f"max_concurrent_uploads={settings.max_concurrent_uploads}; retry shortly",
                              headers={"Retry-After": "1"})
        self.reading += 1
        try:
            return await read_body(request, limit, settings)
        finally:
            self.reading -= 1


class InFlight:
    """Requests that reached the app while the engine admitted work and whose response is not sent yet. Shutdown
    keeps the server accepting (and answering 503) until they are done, so their responses go out first."""

    def __init__(self):
        self.count = 0

    def wait_until_none(self, timeout: float) -> bool:
        """Block (off the event loop) until no such request is left or `timeout` passed."""
        end = time.monotonic() + timeout
        while self.count and time.monotonic() < end:
            time.sleep(0.05)
        return not self.count


class CountInFlight:
    """ASGI middleware feeding `InFlight`."""

    def __init__(self, app, in_flight: InFlight):
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope, receive, send) -> None:
        runtime = scope["app"].state.runtime if scope["type"] == "http" else None
        if runtime is None or not runtime.engine.ready:
            await self.app(scope, receive, send)
            return
        self.in_flight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.count -= 1


class LineBreakPaths:
    """ASGI middleware for the server's outer app (BentoML's), handing requests whose path holds a line break before
    its end straight to `target` (this transport's app). BentoML mounts the app with a Starlette `Mount`, whose
    pattern matches no such path, so they would otherwise get BentoML's plain-text 404 instead of the app's answer
    (for a job route: the 404 naming `job_id`)."""

    def __init__(self, app, target):
        self.app = app
        self.target = target

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and "\n" in scope["path"][:-1]:
            await self.target(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def read_body(request: Request, limit: int, settings) -> bytes:
    """The body, at most `limit` bytes, arriving within `body_read_timeout_s` and, after `body_rate_grace_s`, at
    `body_min_rate_bytes_s` on average; else a `ClientFault` naming the limit (413, 408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ClientFault(413, "payload_too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes")
    started = asyncio.get_running_loop().time()
    last_moment = started + settings.body_read_timeout_s
    chunks, size = [], 0
    stream = aiter(request.stream())
    while True:
        rate_deadline = started + settings.body_rate_grace_s + size / settings.body_min_rate_bytes_s
        try:
            async with asyncio.timeout_at(min(last_moment, rate_deadline)):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError as exc:
            if rate_deadline < last_moment:
                elapsed = asyncio.get_running_loop().time() - started
                raise ClientFault(408, "request_timeout", f"the request body arrived at {size / elapsed:.0f} bytes/s, "
                                  f"below the minimum of body_min_rate_bytes_s={settings.body_min_rate_bytes_s} after "
                                  f"body_rate_grace_s={settings.body_rate_grace_s:g} s") from exc
            raise ClientFault(408, "request_timeout", f"the request body did not arrive within the limit of "
                              f"body_read_timeout_s={settings.body_read_timeout_s:g} s") from exc
        size += len(chunk)
        if size > limit:
            raise ClientFault(413, "payload_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)


def parse_json_integer(text: str) -> int | float:
    return int(text) if len(text) <= MAX_NUMBER_DIGITS else float(text)


def parse_json(body: bytes) -> dict:
    """The JSON object of a request body; any malformed body is a `ClientFault` (400)."""
    try:
        document = json.loads(body, parse_int=parse_json_integer)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClientFault(400, "invalid_json", f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ClientFault(400, "invalid_json", "body nests arrays or objects too deeply to parse; a request is one "
                          "object of scalar fields (1 level)") from exc
    if not isinstance(document, dict):
        raise ClientFault(400, "invalid_json", "body must be a JSON object")
    return document


def decode_base64_image(text: str) -> bytes:
    """Standard base64, also wrapped in lines (the `base64` tool wraps at 76 columns) or as a `data:` URI."""
    match = DATA_URI.match(text)
    if match is None and text.startswith("data:"):
        raise InputError("image", "is a data URI that is not base64; send `data:<type>;base64,<data>`")
    payload = "".join(text[match.end() if match else 0:].split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError("image", f"is not valid base64 ({exc})") from exc


class FormParser(MultiPartParser):
    """Starlette's multipart parser, refusing an oversized or non-UTF-8 text part by its field name."""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > self.max_part_size:
            raise InputError(part.field_name, f"exceeds the limit of {self.max_part_size} bytes for a text field")
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                part.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(part.field_name, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        super().on_part_end()


async def parse_request(request: Request, runtime, json_model=GenerateJSON, form_model=GenerateParams):
    """The request's parameters (a `form_model`) and reference image bytes, from JSON (`json_model`) or multipart."""
    settings = runtime.settings
    uploads: Uploads = request.app.state.uploads
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await uploads.read(request, settings.max_upload_bytes * 4 // 3 + FORM_OVERHEAD, settings)
        payload = json_model.model_validate(parse_json(body))
        image = decode_base64_image(payload.image)
        return form_model.model_validate(payload.model_dump(exclude={"image"})), image
    if content_type == "multipart/form-data":
        body = await uploads.read(request, settings.max_upload_bytes + FORM_OVERHEAD, settings)

        async def stream():
            yield body

        try:
            form = await FormParser(
                request.headers, stream(), max_files=1, max_fields=32, max_part_size=FORM_OVERHEAD
            ).parse()
        except MultiPartException as exc:
            raise ClientFault(400, "invalid_multipart", f"multipart body is malformed: {exc.message}") from exc
        fields = {key: value for key, value in form.multi_items()}
        upload = fields.pop("image", None)
        if not isinstance(upload, UploadFile):
            raise InputError("image", "multipart upload needs a file part named `image`")
        image = await upload.read()
        return form_model.model_validate(fields), image
    raise ClientFault(415, "unsupported_media_type",
                      f"content type {content_type or 'none'!r} is not accepted; send application/json or multipart/form-data")


async def wait_watching_client(request: Request, submission) -> object:
    """The submission's result; the jobs are cancelled if the client disconnects first."""
    result = asyncio.ensure_future(submission.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_S)
            if done:
                return result.result()
            if await request.is_disconnected():
                submission.cancel()
                result.cancel()
                raise RequestCancelled(submission.request_id)
    except asyncio.CancelledError:
        submission.cancel()
        raise


def create_app(title: str = "DSD Serve") -> FastAPI:
    """The HTTP app. The runtime is attached later as `app.state.runtime` (it loads after the server starts)."""
    app = FastAPI(title=title, description=__doc__, docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.runtime = None
    app.state.uploads = Uploads()
    app.state.in_flight = InFlight()
    app.add_middleware(CountInFlight, in_flight=app.state.in_flight)

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses=error_responses(400, 401, 408, 413, 415, 422, 429, 500, 503, 504),
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"schema": GenerateJSON.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"image": {"type": "string", "format": "binary"},
                                           **GenerateParams.model_json_schema()["properties"]},
                            "required": ["image", "prompt"],
                        }
                    },
                },
                "required": True,
            }
        },
    )
    async def generate(request: Request):
        """Generate images of the reference's subject following the prompt (identity or structure mode)."""
        started = time.monotonic()
        request_id = ids.request_id(request.headers.get("x-request-id"))
        runtime = request.app.state.runtime
        mode = "unknown"
        try:
            if runtime is None or not runtime.engine.ready:
                raise ClientFault(503, "unavailable", "the model is loading or the server is draining",
                                  headers={"Retry-After": "5"})
            authenticate(request, runtime)
            params, image = await parse_request(request, runtime)
            mode = params.mode or "default"
            if wants_job(request):
                return await generate_as_job(request, runtime, params, image, request_id)
            submission = await runtime.submit(params, image, request_id=request_id)
            result = await wait_watching_client(request, submission)
        except Exception as exc:
            response, outcome = error_response(exc, request_id)
            metrics.REQUEST_DURATION.labels(transport="http", mode=mode, outcome=outcome).observe(
                time.monotonic() - started
            )
            return response
        metrics.REQUEST_DURATION.labels(transport="http", mode=mode, outcome="ok").observe(time.monotonic() - started)
        body = GenerateResponse(
            images=[base64.b64encode(data).decode("ascii") for data in result.images],
            format=params.output_format,
            seeds=result.seeds,
            mode=params.mode,
            adapter=submission.adapter,
            size=submission.size,
            profile=runtime.profile,
            request_id=request_id,
            timings=Timings(queue_s=result.queue_seconds, run_s=result.run_seconds, total_s=result.total_seconds),
            notice=runtime.notice,
            notices=submission.notices,
            enhanced_prompt=submission.enhanced_prompt,
            **result.identity_json(),
            provenance_id=submission.provenance_id,
        )
        return JSONResponse(body.model_dump(), headers={"X-Request-ID": request_id})

    @app.post(
        "/verify",
        responses=error_responses(401, 408, 413, 415, 422, 500, 503),
        openapi_extra={"requestBody": {"content": {f"image/{kind}": {"schema": {"type": "string", "format": "binary"}}
                                                   for kind in ("png", "jpeg", "webp")}, "required": True}},
    )
    async def verify(request: Request):
        """Read the provenance of an image: this service's invisible watermark and its C2PA Content Credentials.
        The body is the image itself (Content-Type image/png, image/jpeg or image/webp), read and decoded within
        the limits of `POST /generate`."""
        request_id = ids.request_id(request.headers.get("x-request-id"))
        try:
            runtime = ready_runtime(request)
            authenticate(request, runtime)
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type not in VERIFY_TYPES:
                raise ClientFault(415, "unsupported_media_type", f"content type {content_type or 'none'!r} is not "
                                  f"accepted; send the image itself as one of {', '.join(VERIFY_TYPES)}")
            uploads: Uploads = request.app.state.uploads
            image = await uploads.read(request, runtime.settings.max_upload_bytes, runtime.settings)
            report = await runtime.verify(image)
        except Exception as exc:
            return error_response(exc, request_id)[0]
        return JSONResponse(report, headers={"X-Request-ID": request_id})

    @app.get("/v1/adapters", response_model=AdapterList, responses={code: {"model": ErrorResponse} for code in
                                                                       (401, 503)})
    async def adapters(request: Request):
        """The adapters this server serves: those loaded at start and those of its adapter store (loaded on first
        use), with rank, size, the base transformer each was trained on, training metadata and the modes that
        select them. A request names one in `adapter`."""
        request_id = ids.request_id(request.headers.get("x-request-id"))
        try:
            runtime = ready_runtime(request)
            authenticate(request, runtime)
            entries = await asyncio.to_thread(runtime.adapters)
        except Exception as exc:
            return error_response(exc, request_id)[0]
        body = AdapterList(base_transformer_digest=runtime.pipe.adapters.base_digest,
                           default=runtime.pipe.default_adapter,
                           adapters=[AdapterEntry(**{k: v for k, v in vars(entry).items() if k != "path"})
                                     for entry in entries])
        return JSONResponse(body.model_dump(), headers={"X-Request-ID": request_id})

    add_job_routes(app)
    from .openai_api import add_openai_routes  # it builds on this module's parsers and error mapping

    add_openai_routes(app)
    return app


# ---------------------------------------------------------------------------------------------------- jobs

WATCH_TIMEOUT_S = 1.0
"""Longest wait for a job change before reading the job anyway: the change notices are best-effort (Redis pub/sub)."""
SSE_KEEPALIVE_S = 15.0
"""A comment line this often keeps proxies from closing a quiet stream."""
IMAGE_INDEX = re.compile(r"[0-9]{1,9}")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ERROR_STATUS = {"invalid_argument": 422, "content_policy": 422, "deadline_exceeded": 504, "cancelled": 499,
                "internal": 500}
"""HTTP status of `POST /generate` for a job that ended with a stored error of this code."""


def wants_job(request: Request) -> bool:
    """`Prefer: respond-async` (RFC 7240) or an `Idempotency-Key`: the request goes through the job queue."""
    prefer = {part.strip().lower() for part in request.headers.get("prefer", "").split(",")}
    return "respond-async" in prefer or "idempotency-key" in request.headers


def job_store(request: Request) -> job_queue.Jobs:
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise ClientFault(503, "unavailable", "jobs are not available yet; the server is starting",
                          headers={"Retry-After": "5"})
    return jobs


def ready_runtime(request: Request):
    runtime = request.app.state.runtime
    if runtime is None or not runtime.engine.ready:
        raise ClientFault(503, "unavailable", "the model is loading or the server is draining",
                          headers={"Retry-After": "5"})
    return runtime


async def submit_job(request: Request, runtime, spec: job_queue.JobSpec, image: bytes) -> JSONResponse:
    jobs = job_store(request)
    job_id, created = await jobs.submit(runtime, spec, image, request.headers.get("idempotency-key"),
                                        job_queue.caller_of(request.headers.get("authorization")))
    view = await jobs.view(job_id)
    headers = {"Location": view["links"]["self"], "X-Request-ID": job_id}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(view, status_code=202, headers=headers)


async def generate_as_job(request: Request, runtime, params: GenerateParams, image: bytes, request_id: str):
    """`POST /generate` through the queue: 202 with the job for `Prefer: respond-async`; otherwise (an
    Idempotency-Key alone) wait for the job, so a repeated key answers with the first request's result."""
    spec = job_queue.JobSpec(params)
    prefer = {part.strip().lower() for part in request.headers.get("prefer", "").split(",")}
    if "respond-async" in prefer:
        return await submit_job(request, runtime, spec, image)
    jobs = job_store(request)
    job_id, _ = await jobs.submit(runtime, spec, image, request.headers.get("idempotency-key"),
                                  job_queue.caller_of(request.headers.get("authorization")))
    async with jobs.watch(job_id) as changed:
        while (view := await jobs.view(job_id))["status"] not in job_queue.TERMINAL:
            if await request.is_disconnected():
                raise RequestCancelled(request_id)
            await changed(WATCH_TIMEOUT_S)
    if view["status"] != "succeeded":
        error = view["error"] or job_queue.cancelled_error()
        raise ClientFault(ERROR_STATUS.get(error["code"], 500), error["code"], error["message"], error["field"])
    result = view["result"]
    images = await jobs.images(view)
    body = GenerateResponse(
        images=[base64.b64encode(data).decode("ascii") for data in images],
        format=result["format"], seeds=result["seeds"], mode=result["mode"], adapter=result.get("adapter"),
        size=result["size"],
        profile=result["profile"], request_id=job_id, timings=Timings(**result["timings"]), notice=result["notice"],
        notices=result.get("notices", []), identity=result.get("identity"), candidates=result.get("candidates"),
        provenance_id=result.get("provenance_id"),
    )
    return JSONResponse(body.model_dump(), headers={"X-Request-ID": job_id})


def job_route(handler):
    """Authentication, the check of the path's job id and the error mapping around a job route. Once the id is
    checked, an error names the job by its id as request id."""

    @functools.wraps(handler)
    async def route(request: Request, **path):
        request_id = ids.request_id(request.headers.get("x-request-id"))
        try:
            authenticate(request, job_store(request))
            if "job_id" in path:
                request_id = ids.check_job_id(path["job_id"])
            return await handler(request, **path)
        except Exception as exc:
            return error_response(exc, request_id)[0]

    return route


def add_job_routes(app: FastAPI) -> None:
    """Asynchronous jobs: submit, status, progress stream, cancel, result images."""
    read = (401, 404, 410, 500, 503)

    @app.post("/v1/jobs", status_code=202, responses=error_responses(400, 401, 408, 413, 415, 422, 429, 500, 503),
              openapi_extra={"requestBody": {"content": {"application/json": {"schema": JobJSON.model_json_schema()}},
                                             "required": True}})
    @job_route
    async def create_job(request: Request):
        """Queue a generation (the body of `POST /generate`, JSON or multipart, plus `webhook` and
        `webhook_events`); answers 202 with the job's id and links. An `Idempotency-Key` header returns the job of
        an earlier identical request instead of queueing another."""
        runtime = ready_runtime(request)
        params, image = await parse_request(request, runtime, JobJSON, JobParams)
        generation = GenerateParams.model_validate(params.model_dump(exclude={"webhook", "webhook_events"}))
        events = params.webhook_events if params.webhook_events is not None else list(webhooks.EVENTS)
        return await submit_job(request, runtime, job_queue.JobSpec(generation, params.webhook, events), image)

    @app.get("/v1/jobs/{job_id}", responses=error_responses(*read))
    @job_route
    async def get_job(request: Request, job_id: str):
        """The job's status (queued, running, succeeded, failed, canceled), queue position, step i of N, times,
        error (with the field at fault) and result links."""
        return JSONResponse(await job_store(request).view(job_id))

    @app.get("/v1/jobs/{job_id}/events", responses=error_responses(*read), response_class=StreamingResponse)
    @job_route
    async def job_events(request: Request, job_id: str):
        """Server-Sent Events: a `status` event (the body of GET /v1/jobs/{id}) whenever the status, position or
        step changes; the stream ends after the final status."""
        jobs = job_store(request)
        await jobs.view(job_id)

        async def stream():
            last, quiet = None, time.monotonic()
            async with jobs.watch(job_id) as changed:
                while True:
                    view = await jobs.view(job_id)
                    key = (view["status"], view["position"], view["progress"]["step"])
                    if key != last:
                        last, quiet = key, time.monotonic()
                        yield f"event: status\ndata: {json.dumps(view)}\n\n"
                    elif time.monotonic() - quiet > SSE_KEEPALIVE_S:
                        quiet = time.monotonic()
                        yield ": keep-alive\n\n"
                    if view["status"] in job_queue.TERMINAL:
                        return
                    await changed(WATCH_TIMEOUT_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, responses=error_responses(*read, 409))
    @job_route
    async def cancel_job(request: Request, job_id: str):
        """Cancel a queued job at once, or a running one at its next denoising step; 409 when it already ended."""
        return JSONResponse(await job_store(request).cancel(job_id), status_code=202)

    @app.get("/v1/jobs/{job_id}/images/{index}", responses=error_responses(*read, 409, 422), response_class=Response)
    @job_route
    async def job_image(request: Request, job_id: str, index: str):
        """Result image `index` (0-based) as raw bytes, with the job's output format as content type."""
        if not IMAGE_INDEX.fullmatch(index):
            raise InputError("index", f"{ids.quoted(index)} is not an image index (0, 1, ...)")
        jobs = job_store(request)
        view = await jobs.view(job_id)
        count = len(jobs.result_of(view)["images"])
        if int(index) >= count:
            raise ClientFault(404, "not_found", f"image {index} does not exist; the job has {count}", field="index")
        data = await jobs.call("image", job_id, int(index))
        return Response(data, media_type=MEDIA_TYPES[view["result"]["format"]])
