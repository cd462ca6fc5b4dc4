"""Every class of bad input gets an `InputError` naming the field and the limit; nothing is corrected silently."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dsd_model import GenerationRequest, InputError
from dsd_model.images import decode_image
from dsd_model.pipeline import validate_request
from helpers import png_bytes, random_image


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row: decoding it would be a bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_accepts_lossless_modes():
    rgb = random_image(40, 30)
    assert decode_image(png_bytes(rgb)).mode == "RGB"
    assert decode_image(png_bytes(rgb.convert("L"))).mode == "RGB"
    assert decode_image(png_bytes(rgb.convert("P"))).mode == "RGB"
    assert decode_image(png_bytes(rgb.convert("1"))).mode == "RGB"
    opaque = rgb.convert("RGBA")
    assert np.array_equal(np.asarray(decode_image(png_bytes(opaque))), np.asarray(rgb))
    assert decode_image(encoded(rgb, "JPEG")).size == (40, 30)
    assert decode_image(encoded(rgb, "WEBP", lossless=True)).size == (40, 30)


def test_exif_orientation_applied_and_metadata_dropped():
    image = random_image(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    decoded = decode_image(encoded(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (30, 40)
    assert "exif" not in decoded.info


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"not an image at all", "not a decodable image"),
        (png_bytes(random_image(40, 30))[:60], "truncated or corrupt"),
        (png_header(30000, 30000), "too large"),
        (png_header(7000, 7000), "exceeds the limit of 40000000"),
        (png_bytes(random_image(8, 8)), "at least 16 px"),
        (encoded(random_image(40, 30), "GIF"), "format GIF is not accepted"),
    ],
    ids=["empty", "garbage", "truncated", "bomb-header", "too-many-pixels", "tiny", "gif"],
)
def test_rejects_bad_bytes(data, message):
    with pytest.raises(InputError, match=message) as info:
        decode_image(data, "image")
    assert info.value.field == "image"


def transparent() -> Image.Image:
    image = random_image(40, 30).convert("RGBA")
    image.putpixel((0, 0), (0, 0, 0, 10))
    return image


@pytest.mark.parametrize(
    "image, message",
    [
        (transparent(), "transparency \\(mode RGBA, minimum alpha 10\\)"),
        (Image.new("I;16", (40, 30)), "pixel mode I;16"),
        (Image.new("F", (40, 30)), "pixel mode F"),
    ],
    ids=["alpha", "16-bit", "float"],
)
def test_rejects_lossy_modes(image, message):
    with pytest.raises(InputError, match=message):
        decode_image(image if image.mode == "F" else png_bytes(image))


def test_rejects_cmyk_and_palette_transparency():
    with pytest.raises(InputError, match="pixel mode CMYK"):
        decode_image(encoded(Image.new("CMYK", (40, 30)), "JPEG"))
    palette = random_image(40, 30).convert("P")
    with pytest.raises(InputError, match="transparency"):
        decode_image(png_bytes(palette, transparency=0))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        decode_image(tmp_path / "nope.png", "--image")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("size", 100, "not a multiple of 16"),
        ("size", 32, "outside \\[64, 1024\\]"),
        ("size", 2048, "outside \\[64, 1024\\]"),
        ("num_inference_steps", 0, "outside \\[1, 100\\]"),
        ("num_inference_steps", 101, "outside \\[1, 100\\]"),
        ("num_inference_steps", 2.5, "an integer"),
        ("guidance_scale", float("nan"), "finite"),
        ("guidance_scale", float("inf"), "finite"),
        ("guidance_scale", -1.0, "outside \\[0.0, 20.0\\]"),
        ("image_guidance_scale", 21.0, "outside \\[0.0, 20.0\\]"),
        ("text_guidance_scale", True, "a number"),
        ("seed", -1, "outside"),
        ("prompt", "", "must not be empty"),
        ("prompt", "   ", "must not be empty"),
        ("prompt", "x" * 2001, "limit is 2000"),
        ("negative_prompt", None, "must be a string"),
    ],
)
def test_request_bounds(field, value, message):
    request = GenerationRequest(image=random_image(), prompt="a toy")
    setattr(request, field, value)
    with pytest.raises(InputError, match=message) as info:
        validate_request(request)
    assert info.value.field == field


def test_pipeline_call_checks_lists(tiny_pipe):
    with pytest.raises(InputError, match="num_inference_steps: has 3 values for a batch of 2"):
        tiny_pipe([random_image(), random_image()], "a toy", num_inference_steps=[1, 2, 3], size=64)
    with pytest.raises(InputError, match="output_type"):
        tiny_pipe(random_image(), "a toy", size=64, output_type="latent")
    with pytest.raises(InputError, match="image\\[0\\]"):
        tiny_pipe(b"garbage", "a toy", size=64)
