"""Adapters by name for the engine: the pinned ones (loaded at start from settings, or the tiny profile's) and the
`.safetensors` files of adapter store directories (`DSD_ADAPTER_DIRS`), loaded on first use.

    acquire(name) → LoadedAdapter     on the engine's preparing thread: a hit, or a read, check and load
    release(adapter)                  when the request that acquired it has left the engine

- A file's name without `.safetensors` is the adapter's name (the first directory that has it wins). A file added to
  a directory is servable at once; a file that changes is read again and keyed by the sha256 of its bytes, so a
  rewrite with the same content is a hit. A file that does not parse (a bad file, or one being written) fails the
  requests that name it with an `InputError` naming the adapter and why, unless an earlier version of it parsed: that
  version keeps serving, so a half-written file is never served.
- Loaded store adapters live in an LRU within `budget_bytes`. An adapter is never evicted while a request uses it or
  while it is folded into the weights; pinned adapters never are. Superseded versions leave when their last request
  does.
- An adapter whose metadata names another base transformer (`base_transformer_digest`) is refused, naming both.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import ADAPTER_NAME, BASE_DIGEST_KEY, LORA_KEY, AdapterRegistry, LoadedAdapter
from ..errors import InputError, WeightsError
from . import metrics

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 * 2**20
"""safetensors' own limit on a header; a larger one is a damaged file."""


@dataclass(frozen=True)
class StoreFile:
    name: str
    path: Path
    size: int
    mtime_ns: int


@dataclass(eq=False)
class Entry:
    adapter: LoadedAdapter
    file: StoreFile
    users: int = 0
    superseded: bool = False


@dataclass
class AdapterInfo:
    """What `GET /v1/adapters` and `ListAdapters` report of one adapter."""

    name: str
    source: str
    """`pinned` (settings or the tiny profile) or `store` (an adapter store directory)."""
    loaded: bool
    rank: int | None
    size_bytes: int
    digest: str | None
    """sha256 of the file's bytes (of the tensors for a built-in adapter); None for a store file not loaded yet."""
    base_transformer_digest: str | None
    modes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None


def scan(directories: list[Path]) -> dict[str, StoreFile]:
    """The adapter files of `directories` now, by name (the first directory that has a name wins); a missing or
    unreadable directory has none."""
    found: dict[str, StoreFile] = {}
    for directory in directories:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            name = entry.name.removesuffix(SUFFIX)
            if not entry.name.endswith(SUFFIX) or not ADAPTER_NAME.match(name) or name in found:
                continue
            try:
                if entry.is_file():
                    stat = entry.stat()
                    found[name] = StoreFile(name, Path(entry.path), stat.st_size, stat.st_mtime_ns)
            except OSError:
                continue
    return found


