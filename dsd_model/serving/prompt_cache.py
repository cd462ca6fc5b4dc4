"""Prompt embeddings (T5 + pooled CLIP) reused in-process: a bounded, thread-safe LRU.

The pipeline keys entries by (prompt, max_sequence_length) and calls `get` / `put` (`DSDPipeline.set_prompt_cache`).
Pinned keys are kept outside the LRU and never evicted: the empty negative prompt of every true-CFG request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Iterable

from . import metrics


class PromptCache:
    """At most `max_entries` embeddings, least recently used evicted first, plus the `pinned` keys once computed."""

    def __init__(self, max_entries: int, pinned: Iterable[Hashable] = ()):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._pinned_keys = frozenset(pinned)
        self._pinned: dict = {}
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        with self._lock:
            value = self._pinned.get(key)
            if value is None and key in self._entries:
                self._entries.move_to_end(key)
                value = self._entries[key]
        (metrics.PROMPT_CACHE_MISSES if value is None else metrics.PROMPT_CACHE_HITS).inc()
        return value

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            if key in self._pinned_keys:
                self._pinned[key] = value
                return
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries) + len(self._pinned)
