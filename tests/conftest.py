import os

# One intra-op thread per process: the suite runs servers beside the test process on two cores, and OpenMP
# threads that spin while their partner is descheduled make tiny models many times slower.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

from dsd_model import DSDPipeline
from dsd_model.tiny import build_tiny_components
from helpers import GPU_TEST_DEVICE, random_image
from servers import RedisServer


@pytest.fixture(scope="session")
def tiny_pipe():
    """One tiny DSD pipeline for read-only use (tests that load adapters build their own)."""
    pipe = DSDPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def fresh_pipe():
    pipe = DSDPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def start_engine():
    """Start engines (`start_engine(pipe, adapter_store=None, latent_cache=None, start=True, **EngineConfig fields)`)
    without warm-up (`start=False` only builds one); drained after the test."""
    from dsd_model.serving.engine import Engine, EngineConfig

    engines = []

    def start(pipe, adapter_store=None, latent_cache=None, start=True, **config):
        engine = Engine(pipe, EngineConfig(**config), latent_cache=latent_cache, adapter_store=adapter_store)
        if start:
            engine.start(warmup=False)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.drain(timeout=30)


@pytest.fixture
def fresh_redis(tmp_path):
    """A fresh redis-server on a free loopback port (no persistence), stopped after the test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def reference():
    return random_image()


def pytest_collection_modifyitems(config, items):
    if GPU_TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)
