"""Provenance and safety per output image: watermark robustness (bit accuracy after common edits) and the cost of
each output stage (watermark embed and read, encode, C2PA sign, output classifier).

Robustness is measured on two 512 px images: `natural` (tests/assets/reference.png resized) and `tiny` (an output of
the tiny profile, which is noise-like), each marked with `--payloads` different request ids. Bit accuracy is the
share of the 64 payload bits read back correctly (0.5 is chance); `found` is the share of images whose service tag
is recognised by `Watermark.read` (what `dsd verify` and `POST /verify` report), which also tries a square image at
512 and 1024 px and at twice its side. The classifier cost uses a ViT-base-sized classifier with random
weights (the size of common NSFW classifiers; the cost does not depend on the values).

    python benchmarks/watermark.py [--payloads 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dsd_model.images import encode_image
from dsd_model.serving.provenance import Claim, ContentCredentials, Watermark, _bits, write_development_chain
from dsd_model.settings import Settings
from latent_cache import median_seconds

ROOT = Path(__file__).resolve().parent.parent
SIDE = 512


def reencode(image: Image.Image, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(image: Image.Image, fraction: float) -> Image.Image:
    margin = round(image.width * fraction / 2)
    return image.crop((margin, margin, image.width - margin, image.height - margin))


TRANSFORMS = {
    "none (PNG)": lambda im: reencode(im, format="PNG"),
    "service JPEG q95 4:4:4": lambda im: reencode(im, format="JPEG", quality=95, subsampling=0),
    "JPEG q90 4:4:4": lambda im: reencode(im, format="JPEG", quality=90, subsampling=0),
    "JPEG q85 4:4:4": lambda im: reencode(im, format="JPEG", quality=85, subsampling=0),
    "JPEG q75 4:4:4": lambda im: reencode(im, format="JPEG", quality=75, subsampling=0),
    "JPEG q95 4:2:0": lambda im: reencode(im, format="JPEG", quality=95),
    "JPEG q75 4:2:0": lambda im: reencode(im, format="JPEG", quality=75),
    "service WebP q95": lambda im: reencode(im, format="WEBP", quality=95),
    "resize 50%": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC),
    "resize 50%, back to 100%": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC)
    .resize(im.size, Image.Resampling.BICUBIC),
    "crop 10% (central 90%)": lambda im: crop(im, 0.10),
    "crop 10%, back to 100%": lambda im: crop(im, 0.10).resize(im.size, Image.Resampling.BICUBIC),
}


def tiny_output() -> Image.Image:
    from dsd_model import DSDPipeline
    from dsd_model.tiny import build_tiny_components

    pipe = DSDPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    reference = Image.open(ROOT / "tests" / "assets" / "reference.png").convert("RGB")
    return pipe(reference, "the same toy on a beach", num_inference_steps=2, size=SIDE, seed=0).images[0]


def median_ms(function, repeats: int) -> float:
    return 1000 * median_seconds(function, repeats)


def robustness(images: dict[str, Image.Image], payloads: int) -> None:
    mark = Watermark("dsd-serve")
    marked = {name: [(mark.embed(image, f"request-{i}"), f"request-{i}") for i in range(payloads)]
              for name, image in images.items()}
    header = "| transform | " + " | ".join(f"{name} bit acc | {name} found" for name in images) + " |"
    print(header)
    print("|" + " --- |" * (1 + 2 * len(images)))
    for transform_name, transform in TRANSFORMS.items():
        cells = []
        for name in images:
            accuracies, found = [], 0
            for image, request_id in marked[name]:
                edited = transform(image)
                bits = mark.read_bits(edited)
                if bits is None:
                    accuracies.append(float("nan"))
                    continue
                accuracies.append(float(np.mean(bits == _bits(mark.payload(request_id)))))
                found += int(bool(mark.read(edited)["present"]))
            cells += [f"{np.mean(accuracies):.3f}", f"{found}/{len(accuracies)}"]
        print(f"| {transform_name} | " + " | ".join(cells) + " |")
    for name, image in images.items():
        psnr = 10 * np.log10(255**2 / np.mean((np.asarray(marked[name][0][0], float) - np.asarray(image, float)) ** 2))
        print(f"PSNR of the marked {name} image: {psnr:.1f} dB")


def costs(image: Image.Image, repeats: int) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from dsd_model.serving.safety import ImageCheck

    mark = Watermark("dsd-serve")
    marked = mark.embed(image, "request-0")
    claim = Claim(request_id="request-0", provenance_id="request-0", model="bench", adapter="identity", profile="tiny")
    rows = [("watermark embed", median_ms(lambda: mark.embed(image, "request-0"), repeats)),
            ("watermark read", median_ms(lambda: mark.read(marked), repeats))]
    with tempfile.TemporaryDirectory() as tmp:
        chain, key, _ = write_development_chain(Path(tmp) / "c2pa")
        credentials = ContentCredentials(Settings(c2pa_cert_chain=chain, c2pa_private_key=key))
        for output_format in ("png", "jpeg", "webp"):
            data = encode_image(marked, output_format)
            rows.append((f"encode {output_format}", median_ms(lambda: encode_image(marked, output_format), repeats)))
            rows.append((f"C2PA sign {output_format} ({len(data) // 1024} KiB)",
                         median_ms(lambda: credentials.sign(data, output_format, claim), repeats)))
        model_dir = Path(tmp) / "vit-base"
        labels = ("normal", "nsfw")
        ViTForImageClassification(ViTConfig(num_labels=2, id2label=dict(enumerate(labels)),
                                            label2id={label: i for i, label in enumerate(labels)})
                                  ).save_pretrained(model_dir)
        ViTImageProcessor().save_pretrained(model_dir)
        check = ImageCheck("output", model_dir, ["nsfw"], 0.5, "cpu")
        rows.append(("output classifier (ViT-base, CPU)", median_ms(lambda: check.flag(marked), repeats)))
    print("| stage (512 px image) | median ms |")
    print("| --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payloads", type=int, default=8, help="request ids marked per image")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cost (median)")
    args = parser.parse_args()
    natural = Image.open(ROOT / "tests" / "assets" / "reference.png").convert("RGB").resize((SIDE, SIDE))
    images = {"natural": natural, "tiny": tiny_output()}
    robustness(images, args.payloads)
    print()
    costs(natural, args.repeats)


if __name__ == "__main__":
    main()
