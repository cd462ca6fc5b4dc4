"""Stage manifests and atomic file writes: what makes every stage resumable without doing any item twice.

A manifest is an append-only JSONL file with one record per finished item, keyed by `id`; a later record of the
same id replaces an earlier one. Each record is appended with one write and flushed to disk, so an interrupted run
leaves at most a torn last line, which opening the manifest drops.
"""

from __future__ import annotations

import io
import json
import os
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
        if not self.path.exists():
            return {}
        return {record["id"]: record for _, record in read_jsonl(self.path)}

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
