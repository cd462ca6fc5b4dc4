"""Conversion between the dsd.v1 proto messages and the internal types: the one module that knows both.

Requests become `GenerateParams`, the model HTTP validates with, so both transports accept the same values and name
the same field and limit when refusing one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf import empty_pb2, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from .grpc_stubs import dsd_pb2 as pb
from .schemas import GenerateParams

if TYPE_CHECKING:
    from dsd_model.serving.adapter_store import AdapterInfo
    from dsd_model.serving.engine import Event

    from .runtime import GenerationResult, Runtime, Submission

MODES = {pb.MODE_IDENTITY: "identity", pb.MODE_STRUCTURE: "structure"}
FORMATS = {pb.OUTPUT_FORMAT_PNG: "png", pb.OUTPUT_FORMAT_JPEG: "jpeg", pb.OUTPUT_FORMAT_WEBP: "webp"}
MODE_VALUES = {name: value for value, name in MODES.items()}
FORMAT_VALUES = {name: value for value, name in FORMATS.items()}
OPTIONAL_FIELDS = ("steps", "guidance", "image_guidance", "text_guidance", "seed", "size", "num_images", "consent",
                   "exact", "enhance_prompt", "priority", "identity", "best_of")
"""Fields whose absence means the default; the others default when they hold proto3's zero value."""


def to_params(request: pb.GenerateRequest, time_remaining: float | None, max_deadline_s: float) -> GenerateParams:
    """The request's parameters; the call's remaining time, capped at `max_deadline_s`, becomes the deadline.
    Raises pydantic's `ValidationError` naming the field and the limit. An enum value this server does not know is
    passed on as its number, so validation names the accepted values."""
    fields = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    fields.update({name: getattr(request, name) for name in OPTIONAL_FIELDS if request.HasField(name)})
    if request.mode != pb.MODE_UNSPECIFIED:
        fields["mode"] = MODES.get(request.mode, request.mode)
    if request.output_format != pb.OUTPUT_FORMAT_UNSPECIFIED:
        fields["output_format"] = FORMATS.get(request.output_format, request.output_format)
    if request.background:
        fields["background"] = request.background
    if request.adapter:
        fields["adapter"] = request.adapter
    if time_remaining is not None:
        fields["deadline_s"] = min(time_remaining, max_deadline_s)
    return GenerateParams.model_validate(fields)


def invalid_utf8_field(data: bytes, descriptor: Descriptor) -> str | None:
    """The dotted name of the first string field of a serialized `descriptor` message whose value is not UTF-8 (which
    proto3 requires, so that parsing refuses the whole message without naming the field), or None."""
    for field in unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(data)):
        known = descriptor.fields_by_number.get(field.field_number)
        if known is None or field.wire_type != 2:
            continue
        if known.type == FieldDescriptor.TYPE_STRING:
            try:
                field.data.decode("utf-8")
            except UnicodeDecodeError:
                return known.name
        elif known.type == FieldDescriptor.TYPE_MESSAGE:
            inner = invalid_utf8_field(field.data, known.message_type)
            if inner is not None:
                return f"{known.name}.{inner}"
    return None


NOT_GENERATING = (pb.SubmitJobRequest, pb.JobRef, pb.ListAdaptersRequest)
"""Request messages of the rpcs that queue or read jobs or list adapters rather than generate, so their latency is no
request latency."""


def mode_label(request: pb.GenerateRequest) -> str:
    """The request's mode for metrics labels: `default` when it names none, `unknown` when it is not one of ours."""
    if request.mode == pb.MODE_UNSPECIFIED:
        return "default"
    return MODES.get(request.mode, "unknown")


