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

    @field_validator("steps", "guidance", "image_guidance", "text_guidance", "seed", "size", "num_images",
                     "deadline_s", mode="before")
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


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="generated images, base64, in `format`")
    format: OutputFormat
    seeds: list[int] = Field(description="the seed of each image; send it back to reproduce the image")
    mode: Mode | None = Field(description="the request's mode; null when it named none (the default adapter served)")
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
