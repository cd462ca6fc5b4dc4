"""Bad input gets an `InputError` naming the field and the limit; images that need a conversion to 8-bit RGB get the
documented one and a notice (a refusal in strict mode); the reference kept is only the canvas it feeds."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dsd_model import GenerationRequest, InputError
from dsd_model.images import DRAFT_TOLERANCE, condition_canvas, decode_image, read_reference
from dsd_model.pipeline import validate_request
from helpers import alpha_ramp, png_bytes, random_image, transparent_image


def png_file(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk (Pillow cannot write 16-bit colour): `rows` are the filtered scanlines."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row: decoding it would be a bomb."""
    return png_file(width, height, 8, 2, b"\0" * 10)


SIXTEEN_BIT_COLOUR_TYPES = {3: 2, 4: 6, 2: 4}
"""PNG colour type by channel count: RGB, RGBA, grey with alpha."""


def sixteen_bit_png(values: np.ndarray) -> bytes:
    """A 16-bit PNG of `values` (height x width x channels, uint16), every row unfiltered."""
    height, width, channels = values.shape
    rows = np.zeros((height, 1 + width * channels * 2), dtype=np.uint8)
    rows[:, 1:] = values.astype(">u2").view(np.uint8).reshape(height, -1)
    return png_file(width, height, 16, SIXTEEN_BIT_COLOUR_TYPES[channels], rows.tobytes())


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def test_accepts_lossless_modes_unchanged_without_notices():
    rgb = random_image(40, 30)
    for image in (rgb, rgb.convert("L"), rgb.convert("P"), rgb.convert("1"), rgb.convert("RGBA")):
        reference = read_reference(png_bytes(image), strict=True)
        assert reference.notices == [] and reference.image.mode == "RGB"
        assert np.array_equal(np.asarray(reference.image), np.asarray(image.convert("RGB")))
    assert read_reference(encoded(rgb, "JPEG"), strict=True).image.size == (40, 30)
    assert read_reference(encoded(rgb, "WEBP", lossless=True), strict=True).image.size == (40, 30)


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
        (encoded(random_image(40, 30), "BMP"), "format BMP is not accepted"),
        (encoded(random_image(40, 30).convert("RGB"), "TIFF"), "format TIFF is not accepted"),
    ],
    ids=["empty", "garbage", "truncated", "bomb-header", "too-many-pixels", "tiny", "bmp", "tiff"],
)
def test_rejects_bad_bytes(data, message):
    with pytest.raises(InputError, match=message) as info:
        read_reference(data, "image", size=64)
    assert info.value.field == "image"


def test_rejects_modes_without_a_documented_conversion():
    with pytest.raises(InputError, match="pixel mode YCbCr is not accepted") as info:
        read_reference(random_image(40, 30).convert("YCbCr"), "image")
    assert info.value.field == "image"


# ---------------------------------------------------------------- conversions, each with its notice

