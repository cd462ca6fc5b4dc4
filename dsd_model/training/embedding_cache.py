"""Precomputed encoder outputs of a paired dataset (`dsd train-cache`), so training needs neither the VAE encoder
nor the text encoders.

    <cache>/
        cache.json                  identity (encoder digests, preprocessing version, size, T5 length), pair ids,
                                    the VAE's shift and scale, the shard files
        empty.safetensors           T5 and pooled CLIP embeddings of the empty prompt (text dropout trains on it)
        shard-00000.safetensors     per pair, stacked: the VAE posterior parameters (mean and log-variance) of the
                                    [reference | target] and [reference | black] canvases, T5 and pooled CLIP

The posterior is cached as a distribution, not a sample: training samples it per step from its own generator, so
a cached run draws exactly what an uncached run draws. The identity is checked when the cache is opened, and a
cache from other encoders, another preprocessing, size or T5 length, or another dataset is refused.

Encoder digests: for a model directory, a digest of the encoders' files (`vae/`, `text_encoder/`,
`text_encoder_2/`, `tokenizer/`, `tokenizer_2/`), so training can check them without loading the encoders; for
the in-process tiny profile, a digest of the built modules' weights and vocabularies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..pipeline import DSDPipeline
from ..serving.latent_cache import tensor_bytes
from .dataset import PairDataset
from .errors import DatasetError

PREPROCESSING_VERSION = 1
"""Bump when the canvases or prompt encoding change (crop, resize, canvas layout, T5 padding): old caches are then
refused instead of training on inputs inference no longer produces."""
ENCODERS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
INDEX_FILE = "cache.json"
EMPTY_FILE = "empty.safetensors"
FIELDS = ("target", "condition", "prompt_embeds", "pooled")


def encoder_identity(pipe: DSDPipeline, size: int, model_dir: Path | None) -> dict:
    """What the cached values depend on: the encoders (by the files of `model_dir`, else by the modules of `pipe`),
    the preprocessing version, the panel size and the T5 length."""
    if model_dir is not None:
        digests = {name: _files_digest(Path(model_dir) / name) for name in ENCODERS}
    else:
        digests = {name: _module_digest(getattr(pipe, name)) for name in ENCODERS}
    return {"encoders": digests, "preprocessing": PREPROCESSING_VERSION, "size": size,
            "max_sequence_length": pipe.max_sequence_length}


def model_dir_of(pipe: DSDPipeline) -> Path | None:
    """The directory a pipeline was loaded from; None for one built in-process (the tiny profile)."""
    name = pipe.config.get("_name_or_path")
    return Path(name) if name and Path(name).is_dir() else None


def _files_digest(directory: Path) -> str:
    if not directory.is_dir():
        raise DatasetError(f"{str(directory)!r} does not exist: the model directory has no {directory.name}")
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _module_digest(component) -> str:
    digest = hashlib.sha256()
    if isinstance(component, torch.nn.Module):
        config = component.config if isinstance(component.config, dict) else component.config.to_dict()
        config = {k: v for k, v in config.items() if not k.startswith("_")}  # bookkeeping, some in set order
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in component.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor_bytes(tensor))
    else:
        digest.update(json.dumps(component.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def write_cache(
    pipe: DSDPipeline, dataset: PairDataset, directory: Path, model_dir: Path | None = None, shard_pairs: int = 256,
    batch_size: int = 4,
) -> Path:
    """Encode every pair of `dataset` with `pipe`'s VAE and text encoders into `directory`; return its index file.
    Written shard by shard and indexed last, so an interrupted run never leaves something that opens as a cache."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX_FILE).unlink(missing_ok=True)
    device = pipe._execution_device
    empty_embeds, empty_pooled = pipe.encode_prompt([""])
    save_file({"prompt_embeds": empty_embeds[0].cpu().contiguous(), "pooled": empty_pooled[0].cpu().contiguous()},
              str(directory / EMPTY_FILE))
    shards = []
    with tqdm(total=len(dataset), desc="cache", unit="pair") as bar:
        for first in range(0, len(dataset), shard_pairs):
            indices = list(range(first, min(first + shard_pairs, len(dataset))))
            parts = {field: [] for field in FIELDS}
            for start in range(0, len(indices), batch_size):
                batch = dataset.batch(indices[start : start + batch_size])
                canvases = torch.cat([batch.targets, batch.conditions]).to(device=device, dtype=pipe.vae.dtype)
                target, condition = pipe.vae.encode(canvases).latent_dist.parameters.chunk(2)
                prompt_embeds, pooled = pipe.encode_prompt(batch.captions)
                for field, value in zip(FIELDS, (target, condition, prompt_embeds, pooled), strict=True):
                    parts[field].append(value.cpu())
                bar.update(len(batch.captions))
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({field: torch.cat(values).contiguous() for field, values in parts.items()}, str(directory / name))
            shards.append({"file": name, "pairs": len(indices)})
    index = {
        "identity": encoder_identity(pipe, dataset.size, model_dir),
        "pairs": [pair.id for pair in dataset.pairs],
        "shift_factor": pipe.vae.config.shift_factor,
        "scaling_factor": pipe.vae.config.scaling_factor,
        "shards": shards,
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return directory / INDEX_FILE


@dataclass
class CachedBatch:
    """A batch as the encoders would have produced it: posterior parameters and prompt embeddings."""

    targets: torch.Tensor
    conditions: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    empty_embeds: torch.Tensor
    empty_pooled: torch.Tensor
    shift_factor: float
    scaling_factor: float

    def __len__(self) -> int:
        return len(self.targets)


class EmbeddingCache:
    """A cache directory opened for training, checked against the encoders it must stand in for."""

    def __init__(self, directory: str | Path, identity: dict, pair_ids: list[str]):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"embedding_cache {str(self.directory)!r} has no readable {INDEX_FILE} ({exc}); write it with "
                "`dsd train-cache`"
            ) from exc
        changed = [key for key in identity if index["identity"].get(key) != identity[key]]
        if changed:
            details = "; ".join(f"{key}: cache {index['identity'].get(key)!r}, model {identity[key]!r}"
                                for key in changed)
            raise DatasetError(
                f"embedding_cache {str(self.directory)!r} was written for other inputs ({details}); rewrite it with "
                "`dsd train-cache` for this model and settings"
            )
        if index["pairs"] != pair_ids:
            raise DatasetError(
                f"embedding_cache {str(self.directory)!r} holds {len(index['pairs'])} pairs that are not the "
                f"dataset's {len(pair_ids)} pairs in order; rewrite it with `dsd train-cache`"
            )
        self.shards = [safe_open(str(self.directory / shard["file"]), "pt") for shard in index["shards"]]
        self.locations = [(number, offset) for number, shard in enumerate(index["shards"])
                          for offset in range(shard["pairs"])]
        empty = load_file(str(self.directory / EMPTY_FILE))
        self.empty_embeds, self.empty_pooled = empty["prompt_embeds"], empty["pooled"]
        self.shift_factor, self.scaling_factor = index["shift_factor"], index["scaling_factor"]

    def __len__(self) -> int:
        return len(self.locations)

    def batch(self, indices: list[int]) -> CachedBatch:
        """The cached values of `indices`, read from the memory-mapped shards (a cache may exceed memory)."""
        rows = [self.locations[i] for i in indices]
        values = [torch.stack([self.shards[n].get_slice(field)[offset] for n, offset in rows]) for field in FIELDS]
        return CachedBatch(*values, self.empty_embeds, self.empty_pooled, self.shift_factor, self.scaling_factor)
