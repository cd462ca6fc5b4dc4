"""Real photographs that ship inside installed packages (nothing is downloaded):

    astronaut   Eileen Collins, NASA portrait (scikit-image `data.astronaut`, 512 x 512)
    hopper      Grace Hopper, US Navy portrait (matplotlib sample data `grace_hopper.jpg`, 512 x 600)
    coffee      a cup of coffee, no face (scikit-image `data.coffee`, 600 x 400)
    chelsea     a cat, no human face (scikit-image `data.chelsea`, 451 x 300)
"""

from __future__ import annotations

import io

from PIL import Image, ImageEnhance


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def hopper() -> Image.Image:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        return Image.open(file).convert("RGB")


def coffee() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee())


def chelsea() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.BICUBIC)


def crop(image: Image.Image, fraction: float = 0.1) -> Image.Image:
    """`fraction` of the width and height cut away, from the left and the top."""
    return image.crop((round(image.width * fraction), round(image.height * fraction), image.width, image.height))


def jitter(image: Image.Image) -> Image.Image:
    """Brighter, less contrast, more saturated."""
    image = ImageEnhance.Brightness(image).enhance(1.2)
    return ImageEnhance.Color(ImageEnhance.Contrast(image).enhance(0.8)).enhance(1.3)
