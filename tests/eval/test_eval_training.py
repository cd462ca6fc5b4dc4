"""The eval split during `dsd train`: scores beside the loss, and the same weights as a run without it."""

import csv

import pytest
from pydantic import ValidationError
from training.training_helpers import SIZE, build_training_pipe, write_dataset

from dsd_model.errors import InputError
from dsd_model.training import TrainConfig, train

STEPS = 2


@pytest.fixture
def make_config(tmp_path, benchmark):
    dataset = write_dataset(tmp_path / "dataset")

    def make(name, **overrides):
        values = dict(dataset=dataset, output_dir=tmp_path / name, size=SIZE, rank=4, batch_size=2,
                      learning_rate=1e-2, max_steps=STEPS, gradient_checkpointing=False, checkpoint_every=100,
                      eval_benchmark=benchmark, eval_steps=2)
        return TrainConfig(**{**values, **overrides})

    return make


def test_scores_are_logged_beside_the_loss(make_config, encoders_dir, monkeypatch):
    monkeypatch.setenv("DSD_EVAL_DINO_PATH", str(encoders_dir[0]))
    monkeypatch.setenv("DSD_EVAL_CLIP_PATH", str(encoders_dir[1]))
    with_eval = train(make_config("with", eval_every=1), build_training_pipe())
    without = train(make_config("without"), build_training_pipe())
    assert with_eval.losses == pytest.approx(without.losses, rel=1e-6, abs=1e-7)

    with (with_eval.output_dir / "eval.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["step"]), r["metric"], int(r["n"])) for r in rows] == [
        (step, metric, 4) for step in range(1, STEPS + 1) for metric in ("dino", "clip_i", "clip_t")]
    assert all(-1 <= float(r["mean"]) <= 1 for r in rows)
    assert (with_eval.output_dir / "eval.png").stat().st_size > 0
    images = sorted(p.name for p in (with_eval.output_dir / "eval" / "step-000002").iterdir())
    assert images == ["fox-0.png", "fox-1.png", "teapot-0.png", "teapot-1.png"]
    assert not (without.output_dir / "eval.csv").exists()


def test_settings_errors_name_the_field(make_config):
    with pytest.raises(ValidationError, match="eval_every 5 needs eval_benchmark"):
        make_config("x", eval_every=5, eval_benchmark=None)
    with pytest.raises(InputError, match="eval_every: the eval split needs an encoder"):
        train(make_config("x", eval_every=1), build_training_pipe())


def test_a_resumed_run_keeps_the_rows_up_to_its_checkpoint(make_config, encoders_dir, monkeypatch):
    monkeypatch.setenv("DSD_EVAL_DINO_PATH", str(encoders_dir[0]))
    first = train(make_config("run", eval_every=1, checkpoint_every=1), build_training_pipe())
    with (first.output_dir / "eval.csv").open() as handle:
        before = list(csv.DictReader(handle))
    checkpoint = next(p for p in (first.output_dir / "checkpoints").iterdir() if p.name.endswith("-0000001"))
    train(make_config("run", eval_every=1, checkpoint_every=1, resume_from=checkpoint), build_training_pipe())
    with (first.output_dir / "eval.csv").open() as handle:
        after = list(csv.DictReader(handle))
    assert [(r["step"], r["metric"]) for r in after] == [("1", "dino"), ("2", "dino")]
    assert after[0] == before[0]
    assert float(after[1]["mean"]) == pytest.approx(float(before[1]["mean"]), abs=1e-5)
