import os

import pytest
from eval_helpers import write_jsonl_benchmark, write_tiny_encoders


@pytest.fixture(autouse=True)
def _no_eval_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("DSD_EVAL_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def encoders_dir(tmp_path_factory):
    return write_tiny_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture
def benchmark(tmp_path):
    return write_jsonl_benchmark(tmp_path / "bench")
