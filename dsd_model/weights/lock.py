"""`weights.lock.json`: what `dsd weights pull` wrote into a weights directory, and the check of a directory
against it.

The lock lists every file the pull wrote, by its path in the directory: the repository and commit it came from,
its path there, its size and its sha256. A check compares sizes always (one `stat` per file, so it costs nothing at
start-up) and sha256 on request (reads every byte).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import WeightsError

LOCK_NAME = "weights.lock.json"
LOCK_FORMAT = 1
IGNORED = {LOCK_NAME, "lost+found"}
"""Names at the top of a weights directory that are not weights: the lock itself, and the folder a fresh ext4
volume (a new PersistentVolumeClaim) comes with."""
HASH_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class LockedFile:
    path: str
    """Relative to the weights directory, `/`-separated."""
    repository: str
    revision: str
    """The commit the file was taken from."""
    file: str
    """Its path in the repository."""
    size: int
    sha256: str


@dataclass
class Lock:
    files: list[LockedFile]

    def write(self, directory: Path) -> Path:
        """Write `directory/weights.lock.json` atomically (a rename), sorted by path."""
        path = Path(directory) / LOCK_NAME
        document = {"format": LOCK_FORMAT, "files": [asdict(f) for f in sorted(self.files, key=lambda f: f.path)]}
        partial = path.with_name(LOCK_NAME + ".partial")
        partial.write_text(json.dumps(document, indent=2) + "\n")
        partial.replace(path)
        return path

    @classmethod
    def read(cls, path: Path) -> "Lock":
        try:
            document = json.loads(Path(path).read_text())
            if document.get("format") != LOCK_FORMAT:
                raise ValueError(f"format {document.get('format')!r}, expected {LOCK_FORMAT}")
            return cls([LockedFile(**entry) for entry in document["files"]])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{str(path)!r} is not a weights lock file written by `dsd weights pull`: {exc}") from exc


@dataclass
class Verification:
    """Every difference between a directory and its lock file."""

    directory: Path
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    """`path: what differs`."""
    extra: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.extra)

    def lines(self) -> list[str]:
        return ([f"missing: {path}" for path in self.missing] + [f"changed: {line}" for line in self.changed]
                + [f"extra: {path}" for path in self.extra])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(directory: Path, full: bool = False, lock: Lock | None = None) -> Verification:
    """Compare `directory` with its lock file (`directory/weights.lock.json` unless `lock` is given): sizes always,
    sha256 too when `full` (files hashed in parallel; hashlib releases the GIL)."""
    directory = Path(directory)
    lock_path = directory / LOCK_NAME
    if lock is None:
        if not lock_path.is_file():
            raise WeightsError(f"{str(directory)!r} has no {LOCK_NAME}; `dsd weights pull` writes it")
        lock = Lock.read(lock_path)
    result = Verification(directory)
    present = []
    for entry in lock.files:
        path = directory / entry.path
        if not path.is_file():
            result.missing.append(entry.path)
        elif (size := path.stat().st_size) != entry.size:
            result.changed.append(f"{entry.path}: {size} bytes, the lock says {entry.size}")
        else:
            present.append(entry)
    if full:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = pool.map(lambda entry: sha256_of(directory / entry.path), present)
            for entry, digest in zip(present, digests):
                if digest != entry.sha256:
                    result.changed.append(f"{entry.path}: sha256 {digest}, the lock says {entry.sha256}")
    locked = {entry.path for entry in lock.files}
    result.extra = sorted(path for path in _files(directory) if path not in locked)
    result.checked = len(lock.files)
    return result


def _files(directory: Path) -> list[str]:
    found = []
    for root, folders, names in os.walk(directory):
        if Path(root) == directory:
            folders[:] = [name for name in folders if name not in IGNORED]
            names = [name for name in names if name not in IGNORED]
        found += [(Path(root) / name).relative_to(directory).as_posix() for name in names]
    return found
