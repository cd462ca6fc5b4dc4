"""Stage manifests and atomic file writes: what makes every stage resumable without doing any item twice.

A manifest is an append-only JSONL file with one record per finished item, keyed by `id`; a later record of the
same id replaces an earlier one. Each record is appended with one write and flushed to disk, so an interrupted run
leaves at most a torn last line, which opening the manifest drops.

Workers that split a stage (`--shard i/n`) each append to a shard file of their own next to the manifest,
`grids.shard-00000-of-00004.jsonl`, so no two processes write one file (a shared volume need not support
concurrent appends). Reading a manifest reads it together with its shard files; `merge_shards` folds them in.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .pairs import read_jsonl


class Manifest:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()

    def records(self) -> dict[str, dict]:
        """Every item's latest record, from the manifest and then its shard files."""
        records = {}
        for path in [self.path, *shard_files(self.path)]:
            if path.exists():
                records.update((record["id"], record) for _, record in read_jsonl(path))
        return records

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)


@dataclass(frozen=True)
class Shard:
    """Worker `index` of `count`: it owns the items whose id hashes to `index` (a stable hash, so the split needs no
    coordination and does not move when items are added)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if match is None:
            raise ValueError(f"must be INDEX/COUNT, e.g. 0/4, got {text!r}")
        index, count = int(match[1]), int(match[2])
        if not 0 <= index < count:
            raise ValueError(f"index {index} must be at least 0 and below the count {count}")
        return cls(index, count)

    def owns(self, item_id: str) -> bool:
        return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") % self.count == self.index

    def manifest(self, path: Path) -> Manifest:
        """This worker's shard file of the manifest at `path`."""
        return Manifest(path.with_name(f"{path.stem}.shard-{self.index:05d}-of-{self.count:05d}{path.suffix}"))


def shard_files(path: Path) -> list[Path]:
    pattern = re.compile(re.escape(path.stem) + r"\.shard-\d{5}-of-\d{5}" + re.escape(path.suffix))
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def merge_shards(path: Path) -> int:
    """Fold the shard files of the manifest at `path` into it (rewritten atomically) and delete them; return how
    many shard files were merged. Run it when no worker writes any more."""
    shards = shard_files(path)
    if shards:
        records = Manifest(path).records()
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records.values())
        write_atomic(path, lines.encode("utf-8"))
        for shard in shards:
            shard.unlink()
    return len(shards)


@dataclass(frozen=True)
class StageReport:
    """What one run of a stage did: items finished now (`failed` of them recorded as failures; failures of earlier
    runs are tried again), items skipped because an earlier run had finished them, and judge calls the curation
    pre-filter saved."""

    stage: str
    done: int
    skipped: int
    failed: int = 0
    saved: int = 0

    def __str__(self) -> str:
        saved = f", {self.saved} judge call(s) saved by the pre-filter" if self.saved else ""
        return f"{self.stage}: {self.done} done ({self.failed} failed), {self.skipped} already done before{saved}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename it, so `path` is either absent or complete (also when several
    threads write the same path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def write_json(path: Path, value) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