def composite(colour: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    """The documented compositing: round((colour * alpha + background * (255 - alpha)) / 255)."""
    alpha = alpha.astype(np.int64)[..., None]
    return (colour.astype(np.int64) * alpha + np.array(background) * (255 - alpha) + 127) // 255


def test_rgba_transparency_composited_on_the_background():
    colour, alpha = np.asarray(random_image(40, 30)), alpha_ramp(40, 30)
    rgba = transparent_image(40, 30)
    white = read_reference(png_bytes(rgba))
    assert white.notices == ["image: transparency composited on #ffffff"]
    assert np.array_equal(pixels(white.image), composite(colour, alpha, (255, 255, 255)))
    teal = read_reference(png_bytes(rgba), background=(10, 200, 30))
    assert teal.notices == ["image: transparency composited on #0ac81e"]
    assert np.array_equal(pixels(teal.image), composite(colour, alpha, (10, 200, 30)))


def grey_alpha(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.dstack([grey, alpha_ramp(40, 30)]), "LA")


def test_la_transparency_composited():
    grey = np.asarray(random_image(40, 30).convert("L"))
    reference = read_reference(png_bytes(grey_alpha(grey)))
    assert reference.notices == ["image: transparency composited on #ffffff"]
    expected = composite(np.dstack([grey] * 3), alpha_ramp(40, 30), (255, 255, 255))
    assert np.array_equal(pixels(reference.image), expected)


def test_palette_transparency_composited():
    palette = random_image(40, 30).convert("P")
    indices = np.asarray(palette)
    transparent_index = int(indices[0, 0])
    reference = read_reference(png_bytes(palette, transparency=transparent_index), background=(0, 0, 255))
    assert reference.notices == ["image: transparency composited on #0000ff"]
    expected = pixels(palette.convert("RGB"))
    expected[indices == transparent_index] = (0, 0, 255)
    assert np.array_equal(pixels(reference.image), expected)


def test_sixteen_bit_grey_scaled_to_eight_bits():
    values = np.linspace(0, 65535, 40 * 30).round().astype(np.uint16).reshape(30, 40)
    reference = read_reference(png_bytes(Image.fromarray(values)))
    assert reference.notices == ["image: 16-bit grey (mode I;16) scaled to 8 bits"]
    expected = (values.astype(np.int64) * 255 + 32767) // 65535
    assert np.array_equal(pixels(reference.image), np.dstack([expected] * 3))


def test_sixteen_bit_colour_pngs_keep_the_high_byte():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (30, 40, 3), dtype=np.uint16)
    reference = read_reference(sixteen_bit_png(values))
    assert reference.notices == ["image: 16-bit RGB scaled to 8 bits"]
    assert np.array_equal(pixels(reference.image), values >> 8)

    opaque = np.dstack([values, np.full((30, 40), 65535, dtype=np.uint16)])
    reference = read_reference(sixteen_bit_png(opaque), size=16)
    assert reference.notices == ["image: 16-bit RGBA scaled to 8 bits"] and reference.image.size == (16, 16)
    grey = np.dstack([values[:, :, 0], np.full((30, 40), 65535, dtype=np.uint16)])
    reference = read_reference(sixteen_bit_png(grey))
    assert reference.notices == ["image: 16-bit grey with alpha scaled to 8 bits"]
    assert np.array_equal(pixels(reference.image), np.dstack([values[:, :, 0] >> 8] * 3))


def test_float_pixels_scaled_to_eight_bits():
    values = np.linspace(-0.5, 1.5, 40 * 30, dtype=np.float32).reshape(30, 40)
    reference = read_reference(Image.fromarray(values, "F"))
    assert reference.notices == ["image: float pixels (mode F) read as [0, 1] and scaled to 8 bits"]
    expected = np.round(np.clip(values, 0, 1) * 255)
    assert np.array_equal(pixels(reference.image), np.dstack([expected] * 3))


def s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def cmyk_profile(grey: float) -> bytes:
    """A minimal ICC v2 CMYK profile (lut16 A2B0 into XYZ) that maps every ink combination to one grey of luminance
    `grey` (relative to the D50 white)."""
    white = (0.9642, 1.0, 0.8249)
    text = b"test CMYK\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0" * 3 + b"\0" * 67
    wtpt = b"XYZ \0\0\0\0" + b"".join(s15(v) for v in white)
    xyz = [round(v * grey * 32768) for v in white]
    lut = (b"mft2\0\0\0\0" + bytes([4, 3, 2, 0]) + b"".join(s15(float(i == j)) for i in range(3) for j in range(3))
           + struct.pack(">HH", 2, 2) + struct.pack(">8H", *[0, 65535] * 4)
           + struct.pack(">48H", *xyz * 16) + struct.pack(">6H", *[0, 65535] * 3))
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"A2B0", lut)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for signature, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"prtrCMYKXYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + b"".join(s15(v) for v in white)).ljust(128, b"\0")
    return header + table + body


