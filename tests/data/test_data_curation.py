"""Per-panel curation: the offline embedding judge (pixel statistics and a local image encoder), the pre-filter in
front of the VLM, and pairs formed only between consistent panels."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2Model,
)

from dsd_model.data.assemble import CONTACT_SHEET_FILE, build_pairs
from dsd_model.data.curate import CURATION_FILE, curate_grids
from dsd_model.data.grids import GRIDS_FILE, render_grids
from dsd_model.data.manifest import Manifest
from dsd_model.data.pairs import read_pairs
from dsd_model.data.prompts import make_prompts
from dsd_model.errors import InputError

RED, BLUE, GREEN, WHITE = (220, 30, 30), (30, 30, 220), (30, 200, 30), (250, 250, 250)


def tile(panels: list[np.ndarray]) -> Image.Image:
    """A 2x2 grid from four 32x32 panels in reading order."""
    return Image.fromarray(np.concatenate([np.concatenate(panels[:2], 1), np.concatenate(panels[2:], 1)], 0))


def solid(colour) -> np.ndarray:
    return np.full((32, 32, 3), colour, np.uint8)


@pytest.fixture
def grids(make_settings, captions_file, tiny_teacher):
    """Three rendered grids whose images are replaced by: one subject four times; the same with the last panel
    drifted to another colour; four unrelated colours (a clear failure)."""

    def make(**overrides):
        settings = make_settings(prompt_backend="template", concurrency=1, **overrides)
        make_prompts(settings, captions_file, limit=3)
        render_grids(settings, tiny_teacher)
        subject = np.random.default_rng(0).integers(0, 120, (32, 32, 3), dtype=np.uint8)
        unrelated = [solid(colour) for colour in (RED, BLUE, GREEN, WHITE)]
        images = [tile([subject] * 4), tile([subject] * 3 + [solid(WHITE)]), tile(unrelated)]
        records = sorted(Manifest(settings.work_dir / GRIDS_FILE).records().values(), key=lambda g: g["id"])
        for record, image in zip(records, images, strict=True):
            image.save(settings.work_dir / record["path"])
        return settings, [record["id"] for record in records]

    return make


def verdicts(settings) -> dict:
    return Manifest(settings.work_dir / CURATION_FILE).records()


def test_pixel_statistics_judge_keeps_pairs_of_consistent_panels_only(grids):
    settings, (whole, drifted, failure) = grids(curate_backend="embedding")
    assert curate_grids(settings).done == 3
    records = verdicts(settings)
    assert [p["consistent"] for p in records[whole]["panels"]] == [True] * 4
    assert [p["consistent"] for p in records[drifted]["panels"]] == [True, True, True, False]
    assert records[failure]["status"] == "rejected" and records[drifted]["status"] == "accepted"
    assert records[whole]["judge"] == "embedding:pixel-statistics"
    assert records[whole]["panels"][0]["score"] == pytest.approx(1.0, abs=1e-6)
    kept = {(p["reference"], p["target"]) for p in records[drifted]["pairs"] if p["kept"]}
    assert kept == {(i, j) for i in range(3) for j in range(3) if i != j}
    assert len(records[drifted]["pairs"]) == 12

    summary = build_pairs(settings)
    with Image.open(settings.work_dir / CONTACT_SHEET_FILE) as sheet:
        crossed_out = (np.asarray(sheet) == (255, 140, 0)).all(axis=-1)
    assert crossed_out.sum() > 0, "the drifted panel is crossed out on the contact sheet"
    assert summary["pairs"] == 12 + 6
    assert summary["per_panel"]["per_grid_verdict"]["pairs"] == {"kept": 12, "dropped": 24}
    pairs = read_pairs(settings.resolved_dataset_dir)
    assert not [p for p in pairs if p.grid == drifted and ("_p3" in p.reference or "_p3" in p.target)]
    prompts = Manifest(settings.work_dir / "prompts.jsonl").records()
    grid = Manifest(settings.work_dir / GRIDS_FILE).records()[whole]
    assert {p.caption for p in pairs if p.grid == whole} == set(prompts[grid["prompt_id"]]["panels"])


def test_prefilter_saves_judge_calls_on_clear_failures(grids, chat_server):
    settings, (whole, drifted, failure) = grids(prefilter=True, prefilter_threshold=0.3)
    report = curate_grids(settings)
    assert (report.done, report.saved) == (3, 1)
    assert chat_server.count("verdict") == 2
    records = verdicts(settings)
    assert records[failure]["judge"] == "prefilter:pixel-statistics" and records[failure]["status"] == "rejected"
    assert records[whole]["judge"] == records[drifted]["judge"] == "vlm:test-vlm"
    assert build_pairs(settings)["judge_calls_saved_by_prefilter"] == 1


@pytest.fixture(params=["dinov2", "clip"])
def encoder_dir(request, tmp_path):
    """A tiny random DINOv2 or CLIP model and its image processor, saved to a directory as a checkpoint would be."""
    torch.manual_seed(0)
    if request.param == "dinov2":
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=37, image_size=32, patch_size=8))
    else:
        layers = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1)
        model = CLIPModel(CLIPConfig(
            text_config=CLIPTextConfig(vocab_size=99, **layers).to_dict(),
            vision_config=CLIPVisionConfig(image_size=32, patch_size=8, **layers).to_dict(),
            projection_dim=16,
        ))
    path = tmp_path / f"{request.param}-tiny"
    model.save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_local_image_encoder_judges_by_embedding_cosine(grids, encoder_dir):
    settings, (whole, drifted, _) = grids(
        curate_backend="embedding", embedding_model_dir=encoder_dir, consistency_threshold=0.9999
    )
    curate_grids(settings)
    records = verdicts(settings)
    assert records[whole]["judge"] == f"embedding:model:{encoder_dir}"
    assert [p["score"] for p in records[whole]["panels"]] == pytest.approx([1.0] * 4, abs=1e-5)
    assert [p["consistent"] for p in records[drifted]["panels"]] == [True, True, True, False]
    assert records[drifted]["panels"][3]["score"] < 0.9999


def test_embedding_model_dir_must_be_a_checkpoint(grids, tmp_path):
    settings, _ = grids(curate_backend="embedding", embedding_model_dir=tmp_path)
    with pytest.raises(InputError, match=r"embedding_model_dir: .* \(no config.json\)"):
        curate_grids(settings)
