"""A tiny benchmark: two subjects, two prompts each."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import random_image

SUBJECTS = {"fox": "live", "teapot": "object"}
PROMPTS = ["a {} on the beach", "a {} in the snow"]


def write_jsonl_benchmark(root: Path) -> Path:
    """Two subjects (one live, one object), two prompts each, 64 px references."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for seed, (name, category) in enumerate(SUBJECTS.items()):
        random_image(64, 64, seed=seed).save(root / f"{name}.png")
        lines += [{"subject": name, "image": f"{name}.png", "prompt": p.format(name), "category": category}
                  for p in PROMPTS]
    path = root / "benchmark.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path
