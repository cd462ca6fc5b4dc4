"""The four stages on the tiny teacher (64x64 grids, 2 steps) against the loopback chat server."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dsd_model.data.assemble import CONTACT_SHEET_FILE, SUMMARY_FILE, build_pairs
from dsd_model.data.chat import ChatError
from dsd_model.data.curate import CURATION_FILE, curate_grids
from dsd_model.data.grids import GRIDS_FILE, render_grids
from dsd_model.data.layout import parse_layout, split_grid
from dsd_model.data.manifest import Manifest, StageReport
from dsd_model.data.pairs import load_hf_dataset, read_pairs
from dsd_model.data.prompts import PROMPTS_FILE, make_prompts
from dsd_model.errors import InputError


def manifest(settings, name) -> dict:
    return Manifest(settings.work_dir / name).records()


def test_end_to_end_with_faults_and_full_resume(chat_server, make_settings, captions_file, counting_teacher):
    settings = make_settings(
        caption_filter=True, concurrency=1, grids_per_prompt=2, shard_size=4, max_retries=3, request_timeout_s=0.5
    )
    chat_server.fault(("status", 429, {"Retry-After": "0"}), ("status", 500), ("sleep", 1.0))
    report = make_prompts(settings, captions_file)
    assert (report.done, report.failed) == (5, 1)

    teacher = counting_teacher()
    assert render_grids(settings, teacher).done == 6
    assert (teacher.calls, teacher.rendered) == (2, 6)
    grids = manifest(settings, GRIDS_FILE)
    assert sorted(g["path"].split("/")[1] for g in grids.values()) == ["00000"] * 4 + ["00001"] * 2
    assert len({g["seed"] for g in grids.values()}) == 6
    for grid in grids.values():
        with Image.open(settings.work_dir / grid["path"]) as image:
            assert (image.size, image.mode) == ((64, 64), "RGB")

    chat_server.fault(
        ("reply", "The panels look alike to me."),
        ("reply", '```json\n{"subject": "red plush fox", "panels": ["a", "b"], "identical": true}\n```'),
        ("reply", '{"subject": "red plush fox", "panels": ['),
        ("status", 503, {"Retry-After": "0"}),
    )
    report = curate_grids(settings)
    assert (report.done, report.failed) == (6, 1)
    assert chat_server.count("verdict") == 3 + 1 + 5
    verdicts = manifest(settings, CURATION_FILE)
    failed = [v for v in verdicts.values() if v["status"] == "failed"]
    assert len(failed) == 1 and "no usable reply in 3 attempt(s)" in failed[0]["error"]

    summary = build_pairs(settings)
    assert summary["prompts"] == {"ok": 3, "filtered": 1, "failed": 1}
    assert summary["grids"] == {"rendered": 6}
    # The judge's five verdicts: all four panels consistent, one drifted, only one consistent, all, one drifted.
    assert summary["curation"] == {"accepted": 4, "rejected": 1, "failed": 1}
    assert summary["acceptance_rate"] == 0.8
    assert summary["per_panel"] == {
        "grids": {"kept": 4, "dropped": 1},
        "panels": {"kept": 4 + 3 + 1 + 4 + 3, "dropped": 5},
        "pairs": {"kept": 12 + 6 + 12 + 6, "dropped": 6 + 12 + 6},
        "per_grid_verdict": {"grids": {"kept": 2, "dropped": 3}, "pairs": {"kept": 24, "dropped": 36}},
    }
    assert summary["pairs"] == 36
    assert json.loads((settings.work_dir / SUMMARY_FILE).read_text()) == summary
    with Image.open(settings.work_dir / CONTACT_SHEET_FILE) as sheet:
        assert sheet.format == "PNG" and sheet.width > 6 * 64

    dataset = load_hf_dataset(settings.resolved_dataset_dir)
    assert len(dataset) == 36
    drifted = {v["id"]: [p["index"] for p in v["panels"] if not p["consistent"]] for v in verdicts.values()
               if v["status"] == "accepted"}
    assert sorted(map(len, drifted.values())) == [0, 0, 1, 1]
    assert not any(int(row["id"][-4]) in drifted[row["grid"]] or int(row["id"][-1]) in drifted[row["grid"]]
                   for row in dataset.select_columns(["id", "grid"]))
    row = dataset[0]
    grid_id, reference, target = row["grid"], int(row["id"][-4]), int(row["id"][-1])
    assert row["caption"] == verdicts[grid_id]["panels"][target]["description"]
    assert row["subject"] == verdicts[grid_id]["subject"]
    with Image.open(settings.work_dir / grids[grid_id]["path"]) as image:
        panels = split_grid(image.convert("RGB"), parse_layout("2x2"))
    np.testing.assert_array_equal(np.asarray(row["reference"]), np.asarray(panels[reference]))
    np.testing.assert_array_equal(np.asarray(row["target"]), np.asarray(panels[target]))
    assert row["reference"].size == (32, 32)

    # A rerun finishes nothing twice and tries every failed item again, past the reply cache.
    files = {p: p.stat().st_mtime_ns for p in settings.work_dir.rglob("*.png") if p.name != CONTACT_SHEET_FILE}
    filters, verdict_requests = chat_server.count("filter"), chat_server.count("verdict")
    idle_teacher = counting_teacher()
    assert make_prompts(settings, captions_file) == StageReport("prompts", done=1, skipped=4, failed=1)
    assert chat_server.count("filter") - filters == 3
    assert render_grids(settings, idle_teacher).skipped == 6
    assert curate_grids(settings) == StageReport("curate", done=1, skipped=5, failed=0)
    assert chat_server.count("verdict") - verdict_requests == 1
    assert build_pairs(settings)["curation"] == {"accepted": 4, "rejected": 2, "failed": 0}
    assert idle_teacher.calls == 0
    assert {p: p.stat().st_mtime_ns for p in files} == files
    requests = chat_server.count()
    assert curate_grids(settings).skipped == 6 and chat_server.count() == requests


def test_recorded_seed_reproduces_a_grid(captions_file, make_settings, tiny_teacher):
    settings = make_settings(prompt_backend="template")
    make_prompts(settings, captions_file, limit=3)
    render_grids(settings, tiny_teacher)
    grid = next(iter(manifest(settings, GRIDS_FILE).values()))
    alone = tiny_teacher(
        prompt=grid["prompt"],
        height=grid["height"],
        width=grid["width"],
        num_inference_steps=grid["num_inference_steps"],
        guidance_scale=grid["guidance_scale"],
        max_sequence_length=settings.max_sequence_length,
        generator=torch.Generator().manual_seed(grid["seed"]),
    ).images[0]
    with Image.open(settings.work_dir / grid["path"]) as batched:
        difference = np.abs(np.asarray(batched, dtype=int) - np.asarray(alone, dtype=int))
    assert difference.max() <= 1


def test_interrupted_rendering_resumes_without_rendering_twice(make_settings, captions_file, counting_teacher):
    settings = make_settings(prompt_backend="template", batch_size=2)
    make_prompts(settings, captions_file)
    with pytest.raises(KeyboardInterrupt):
        render_grids(settings, counting_teacher(stop_at=1))
    paths = [settings.work_dir / grid["path"] for grid in manifest(settings, GRIDS_FILE).values()]
    first = {path: path.stat().st_mtime_ns for path in paths}
    assert len(first) == 2

    teacher = counting_teacher()
    report = render_grids(settings, teacher)
    assert (report.done, report.skipped, teacher.rendered) == (3, 2, 3)
    assert len(manifest(settings, GRIDS_FILE)) == 5
    assert {path: path.stat().st_mtime_ns for path in first} == first


def test_interrupted_curation_resumes_without_asking_twice(chat_server, make_settings, captions_file, tiny_teacher):
    settings = make_settings(prompt_backend="template", concurrency=1, max_retries=0)
    make_prompts(settings, captions_file)
    render_grids(settings, tiny_teacher)
    chat_server.down_after = 2
    with pytest.raises(ChatError, match="vlm_base_url"):
        curate_grids(settings)
    assert len(manifest(settings, CURATION_FILE)) == 2

    chat_server.down_after = None
    before = chat_server.count("verdict")
    report = curate_grids(settings)
    assert (report.done, report.skipped) == (3, 2)
    assert chat_server.count("verdict") - before == 3


def test_two_panel_layout_pairs_top_and_bottom(chat_server, make_settings, captions_file, tiny_teacher):
    settings = make_settings(prompt_backend="template", layout="1x2", width=32, height=64, concurrency=1)
    make_prompts(settings, captions_file, limit=1)
    render_grids(settings, tiny_teacher)
    curate_grids(settings)
    assert build_pairs(settings)["pairs"] == 2
    pairs = read_pairs(settings.resolved_dataset_dir)
    assert [(p.reference[-6:], p.target[-6:]) for p in pairs] == [("p0.png", "p1.png"), ("p1.png", "p0.png")]
    grid = next(iter(manifest(settings, GRIDS_FILE).values()))
    with Image.open(settings.work_dir / grid["path"]) as image:
        top = np.asarray(image.convert("RGB"))[:32]
    with Image.open(settings.resolved_dataset_dir / pairs[0].reference) as reference:
        np.testing.assert_array_equal(np.asarray(reference), top)


def test_stages_need_their_inputs(make_settings):
    settings = make_settings()
    with pytest.raises(InputError, match="work_dir: .*prompts.jsonl' has no usable prompts"):
        render_grids(settings)
    with pytest.raises(InputError, match="work_dir: .* has no rendered grids"):
        curate_grids(settings)
    with pytest.raises(InputError, match="work_dir: .* has no curated grids"):
        build_pairs(settings)
    assert not (settings.work_dir / PROMPTS_FILE).exists()
