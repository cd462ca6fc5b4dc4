"""Documented bounds of every generation parameter, shared by the pipeline, the CLI and the transports."""

MIN_SIZE = 64
"""Smallest reference side: 4x4 latent patches per half canvas."""
MAX_SIZE = 1024
"""Largest reference side: a 1024x2048 canvas is 8192 image tokens, 4x the official cost per token squared."""
SIZE_MULTIPLE = 16
"""VAE downsampling (8) times the 2x2 latent packing."""

MIN_STEPS, MAX_STEPS = 1, 100
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 20.0
"""Distilled guidance fed to the transformer; FLUX.1-dev and DSD use 3.5."""
MIN_CFG, MAX_CFG = 0.0, 20.0
"""True-CFG image and text scales; CFG runs only when the image scale is above 1."""
CFG_START_STEP = 2
"""True CFG is skipped for the first two steps, as in the official inference code."""
MAX_SEED = 2**63 - 1
MIN_PRIORITY, MAX_PRIORITY = -10, 10
"""A request's `priority` (higher first); each level is worth DSD_PRIORITY_STEP_S seconds of queue rank."""

MAX_PROMPT_CHARS = 2000
MIN_IMAGE_SIDE = 16
"""Smaller references carry too little to crop and resize meaningfully."""
MAX_IMAGE_PIXELS = 40_000_000
"""Decoded-pixel bound (≈ 6300x6300) checked from the header, before pixels are decoded."""


def check_size(value: int) -> int:
    """A canvas side within the bounds above, or a ValueError naming them."""
    if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
        raise ValueError(f"size must be a multiple of {SIZE_MULTIPLE} in [{MIN_SIZE}, {MAX_SIZE}], got {value}")
    return value
