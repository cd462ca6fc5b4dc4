"""Training examples from a paired dataset, and the order in which a run visits them.

One example is the [reference | target] canvas the model learns to generate, the [reference | black] canvas its
condition is encoded from (exactly as inference encodes it) and the caption of the target. The visiting order is a
pure function of the seed and the position in the run, so a resumed run reads the same examples as an
uninterrupted one without any sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.pairs import PAIRS_FILE, Pair, read_pairs
from ..errors import InputError
from ..images import center_crop_resize, condition_canvas, decode_image, to_tensor
from .errors import DatasetError


@dataclass
class TrainingBatch:
    targets: torch.Tensor
    """[B, 3, size, 2*size] in [-1, 1]: reference panel then target panel."""
    conditions: torch.Tensor
    """[B, 3, size, 2*size] in [-1, 1]: reference panel then black."""
    captions: list[str]


class PairDataset:
    """The pairs of a dataset directory, checked when opened: records, files and image headers."""

    def __init__(self, directory: str | Path, size: int):
        self.directory = Path(directory)
        self.size = size
        self.pairs = self.read(self.directory)
        for pair in self.pairs:
            for field in ("reference", "target"):
                self._check_header(pair, field)

    @staticmethod
    def read(directory: Path) -> list[Pair]:
        """The records of `directory`'s pairs.jsonl, without opening the images."""
        try:
            return read_pairs(directory)
        except FileNotFoundError as exc:
            raise DatasetError(f"{exc}; point `dataset` at a directory written by the curation stage") from exc
        except ValueError as exc:
            raise DatasetError(str(exc)) from exc

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: list[int]) -> TrainingBatch:
        examples = [self._example(i) for i in indices]
        return TrainingBatch(
            targets=torch.cat([e[0] for e in examples]),
            conditions=torch.cat([e[1] for e in examples]),
            captions=[self.pairs[i].caption for i in indices],
        )

    def _example(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        reference, target = self._decode(pair, "reference"), self._decode(pair, "target")
        canvas = torch.cat([to_tensor(center_crop_resize(reference, self.size)),
                            to_tensor(center_crop_resize(target, self.size))], dim=3)
        return canvas, condition_canvas(reference, self.size)

    def _decode(self, pair: Pair, field: str) -> Image.Image:
        try:
            return decode_image(self.directory / getattr(pair, field), field)
        except InputError as exc:
            raise DatasetError(f"{self._where(pair, field)}: {exc.message}") from exc

    def _check_header(self, pair: Pair, field: str) -> None:
        try:
            with Image.open(self.directory / getattr(pair, field)) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DatasetError(f"{self._where(pair, field)} is not a readable image ({exc})") from exc

    def _where(self, pair: Pair, field: str) -> str:
        return f"{self.directory / PAIRS_FILE}: pair {pair.id!r}: {field} {getattr(pair, field)!r}"


def sample_indices(num_pairs: int, seed: int, start: int, count: int) -> list[int]:
    """Positions `start` .. `start + count - 1` of the run's endless example stream: every epoch visits each pair
    once, in a permutation drawn from (seed, epoch)."""
    indices = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_pairs)
        indices.append(_epoch_order(num_pairs, seed, epoch)[offset])
    return indices


@lru_cache(maxsize=2)
def _epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(num_pairs, generator=generator).tolist()


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy's SeedSequence): distinct inputs give unrelated streams."""
    return int(np.random.SeedSequence(values).generate_state(1, np.uint64)[0] >> np.uint64(1))
