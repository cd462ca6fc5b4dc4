"""The generation request and response of every transport, with their bounds in the types."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from dsd_model import limits

Mode = Literal["identity", "structure"]
OutputFormat = Literal["png", "jpeg", "webp"]


class GenerateParams(BaseModel):
    """Everything but the reference image. Unknown fields are refused by name."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Annotated[str, Field(min_length=1, max_length=limits.MAX_PROMPT_CHARS)]
    negative_prompt: Annotated[str, Field(max_length=limits.MAX_PROMPT_CHARS)] = ""
    mode: Mode | None = Field(None, description="selects the adapter (DSD_MODE_ADAPTERS); absent: the default adapter")
    adapter: Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")] | None = Field(
        None, description="the adapter to generate with, by name: one of `GET /v1/adapters` (the server's adapters and "
        "its adapter store's); instead of `mode`",
    )
    priority: Annotated[int, Field(ge=limits.MIN_PRIORITY, le=limits.MAX_PRIORITY)] | None = Field(
        None, description="queue rank, higher first: each level moves the request DSD_PRIORITY_STEP_S seconds ahead; "
        "0 when absent. Ignored, with a notice, when the server disables priorities",
    )
    steps: Annotated[int, Field(ge=limits.MIN_STEPS, le=limits.MAX_STEPS)] = 28
    guidance: Annotated[float, Field(ge=limits.MIN_GUIDANCE, le=limits.MAX_GUIDANCE)] = 3.5
    image_guidance: Annotated[float, Field(ge=limits.MIN_CFG, le=limits.MAX_CFG)] = 1.0
    text_guidance: Annotated[float, Field(ge=limits.MIN_CFG, le=limits.MAX_CFG)] = 1.0
    seed: Annotated[int, Field(ge=0, le=limits.MAX_SEED)] | None = None
    size: Annotated[int, Field(ge=limits.MIN_SIZE, le=limits.MAX_SIZE, multiple_of=limits.SIZE_MULTIPLE)] | None = None
    num_images: Annotated[int, Field(ge=1, le=16)] = 1
    output_format: OutputFormat = "png"
    deadline_s: Annotated[float, Field(gt=0)] | None = None
    exact: bool = Field(
        False, description="run this request's rows in forwards of their own: the image is byte-identical to the "
        "same request run alone, whatever else the server runs (slower under load)",
    )
    consent: bool = Field(False, description="the person shown in the reference agreed to this use (needed when the "
                          "service's input check flags the reference as showing a real person)")
    enhance_prompt: bool | None = Field(
        None, description="rewrite the prompt into a detailed caption of the reference's subject with the server's "
        "vision-language model before generating (see `enhanced_prompt`); absent: the server's default "
        "(DSD_ENHANCE_DEFAULT)",
    )
    background: Annotated[str, Field(pattern=r"^#[0-9a-fA-F]{6}$", description="colour that transparent parts of "
                                     "the reference are composited on, #rrggbb")] = "#ffffff"
    identity: bool | None = Field(
        None, description="score each image against the reference (`identity` in the response): face distance "
        "when the reference shows a face, else subject similarity; absent: the server's default "
        "(DSD_IDENTITY_DEFAULT)",
    )
    best_of: Annotated[int, Field(ge=1, le=16)] | None = Field(
        None, description="generate this many candidates (seeds `seed` to `seed + best_of - 1`), score each against "
        "the reference and return the best `num_images`, best first, with every candidate's score in `candidates`; "
        "at least num_images, at most DSD_MAX_BEST_OF (8). Each returned seed regenerates its image alone",
    )

    @field_validator("steps", "guidance", "image_guidance", "text_guidance", "seed", "size", "num_images",
                     "deadline_s", "priority", "best_of", mode="before")
    @classmethod
    def _refuse_booleans(cls, value):
        if isinstance(value, bool):
            raise PydanticCustomError("number_type", "Input should be a number, not a boolean")
        return value


class GenerateJSON(GenerateParams):
    """The JSON body of `POST /generate`: the parameters plus the reference image as base64."""

    image: Annotated[str, Field(min_length=1, description="reference image (PNG, JPEG, WebP, GIF or MPO), base64")]