def cmyk_jpeg(**kwargs) -> bytes:
    """Cyan on the left half, 50 % black on the right."""
    image = Image.new("CMYK", (40, 30), (255, 0, 0, 0))
    image.paste((0, 0, 0, 128), (20, 0, 40, 30))
    return encoded(image, "JPEG", quality=100, **kwargs)


def test_cmyk_without_profile_converted_by_pillow():
    reference = read_reference(cmyk_jpeg())
    assert reference.notices == ["image: CMYK converted to RGB without a colour profile"]
    result = pixels(reference.image)
    assert np.abs(result[:, :16] - (0, 255, 255)).max() <= 2
    assert np.abs(result[:, 24:] - (127, 127, 127)).max() <= 2


def test_cmyk_with_profile_converted_through_it():
    dark, light = (read_reference(cmyk_jpeg(icc_profile=cmyk_profile(grey))) for grey in (0.2, 0.6))
    assert dark.notices == ["image: CMYK converted to sRGB with the embedded ICC profile"]
    dark_pixels, light_pixels = pixels(dark.image), pixels(light.image)
    # the test profile maps every ink to one grey: cyan and black come out as that grey, not as cyan
    assert np.ptp(dark_pixels) == 0 and np.ptp(light_pixels) == 0
    assert dark_pixels[0, 0, 0] < light_pixels[0, 0, 0]


def frames(first, second) -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), first), Image.new("RGB", (40, 30), second)]


