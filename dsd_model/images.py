"""Reference images: decode, convert to 8-bit RGB with each conversion reported, then the official DSD preprocessing.

Pixels are converted one by one (the result does not depend on where the centre crop falls):

- RGB, L (grey), 1 (bilevel), P (palette) and fully opaque RGBA/LA: converted to RGB, nothing reported.
- Transparency (RGBA, LA, PA, or a palette/colour key with a transparent entry): composited on `background`
  (white by default): ``out = round((colour * alpha + background * (255 - alpha)) / 255)``.
- 16-bit grey (I;16 variants) and 32-bit integer (I) pixels: ``round(v * 255 / 65535)``, values clipped to
  [0, 65535]. Float pixels (F): read as [0, 1], ``round(v * 255)``, clipped.
- 16-bit colour PNGs (RGB, RGBA, grey with alpha): ``v >> 8``, the high byte Pillow's decoder keeps.
- CMYK: through the embedded ICC profile to sRGB when there is one (littleCMS, perceptual intent), else Pillow's
  profile-less conversion.
- Several frames (MPO from phone cameras, animated GIF, WebP and APNG): the first frame.

Each conversion adds a notice (``"image: transparency composited on #ffffff"``). With `strict`, each is refused
instead, naming the field and what was found.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import InputError
from .limits import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 2
"""Bumped whenever preprocessing changes; part of the condition-latent cache key. 2: JPEG references decoded at
reduced scale (`read_reference`)."""
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "MPO")
RGB_MODES = ("RGB", "L", "1", "P")
"""Modes that convert to 8-bit RGB unchanged."""
ALPHA_MODES = ("RGBA", "LA", "PA")
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_PNG_COLOURS = {"RGB;16B": "RGB", "RGBA;16B": "RGBA", "LA;16B": "grey with alpha"}
"""The raw modes of 16-bit colour PNGs, which Pillow decodes to 8 bits per channel, by the colour they hold."""
WHITE = (255, 255, 255)
ENCODE_OPTIONS = {"png": {"format": "PNG"}, "jpeg": {"format": "JPEG", "quality": 95, "subsampling": 0},
                  "webp": {"format": "WEBP", "quality": 95}}
"""Output encodings. JPEG keeps full-resolution chroma (4:4:4): the watermark lives in the chroma plane."""
DRAFT_FORMATS = ("JPEG", "MPO")
DRAFT_TOLERANCE = 0.005
"""Bound on the mean absolute difference (fraction of full scale) between the canvas of a JPEG decoded at reduced
scale and that of a full decode. A photograph-like test image at 1/8 scale differs by 0.13 % (0.26 % with heavy
grain); checked by tests/test_inputs.py."""


@dataclass
class Reference:
    """A decoded reference in 8-bit RGB and the conversions that made it so."""

    image: Image.Image
    notices: list[str] = field(default_factory=list)


def decode_image(data: bytes | str | Path | Image.Image, field: str = "image") -> Image.Image:
    """Decode bytes, a file path or a PIL image into an 8-bit RGB image, or raise `InputError` naming `field`.
    Conversions (see the module docstring) are logged."""
    reference = read_reference(data, field)
    for notice in reference.notices:
        logger.info(notice)
    return reference.image


def read_reference(
    data: bytes | str | Path | Image.Image,
    field: str = "image",
    size: int | None = None,
    background: tuple[int, int, int] = WHITE,
    strict: bool = False,
) -> Reference:
    """Decode and convert to 8-bit RGB (module docstring). With `size`, keep only what the canvas uses: the centre
    square resized to `size`, exactly what `center_crop_resize` makes of the full image, except that JPEGs at least
    twice as large as needed are decoded at a reduced scale (within `DRAFT_TOLERANCE`)."""
    notices: list[str] = []
    image = data.copy() if isinstance(data, Image.Image) else _open(data, field)
    check_dimensions(image.size, field)
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        _convert(notices, field, strict, f"{image.format or 'image'} with {frames} frames",
                 f"first of {frames} frames used ({image.format})")
    colour = _sixteen_bit_png_colour(image)
    if colour is not None:
        _convert(notices, field, strict, f"16-bit {colour} pixels (PNG)", f"16-bit {colour} scaled to 8 bits")
    if size is not None and image.format in DRAFT_FORMATS:
        image.draft(image.mode, (size, size))
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(field, f"{image.format} data is truncated or corrupt ({exc})") from exc
    ImageOps.exif_transpose(image, in_place=True)
    if size is not None:
        image = center_square(image)
    image = _to_rgb(image, field, background, strict, notices)
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return Reference(image, notices)


def _open(data: bytes | str | Path, field: str) -> Image.Image:
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
    return image


def _sixteen_bit_png_colour(image: Image.Image) -> str | None:
    """The colour of a 16-bit colour PNG not yet decoded (its raw mode is in the tile), else None."""
    if image.format != "PNG" or not image.tile:
        return None
    return SIXTEEN_BIT_PNG_COLOURS.get(image.tile[0].args)


def check_dimensions(size: tuple[int, int], field: str = "image") -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(field, f"{width}x{height} = {width * height} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(field, f"{width}x{height} is too small; the shorter side must be at least {MIN_IMAGE_SIDE} px")


def _convert(notices: list[str], field: str, strict: bool, found: str, done: str) -> None:
    """Record a conversion, or refuse it in strict mode."""
    if strict:
        raise InputError(field, f"{found}: strict image mode accepts only single-frame images that convert to "
                                "8-bit RGB unchanged (RGB, grey, bilevel, palette, fully opaque alpha)")
    notices.append(f"{field}: {done}")


def _to_rgb(image: Image.Image, field: str, background: tuple[int, int, int], strict: bool,
            notices: list[str]) -> Image.Image:
    mode = image.mode
    if mode in ALPHA_MODES or "transparency" in image.info:
        image = image.convert("RGBA")
        alpha = image.getchannel("A")
        lowest = alpha.getextrema()[0]
        if lowest < 255:
            _convert(notices, field, strict, f"transparency (mode {mode}, minimum alpha {lowest})",
                     f"transparency composited on {hex_color(background)}")
            flat = Image.new("RGB", image.size, background)
            flat.paste(image.convert("RGB"), mask=alpha)
            image = flat
    elif mode in HIGH_DEPTH_MODES:
        _convert(notices, field, strict, f"16-bit pixels (mode {mode})", f"16-bit grey (mode {mode}) scaled to 8 bits")
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif mode == "F":
        _convert(notices, field, strict, "float pixels (mode F)",
                 "float pixels (mode F) read as [0, 1] and scaled to 8 bits")
        values = np.clip(np.asarray(image), 0.0, 1.0)
        image = Image.fromarray(np.round(values * 255).astype(np.uint8), "L")
    elif mode == "CMYK":
        image = _cmyk_to_rgb(image, field, strict, notices)
    elif mode not in RGB_MODES:
        raise InputError(field, f"pixel mode {mode} is not accepted; accepted modes: {', '.join(RGB_MODES)}, "
                                f"{', '.join(ALPHA_MODES)}, {', '.join(HIGH_DEPTH_MODES)}, F, CMYK")
    if image.mode != "RGB":
        image = image.convert("RGB")
    image.info.clear()
    return image


def _cmyk_to_rgb(image: Image.Image, field: str, strict: bool, notices: list[str]) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            converted = ImageCms.profileToProfile(
                image, ImageCms.ImageCmsProfile(io.BytesIO(profile)), ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError, ValueError):
            _convert(notices, field, strict, "CMYK pixels with an unreadable ICC profile",
                     "CMYK converted to RGB without a colour profile (the embedded one is unreadable)")
            return image.convert("RGB")
        _convert(notices, field, strict, "CMYK pixels", "CMYK converted to sRGB with the embedded ICC profile")
        return converted
    _convert(notices, field, strict, "CMYK pixels", "CMYK converted to RGB without a colour profile")
    return image.convert("RGB")


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def center_square(image: Image.Image) -> Image.Image:
    """The centred largest square (the official crop)."""
    width, height = image.size
    side = min(width, height)
    return image.crop(((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2))


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The official crop: the centred largest square, then a bicubic resize to `size` x `size`."""
    return center_square(image).resize((size, size), Image.Resampling.BICUBIC)


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


def encode_image(image: Image.Image, output_format: str, quality: int | None = None) -> bytes:
    """`image` encoded as `output_format` (png, jpeg or webp) with `ENCODE_OPTIONS`; `quality` (0-100) replaces the
    JPEG and WebP quality (PNG is lossless and ignores it)."""
    options = dict(ENCODE_OPTIONS[output_format])
    if quality is not None and "quality" in options:
        options["quality"] = quality
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()
