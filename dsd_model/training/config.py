"""Every setting of a LoRA training run, in one typed object; each field says why its default is what it is."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..limits import check_size

RESUMABLE_CHANGES = frozenset(
    {"dataset", "output_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "resume_from", "eval_every",
     "eval_benchmark", "eval_steps", "fsdp"}
)
"""Fields that may differ between a run and the run it resumes (a dataset may move; its content is not compared);
any other difference would change the result."""


class TrainConfig(BaseModel):
    """A DSD LoRA training run on a paired dataset (`dsd_model.data.pairs`)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Path = Field(description="Dataset directory holding pairs.jsonl and the images it names.")
    embedding_cache: Path | None = Field(
        None, description="Directory written by `dsd train-cache` for this dataset and model: train from its VAE "
        "posteriors and prompt embeddings, without the VAE encoder and text encoders. Unset: encode every step."
    )
    output_dir: Path = Field(
        Path("outputs/train"),
        description="Where the adapter, checkpoints, loss.csv and loss.png are written.",
    )
    size: int = Field(
        512, description="Panel side in pixels (canvas size x 2*size); 512 is the official DSD size, used at inference."
    )
    max_steps: int = Field(
        1000, ge=1, description="Optimizer steps. A starting point for a few thousand pairs: watch loss.png and extend."
    )
    batch_size: int = Field(1, ge=1, description="Pairs per forward and device; 1 fits a 12B transformer on one GPU.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forwards per optimizer step; raise it for a larger effective batch at the same memory."
    )
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate; 1e-4 is the usual FLUX LoRA rate.")
    weight_decay: float = Field(
        1e-4, ge=0, description="AdamW decay of the LoRA weights (diffusers' FLUX LoRA default); the embedder is not "
        "decayed, since decay would move its frozen noise columns."
    )
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warm-up; constant keeps a run extendable."
    )
    lr_warmup_steps: int = Field(
        0, ge=0, description="Linear warm-up steps. None by default: LoRA B starts at zero, so the first steps move "
        "the model gently anyway."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm, the common diffusion-training value.")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="`adamw_8bit` (bitsandbytes, CUDA) stores the moments in 8 bits: about 4x less optimizer "
        "memory, which matters at rank 512."
    )
    rank: int = Field(512, ge=1, description="LoRA rank; the DSD paper trains rank 512. Small ranks suit tests.")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; unset means alpha = rank (scale 1, the meaning of the exported file)."
    )
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA input; off, the common FLUX LoRA setting."
    )
    target_modules: list[str] | None = Field(
        None,
        description="Linear layers that get a LoRA, by name or name suffix (e.g. `attn.to_q`); unset means the "
        "attention projections of every block, the layout of the official DSD adapter.",
    )
    text_dropout: float = Field(
        0.1, ge=0, le=1, description="Fraction of samples trained as (empty prompt, condition): the input of the "
        "`u_t = F(x, \"\", c)` pass of true CFG, the anchor of the text scale. One joint draw per sample decides "
        "among (prompt, condition) for the `v = F(x, prompt, c)` pass, this case and `text_and_condition_dropout`; "
        "(prompt, zero condition) is never drawn, since inference never runs it. 0.1 is the usual CFG rate."
    )
    text_and_condition_dropout: float = Field(
        0.1, ge=0, le=1, description="Fraction of samples trained as (empty prompt, zero condition): the input of "
        "the `u = F(x, \"\", c=0)` pass of true CFG, the anchor of the image scale. 0.1, so both guidance anchors "
        "are seen as often as the usual single CFG dropout (InstructPix2Pix-style joint dropout)."
    )
    guidance: float = Field(
        1.0, ge=0, description="Distilled-guidance input during training. 1.0: the flow-matching target is the "
        "unguided velocity, which FLUX.1-dev represents at guidance 1; training at 3.5 would teach the model to "
        "ignore the guidance input, weakening it at inference (where 3.5 stays the default)."
    )
    logit_mean: float = Field(
        0.0, description="Mean of the logit-normal timestep density (SD3/FLUX training: 0), before the FLUX "
        "resolution-dependent shift that inference also applies."
    )
    logit_std: float = Field(1.0, gt=0, description="Standard deviation of the logit-normal timestep density (1).")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="`auto` = bf16 on CUDA (what FLUX.1-dev was trained in), none on CPU."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute block activations in the backward pass: the 12B transformer does not fit "
        "one GPU without it. Turn off for small models, where it only costs time."
    )
    fsdp: bool = Field(
        False, description="With several processes, shard the frozen base over them (FSDP2, one unit per FLUX "
        "block), so each holds 1/N of it; the adapter trained is the same as with DDP. Off by default: DDP (every "
        "process holds the whole base) is faster when the base fits. `deploy/accelerate/fsdp.yaml` shards as well."
    )
    seed: int = Field(
        0, ge=0, lt=2**31, description="Seeds the data order, the noise, timesteps and dropout draws, and LoRA init."
    )
    checkpoint_every: int = Field(
        500, ge=1, description="Optimizer steps between checkpoints (a checkpoint is also written at the end)."
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Newest checkpoints kept; at rank 512 one checkpoint with optimizer state is ~10 GB."
    )
    resume_from: Literal["latest", "auto"] | Path | None = Field(
        None, description="Checkpoint directory to resume from, `latest` for the newest in output_dir, or `auto`: "
        "the newest if there is one, else a new run (for a job that is retried)."
    )
    eval_every: int = Field(
        0, ge=0, description="Optimizer steps between runs of the eval split (0: never), scored with the "
        "DSD_EVAL_DINO_PATH / DSD_EVAL_CLIP_PATH encoders into eval.csv and eval.png; it does not change the weights."
    )
    eval_benchmark: Path | None = Field(
        None, description="The eval split: a small benchmark in any `dsd eval` layout; its subjects and prompts stay "
        "fixed for the run, so the scores are comparable from step to step."
    )
    eval_steps: int = Field(
        28, ge=1, le=100, description="Denoising steps of the eval split's images; the inference default, so the "
        "scores mean what serving will show."
    )

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: int) -> int:
        return check_size(value)

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("target_modules must name at least one module (leave it unset for the default)")
        return value

    @model_validator(mode="after")
    def _check_dropout(self) -> TrainConfig:
        if self.text_dropout + self.text_and_condition_dropout > 1:
            raise ValueError(
                f"text_dropout {self.text_dropout} + text_and_condition_dropout {self.text_and_condition_dropout} "
                "exceeds 1: they are fractions of one draw per sample"
            )
        return self

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainConfig:
        if self.lr_warmup_steps > self.max_steps:
            raise ValueError(f"lr_warmup_steps {self.lr_warmup_steps} exceeds max_steps {self.max_steps}")
        return self

    @model_validator(mode="after")
    def _check_eval(self) -> TrainConfig:
        if self.eval_every and self.eval_benchmark is None:
            raise ValueError(f"eval_every {self.eval_every} needs eval_benchmark, the benchmark of the eval split")
        return self

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.rank)

    def resolved_mixed_precision(self, device_type: str) -> str:
        if self.mixed_precision == "auto":
            return "bf16" if device_type == "cuda" else "no"
        return self.mixed_precision
