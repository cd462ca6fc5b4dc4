"""One typed settings object for `dsd eval`, read from the environment (prefix ``DSD_EVAL_``) and overridden by
command-line flags. The local contenders' model is described by the service settings (`DSD_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from .. import limits
from ..data.settings import ChatSettings, Endpoint
from ..errors import InputError


class EvalSettings(ChatSettings):
    """Where a run lives, how contenders generate, and which scores are computed how (the judge's timeouts,
    retries, concurrency and reply cache are the `ChatSettings` fields)."""

    model_config = SettingsConfigDict(env_prefix="DSD_EVAL_", extra="ignore")

    run_dir: Path = Field(
        Path("outputs/eval"), description="Directory of one evaluation run: images, manifests, scores; resumable."
    )
    benchmark_format: Literal["auto", "jsonl", "dreambench", "dreambench_plus"] = Field(
        "auto", description="Benchmark layout; `auto` tells them apart by their files."
    )
    images_per_prompt: int = Field(
        1, ge=1, le=64, description="Images per (subject, prompt) and contender; DreamBench++ scores one, more "
        "narrows the intervals."
    )
    seed: int = Field(0, ge=0, le=limits.MAX_SEED, description="Image k of every (subject, prompt) uses seed + k, "
                      "the same for every contender, so scores pair up across contenders.")
    steps: int = Field(28, ge=limits.MIN_STEPS, le=limits.MAX_STEPS, description="Denoising steps (official: 28).")
    guidance: float = Field(3.5, ge=limits.MIN_GUIDANCE, le=limits.MAX_GUIDANCE, description="Distilled guidance "
                            "(official: 3.5).")
    size: int = Field(512, description="Reference/output side in pixels; 512 is the official DSD size.")
    service_api_key: SecretStr | None = Field(None, description="Bearer key of remote DSD Serve contenders.")
    service_timeout_s: float = Field(
        600.0, gt=0, description="Per remote generation; the service's own maximum deadline is 600 s."
    )

    judge_base_url: str | None = Field(
        None, description="OpenAI-compatible API root of the VLM judge (CP and PF scores); unset: no judge scores."
    )
    judge_model: str | None = Field(None, description="Judge model; DreamBench++ and the DSD paper use GPT-4o.")
    judge_api_key: SecretStr | None = Field(None, description="Bearer token of the judge API.")
    judge_temperature: float = Field(0.0, ge=0, le=2, description="A judge should answer the same way every time.")
    judge_max_tokens: int = Field(2048, ge=16, description="Room for the chain of thought before the score.")
    judge_prompts: str = Field(
        "auto", description="The judge's instructions. A path: DreamBench++'s own prompt files, from a checkout of "
        "its repository (or its prompts folder), read as its scripts read them, so CP and PF are comparable with "
        "published DreamBench++ tables. A version (`v1`): ours (prompts/cp_<v>.txt, pf_<v>.txt), not comparable. "
        "`auto`: DreamBench++'s files when the benchmark folder holds them, else `v1`. Every score records the set "
        "and its file digest, so scores of different prompts are never mixed unknowingly."
    )
    dino_path: Path | None = Field(
        None, description="Local DINOv2 directory (transformers layout, e.g. facebook/dinov2-base) for the DINO "
        "score and the copy-paste check; unset: no DINO score."
    )
    clip_path: Path | None = Field(
        None, description="Local CLIP directory (e.g. openai/clip-vit-large-patch14) for CLIP-I and CLIP-T; unset: "
        "neither."
    )
    embed_batch_size: int = Field(16, ge=1, description="Images per encoder forward.")
    device: str = Field("auto", description="Device of the encoders; `auto` = cuda when available, else cpu.")
    copy_paste_dino: float = Field(
        0.95, gt=0, le=1, description="DINO similarity to the reference at or above which an image counts as a copy: "
        "photos of one subject in new scenes stay well below it, a pasted reference sits near 1."
    )
    face_id: bool | None = Field(
        None, description="The face_id score (cosine of dlib's face descriptors, with their distance) of images whose "
        "reference shows a face. Unset: when the `[faces]` extra is installed; true: required; false: off."
    )
    copy_paste_face: float = Field(
        0.15, ge=0, le=2, description="Face distance to the reference at or below which an image counts as a copy: "
        "the reference re-encoded as JPEG q75 measures 0.09 and colour-jittered 0.11, while dlib puts two "
        "photographs of one person at 0.3-0.6 (benchmarks/identity.py)."
    )
    copy_paste_pixel: float = Field(
        0.02, ge=0, le=1, description="Mean absolute pixel difference (0-1, at 64 px grey) at or below which an "
        "image counts as a copy of the reference, with or without a DINO model."
    )

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: int) -> int:
        return limits.check_size(value)

    @field_validator("judge_base_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @property
    def resolved_cache_dir(self) -> Path | None:
        return (self.cache_dir or self.run_dir / "cache") if self.cache else None

    def judge_endpoint(self) -> Endpoint | None:
        """The judge, or None when no judge is configured."""
        if self.judge_base_url is None:
            return None
        if not self.judge_model:
            raise InputError("judge_model", "is not set: give --judge-model or DSD_EVAL_JUDGE_MODEL")
        key = self.judge_api_key.get_secret_value() if self.judge_api_key else None
        return Endpoint("judge", self.judge_base_url, self.judge_model, key, self.judge_temperature,
                        self.judge_max_tokens)
