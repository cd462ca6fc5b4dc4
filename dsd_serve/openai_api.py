"""The OpenAI Images API, so backends written for OpenAI's SDKs, or gateways that speak the API, switch by changing
`base_url`:

    POST /v1/images/edits         multipart (`image` or `image[]`: one file) or JSON (`images: [{image_url: "data:…"}]`)
                                  → {created, data: [{b64_json | url, revised_prompt, seed}], output_format, size, usage};
                                  `stream=true`: Server-Sent Events image_edit.partial_image …, image_edit.completed
    GET  /v1/images/{id}/content  the image behind a signed URL (`image_urls`)
    GET  /v1/models[/{model}]     the models this replica serves: modes and adapters
    POST /v1/images/generations   400: DSD needs a reference image, use /v1/images/edits

A second face of `Runtime.submit`, as thin as the gRPC servicer: OpenAI's fields become `GenerateParams` (our own
knobs arrive as extra fields, what the SDK's `extra_body` sends), and every failure goes through the HTTP transport's
one mapping, `http.error_response`, whose result `openai_error` restates in OpenAI's shape
`{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from dsd_model import InputError, limits
from dsd_model.serving import metrics

from .http import (
    FORM_OVERHEAD, ClientFault, FormParser, authenticate, decode_base64_image, error_response, parse_json,
    ready_runtime, wait_watching_client,
)
from . import ids
from .image_urls import ImageURLs
from .schemas import GenerateParams, Mode

if TYPE_CHECKING:
    from .runtime import Runtime, Submission

logger = logging.getLogger(__name__)

KNOBS = ("prompt", "output_format", "seed", "steps", "guidance", "image_guidance", "text_guidance", "negative_prompt",
         "exact", "enhance_prompt", "consent", "identity", "best_of", "priority")
"""Fields passed to `GenerateParams` as they are: OpenAI's `prompt` and `output_format`, and our own knobs."""
MAX_FILES = 16
"""File parts read from one multipart edit: OpenAI's own limit of references, so that more than one is answered with
the field at fault rather than a malformed body."""
IMAGE_FIELDS = ("image", "image[]")
OWNER = "dsd-serve"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 429: "rate_limit_error"}
"""OpenAI's error type per status; other 4xx are `invalid_request_error`, 5xx `server_error`."""
PARAMS = {"num_images": "n", "mode": "model"}
"""`GenerateParams` fields that OpenAI's API names otherwise."""


