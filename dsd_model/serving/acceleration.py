"""Speed features of the denoising forward: attention backend, regional compilation over bucketed row counts, a
cache of compiled artefacts across restarts, fp8 weights, and the per-row step cache (`step_cache.py`).

`accelerate(pipe, settings)` applies what the settings ask for and installs a `Denoiser` as the pipeline's
transformer call. Every feature is optional; without any, the pipeline calls the stock transformer.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from ..adapters import AdapterRegistry
from ..errors import DeviceError
from ..pipeline import latent_image_ids
from .step_cache import StepCache, flux_forward

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("native", "flash", "_flash_3", "sage", "_native_cudnn", "_native_flash", "_native_efficient")
"""diffusers attention backends that run from locally installed kernels (the `*_hub` ones download at start-up,
which the service never does). `native` is PyTorch's SDPA, which picks flash/cuDNN/efficient kernels itself."""
FP8_MIN_CAPABILITY = (8, 9)
"""float8 matrix multiplies need Ada (8.9) or Hopper (9.0) tensor cores."""


class RowBuckets:
    """Row counts the compiled blocks are built for; a forward's rows are padded up to the next one, so a varying
    batch never triggers a recompilation. Padding repeats the last row (real values: no NaN from an all-zero row)
    and is dropped after the forward; every row is computed independently, so real rows keep their results up to
    the kernel differences of another batch size."""

    def __init__(self, sizes: Sequence[int]):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"row buckets must be positive batch sizes, got {list(sizes)}")
        self.sizes = tuple(sorted(set(sizes)))

    def size_for(self, rows: int) -> int:
        """The smallest bucket holding `rows`; beyond the largest, the next multiple of the largest."""
        for size in self.sizes:
            if rows <= size:
                return size
        largest = self.sizes[-1]
        return -(-rows // largest) * largest

    def pad(self, tensor: torch.Tensor) -> torch.Tensor:
        missing = self.size_for(tensor.shape[0]) - tensor.shape[0]
        if not missing:
            return tensor
        return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


class Denoiser:
    """The transformer call of one denoising step, with rows padded to a bucket and, when `cache` is set, the
    per-row step cache. Same signature as `DSDPipeline._forward`, plus the pipeline's adapter registry, which keeps
    each row's adapter when the cache runs only some rows through the remaining blocks."""

    def __init__(self, transformer, buckets: RowBuckets | None = None, cache: StepCache | None = None):
        self.transformer = transformer
        self.buckets = buckets
        self.cache = cache

    def __call__(self, hidden, timestep, guidance, pooled, text, img_ids, txt_ids, states,
                 adapters: AdapterRegistry | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        rows = hidden.shape[0]
        pad = self.buckets.pad if self.buckets is not None else None
        if pad is not None:
            hidden, timestep, pooled, text = pad(hidden), pad(timestep), pad(pooled), pad(text)
            guidance = pad(guidance) if guidance is not None else None
            attention_mask = pad(attention_mask) if attention_mask is not None else None
        prediction = flux_forward(
            self.transformer, hidden, text, pooled, timestep, img_ids, txt_ids, guidance, self.cache, states, pad,
            adapters, attention_mask,
        )
        return prediction[:rows]


def set_attention_backend(transformer, backend: str) -> str:
    """Run attention through `backend`; when its kernels or a CUDA device are missing, log why and keep native
    SDPA. Returns the backend in use."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "native":
        return backend
    reason = None
    if transformer.device.type != "cuda":
        reason = f"it needs a CUDA device, the transformer is on {transformer.device.type}"
    else:
        try:
            transformer.set_attention_backend(backend)
        except (ImportError, RuntimeError, ValueError) as exc:
            reason = str(exc).splitlines()[0]
    if reason is None:
        return backend
    logger.warning("attention backend %r is unavailable (%s); using native SDPA (DSD_ATTENTION_BACKEND)", backend, reason)
    transformer.reset_attention_backend()
    return "native"


def check_fp8_support(device: torch.device) -> None:
    """Raise a `DeviceError` naming the setting unless `device` runs float8 matrix multiplies."""
    if device.type != "cuda":
        raise DeviceError(
            f"quantization 'fp8' (DSD_QUANTIZATION) needs a CUDA GPU of compute capability "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper); the model is on {device.type}. "
            "Unset DSD_QUANTIZATION to serve in the unquantized dtype."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise DeviceError(
            f"quantization 'fp8' (DSD_QUANTIZATION) needs compute capability {FP8_MIN_CAPABILITY[0]}."
            f"{FP8_MIN_CAPABILITY[1]} or newer; {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}. Unset DSD_QUANTIZATION to serve in the unquantized dtype."
        )


def quantize_fp8(transformer) -> int:
    """float8 weights and dynamic per-row float8 activations (torchao) on every linear layer of the transformer
    blocks; embedders, norms, the output projection and LoRA factors stay in their dtype. Returns the number of
    layers quantized."""
    check_fp8_support(transformer.device)
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise ValueError(
            "quantization 'fp8' (DSD_QUANTIZATION) needs torchao: install the `gpu` extra (pip install 'dsd-serve[gpu]')"
        ) from exc
    selected = [name for name, module in transformer.named_modules() if _is_block_linear(module, name)]
    quantize_(
        transformer,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=lambda module, name: _is_block_linear(module, name),
    )
    return len(selected)


def _is_block_linear(module: torch.nn.Module, name: str) -> bool:
    in_blocks = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    return type(module) is torch.nn.Linear and in_blocks


def compile_blocks(transformer, mode: str, shapes: int) -> None:
    """`torch.compile` each repeated block (regional compilation: one graph shared by all 57 blocks of FLUX).

    Shapes are static at first and become dynamic on the first change (torch's automatic dynamic shapes), so a
    second row bucket costs one more compilation and the others none; the buckets bound the shapes CUDA graphs
    record in `reduce-overhead` mode. `shapes` bounds the compiled variants kept (rows, canvas, adapter state)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
    transformer.compile_repeated_blocks(mode=None if mode == "default" else mode, fullgraph=True)


def mega_cache_path(directory: Path) -> Path:
    return Path(directory) / f"mega-cache-torch-{torch.__version__}.bin"


def use_compile_cache(directory: Path) -> bool:
    """Keep inductor's and Triton's on-disk caches under `directory` and preload the portable artefacts that
    `save_compile_cache` wrote there. Returns whether artefacts were loaded."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    path = mega_cache_path(directory)
    if not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    logger.info("loaded compiled artefacts from %s", path)
    return True


def save_compile_cache(directory: Path) -> None:
    """Write the artefacts compiled so far to `directory` (atomically), for the next start to load."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return
    path = mega_cache_path(directory)
    partial = path.with_suffix(".partial")
    partial.write_bytes(artifacts[0])
    partial.replace(path)
    logger.info("saved compiled artefacts to %s", path)


@torch.no_grad()  # as the pipeline steps: grad mode is part of what a compiled graph is guarded on
def warm_up(pipe, sizes: Sequence[int], buckets: RowBuckets) -> float:
    """Run one forward for every (canvas size, row bucket, adapter) so that compilation happens before the first
    request. Returns the seconds it took."""
    start = time.perf_counter()
    transformer = pipe.transformer
    config = transformer.config
    device, dtype = pipe._execution_device, transformer.dtype
    generator = torch.Generator("cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    active = pipe.adapters.active
    for adapter in [None, *pipe.adapters.names] if pipe.adapters.fused is None else [pipe.adapters.fused]:
        pipe.set_adapter(adapter)
        for size in sizes:
            tokens = (size // 16) * (2 * size // 16)
            img_ids = latent_image_ids(2 * (size // 16), 2 * (2 * size // 16), device, dtype)
            txt_ids = torch.zeros(pipe.max_sequence_length, 3, device=device, dtype=dtype)
            for rows in buckets.sizes:
                flux_forward(
                    transformer,
                    rand(rows, tokens, config.in_channels),
                    rand(rows, pipe.max_sequence_length, config.joint_attention_dim),
                    rand(rows, config.pooled_projection_dim),
                    torch.full((rows,), 0.5, device=device, dtype=dtype),
                    img_ids,
                    txt_ids,
                    torch.full((rows,), 3.5, device=device) if config.guidance_embeds else None,
                )
    pipe.set_adapter(active)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def accelerate(pipe, settings) -> None:
    """Apply the speed settings to a loaded pipeline on its device (after adapters are loaded)."""
    transformer = pipe.transformer
    device = transformer.device
    if settings.quantization == "fp8":
        layers = quantize_fp8(transformer)
        logger.info("fp8 weights and activations on %d linear layers", layers)
    fold = settings.lora_fusion == "per_adapter" or (
        settings.lora_fusion == "auto" and device.type == "cuda" and settings.quantization == "none"
    )
    if fold:
        pipe.adapters.fold_on_activate()
    set_attention_backend(transformer, settings.attention_backend)
    compiled = settings.compile == "on" or (settings.compile == "auto" and device.type == "cuda")
    buckets = RowBuckets(settings.compile_row_buckets) if compiled else None
    cache = StepCache(settings.step_cache_threshold) if settings.step_cache_threshold > 0 else None
    if compiled:
        if settings.compile_cache_dir is not None:
            use_compile_cache(settings.compile_cache_dir)
        adapters = 1 + len(pipe.adapters.names)
        compile_blocks(transformer, settings.compile_mode, 2 * len(buckets.sizes) * len(settings.compile_sizes) * adapters)
    if compiled or cache is not None:
        pipe.denoiser = Denoiser(transformer, buckets, cache)
    if compiled and settings.compile_warmup:
        seconds = warm_up(pipe, settings.compile_sizes, buckets)
        logger.info("compiled and warmed up %d row buckets x %d canvas sizes in %.1f s", len(buckets.sizes),
                    len(settings.compile_sizes), seconds)
        if settings.compile_cache_dir is not None:
            save_compile_cache(settings.compile_cache_dir)