class JobFields(BaseModel):
    """What `POST /v1/jobs` accepts beside the generation request."""

    webhook: Annotated[str, Field(min_length=1, max_length=2048)] | None = Field(
        None, description="http(s) URL that receives the job's end as a signed Standard Webhooks POST")
    webhook_events: list[str] | None = Field(
        None, description="events to send: job.succeeded, job.failed, job.canceled (all when absent); a "
        "comma-separated string in multipart forms")

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _split(cls, value):
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class JobParams(GenerateParams, JobFields):
    """A multipart job request's fields."""


class JobJSON(GenerateJSON, JobFields):
    """The JSON body of `POST /v1/jobs`: the body of `POST /generate` plus the webhook."""


class Timings(BaseModel):
    queue_s: float
    run_s: float
    total_s: float


class IdentityScore(BaseModel):
    """How well one image keeps the reference's subject (`dsd_model.scoring.identity.IdentityScore`)."""

    scorer: str = Field(description="what made the score: `dlib-resnet-v1` (faces), `dino:<dir>` / `clip-i:<dir>` "
                        "(subjects), `tiny-random-dino` (the tiny profile's random encoder: meaningless numbers)")
    status: Literal["ok", "no_face"] = Field(description="`no_face`: no face in the reference or the image (see "
                                             "`note`); no number then")
    similarity: float | None = Field(None, description="cosine of the two embeddings (1: the same)")
    distance: float | None = Field(None, description="faces: distance of the 128-d face descriptors (0: the same "
                                   "face)")
    threshold: float | None = Field(None, description="faces: distance under which it is the same person (0.6)")
    match: bool | None = Field(None, description="faces: distance < threshold")
    note: str | None = Field(None, description="e.g. that several faces were found and the largest was scored")


class Candidate(BaseModel):
    seed: int
    identity: IdentityScore
    returned: bool = Field(description="among the returned images")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="generated images, base64, in `format`")
    format: OutputFormat
    seeds: list[int] = Field(description="the seed of each image; send it back to reproduce the image")
    mode: Mode | None = Field(description="the request's mode; null when it named none (the default adapter served)")
    adapter: str | None = Field(None, description="the adapter the images were generated with; null: the base model")
    size: int
    profile: str = Field(description="`tiny` (embedded random components: noise-like images) or `real`")
    request_id: str
    timings: Timings
    notice: str | None = None
    notices: list[str] = Field(
        default_factory=list,
        description="what was done to the inputs, one line each, e.g. `image: transparency composited on #ffffff`, "
        "and, once, that outputs under 256 px a side carry no watermark",
    )
    enhanced_prompt: str | None = Field(
        None, description="the prompt the images were generated from when prompt enhancement replaced the request's "
        "prompt; null when the request's prompt was used as given",
    )
    identity: list[IdentityScore] | None = Field(
        None, description="the identity score of each image against the reference, in the order of `images`; null "
        "unless the request asked for scores (`identity` or `best_of`)",
    )
    candidates: list[Candidate] | None = Field(
        None, description="best_of: every candidate's seed and score, in seed order; null without best_of",
    )
    provenance_id: str | None = Field(
        None, description="the id the images' watermark (as `provenance_tag`) and C2PA manifest carry: made by the "
        "server for this request, unlike `request_id`, which the client may choose; null when the job's stored "
        "result does not record it",
    )


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class AdapterEntry(BaseModel):
    name: str
    source: Literal["pinned", "store"] = Field(
        description="`pinned`: loaded at start (DSD_ADAPTERS, or the tiny profile's) and never dropped; `store`: a "
        "file of an adapter store directory (DSD_ADAPTER_DIRS), loaded on first use")
    loaded: bool
    rank: int | None = Field(description="largest LoRA rank of the adapter; null when the file cannot be read")
    size_bytes: int
    digest: str | None = Field(description="sha256 of the loaded file's bytes; null while not loaded")
    base_transformer_digest: str | None = Field(
        description="the base transformer the adapter was trained on (null: not recorded); the server refuses an "
        "adapter of another base")
    modes: list[str] = Field(description="request modes that select this adapter")
    metadata: dict[str, str] = Field(description="the file's metadata: training settings, config hash, eval summary")


class AdapterList(BaseModel):
    base_transformer_digest: str = Field(description="the base transformer this server runs")
    default: str | None = Field(description="the adapter of requests that name neither `mode` nor `adapter`")
    adapters: list[AdapterEntry]
