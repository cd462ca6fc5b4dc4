"""Panel similarity without a chat model: the offline curation judge and the pre-filter in front of the VLM.

    load_embedder(settings)              an image encoder from a local directory, or the pixel-statistics fallback
    panel_similarity(embedder, panels)   [n, n] similarity between the panels of one grid
    consistent_panels(similarity, t)     which panels show the grid's common subject

Two measures, named in every verdict they produce:

- `model:<path>`: cosine similarity of image embeddings from a local DINOv2 or CLIP checkpoint (any transformers
  image model with an image processor), loaded from a path and never downloaded. DINOv2 features separate
  individual instances better than CLIP's; both work.
- `pixel-statistics`: the fallback when no model path is set. Each panel becomes a joint RGB colour histogram
  (4 levels per channel, 64 bins); the similarity of two panels is the histogram intersection, the fraction of
  pixel colour mass they share (1 for the same colour distribution, 0 for disjoint colours). It sees colour drift
  (a subject that changes colour, a panel of a different scene) and nothing about shape or identity: a stand-in
  that makes the loop runnable offline, not a judge of identity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from .settings import DataSettings

logger = logging.getLogger(__name__)

PIXEL_STATISTICS = "pixel-statistics"
PIXEL_STATISTICS_NOTICE = (
    "curation by pixel statistics (colour-histogram intersection between panels): it catches colour drift only, "
    "not identity. Set embedding_model_dir (DSD_DATA_EMBEDDING_MODEL_DIR) to a local DINOv2 or CLIP checkpoint."
)
_LEVELS = 4


@dataclass
class Embedder:
    """`name` goes into every verdict; `model` and `processor` are None for the pixel-statistics measure."""

    name: str
    model: torch.nn.Module | None = None
    processor: object | None = None

    @torch.no_grad()
    def features(self, panels: list[Image.Image]) -> torch.Tensor:
        """[n, d] float32 features whose pairwise similarity is `similarity`'s measure."""
        if self.model is None:
            return torch.stack([_colour_histogram(panel) for panel in panels])
        inputs = self.processor(images=[panel.convert("RGB") for panel in panels], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        if hasattr(self.model, "get_image_features"):
            output = self.model.get_image_features(pixel_values=pixel_values)
        else:
            output = self.model(pixel_values=pixel_values)
        if not isinstance(output, torch.Tensor):
            output = output.pooler_output if output.pooler_output is not None else output.last_hidden_state[:, 0]
        return torch.nn.functional.normalize(output.float(), dim=-1)

    def similarity(self, panels: list[Image.Image]) -> torch.Tensor:
        """[n, n]: cosine similarity of the embeddings, or the histogram intersection for pixel statistics."""
        features = self.features(panels)
        if self.model is None:
            return torch.minimum(features[:, None], features[None]).sum(-1)
        return features @ features.T


def _colour_histogram(panel: Image.Image) -> torch.Tensor:
    pixels = np.asarray(panel.convert("RGB"), dtype=np.int64) * _LEVELS // 256
    bins = (pixels[..., 0] * _LEVELS + pixels[..., 1]) * _LEVELS + pixels[..., 2]
    counts = np.bincount(bins.ravel(), minlength=_LEVELS**3)
    return torch.from_numpy(counts / counts.sum()).float()


def load_embedder(settings: DataSettings) -> Embedder:
    """The image encoder at `settings.embedding_model_dir`, or the pixel-statistics measure when none is set."""
    if settings.embedding_model_dir is None:
        logger.warning(PIXEL_STATISTICS_NOTICE)
        return Embedder(PIXEL_STATISTICS)
    from transformers import AutoModel

    path = Path(settings.embedding_model_dir)
    model, processor = load_image_model(path, AutoModel, "embedding_model_dir", "DINOv2 or CLIP", settings)
    return Embedder(f"model:{path}", model, processor)


def load_image_model(path: Path, auto_class, field: str, kind: str, settings: DataSettings):
    """(model in eval mode on the settings' device, image processor) from a local transformers directory;
    `field` and `kind` name the setting and the expected checkpoint in errors."""
    from transformers import AutoImageProcessor

    if not (path / "config.json").is_file():
        raise InputError(
            field,
            f"{str(path)!r} is not a transformers model directory (no config.json); point it at a local {kind} "
            "checkpoint",
        )
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(field, f"{str(path)!r} has no usable image processor ({exc})") from exc
    model = auto_class.from_pretrained(path, local_files_only=True).eval().to(settings.resolved_device())
    return model, processor


def consistent_panels(similarity: torch.Tensor, threshold: float) -> list[bool]:
    """A panel is consistent when it reaches `threshold` with at least half of the other panels (rounded up):
    one drifted panel of a 2x2 grid matches none of the three others, each good panel matches two of three."""
    n = similarity.shape[0]
    matches = (similarity >= threshold).sum(dim=1) - (similarity.diagonal() >= threshold).long()
    return [bool(m >= -(-(n - 1) // 2)) for m in matches.tolist()]