def to_response(result: GenerationResult, submission: Submission, runtime: Runtime) -> pb.GenerateResponse:
    params = submission.params
    return pb.GenerateResponse(
        images=result.images,
        format=FORMAT_VALUES[params.output_format],
        seeds=result.seeds,
        mode=MODE_VALUES.get(params.mode, pb.MODE_UNSPECIFIED),
        size=submission.size,
        profile=runtime.profile,
        request_id=submission.request_id,
        timings=pb.Timings(queue_s=result.queue_seconds, run_s=result.run_seconds, total_s=result.total_seconds),
        notice=runtime.notice or "",
        notices=submission.notices,
        enhanced_prompt=submission.enhanced_prompt or "", provenance_id=submission.provenance_id,
        adapter=submission.adapter or "",
        **identity_fields(result.identity_json()),
    )


def identity_fields(scores: dict) -> dict:
    """`identity` and `candidates` of a response from their JSON values (`GenerationResult.identity_json`, or a job
    result)."""

    def score(value: dict) -> pb.IdentityScore:
        return pb.IdentityScore(**{key: item for key, item in value.items() if item is not None})

    return {"identity": [score(value) for value in scores.get("identity") or []],
            "candidates": [pb.BestOfCandidate(seed=c["seed"], identity=score(c["identity"]), returned=c["returned"])
                           for c in scores.get("candidates") or []]}


def to_result_event(result: GenerationResult, submission: Submission, runtime: Runtime) -> pb.GenerateEvent:
    return pb.GenerateEvent(result=to_response(result, submission, runtime))


def to_event(image_index: int, event: Event) -> pb.GenerateEvent | None:
    """The stream message for an engine event; None for the events the stream does not carry (`started`, `done`:
    the result follows; `failed`: the status follows)."""
    if event.kind == "queued":
        return pb.GenerateEvent(queued=pb.Queued(image_index=image_index, position=event.position))
    if event.kind == "step":
        return pb.GenerateEvent(step=pb.Step(image_index=image_index, step=event.step, total=event.total))
    return None


JOB_STATES = {"queued": pb.JOB_STATE_QUEUED, "running": pb.JOB_STATE_RUNNING, "succeeded": pb.JOB_STATE_SUCCEEDED,
              "failed": pb.JOB_STATE_FAILED, "canceled": pb.JOB_STATE_CANCELED}


def to_job(view: dict, images: list[bytes] | None = None) -> pb.Job:
    """A job's status document (`jobs.job_view`) as a message; the result is set when `images` are given."""
    job = pb.Job(
        id=view["id"], state=JOB_STATES[view["status"]], position=view["position"] or 0,
        step=view["progress"]["step"], total=view["progress"]["total"], attempts=view["attempts"],
        created_at=view["created_at"], started_at=view["started_at"] or 0, finished_at=view["finished_at"] or 0,
        expires_at=view["expires_at"],
    )
    if view["error"] is not None:
        job.error.CopyFrom(pb.JobError(code=view["error"]["code"], message=view["error"]["message"],
                                       field=view["error"]["field"] or ""))
    if images is not None:
        result = view["result"]
        job.result.CopyFrom(pb.GenerateResponse(
            images=images, format=FORMAT_VALUES[result["format"]], seeds=result["seeds"],
            mode=MODE_VALUES.get(result["mode"], pb.MODE_UNSPECIFIED), size=result["size"], profile=result["profile"],
            request_id=view["id"], timings=pb.Timings(**result["timings"]), notice=result["notice"] or "",
            notices=result.get("notices", []), provenance_id=result.get("provenance_id") or "",
            adapter=result.get("adapter") or "", **identity_fields(result),
        ))
    return job


def to_adapters(runtime: Runtime, entries: list[AdapterInfo]) -> pb.ListAdaptersResponse:
    return pb.ListAdaptersResponse(
        base_transformer_digest=runtime.pipe.adapters.base_digest,
        default_adapter=runtime.pipe.default_adapter or "",
        adapters=[pb.Adapter(name=e.name, source=e.source, loaded=e.loaded, rank=e.rank or 0, size_bytes=e.size_bytes,
                             digest=e.digest or "", base_transformer_digest=e.base_transformer_digest or "",
                             modes=e.modes, metadata=e.metadata) for e in entries],
    )