def describe(file: StoreFile) -> AdapterInfo:
    """What a store file's header says of it, without loading it; an unreadable header is reported in `metadata`."""
    try:
        header, metadata = read_header(file.path)
    except (OSError, ValueError, WeightsError) as exc:
        header, metadata = {}, {"error": str(exc)}
    ranks = [entry["shape"][0] for key, entry in header.items() if (match := LORA_KEY.match(key))
             and match["kind"] == "A" and isinstance(entry, dict) and entry.get("shape")]
    return AdapterInfo(name=file.name, source="store", loaded=False, rank=max(ranks, default=None),
                       size_bytes=file.size, digest=None, base_transformer_digest=metadata.get(BASE_DIGEST_KEY),
                       metadata=metadata, path=str(file.path))


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """The tensor entries and metadata of a safetensors file's header, without reading its tensors."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= MAX_HEADER_BYTES:
            raise WeightsError(f"{str(path)!r} is not a safetensors file (header length {length})")
        header = json.loads(handle.read(length))
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


class AdapterStore:
    """See the module docstring. `acquire` runs on the preparing thread; the rest on any thread."""

    def __init__(self, registry: AdapterRegistry, directories: list[Path], budget_bytes: int):
        self.registry = registry
        self.directories = [Path(d) for d in directories]
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[LoadedAdapter, Entry] = OrderedDict()
        """Loaded store adapters, least recently used first."""
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ names

    def files(self) -> dict[str, StoreFile]:
        """The adapter files of the store directories now, by name."""
        return scan(self.directories)

    def names(self) -> list[str]:
        return sorted(set(self.registry.names) | set(self.files()))

    def check(self, name: str) -> None:
        """Raise an `InputError` naming the adapters there are unless `name` is one of them."""
        if name not in self.registry.adapters and name not in self.files():
            raise self.unknown(name)

    def unknown(self, name: str) -> InputError:
        return InputError("adapter", f"{name!r} is not an adapter of this server; adapters: "
                                     f"{', '.join(self.names()) or 'none'}")

    # ------------------------------------------------------------------ use

    def acquire(self, name: str | None) -> LoadedAdapter | None:
        """The adapter `name` now, held for one request until `release`; loads a store file when needed."""
        if name is None:
            return None
        pinned = self.registry.adapters.get(name)
        if pinned is not None:
            return pinned
        file = self.files().get(name)
        if file is None:
            raise self.unknown(name)
        with self._lock:
            current = self._current(name)
            if current is not None and current.file == file:
                return self._hold(current)
        started = time.monotonic()
        try:
            data = file.path.read_bytes()
            adapter = self.registry.read(data, name, origin=f"adapter file {str(file.path)!r}")
        except (OSError, WeightsError) as exc:
            metrics.ADAPTER_LOADS.labels(outcome="failed").inc()
            with self._lock:
                current = self._current(name)
                if current is not None:
                    logger.warning("adapter %r: %s; serving its earlier version %s", name, exc,
                                   current.adapter.digest[:12])
                    return self._hold(current)
            raise InputError("adapter", f"{name!r} cannot be loaded: {exc}") from exc
        with self._lock:
            current = self._current(name)
            if current is not None and current.adapter.digest == adapter.digest:
                current.file = file  # rewritten with the same content
                return self._hold(current)
            if current is not None:
                current.superseded = True
            entry = Entry(adapter, file)
            self._entries[adapter] = entry
            held = self._hold(entry, hit=False)
            self._evict()
        metrics.ADAPTER_LOADS.labels(outcome="loaded").inc()
        metrics.ADAPTER_LOAD_SECONDS.observe(time.monotonic() - started)
        logger.info("loaded adapter %r (%s, %.1f MiB) in %.2f s", name, adapter.digest[:12], adapter.nbytes / 2**20,
                    time.monotonic() - started)
        return held

    def release(self, adapter: LoadedAdapter | None) -> None:
        with self._lock:
            entry = self._entries.get(adapter)
            if entry is not None:
                entry.users -= 1
                self._evict()

    def _current(self, name: str) -> Entry | None:
        """The newest loaded version of `name` (caller holds the lock)."""
        for entry in reversed(self._entries.values()):
            if entry.adapter.name == name and not entry.superseded:
                return entry
        return None

    def _hold(self, entry: Entry, hit: bool = True) -> LoadedAdapter:
        entry.users += 1
        self._entries.move_to_end(entry.adapter)
        if hit:
            metrics.ADAPTER_CACHE_HITS.inc()
        return entry.adapter

    def _evict(self) -> None:
        """Drop superseded versions nobody uses, then least recently used adapters until the budget holds (caller
        holds the lock). In use or folded: kept, whatever the budget."""
        for adapter, entry in list(self._entries.items()):
            if entry.superseded and self._evictable(entry):
                del self._entries[adapter]
        total = sum(entry.adapter.nbytes for entry in self._entries.values())
        for adapter, entry in list(self._entries.items()):
            if total <= self.budget_bytes:
                break
            if self._evictable(entry):
                del self._entries[adapter]
                total -= adapter.nbytes
                metrics.ADAPTER_EVICTIONS.inc()
                logger.info("evicted adapter %r (%s) to stay within %d bytes", adapter.name, adapter.digest[:12],
                            self.budget_bytes)
        metrics.ADAPTER_CACHE_BYTES.set(total)

    def _evictable(self, entry: Entry) -> bool:
        return entry.users == 0 and not self.registry.is_folded(entry.adapter)

    @property
    def loaded(self) -> list[LoadedAdapter]:
        with self._lock:
            return [entry.adapter for entry in self._entries.values() if not entry.superseded]

    # ------------------------------------------------------------------ listing

    def listing(self, modes: dict[str, str] | None = None) -> list[AdapterInfo]:
        """Every adapter this server can serve, pinned first, with what is known of it without loading it."""
        by_adapter: dict[str, list[str]] = {}
        for mode, adapter in (modes or {}).items():
            by_adapter.setdefault(adapter, []).append(mode)
        infos = [self._info(adapter, "pinned", None, by_adapter.get(name, []))
                 for name, adapter in self.registry.adapters.items()]
        loaded = {adapter.name: adapter for adapter in self.loaded}
        for name, file in sorted(self.files().items()):
            if name in self.registry.adapters:
                continue
            adapter = loaded.get(name)
            if adapter is not None:
                infos.append(self._info(adapter, "store", file, by_adapter.get(name, [])))
                continue
            info = describe(file)
            info.modes = by_adapter.get(name, [])
            infos.append(info)
        return infos

    @staticmethod
    def _info(adapter: LoadedAdapter, source: str, file: StoreFile | None, modes: list[str]) -> AdapterInfo:
        return AdapterInfo(name=adapter.name, source=source, loaded=True, rank=adapter.rank,
                           size_bytes=file.size if file is not None else adapter.nbytes, digest=adapter.digest,
                           base_transformer_digest=adapter.metadata.get(BASE_DIGEST_KEY), modes=modes,
                           metadata=dict(adapter.metadata), path=str(file.path) if file is not None else None)


def publish(run: Path, name: str, store: Path, replace: bool = False) -> Path:
    """Copy a trained adapter into an adapter store as `<store>/<name>.safetensors`, atomically (a serving replica
    never reads it half-written), with its provenance in the file's metadata: the base transformer digest the
    training recorded, the training settings and their sha256, and the last eval-split scores when the run has
    them. `run` is a `dsd train` output directory or an adapter file. Returns the written path."""
    from safetensors.torch import load_file, save_file

    if not ADAPTER_NAME.match(name):
        raise InputError("name", f"{name!r} must match {ADAPTER_NAME.pattern}")
    run = Path(run)
    source = run / "adapter.safetensors" if run.is_dir() else run
    if not source.is_file() or source.suffix != SUFFIX:
        raise InputError("run", f"{str(run)!r} is neither a training run directory with adapter.safetensors nor an "
                                "adapter .safetensors file")
    target = Path(store) / f"{name}{SUFFIX}"
    if target.exists() and not replace:
        raise InputError("name", f"{str(target)!r} exists; pass --replace to serve the new adapter under this name")
    _, metadata = read_header(source)
    metadata = dict(metadata)
    config = run / "config.json" if run.is_dir() else None
    if config is not None and config.is_file():
        text = json.dumps(json.loads(config.read_text()), sort_keys=True, separators=(",", ":"))
        metadata["training_config"] = text
        metadata["training_config_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    summary = eval_summary(run / "eval.csv") if run.is_dir() else None
    if summary is not None:
        metadata["eval_summary"] = json.dumps(summary, sort_keys=True)
    metadata["published_from"] = str(source.resolve())
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        save_file(load_file(str(source)), str(partial), metadata=metadata)
        partial.chmod(0o644)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def eval_summary(path: Path) -> dict | None:
    """The last step's mean of each metric in a training run's `eval.csv` (step, metric, mean, n); None without one."""
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    last = max(int(row["step"]) for row in rows)
    return {"step": last, **{row["metric"]: float(row["mean"]) for row in rows if int(row["step"]) == last}}
