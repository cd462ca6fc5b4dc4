"""`--shard i/n`: workers split the grids and curation stages by a stable hash of the grid ids, each writing its own
manifest shard; merged, their output equals one worker's, item for item."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsd_model.cli import main
from dsd_model.data.manifest import Manifest, Shard, shard_files

ROOT = Path(__file__).resolve().parents[2]
GRID_FLAGS = ["--width", "64", "--height", "64", "--num-inference-steps", "2", "--max-sequence-length", "32",
              "--batch-size", "1", "--grids-per-prompt", "2", "--curate-backend", "embedding"]
"""Offline and per item: the tiny teacher renders each grid alone from its own seed, the embedding judge looks at
one grid at a time, so a grid's record does not depend on which worker made it."""


def stages(work: Path, *extra: str) -> list[list[str]]:
    grids = [f for f in GRID_FLAGS if f not in ("--curate-backend", "embedding")]
    return [["data", "grids", "--work-dir", str(work), *grids, *extra],
            ["data", "curate", "--work-dir", str(work), "--curate-backend", "embedding", *extra]]


def worker(work: Path, shard: str) -> subprocess.Popen:
    """One worker process: its share of the grids, then its share of the curation (which only needs its own grids,
    since both stages split by the same hash)."""
    script = f"from dsd_model.cli import main\nfor argv in {stages(work, '--shard', shard)!r}:\n    main(argv)\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_two_shard_workers_then_merge_equal_one_worker(tmp_path, captions_file):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["data", "prompts", "--work-dir", str(single), "--captions", str(captions_file), "--limit", "3",
                 "--prompt-backend", "template"]) == 0
    shutil.copytree(single, sharded)

    workers = [worker(sharded, "0/2"), worker(sharded, "1/2")]
    for stage in stages(single):
        assert main(stage) == 0
    for process in workers:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]

    grid_shards = shard_files(sharded / "grids.jsonl")
    assert [p.name for p in grid_shards] == ["grids.shard-00000-of-00002.jsonl", "grids.shard-00001-of-00002.jsonl"]
    ids = [set(Manifest(p).records()) for p in grid_shards]
    assert ids[0] and ids[1] and not ids[0] & ids[1], "each worker renders its own, non-empty share"
    assert not (sharded / "grids.jsonl").exists()

    assert main(["data", "merge", "--work-dir", str(sharded)]) == 0
    assert not shard_files(sharded / "grids.jsonl") and not shard_files(sharded / "curation.jsonl")
    for name in ("grids.jsonl", "curation.jsonl"):
        expected, merged = Manifest(single / name).records(), Manifest(sharded / name).records()
        assert len(expected) == 6 and expected == merged
    for grid in Manifest(single / "grids.jsonl").records().values():
        difference = np.abs(pixels(single / grid["path"]) - pixels(sharded / grid["path"])).max()
        assert difference <= 1, f"grid {grid['id']}: pixels differ by {difference} (rounding bound: 1 level)"

    assert main(["data", "pairs", "--work-dir", str(sharded)]) == 0
    assert main(["data", "pairs", "--work-dir", str(single)]) == 0
    assert sorted((single / "dataset/pairs.jsonl").read_text().splitlines()) == sorted(
        (sharded / "dataset/pairs.jsonl").read_text().splitlines()
    )


def test_a_stage_reads_unmerged_shards_and_resumes_across_shard_counts(tmp_path):
    manifest = Manifest(tmp_path / "grids.jsonl")
    manifest.append({"id": "a", "n": 1})
    Shard(0, 2).manifest(manifest.path).append({"id": "b", "n": 2})
    Shard(3, 4).manifest(manifest.path).append({"id": "a", "n": 3})
    assert manifest.records() == {"a": {"id": "a", "n": 3}, "b": {"id": "b", "n": 2}}


def test_shards_split_ids_without_overlap_or_gaps():
    ids = [f"prompt-{i}_{k}" for i in range(200) for k in range(2)]
    owners = [[s for s in range(3) if Shard(s, 3).owns(item)] for item in ids]
    assert all(len(owner) == 1 for owner in owners)
    assert all(60 < sum(owner == [s] for owner in owners) < 210 for s in range(3))


@pytest.mark.parametrize(("value", "message"), [("2/2", "index 2 must be at least 0 and below the count 2"),
                                                ("1", "must be INDEX/COUNT, e.g. 0/4, got '1'"),
                                                ("0/0", "below the count 0")])
def test_bad_shard_names_the_field_and_the_limit(value, message, tmp_path, capsys):
    assert main(["data", "grids", "--work-dir", str(tmp_path), "--shard", value]) == 2
    error = capsys.readouterr().err
    assert "shard" in error and message in error
