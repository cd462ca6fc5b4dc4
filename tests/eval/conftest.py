import os

import pytest
from eval_helpers import write_jsonl_benchmark

from dsd_model.eval.random_encoders import write_random_encoders


@pytest.fixture(autouse=True)
def _no_eval_env(monkeypatch):
    """No `DSD_EVAL_*` from outside; face_id off, since the noise benchmarks here show no faces
    (test_eval_face_id.py scores photographs)."""
    for name in list(os.environ):
        if name.startswith("DSD_EVAL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DSD_EVAL_FACE_ID", "false")


@pytest.fixture(scope="session")
def encoders_dir(tmp_path_factory):
    return write_random_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture
def benchmark(tmp_path):
    return write_jsonl_benchmark(tmp_path / "bench")


@pytest.fixture(scope="session")
def tiny_local():
    """The tiny profile as local contenders load it (with its `identity` and `structure` adapters)."""
    from dsd_model.loading import load_pipeline
    from dsd_model.settings import Settings

    return load_pipeline(Settings(profile="tiny", device="cpu", max_sequence_length=32))


@pytest.fixture
def generated_run(tmp_path, benchmark, tiny_local):
    """A run directory holding one tiny contender's images of the 2 x 2 benchmark (64 px, 2 steps)."""
    from dsd_model.eval.run import run_eval
    from dsd_model.eval.settings import EvalSettings

    settings = EvalSettings(run_dir=tmp_path / "run", size=64, steps=2)
    run_eval(settings, benchmark, {"dsd": "local:identity"}, load_local=lambda: tiny_local)
    return settings.run_dir
