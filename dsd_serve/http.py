"""The HTTP transport: `POST /generate` (JSON with a base64 image, or a multipart upload).

Thin by design: read the body within its limit, authenticate, validate, submit to the runtime, wait while watching
for the client going away, encode. Every failure goes through `error_response`, the one mapping of this transport.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from dsd_model import metrics
from dsd_model.errors import DeadlineExceeded, Draining, InputError, QueueFull, RequestCancelled

from .schemas import ErrorResponse, GenerateJSON, GenerateParams, GenerateResponse, Timings

logger = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
DISCONNECT_POLL_S = 0.25
FORM_OVERHEAD = 64 * 1024
"""Room for the other fields and multipart boundaries beside the image."""


class ClientFault(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers=None):
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers
        super().__init__(message)


def error_response(exc: BaseException, request_id: str) -> tuple[JSONResponse, str]:
    """The response and the metrics outcome for any failure of a request."""
    headers = {"X-Request-ID": request_id}
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
    else:
        logger.error("request %s failed", request_id, exc_info=exc)
        status, code, field, outcome = 500, "internal", None, "error"
        message = f"internal error; quote request id {request_id} when reporting it"
    body = ErrorResponse(error=dict(code=code, message=message, field=field, request_id=request_id))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers), outcome


def authenticate(request: Request, runtime) -> None:
    key = runtime.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        raise ClientFault(401, "unauthenticated", "missing or wrong API key; send `Authorization: Bearer <key>`",
                          headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ClientFault(413, "payload_too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientFault(413, "payload_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request: Request, runtime) -> tuple[GenerateParams, bytes]:
    upload_limit = runtime.settings.max_upload_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await read_body(request, upload_limit * 4 // 3 + FORM_OVERHEAD)
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ClientFault(400, "invalid_json", f"body is not valid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise ClientFault(400, "invalid_json", "body must be a JSON object")
        payload = GenerateJSON.model_validate(document)
        try:
            image = base64.b64decode(payload.image, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError("image", f"is not valid base64 ({exc})") from exc
        return GenerateParams.model_validate(payload.model_dump(exclude={"image"})), image
    if content_type == "multipart/form-data":
        body = await read_body(request, upload_limit + FORM_OVERHEAD)

        async def stream():
            yield body

        try:
            form = await MultiPartParser(
                request.headers, stream(), max_files=1, max_fields=32, max_part_size=FORM_OVERHEAD
            ).parse()
        except MultiPartException as exc:
            raise ClientFault(400, "invalid_multipart", f"multipart body is malformed: {exc.message}") from exc
        fields = {key: value for key, value in form.multi_items()}
        upload = fields.pop("image", None)
        if not isinstance(upload, UploadFile):
            raise InputError("image", "multipart upload needs a file part named `image`")
        image = await upload.read()
        return GenerateParams.model_validate(fields), image
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

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses={code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 429, 500, 503, 504)},
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
        supplied = request.headers.get("x-request-id", "")
        request_id = supplied if REQUEST_ID.match(supplied) else uuid.uuid4().hex
        runtime = request.app.state.runtime
        mode = "unknown"
        try:
            if runtime is None or not runtime.engine.ready:
                raise ClientFault(503, "unavailable", "the model is loading or the server is draining",
                                  headers={"Retry-After": "5"})
            authenticate(request, runtime)
            params, image = await parse_request(request, runtime)
            mode = params.mode
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
            size=submission.size,
            profile=runtime.profile,
            request_id=request_id,
            timings=Timings(queue_s=result.queue_seconds, run_s=result.run_seconds, total_s=result.total_seconds),
            notice=runtime.notice,
            notices=submission.notices,
        )
        return JSONResponse(body.model_dump(), headers={"X-Request-ID": request_id})

    return app
