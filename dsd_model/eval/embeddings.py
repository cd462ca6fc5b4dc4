"""Embedding scores from local encoder weights (transformers layout; nothing is downloaded):

    dino     subject fidelity: cosine of the DINOv2 CLS embeddings of the reference and the image
    clip_i   cosine of the CLIP image embeddings of the reference and the image
    clip_t   cosine of the CLIP image embedding and the CLIP text embedding of the prompt

and the copy-paste check: an image whose DINO similarity to its reference reaches `copy_paste_dino`, whose face
distance to it (`dsd_model.scoring.faces`) is at most `copy_paste_face`, or whose mean absolute pixel difference from
it (64 px greyscale, 0-1) is at most `copy_paste_pixel`, is flagged. Reports give
every score with and without the flagged images, since a copied reference scores perfectly on identity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import WeightsError

METRICS = ("dino", "clip_i", "clip_t")
COPY_PASTE = "copy_paste"
PIXEL_SIDE = 64


class Encoders:
    """The DINO and CLIP models of a run (either may be absent), loaded from local directories."""

    def __init__(self, dino_path: Path | None, clip_path: Path | None, device: str):
        self.device = device
        self.dino = self.dino_processor = self.clip = self.clip_processor = self.tokenizer = None
        if dino_path is not None:
            from transformers import AutoImageProcessor, Dinov2Model

            self.dino = _load(Dinov2Model, dino_path, device)
            self.dino_processor = _load(AutoImageProcessor, dino_path)
        if clip_path is not None:
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

            self.clip = _load(CLIPModel, clip_path, device)
            self.clip_processor = _load(AutoImageProcessor, clip_path)
            self.tokenizer = _load(AutoTokenizer, clip_path)

    @property
    def metrics(self) -> tuple[str, ...]:
        return (("dino",) if self.dino else ()) + (("clip_i", "clip_t") if self.clip else ())

    @torch.no_grad()
    def dino_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.dino_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _unit(self.dino(pixel_values=pixels).last_hidden_state[:, 0])

    @torch.no_grad()
    def clip_image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.clip_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _unit(self.clip.get_image_features(pixel_values=pixels).pooler_output)

    @torch.no_grad()
    def clip_text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _unit(self.clip.get_text_features(**tokens).pooler_output)

    def score(self, references: list[Image.Image], images: list[Image.Image], prompts: list[str]) -> dict:
        """`{metric: [cosine per image]}` for the metrics these encoders give; row i compares images[i] with
        references[i] and prompts[i]."""
        scores = {}
        if self.dino:
            scores["dino"] = _rowwise(self.dino_embeddings(references), self.dino_embeddings(images))
        if self.clip:
            image_embeddings = self.clip_image_embeddings(images)
            scores["clip_i"] = _rowwise(self.clip_image_embeddings(references), image_embeddings)
            scores["clip_t"] = _rowwise(self.clip_text_embeddings(prompts), image_embeddings)
        return scores


def pixel_difference(reference: Image.Image, image: Image.Image) -> float:
    """Mean absolute difference of the two images as 64 x 64 greyscale, in [0, 1] (0: the same picture)."""
    a, b = (np.asarray(i.convert("L").resize((PIXEL_SIDE, PIXEL_SIDE), Image.BICUBIC), np.float32) / 255
            for i in (reference, image))
    return float(np.abs(a - b).mean())


def copy_paste_verdict(dino: float | None, pixels: float, dino_threshold: float, pixel_threshold: float,
                       face: float | None = None, face_threshold: float = 0.0):
    """(flagged, reason) for one image from its DINO similarity to the reference (None without DINO), its pixel
    difference and its face distance to the reference (None without a face on both sides or without the face
    scorer)."""
    reasons = []
    if dino is not None and dino >= dino_threshold:
        reasons.append(f"DINO similarity {dino:.4f} >= {dino_threshold}")
    if face is not None and face <= face_threshold:
        reasons.append(f"face distance {face:.4f} <= {face_threshold}")
    if pixels <= pixel_threshold:
        reasons.append(f"pixel difference {pixels:.4f} <= {pixel_threshold}")
    if reasons:
        return True, "copy of the reference: " + "; ".join(reasons)
    shown = f"DINO similarity {dino:.4f} < {dino_threshold}, " if dino is not None else ""
    shown += f"face distance {face:.4f} > {face_threshold}, " if face is not None else ""
    return False, f"{shown}pixel difference {pixels:.4f} > {pixel_threshold}"


def _load(cls, path: Path, device: str | None = None):
    if not Path(path).is_dir():
        raise WeightsError(f"encoder directory {str(path)!r} does not exist (local weights only, never downloaded)")
    try:
        loaded = cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{str(path)!r}: cannot load {cls.__name__} from it: {exc}") from exc
    return loaded.to(device).eval() if device is not None else loaded


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _rowwise(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return (a * b).sum(-1).clamp(-1, 1).cpu().tolist()
