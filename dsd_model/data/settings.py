"""One typed settings object for the data pipeline, read from the environment (prefix ``DSD_DATA_``) and overridden
by command-line flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..errors import InputError
from ..settings import resolve_device, resolve_dtype
from .layout import GridLayout, parse_layout
from .manifest import Shard

TINY_TEACHER = "tiny"
"""The teacher name of the built-in tiny FLUX pipeline."""

PIXEL_MULTIPLE = 16
"""FLUX renders sizes in 16-pixel steps (VAE factor 8 times 2x2 packing) and silently resizes anything else."""


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible chat model; `role` ("llm" or "vlm") names the settings fields in error messages."""

    role: str
    base_url: str
    model: str
    api_key: str | None
    temperature: float
    max_tokens: int


class ChatSettings(BaseSettings):
    """How `ChatClient` talks to a chat server: timeouts, retries, concurrency and the reply cache. Subclasses set
    the environment prefix and give `resolved_cache_dir` (None when `cache` is off)."""

    request_timeout_s: float = Field(
        120.0, gt=0, description="Per request; a VLM reasoning over 1024 px images on a local server can take a minute."
    )
    max_retries: int = Field(5, ge=0, description="Retries after a timeout, a connection error, HTTP 408, 429 or 5xx.")
    backoff_s: float = Field(1.0, ge=0, description="First retry delay, doubled each time (with jitter).")
    max_backoff_s: float = Field(60.0, ge=0, description="Cap on any retry delay, Retry-After included.")
    max_reply_attempts: int = Field(
        3, ge=1, description="Tries for a usable reply (the model is told what was wrong) before recording a failure."
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at once; hosted APIs rate-limit beyond a few.")
    cache: bool = Field(True, description="Keep every reply on disk so a rerun never asks the same question twice.")
    cache_dir: Path | None = Field(None, description="Reply cache; defaults to cache/ in the work or run directory.")


class DataSettings(ChatSettings):
    """Every knob of `dsd data`: where files go, the chat servers, the teacher and the grid geometry."""

    model_config = SettingsConfigDict(env_prefix="DSD_DATA_", extra="ignore")

    work_dir: Path = Field(
        Path("outputs/data"), description="Directory holding every stage's manifest and images; resumable in place."
    )
    dataset_dir: Path | None = Field(
        None, description="Where `pairs` writes the training dataset; defaults to <work_dir>/dataset."
    )

    prompt_backend: Literal["auto", "llm", "template"] = Field(
        "auto",
        description="`llm` writes grid prompts with the chat model; `template` is offline and deterministic; "
        "`auto` = llm when llm_base_url is set, else template.",
    )
    caption_filter: bool = Field(
        False, description="Ask the LLM first whether a caption has one clear subject, and drop those without."
    )
    llm_base_url: str | None = Field(
        None, description="OpenAI-compatible API root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1."
    )
    llm_model: str | None = Field(None, description="Model name the LLM server expects.")
    llm_api_key: SecretStr | None = Field(None, description="Bearer token; local servers usually need none.")
    llm_temperature: float = Field(0.8, ge=0, le=2, description="Some randomness gives varied panel content.")
    llm_max_tokens: int = Field(1024, ge=16, description="Room for a subject and a sentence per panel.")
    vlm_base_url: str | None = Field(None, description="Defaults to llm_base_url (one server serving both models).")
    vlm_model: str | None = Field(None, description="Vision-language model name; it must accept image inputs.")
    vlm_api_key: SecretStr | None = Field(None, description="Defaults to llm_api_key.")
    vlm_temperature: float = Field(0.0, ge=0, le=2, description="A judge should answer the same way every time.")
    vlm_max_tokens: int = Field(2048, ge=16, description="Room for the chain of thought before the verdict.")

    teacher_dir: Path | None = Field(
        None,
        description="Local FLUX.1-dev directory (diffusers layout), never downloaded. Unset: the tiny built-in "
        "teacher, which renders noise-like grids (for trying the pipeline only).",
    )
    teachers: str | None = Field(
        None,
        description="Several teachers mixed in one run: comma-separated PATH=WEIGHT entries, e.g. "
        "`/models/FLUX.1-dev=3,/models/sd3.5-large=1` (weight 1 when omitted; `tiny` names the built-in teacher). "
        "Any local diffusers text-to-image pipeline directory works; its class is read from model_index.json. "
        "Each grid draws its teacher from the weights by its id, so the mix does not depend on batching or order. "
        "Unset: teacher_dir alone.",
    )
    layout: str = Field("2x2", description="COLUMNSxROWS panels per grid; the paper renders 2x2.")
    width: int = Field(1024, ge=PIXEL_MULTIPLE, description="Grid width in pixels; 1024 gives 512 px panels in 2x2.")
    height: int = Field(1024, ge=PIXEL_MULTIPLE, description="Grid height in pixels.")
    num_inference_steps: int = Field(28, ge=1, le=100, description="FLUX.1-dev's usual step count.")
    guidance_scale: float = Field(3.5, ge=0, le=20, description="FLUX.1-dev's distilled guidance default.")
    max_sequence_length: int = Field(512, ge=16, le=512, description="T5 tokens; grid prompts are long.")
    batch_size: int = Field(4, ge=1, description="Grids per teacher call.")
    grids_per_prompt: int = Field(1, ge=1, description="Grids rendered per prompt, each with its own seed.")
    seed: int = Field(0, ge=0, description="Base seed; each grid's seed is derived from it and the grid id.")
    shard_size: int = Field(1000, ge=1, description="Grid images per subdirectory, so no directory grows huge.")
    device: str = Field("auto", description="`auto` = cuda when available, else cpu.")
    shard: str | None = Field(
        None, description="`INDEX/COUNT`: this worker of COUNT does only the grids whose id hashes to INDEX and "
        "writes its own manifest shard (`grids` and `curate`); unset, one worker does everything.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto` = bfloat16 on cuda (FLUX.1-dev's training precision), float32 on cpu."
    )

    curate_backend: Literal["auto", "vlm", "embedding"] = Field(
        "auto",
        description="`vlm` asks the vision-language model about every panel; `embedding` is offline: panel "
        "similarity from embedding_model_dir, or pixel statistics without one; `auto` = vlm when a VLM base URL is "
        "set (vlm_base_url or llm_base_url), else embedding.",
    )
    embedding_model_dir: Path | None = Field(
        None,
        description="Local DINOv2 or CLIP checkpoint (transformers layout) for the embedding judge and the "
        "pre-filter, never downloaded. Unset: colour-histogram pixel statistics, which see colour drift only.",
    )
    consistency_threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Embedding judge: a panel is consistent when its similarity (embedding cosine, or histogram "
        "intersection) reaches this with at least half of the other panels. 0.5 separates one instance from "
        "another of its kind for DINOv2 features; tune it on the contact sheet.",
    )
    prefilter: bool = Field(
        False,
        description="Before asking the VLM, measure panel similarity; a grid with fewer than two panels reaching "
        "prefilter_threshold is rejected without a VLM call.",
    )
    prefilter_threshold: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Below consistency_threshold on purpose: the pre-filter drops only clear failures and leaves "
        "every doubtful grid to the VLM.",
    )

    recipe: Literal["identity", "structure", "relight"] = Field(
        "identity",
        description="What `dsd data run` makes: `identity` grids of one subject (VLM or embedding curation), "
        "`structure` pairs rendered from one depth/edge map with two appearances, `relight` the same with two "
        "lightings.",
    )
    depth_model_dir: Path | None = Field(
        None,
        description="Local transformers depth model (DPT, Depth Anything) for structure pairs, never downloaded. "
        "Unset: Canny edges (OpenCV) are the control map; pair it with a Canny control teacher.",
    )
    control_teacher_dir: Path | None = Field(
        None,
        description="Local FluxControlPipeline directory (FLUX.1-Depth-dev for depth, FLUX.1-Canny-dev for edges). "
        "Unset: a tiny built-in control pipeline with random weights (for trying the recipe only).",
    )
    control_guidance_scale: float = Field(
        10.0, ge=0, le=50, description="Distilled guidance of the control teacher; 10 is FLUX.1-Depth-dev's default."
    )
    structure_min_agreement: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Keep a structure item when its two renderings agree this well (depth: 1 - mean absolute "
        "difference of normalised depth; edges: F-score within one pixel). 0.8 drops pairs whose shapes moved.",
    )

    contact_sheet_limit: int = Field(32, ge=1, description="Grids shown per section (accepted, rejected).")

    @field_validator("layout")
    @classmethod
    def _check_layout(cls, value: str) -> str:
        return str(parse_layout(value))

    @field_validator("width", "height")
    @classmethod
    def _check_pixels(cls, value: int) -> int:
        if value % PIXEL_MULTIPLE:
            raise ValueError(f"must be a multiple of {PIXEL_MULTIPLE}")
        return value

    @field_validator("shard")
    @classmethod
    def _check_shard(cls, value: str | None) -> str | None:
        return None if value is None else "{0.index}/{0.count}".format(Shard.parse(value))

    @field_validator("llm_base_url", "vlm_base_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _check_grid(self) -> DataSettings:
        self.grid_layout.panel_size(self.width, self.height)
        return self

    @model_validator(mode="after")
    def _check_teachers(self) -> DataSettings:
        if self.teachers is not None and self.teacher_dir is not None:
            raise InputError("teachers", "give teachers or teacher_dir, not both (teachers may list one entry)")
        self.teacher_mix()
        return self

    def teacher_mix(self) -> list[tuple[str, float]]:
        """(teacher, weight) pairs: a directory path or `tiny`, weights normalised to sum to 1."""
        if self.teachers is None:
            return [(str(self.teacher_dir) if self.teacher_dir else TINY_TEACHER, 1.0)]
        mix = {}
        for entry in self.teachers.split(","):
            name, _, weight = entry.strip().rpartition("=") if "=" in entry else (entry.strip(), "", "1")
            try:
                value = float(weight)
            except ValueError:
                value = -1.0
            if not name or value <= 0:
                raise InputError("teachers", f"entry {entry.strip()!r} is not PATH or PATH=WEIGHT with a weight > 0")
            if name in mix:
                raise InputError("teachers", f"{name!r} is listed twice")
            mix[name] = value
        total = sum(mix.values())
        return [(name, weight / total) for name, weight in mix.items()]

    @property
    def grid_layout(self) -> GridLayout:
        return parse_layout(self.layout)

    @property
    def resolved_shard(self) -> Shard | None:
        return None if self.shard is None else Shard.parse(self.shard)

    @property
    def resolved_prompt_backend(self) -> Literal["llm", "template"]:
        if self.prompt_backend == "auto":
            return "llm" if self.llm_base_url else "template"
        return self.prompt_backend

    @property
    def resolved_curate_backend(self) -> Literal["vlm", "embedding"]:
        if self.curate_backend == "auto":
            return "vlm" if self.vlm_base_url or self.llm_base_url else "embedding"
        return self.curate_backend

    @property
    def resolved_cache_dir(self) -> Path | None:
        return (self.cache_dir or self.work_dir / "cache") if self.cache else None

    @property
    def resolved_dataset_dir(self) -> Path:
        return self.dataset_dir or self.work_dir / "dataset"

    def endpoint(self, role: Literal["llm", "vlm"]) -> Endpoint:
        base_url = getattr(self, f"{role}_base_url") or (self.llm_base_url if role == "vlm" else None)
        key = getattr(self, f"{role}_api_key") or (self.llm_api_key if role == "vlm" else None)
        model = getattr(self, f"{role}_model")
        if not base_url:
            raise InputError(
                f"{role}_base_url",
                f"is not set: give --{role}-base-url or DSD_DATA_{role.upper()}_BASE_URL, the root of an "
                "OpenAI-compatible API such as http://127.0.0.1:8000/v1",
            )
        if not model:
            raise InputError(f"{role}_model", f"is not set: give --{role}-model or DSD_DATA_{role.upper()}_MODEL")
        return Endpoint(
            role=role,
            base_url=base_url,
            model=model,
            api_key=key.get_secret_value() if key else None,
            temperature=getattr(self, f"{role}_temperature"),
            max_tokens=getattr(self, f"{role}_max_tokens"),
        )

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def resolved_dtype(self):
        return resolve_dtype(self.dtype, self.resolved_device())