class EditOptions(BaseModel):
    """OpenAI's fields of an edit that are not `GenerateParams` fields."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: str | None = Field(None, description="`dsd-identity`, `dsd-structure` or an adapter this server serves "
                              "(GET /v1/models); absent: the default adapter")
    n: Annotated[int, Field(ge=1, le=16)] = 1
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = Field(
        None, description="JPEG/WebP quality, 0-100; absent: the service's default (95)")
    background: Literal["transparent", "opaque", "auto"] = "auto"
    quality: Literal["auto"] = "auto"
    user: Annotated[str, Field(max_length=256)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    stream: bool = False
    partial_images: Annotated[int, Field(ge=0, le=3)] = 0


ACCEPTED = sorted({*KNOBS, *EditOptions.model_fields, "size"})
FIELDS_SCHEMA = {
    **{name: GenerateParams.model_json_schema()["properties"][name] for name in KNOBS},
    "size": {"type": "string", "description": "`<S>x<S>`, S from 64 to 1024 in steps of 16, or auto",
             "default": "auto"},
    **EditOptions.model_json_schema()["properties"],
}
EDIT_BODY = {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "prompt"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "the reference (also as `image[]`)"},
        **FIELDS_SCHEMA}}},
    "application/json": {"schema": {"type": "object", "required": ["images", "prompt"], "properties": {
        "images": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["image_url"],
            "properties": {"image_url": {"type": "string", "description": "data:<type>;base64,<data>"}}}},
        **FIELDS_SCHEMA}}},
}, "required": True}
"""The OpenAPI request body of an edit."""


@dataclass
class Edit:
    params: GenerateParams
    options: EditOptions
    image: bytes

    @property
    def preview_steps(self) -> tuple[int, ...]:
        """`partial_images` evenly spaced steps: after each (k + 1)-th of the schedule, fewer when steps < k + 1."""
        steps, count = self.params.steps, self.options.partial_images
        return tuple(sorted({max(1, i * steps // (count + 1)) for i in range(1, count + 1)}))


def openai_error(exc: BaseException, request_id: str, params: dict[str, str] = PARAMS) -> tuple[JSONResponse, str]:
    """`http.error_response` restated in OpenAI's shape: the field becomes `param` (OpenAI's name for it), and a
    refused value is 400, as OpenAI answers it (422 elsewhere in this service); other statuses and headers stay."""
    response, outcome = error_response(exc, request_id)
    error = json.loads(response.body)["error"]
    status = 400 if response.status_code == 422 else response.status_code
    field, message = error["field"], error["message"]
    param = params.get(field, field)
    if param != field and message.startswith(f"{field}:"):
        message = f"{param}:{message.removeprefix(f'{field}:')}"
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    headers = {name: value for name, value in response.headers.items()
               if name not in ("content-length", "content-type")}
    body = {"error": {"message": message, "type": kind, "param": param, "code": error["code"]}}
    return JSONResponse(body, status_code=status, headers=headers), outcome


def served_models(runtime: Runtime) -> dict[str, dict]:
    """Each model name this replica serves → the `GenerateParams` fields that select it: `dsd-<mode>` for each mode
    served, and every adapter under its own name (those loaded at start and the adapter store's, `adapter`)."""
    from dsd_model.loading import adapter_for_mode

    names = runtime.adapter_store.names()
    models: dict[str, dict] = {}
    for mode in get_args(Mode):
        try:
            adapter_for_mode(runtime.pipe, mode, names)
        except InputError:
            continue
        models[f"dsd-{mode}"] = {"mode": mode}
    for name in names:
        models.setdefault(name, {"adapter": name})
    return models


def model_fields(runtime: Runtime, model: str | None) -> dict:
    if model is None:
        return {}
    models = served_models(runtime)
    if model not in models:
        raise ClientFault(404, "model_not_found", f"the model {model!r} does not exist on this server; served: "
                          f"{', '.join(models)} (GET /v1/models)", field="model")
    return models[model]


def parse_size(value) -> int | None:
    """`"<S>x<S>"` → S; `auto` or absent → None (the server default)."""
    if value is None or value == "auto":
        return None
    width, _, height = str(value).partition("x")
    if not (width.isdigit() and width == height and int(width) % limits.SIZE_MULTIPLE == 0
            and limits.MIN_SIZE <= int(width) <= limits.MAX_SIZE):
        raise InputError("size", f"{value!r} is not supported; supported: square sizes from "
                         f"{limits.MIN_SIZE}x{limits.MIN_SIZE} to {limits.MAX_SIZE}x{limits.MAX_SIZE} in steps of "
                         f"{limits.SIZE_MULTIPLE} (e.g. 512x512, the official size), or auto")
    return int(width)


def to_edit(fields: dict, image: bytes, runtime: Runtime) -> Edit:
    """OpenAI's fields (strings from a form, JSON values otherwise) as `GenerateParams` and `EditOptions`."""
    unknown = sorted(set(fields) - set(ACCEPTED))
    if unknown:
        raise InputError(unknown[0], f"is not a field of this API; accepted: {', '.join(ACCEPTED)}")
    options = EditOptions.model_validate({name: fields[name] for name in EditOptions.model_fields if name in fields})
    if options.background == "transparent":
        raise InputError("background", "'transparent' is not supported: DSD generates opaque images; send opaque "
                         "or auto")
    if options.stream and options.n > 1:
        raise InputError("n", f"{options.n} images cannot be streamed; a stream carries one image, send n=1")
    if options.stream and fields.get("best_of") not in (None, "", "1", 1):
        raise InputError("best_of", "best-of candidates cannot be streamed; a stream carries one image's partials")
    if options.stream and options.response_format == "url":
        raise InputError("response_format", "a stream carries its images as b64_json; send b64_json or no stream")
    if options.partial_images and not options.stream:
        raise InputError("partial_images", "partial images are streamed; send stream=true with them")
    params = GenerateParams.model_validate({
        **{name: fields[name] for name in KNOBS if name in fields},
        "num_images": options.n,
        "size": parse_size(fields.get("size")),
        **model_fields(runtime, options.model),
    })
    return Edit(params, options, image)


def json_reference(images) -> bytes:
    """The one reference of the JSON variant, `images: [{"image_url": "data:<type>;base64,…"}]`."""
    if not isinstance(images, list) or len(images) != 1:
        count = len(images) if isinstance(images, list) else 0
        raise InputError("images", f"{count} references given; this model takes exactly one, as "
                         '[{"image_url": "data:<type>;base64,<data>"}]')
    url = images[0].get("image_url") if isinstance(images[0], dict) else None
    if not isinstance(url, str):
        raise InputError("images", 'each reference must be {"image_url": "data:<type>;base64,<data>"}')
    if not url.startswith("data:"):
        raise InputError("images", "only data: URIs are accepted; this server fetches no URLs, so send the image as "
                         "data:<type>;base64,<data> or upload it as multipart `image`")
    return decode_base64_image(url)


async def read_edit(request: Request, runtime: Runtime) -> Edit:
    """The edit of a JSON or multipart body, read within the upload limits as `POST /generate` reads its own."""
    settings, uploads = runtime.settings, request.app.state.uploads
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        fields = parse_json(await uploads.read(request, settings.max_upload_bytes * 4 // 3 + FORM_OVERHEAD, settings))
        return to_edit(fields, json_reference(fields.pop("images", None)), runtime)
    if content_type != "multipart/form-data":
        raise ClientFault(415, "unsupported_media_type", f"content type {content_type or 'none'!r} is not accepted; "
                          "send multipart/form-data or application/json")
    body = await uploads.read(request, settings.max_upload_bytes + FORM_OVERHEAD, settings)

    async def stream():
        yield body

    try:
        form = await FormParser(request.headers, stream(), max_files=MAX_FILES, max_fields=32,
                                max_part_size=FORM_OVERHEAD).parse()
    except MultiPartException as exc:
        raise ClientFault(400, "invalid_multipart", f"multipart body is malformed: {exc.message}") from exc
    files = [(name, value) for name, value in form.multi_items() if isinstance(value, UploadFile)]
    for name, _ in files:
        if name not in IMAGE_FIELDS:
            raise InputError(name, "is not a file field of this API; send the reference as `image`")
    if len(files) != 1:
        raise InputError("image", f"{len(files)} references given; this model takes exactly one")
    fields = {name: value for name, value in form.multi_items() if not isinstance(value, UploadFile)}
    return to_edit(fields, await files[0][1].read(), runtime)


def usage(submission: Submission) -> dict:
    """What the request cost, in the units the engine spends: denoising steps, and transformer rows over those steps
    (three per step while true CFG runs)."""
    requests = [job.request for job in submission.jobs]
    return {"images": len(requests), "steps": sum(r.num_inference_steps for r in requests),
            "rows": sum(r.rows_at(step) for r in requests for step in range(r.num_inference_steps))}


def event(kind: str, payload: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n"


def stream_edit(submission: Submission, edit: Edit, request_id: str, started: float) -> StreamingResponse:
    """Partial images as the engine decodes them, then the final image, as OpenAI's events. A failure after the
    stream began is an `error` event (the SDK raises it); a client that goes away cancels the request."""
    size = f"{submission.size}x{submission.size}"
    common = {"size": size, "background": "opaque", "output_format": edit.params.output_format}
    mode = edit.params.mode or "default"

    async def events():
        outcome, finished = "ok", False
        try:
            index = 0
            async for _, progress in submission.events():
                if progress.kind == "partial":
                    data = await asyncio.to_thread(submission.finish, progress.image)
                    yield event("image_edit.partial_image", {
                        "b64_json": base64.b64encode(data).decode("ascii"), "created_at": int(time.time()),
                        "partial_image_index": index, **common})
                    index += 1
            result = await submission.result()
            finished = True
            scores = result.identity_json()["identity"] or [None] * len(result.images)
            for data, score in zip(result.images, scores):
                yield event("image_edit.completed", {
                    "b64_json": base64.b64encode(data).decode("ascii"), "created_at": int(time.time()),
                    "usage": usage(submission), "revised_prompt": submission.enhanced_prompt, **common,
                    **({"identity": score} if score is not None else {})})
        except Exception as exc:
            finished = True
            response, outcome = openai_error(exc, request_id)
            yield event("error", json.loads(response.body))
        finally:
            if not finished:
                submission.cancel()
                outcome = "cancelled"
            metrics.REQUEST_DURATION.labels(transport="openai", mode=mode, outcome=outcome).observe(
                time.monotonic() - started)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      "X-Request-ID": request_id})


def image_urls(request: Request) -> ImageURLs:
    urls = getattr(request.app.state, "image_urls", None)
    if urls is None:
        raise ClientFault(503, "unavailable", "image URLs are not available yet; the server is starting",
                          headers={"Retry-After": "5"})
    return urls


async def images_body(request: Request, submission: Submission, edit: Edit, result) -> dict:
    if edit.options.response_format == "url":
        urls = image_urls(request)
        outputs = [{"url": await asyncio.to_thread(urls.publish, data, edit.params.output_format,
                                                   str(request.base_url))} for data in result.images]
    else:
        outputs = [{"b64_json": base64.b64encode(data).decode("ascii")} for data in result.images]
    scores = result.identity_json()
    identity = scores["identity"] or [None] * len(outputs)
    body = {
        "created": int(time.time()),
        "data": [{**output, "revised_prompt": submission.enhanced_prompt, "seed": seed,
                  **({"identity": score} if score is not None else {})}
                 for output, seed, score in zip(outputs, result.seeds, identity)],
        "background": "opaque",
        "output_format": edit.params.output_format,
        "size": f"{submission.size}x{submission.size}",
        "usage": usage(submission),
    }
    if scores["candidates"] is not None:
        body["candidates"] = scores["candidates"]
    return body


def request_id_of(request: Request) -> str:
    return ids.request_id(request.headers.get("x-request-id"))


def add_openai_routes(app: FastAPI) -> None:
    """The OpenAI Images API routes (see the module docstring)."""
    created = int(time.time())
    app.state.image_urls = None
    errors = {code: {"description": "OpenAI error shape: {error: {message, type, param, code}}"}
              for code in (400, 401, 404, 408, 413, 415, 429, 500, 503, 504)}

    @app.post("/v1/images/edits", responses=errors, tags=["OpenAI"], openapi_extra={"requestBody": EDIT_BODY})
    async def edits(request: Request):
        """OpenAI's image edit: the reference as multipart `image` (or `image[]`, one file) or JSON `images`, a
        `prompt`, and OpenAI's fields; this service's knobs (seed, steps, guidance, image_guidance, text_guidance,
        negative_prompt, exact, enhance_prompt, consent) as extra fields. See docs/openai.md."""
        started = time.monotonic()
        request_id = request_id_of(request)
        mode, names = "unknown", PARAMS
        try:
            runtime = ready_runtime(request)
            authenticate(request, runtime)
            if request.headers.get("content-type", "").lower().startswith("application/json"):
                names = {**PARAMS, "image": "images"}
            edit = await read_edit(request, runtime)
            mode = edit.params.mode or "default"
            submission = await runtime.submit(edit.params, edit.image, request_id=request_id,
                                              preview_steps=edit.preview_steps,
                                              output_quality=edit.options.output_compression)
            if edit.options.stream:
                return stream_edit(submission, edit, request_id, started)
            result = await wait_watching_client(request, submission)
            body = await images_body(request, submission, edit, result)
        except Exception as exc:
            response, outcome = openai_error(exc, request_id, names)
            metrics.REQUEST_DURATION.labels(transport="openai", mode=mode, outcome=outcome).observe(
                time.monotonic() - started)
            return response
        metrics.REQUEST_DURATION.labels(transport="openai", mode=mode, outcome="ok").observe(time.monotonic() - started)
        return JSONResponse(body, headers={"X-Request-ID": request_id})

    @app.post("/v1/images/generations", responses=errors, tags=["OpenAI"])
    async def generations(request: Request):
        """Not served: DSD generates from a reference image. Answers 400 pointing to /v1/images/edits."""
        request_id = request_id_of(request)
        try:
            authenticate(request, ready_runtime(request))
            raise ClientFault(400, "reference_required", "DSD generates from a reference image and a prompt, so it "
                              "serves no text-only generations; POST /v1/images/edits with the reference as `image` "
                              "(multipart) or `images` (JSON)", field="image")
        except Exception as exc:
            return openai_error(exc, request_id)[0]

    @app.get("/v1/images/{image_id}/content", response_class=Response, tags=["OpenAI"],
             responses={code: errors.get(code, {"description": "OpenAI error shape"}) for code in (403, 404, 410, 503)})
    async def image_content(request: Request, image_id: str, expires: str = "", signature: str = ""):
        """The image behind a signed URL of a `response_format=url` edit; the URL is its own credential."""
        try:
            data, media_type = await asyncio.to_thread(image_urls(request).open, image_id, expires, signature)
        except Exception as exc:
            return openai_error(exc, request_id_of(request))[0]
        lifetime = max(0, int(expires) - int(time.time()))
        return Response(data, media_type=media_type, headers={"Cache-Control": f"private, max-age={lifetime}"})

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": OWNER}

    @app.get("/v1/models", responses=errors, tags=["OpenAI"])
    async def models(request: Request):
        """The models this replica serves, in OpenAI's list shape: `dsd-identity`, `dsd-structure` and the adapters."""
        try:
            runtime = ready_runtime(request)
            authenticate(request, runtime)
        except Exception as exc:
            return openai_error(exc, request_id_of(request))[0]
        return JSONResponse({"object": "list", "data": [model_card(name) for name in served_models(runtime)]})

    @app.get("/v1/models/{model}", responses=errors, tags=["OpenAI"])
    async def model(request: Request, model: str):
        """One model of `GET /v1/models`; 404 `model_not_found` for another name."""
        try:
            runtime = ready_runtime(request)
            authenticate(request, runtime)
            model_fields(runtime, model)
        except Exception as exc:
            return openai_error(exc, request_id_of(request))[0]
        return JSONResponse(model_card(model))
