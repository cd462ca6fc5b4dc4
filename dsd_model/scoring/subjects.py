"""Subject identity for references without a face: the cosine of DINOv2 (or CLIP image) embeddings, from a local
encoder directory (transformers layout; never downloaded), or the tiny profile's random-weight DINOv2."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from PIL import Image

from ..errors import WeightsError
from ..eval.embeddings import Encoders

TINY_SCORER = "tiny-random-dino"
"""The tiny profile's encoder: random weights, so its scores only exercise the path; they mean nothing."""


class SubjectEmbedder:
    """Cosine similarity of image embeddings from one encoder; `name` says which (`dino:<dir>`, `clip-i:<dir>`)."""

    def __init__(self, path: Path, device: str, name: str | None = None):
        kind = encoder_kind(path)
        self.encoders = Encoders(path if kind == "dino" else None, path if kind == "clip-i" else None, device)
        self._embed = self.encoders.dino_embeddings if kind == "dino" else self.encoders.clip_image_embeddings
        self.name = name or f"{kind}:{Path(path).name}"

    def similarities(self, reference: Image.Image, images: list[Image.Image]) -> list[float]:
        """Cosine of each image's embedding with the reference's, in [-1, 1]."""
        embeddings = self._embed([reference, *images])
        return (embeddings[1:] @ embeddings[0]).clamp(-1, 1).tolist()


def encoder_kind(path: Path) -> str:
    """`dino` for a DINOv2 directory, `clip-i` for a CLIP one, by its config.json."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise WeightsError(f"identity encoder {str(path)!r} is not a local transformers model (no config.json)")
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type == "dinov2":
        return "dino"
    if model_type == "clip":
        return "clip-i"
    raise WeightsError(f"identity encoder {str(path)!r} is a {model_type!r} model; give a DINOv2 or CLIP directory")


def tiny_subject_embedder() -> SubjectEmbedder:
    """The tiny profile's random-weight DINOv2, built from a fixed seed (its scores are labelled as meaningless)."""
    from ..eval.random_encoders import write_random_encoders

    with tempfile.TemporaryDirectory(prefix="dsd-identity-") as root:
        dino, _ = write_random_encoders(Path(root))
        return SubjectEmbedder(dino, "cpu", TINY_SCORER)
