"""What a DSD training run trains, and the adapter file it exports.

Trained: a peft LoRA on the target Linear layers (default: the attention projections of every block) and the
condition columns of `x_embedder` with its bias (the official model's separate `c_embedder` has its own bias, which
converts into this one). The noise columns stay frozen: their gradient is zeroed before each optimizer step
(`zero_noise_columns`), and the embedder is not decayed.

The exported file is the layout `dsd_model.adapters` loads: `transformer.<module>.lora_A.weight` [r, in] and
`transformer.<module>.lora_B.weight` [out, r] with alpha/r folded into B (the file means `W + B @ A`, no alpha keys),
plus the full `transformer.x_embedder.weight` / `.bias`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from ..tiny import is_attention_projection
from .config import TrainConfig
from .errors import IncompatibleModelError

TRAINING_ADAPTER = "dsd_training"
EMBEDDER = "x_embedder"


def check_base_model(pipe) -> None:
    """Refuse a pipeline whose transformer cannot be trained as a DSD model, naming what is wrong."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(transformer, EMBEDDER):
        raise IncompatibleModelError(f"{type(pipe).__name__} has no FLUX transformer to train; pass a DSDPipeline")
    in_channels = transformer.config.in_channels
    out_channels = transformer.config.out_channels or in_channels
    if in_channels != 2 * out_channels:
        raise IncompatibleModelError(
            f"the transformer has in_channels={in_channels} and out_channels={out_channels}; a DSD transformer takes "
            "the noisy latents and the condition latents concatenated, so in_channels must be 2 x out_channels. "
            "Convert a plain FLUX or official DSD checkpoint with `dsd convert` first."
        )
    loaded = pipe.adapters.names if hasattr(pipe, "adapters") else []
    if getattr(transformer, "peft_config", None) or loaded:
        raise IncompatibleModelError(
            f"the transformer already carries LoRA adapters {sorted(getattr(transformer, 'peft_config', None) or loaded)}"
            "; train on a base pipeline without adapters (do not load or fuse adapters before training)"
        )


def resolve_targets(transformer: torch.nn.Module, targets: list[str] | None) -> list[str]:
    """Full names of the Linear layers that get a LoRA: `targets` by name or suffix, or every attention projection."""
    linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and n != EMBEDDER]
    if targets is None:
        return [n for n in linear if is_attention_projection(n)]
    resolved = []
    for target in targets:
        if target == EMBEDDER:
            raise IncompatibleModelError(
                f"target_modules: {EMBEDDER} is trained in full (its condition columns), not by a LoRA"
            )
        matches = [n for n in linear if n == target or n.endswith("." + target)]
        if not matches:
            raise IncompatibleModelError(
                f"target_modules: {target!r} matches no Linear layer of the transformer, e.g. {linear[:4]}"
            )
        resolved += [n for n in matches if n not in resolved]
    return resolved


@contextmanager
def trainable_adapter(
    transformer: torch.nn.Module, config: TrainConfig, trainable_dtype: torch.dtype
) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Attach the training LoRA and open the embedder's condition columns; yield the trainable parameters by name.

    On exit the transformer is as it was: LoRA removed, embedder values restored, gradients off, eval mode.
    """
    embedder = getattr(transformer, EMBEDDER)
    original = {"weight": embedder.weight.data, "bias": embedder.bias.data}  # trained as copies, put back on exit
    embedder.weight.data, embedder.bias.data = original["weight"].clone(), original["bias"].clone()
    transformer.add_adapter(
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            target_modules=resolve_targets(transformer, config.target_modules),
            init_lora_weights=True,
        ),
        adapter_name=TRAINING_ADAPTER,
    )
    embedder.requires_grad_(True)
    params = trainable_parameters(transformer)
    for param in params.values():
        param.data = param.data.to(trainable_dtype)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    try:
        yield params
    finally:
        transformer.eval()
        if config.gradient_checkpointing:
            transformer.disable_gradient_checkpointing()
        transformer.unload_lora()
        embedder.requires_grad_(False)
        embedder.weight.data, embedder.bias.data = original["weight"], original["bias"]


def trainable_parameters(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, by name (after FSDP sharding: the sharded parameters, under the same names)."""
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


def zero_noise_columns(transformer: torch.nn.Module) -> None:
    """Zero the gradient of the embedder's noise columns, which stay as the base has them. Sharded (FSDP splits
    rows), each process zeroes the columns of its rows."""
    embedder = getattr(transformer, EMBEDDER)
    grad = embedder.weight.grad
    if grad is not None:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local[:, : embedder.in_features // 2] = 0


def adapter_state_dict(
    transformer: torch.nn.Module, trainable: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The training LoRA with alpha/r folded into B, and the full embedder, keyed in the adapter file layout.
    `trainable` holds the trained values whole, by parameter name (`sharding.full_tensors`)."""
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and TRAINING_ADAPTER in module.lora_A:
            a = trainable[f"{name}.lora_A.{TRAINING_ADAPTER}.weight"].float()
            b = trainable[f"{name}.lora_B.{TRAINING_ADAPTER}.weight"].float() * module.scaling[TRAINING_ADAPTER]
            state[f"transformer.{name}.lora_A.weight"] = a
            state[f"transformer.{name}.lora_B.weight"] = b
    state[f"transformer.{EMBEDDER}.weight"] = trainable[f"{EMBEDDER}.weight"]
    state[f"transformer.{EMBEDDER}.bias"] = trainable[f"{EMBEDDER}.bias"]
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def save_adapter(
    transformer: torch.nn.Module, trainable: dict[str, torch.Tensor], path: Path, dtype: torch.dtype,
    metadata: dict[str, str],
) -> Path:
    """Write the adapter file (safetensors); `DSDPipeline.load_adapter(path, name)` loads it as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(adapter_state_dict(transformer, trainable, dtype), str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors writes 0600; the file is meant for a serving process, often another user
    tmp.replace(path)
    return path
