"""The self-distillation loop end to end on the tiny profile: captions → prompts → grids from two teacher
classes → per-panel curation behind the pre-filter → pairs → a few training steps → the adapter loaded in the
pipeline; and the same for a structure adapter on structure pairs."""

import numpy as np
import pytest

from dsd_model import DSDPipeline
from dsd_model.data.assemble import build_pairs
from dsd_model.data.curate import CURATION_FILE, curate_grids
from dsd_model.data.grids import GRIDS_FILE, render_grids
from dsd_model.data.manifest import Manifest
from dsd_model.data.pairs import read_pairs
from dsd_model.data.prompts import make_prompts
from dsd_model.data.structure import make_structure_pairs, write_structure_dataset
from dsd_model.tiny import build_tiny_components
from dsd_model.training import TrainConfig, train
from helpers import random_image

LOOP = dict(width=128, height=128, prompt_backend="template")
"""64 px panels: the smallest size training accepts."""


@pytest.fixture
def student():
    pipe = DSDPipeline(**build_tiny_components())
    pipe.max_sequence_length = 32
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_and_load(student, dataset, output_dir, mode: str) -> None:
    """Train a few steps on `dataset`, load the adapter as `mode`, and check it changes the pipeline's output."""
    config = TrainConfig(dataset=dataset, output_dir=output_dir, size=64, max_steps=2, rank=4, learning_rate=1e-2,
                         checkpoint_every=100, gradient_checkpointing=False)
    result = train(config, student)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    reference = random_image(64, 64, seed=3)
    kwargs = dict(num_inference_steps=2, size=64, seed=1)
    base = np.asarray(student(reference, "a red plush fox", **kwargs).images[0], dtype=np.int16)
    student.load_adapter(result.adapter_path, mode)
    adapted = np.asarray(student(reference, "a red plush fox", adapter=mode, **kwargs).images[0], dtype=np.int16)
    assert np.abs(adapted - base).max() > 1


def test_identity_loop_from_captions_to_a_loaded_adapter(chat_server, make_settings, captions_file, teacher_dirs,
                                                         student, tmp_path):
    flux, sd3 = teacher_dirs
    settings = make_settings(**LOOP, teachers=f"{flux}=1,{sd3}=1", prefilter=True, concurrency=1)
    make_prompts(settings, captions_file)
    render_grids(settings)
    grids = Manifest(settings.work_dir / GRIDS_FILE).records()
    assert {g["teacher_class"] for g in grids.values()} == {"FluxPipeline", "StableDiffusion3Pipeline"}

    report = curate_grids(settings)
    verdicts = Manifest(settings.work_dir / CURATION_FILE).records()
    assert report.done == 5 and chat_server.count("verdict") == 5 - report.saved
    assert all(len(v["panels"]) == 4 and len(v["pairs"]) == 12 for v in verdicts.values())

    summary = build_pairs(settings)
    per_panel = summary["per_panel"]
    assert summary["pairs"] == per_panel["pairs"]["kept"] > per_panel["per_grid_verdict"]["pairs"]["kept"]
    pairs = read_pairs(settings.resolved_dataset_dir)
    for pair in pairs:
        panels = verdicts[pair.grid]["panels"]
        assert panels[int(pair.reference[-5])]["consistent"] and panels[int(pair.target[-5])]["consistent"]

    train_and_load(student, settings.resolved_dataset_dir, tmp_path / "identity", "identity")


def test_structure_loop_from_captions_to_a_loaded_adapter(make_settings, captions_file, student, tmp_path):
    settings = make_settings(**LOOP, recipe="structure", structure_min_agreement=0.0)
    make_prompts(settings, captions_file, limit=2)
    make_structure_pairs(settings)
    assert write_structure_dataset(settings)["pairs"] == 4
    train_and_load(student, settings.resolved_dataset_dir, tmp_path / "structure", "structure")