@pytest.mark.parametrize(
    "fmt, options",
    [("MPO", {}), ("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})],
    ids=["mpo", "gif", "webp", "apng"],
)
def test_several_frames_first_used(fmt, options):
    first, *rest = frames((200, 30, 40), (10, 20, 230))
    data = encoded(first, fmt, save_all=True, append_images=rest, **options)
    reference = read_reference(data)
    assert reference.notices == [f"image: first of 2 frames used ({fmt})"]
    assert np.abs(pixels(reference.image) - (200, 30, 40)).max() <= (3 if fmt == "MPO" else 0)


def convertible() -> list:
    first, *rest = frames((200, 30, 40), (10, 20, 230))
    palette = random_image(40, 30).convert("P")
    return [
        pytest.param(png_bytes(transparent_image(40, 30)),
                     "transparency \\(mode RGBA, minimum alpha 0\\)", id="rgba"),
        pytest.param(png_bytes(grey_alpha(np.asarray(palette.convert("L")))),
                     "transparency \\(mode LA, minimum alpha 0\\)", id="la"),
        pytest.param(png_bytes(palette, transparency=int(np.asarray(palette)[0, 0])),
                     "transparency \\(mode P, minimum alpha 0\\)", id="palette"),
        pytest.param(png_bytes(Image.new("I;16", (40, 30))), "16-bit pixels \\(mode I;16\\)", id="16-bit"),
        pytest.param(sixteen_bit_png(np.zeros((30, 40, 3), dtype=np.uint16)), "16-bit RGB pixels \\(PNG\\)",
                     id="16-bit-rgb"),
        pytest.param(sixteen_bit_png(np.full((30, 40, 4), 65535, dtype=np.uint16)), "16-bit RGBA pixels \\(PNG\\)",
                     id="16-bit-rgba"),
        pytest.param(Image.new("F", (40, 30)), "float pixels \\(mode F\\)", id="float"),
        pytest.param(cmyk_jpeg(), "CMYK pixels", id="cmyk"),
        pytest.param(cmyk_jpeg(icc_profile=cmyk_profile(0.2)), "CMYK pixels", id="cmyk-icc"),
        pytest.param(encoded(first, "MPO", save_all=True, append_images=rest), "MPO with 2 frames", id="mpo"),
        pytest.param(encoded(first, "GIF", save_all=True, append_images=rest), "GIF with 2 frames", id="gif"),
        pytest.param(encoded(first, "WEBP", save_all=True, append_images=rest, lossless=True), "WEBP with 2 frames",
                     id="webp"),
        pytest.param(encoded(first, "PNG", save_all=True, append_images=rest), "PNG with 2 frames", id="apng"),
    ]


@pytest.mark.parametrize("data, found", convertible())
def test_strict_mode_refuses_each_conversion(data, found):
    with pytest.raises(InputError, match=f"{found}: strict image mode accepts only") as info:
        read_reference(data, "image", size=64, strict=True)
    assert info.value.field == "image"


# ---------------------------------------------------------------- the reference kept is the canvas it feeds

@pytest.mark.parametrize(
    "image, fmt",
    [
        (random_image(97, 80, seed=3), "PNG"),
        (random_image(80, 131, seed=4).convert("L"), "PNG"),
        (random_image(90, 71, seed=5).convert("P"), "PNG"),
        (random_image(70, 99, seed=6).convert("RGBA"), "PNG"),
        (random_image(100, 90, seed=7), "JPEG"),
    ],
    ids=["rgb", "grey", "palette", "opaque-rgba", "jpeg"],
)
@pytest.mark.parametrize("size", [64, 80])
def test_reduced_reference_gives_the_same_canvas(image, fmt, size):
    data = encoded(image, fmt)
    reduced = read_reference(data, size=size).image
    assert reduced.size == (size, size)
    assert np.array_equal(condition_canvas(reduced, size).numpy(), condition_canvas(decode_image(data), size).numpy())


def test_reduced_reference_follows_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(random_image(120, 70, seed=8), "JPEG", exif=exif.tobytes())
    reduced = read_reference(data, size=64).image
    assert np.array_equal(condition_canvas(reduced, 64).numpy(), condition_canvas(decode_image(data), 64).numpy())


def photograph(width: int, height: int) -> Image.Image:
    """Smooth shapes and gradients with mild grain: the spatial spectrum of a photograph rather than of noise."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(0)
    channels = [np.sin(6 * x + 2 * c) * np.cos(5 * y - c) + 0.5 * np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) * 20)
                for c in range(3)]
    array = (np.dstack(channels) + 1.5) / 3 * 255 + rng.normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def test_large_jpeg_decoded_at_reduced_scale_within_tolerance():
    data = encoded(photograph(1100, 700), "JPEG", quality=90)
    reduced = read_reference(data, size=64).image
    full = decode_image(data)
    difference = np.abs(condition_canvas(reduced, 64) - condition_canvas(full, 64)).mean() / 2
    assert 0 < difference <= DRAFT_TOLERANCE


# ---------------------------------------------------------------- prompts against the text encoders' windows

def test_prompt_over_the_t5_window_is_refused(tiny_pipe):
    # the tiny T5 tokenizer reads one token per character, plus a word-start and an end token
    assert tiny_pipe.check_prompt("a" * 510) == ["prompt: 512 CLIP tokens, only the first 77 reach the pooled CLIP "
                                                 "embedding"]
    with pytest.raises(InputError, match="is 513 T5 tokens long; the limit is 512 tokens") as info:
        tiny_pipe.check_prompt("a" * 511, "negative_prompt")
    assert info.value.field == "negative_prompt"


def test_prompt_over_the_clip_window_is_reported(tiny_pipe):
    assert tiny_pipe.check_prompt("a" * 75) == []  # with the start and end tokens: 77
    assert tiny_pipe.check_prompt("a" * 100) == [
        "prompt: 102 CLIP tokens, only the first 77 reach the pooled CLIP embedding"
    ]


def test_the_plain_call_checks_the_windows_too(tiny_pipe, caplog):
    with pytest.raises(InputError, match="is 602 T5 tokens long") as info:
        tiny_pipe(random_image(), "a" * 600, num_inference_steps=1, size=64, seed=0)
    assert info.value.field == "prompt"
    with caplog.at_level("WARNING", logger="dsd_model.pipeline"):
        tiny_pipe(random_image(), "a toy", negative_prompt="b" * 100, num_inference_steps=1, size=64, seed=0)
    assert "negative_prompt: 102 CLIP tokens, only the first 77 reach the pooled CLIP embedding" in caplog.messages


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
