"""Reference images: decode and validate without silent correction, then the official DSD preprocessing.

Accepted pixel modes are those that convert to 8-bit RGB without losing anything: RGB, L (grey), 1 (bilevel), P (palette)
without transparency, and RGBA/LA whose alpha is fully opaque. Everything else (transparency, 16-bit or float
pixels, CMYK, ...) is refused with the mode named, because any conversion would change the picture.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .limits import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE

PREPROCESS_VERSION = 1
"""Bumped whenever preprocessing changes; part of the condition-latent cache key."""
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
ENCODE_OPTIONS = {"png": {"format": "PNG"}, "jpeg": {"format": "JPEG", "quality": 95, "subsampling": 0},
                  "webp": {"format": "WEBP", "quality": 95}}
"""Output encodings. JPEG keeps full-resolution chroma (4:4:4): the watermark lives in the chroma plane."""
LOSSLESS_MODES = ("RGB", "L", "1", "P", "RGBA", "LA")


def decode_image(data: bytes | str | Path | Image.Image, field: str = "image") -> Image.Image:
    """Decode bytes, a file path or a PIL image into an 8-bit RGB image, or raise `InputError` naming `field`."""
    if isinstance(data, Image.Image):
        return _to_rgb(data, field)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise InputError(field, f"file {str(path)!r} does not exist")
        data = path.read_bytes()
    if not data:
        raise InputError(field, "is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(field, f"image is too large to decode ({exc}); limit {MAX_IMAGE_PIXELS} pixels") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(field, f"is not a decodable image; accepted formats: {', '.join(ALLOWED_FORMATS)}") from exc
    if image.format not in ALLOWED_FORMATS:
        raise InputError(field, f"format {image.format} is not accepted; accepted formats: {', '.join(ALLOWED_FORMATS)}")
    check_dimensions(image.size, field)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(field, f"{image.format} data is truncated or corrupt ({exc})") from exc
    return _to_rgb(image, field)


def check_dimensions(size: tuple[int, int], field: str = "image") -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(field, f"{width}x{height} = {width * height} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(field, f"{width}x{height} is too small; the shorter side must be at least {MIN_IMAGE_SIDE} px")


def _to_rgb(image: Image.Image, field: str) -> Image.Image:
    check_dimensions(image.size, field)
    if image.mode not in LOSSLESS_MODES:
        raise InputError(
            field,
            f"pixel mode {image.mode} cannot be converted to 8-bit RGB without changing the picture; "
            f"accepted modes: {', '.join(LOSSLESS_MODES)} (RGBA/LA/P only when fully opaque)",
        )
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            raise InputError(
                field,
                f"image has transparency (mode {image.mode}, minimum alpha {int(alpha.min())}); accepted are fully "
                "opaque images: flatten it onto the background you want first",
            )
    image = ImageOps.exif_transpose(image)
    rgb = image.convert("RGB")
    rgb.info.clear()
    return rgb


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The official crop: the centred largest square, then a bicubic resize to `size` x `size`."""
    width, height = image.size
    side = min(width, height)
    box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
    return image.crop(box).resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB → float32 [1, 3, H, W] in [-1, 1] (what `VaeImageProcessor.preprocess` does)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def condition_canvas(image: Image.Image, size: int) -> torch.Tensor:
    """[reference | black] of size x 2*size, in [-1, 1]: what the VAE encodes into the condition latents."""
    reference = to_tensor(center_crop_resize(image, size))
    return torch.cat([reference, torch.full_like(reference, -1.0)], dim=3)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] → PIL images (the decode side of `VaeImageProcessor.postprocess`)."""
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def encode_image(image: Image.Image, output_format: str) -> bytes:
    """`image` encoded as `output_format` (png, jpeg or webp) with `ENCODE_OPTIONS`."""
    buffer = io.BytesIO()
    image.save(buffer, **ENCODE_OPTIONS[output_format])
    return buffer.getvalue()
