"""Training from cached embeddings (`dsd train-cache`) equals training that encodes every step, without calling
the VAE encoder or the text encoders; a cache for other encoders, settings or pairs is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import SIZE, write_dataset

from dsd_model.training import DatasetError, train
from dsd_model.training.dataset import PairDataset
from dsd_model.training.embedding_cache import INDEX_FILE, write_cache

RUN = dict(max_steps=3, text_dropout=0.3, text_and_condition_dropout=0.3)
"""Dropout rates high enough that the 6 samples of the run include dropped prompts and conditions."""
TOLERANCE = 1e-5
"""Max abs adapter difference: the cache encodes its pairs in other batch shapes than the training steps do."""


def refuse(module: torch.nn.Module, name: str):
    def hook(*_):
        raise AssertionError(f"{name} ran during cached training")

    return module.register_forward_pre_hook(hook)


@pytest.fixture
def cache(dataset, build_pipe, tmp_path):
    write_cache(build_pipe(), PairDataset(dataset, SIZE), tmp_path / "cache", shard_pairs=3, batch_size=2)
    return tmp_path / "cache"


def test_cached_training_equals_encoding_every_step_without_the_encoders(cache, make_config, build_pipe):
    encoded = train(make_config("encoded", **RUN), build_pipe())
    pipe = build_pipe()
    for name in ("text_encoder", "text_encoder_2"):
        refuse(getattr(pipe, name), name)
    refuse(pipe.vae.encoder, "vae.encoder")

    cached = train(make_config("cached", embedding_cache=cache, **RUN), pipe)

    expected, actual = load_file(str(encoded.adapter_path)), load_file(str(cached.adapter_path))
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= TOLERANCE
    assert cached.losses == pytest.approx(encoded.losses, abs=1e-5)
    assert sorted(p.name for p in cache.iterdir()) == [
        "cache.json", "empty.safetensors", "shard-00000.safetensors", "shard-00001.safetensors"
    ]


def test_a_cache_of_other_encoders_is_refused(cache, make_config, build_pipe):
    pipe = build_pipe()
    with torch.no_grad():
        pipe.vae.encoder.conv_in.weight.add_(1e-3)
    with pytest.raises(DatasetError, match=r"written for other inputs \(encoders: cache .*'vae': '"):
        train(make_config(embedding_cache=cache), pipe)


def test_a_cache_of_another_t5_length_or_preprocessing_is_refused(cache, make_config, build_pipe):
    pipe = build_pipe()
    pipe.max_sequence_length = 64
    with pytest.raises(DatasetError, match="max_sequence_length: cache 32, model 64"):
        train(make_config(embedding_cache=cache), pipe)
    index = json.loads((cache / INDEX_FILE).read_text())
    index["identity"]["preprocessing"] = 0
    (cache / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="preprocessing: cache 0, model 1"):
        train(make_config(embedding_cache=cache), build_pipe())


def test_a_cache_of_other_pairs_or_none_is_refused(cache, make_config, build_pipe, tmp_path):
    other = write_dataset(tmp_path / "other", num_pairs=3)
    with pytest.raises(DatasetError, match="holds 4 pairs that are not the dataset's 3 pairs"):
        train(make_config(dataset=other, embedding_cache=cache), build_pipe())
    with pytest.raises(DatasetError, match="no readable cache.json .* `dsd train-cache`"):
        train(make_config(embedding_cache=tmp_path / "missing"), build_pipe())


def test_command_line_caches_then_trains_a_model_directory_without_t5(dataset, tmp_path, capsys):
    from dsd_model.cli import main
    from dsd_model.pipeline import DSDPipeline
    from dsd_model.tiny import build_tiny_components

    model_dir = tmp_path / "model"
    pipe = DSDPipeline(**build_tiny_components())
    pipe.save_pretrained(model_dir)
    pipe.transformer.save_pretrained(model_dir / "dsd_transformer")
    flags = ["--size", str(SIZE), "--model-dir", str(model_dir)]
    assert main(["train-cache", str(dataset), str(tmp_path / "cache"), *flags]) == 0
    with pytest.raises(SystemExit):
        main(["train", str(dataset), "--embedding-cache", str(tmp_path / "cache"), "--size", str(SIZE)])
    assert "written for other inputs (encoders:" in capsys.readouterr().err, "the tiny profile is another model"

    run = ["train", str(dataset), "--embedding-cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run"),
           "--rank", "4", "--max-steps", "2", "--no-gradient-checkpointing", *flags]
    assert main(run) == 0
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
