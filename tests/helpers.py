"""Small builders shared by the tests."""

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GPU_TEST_DEVICE = os.environ.get("GPU_TEST_DEVICE", "cuda")
"""Where the tests marked `gpu` run: `cuda`; `cpu` runs their CPU-runnable halves, in the GPU check's rehearsal
(benchmarks/gpu_check.sh --rehearsal)."""


def random_image(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def alpha_ramp(width: int = 96, height: int = 80) -> np.ndarray:
    """An alpha channel in which every value from 0 to 255 appears."""
    return (np.arange(width * height) % 256).reshape(height, width).astype(np.uint8)


def transparent_image(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """`random_image` with `alpha_ramp` as alpha."""
    return Image.fromarray(np.dstack([np.asarray(random_image(width, height, seed)), alpha_ramp(width, height)]), "RGBA")


def unmarked(size: int) -> str:
    """The notice of a response whose outputs are `size` px, too small to carry the watermark."""
    return f"size: {size} px output is below the watermark's 256 px minimum; it is not marked"


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def write_tiny_weights(root: Path) -> dict:
    """Tiny weights laid out like FLUX.1-dev (`root/flux`) plus a fused DSD transformer with a trained-looking
    condition embedder (`root/fused`); returns the in-memory components the files were written from."""
    from diffusers import FluxPipeline

    from dsd_model.tiny import build_tiny_components

    FluxPipeline(**build_tiny_components(dsd=False)).save_pretrained(root / "flux")
    components = build_tiny_components()
    with torch.no_grad():
        components["transformer"].x_embedder.weight[:, 16:].normal_(0, 0.1)
    components["transformer"].save_pretrained(root / "fused")
    return components
