"""The adapter store on the tiny profile: files of store directories served by name without a restart, loaded on the
preparing thread, replaced by content, refused with the reason when bad or trained on another base, and kept within
a memory budget without ever dropping an adapter in use; `dsd adapters publish` and `list`."""

import csv
import hashlib
import json
import logging

import pytest
from prometheus_client import REGISTRY
from safetensors.torch import save_file

from dsd_model import InputError
from dsd_model.adapters import BASE_DIGEST_KEY
from dsd_model.cli import main
from dsd_model.serving.adapter_store import AdapterStore, read_header
from dsd_model.tiny import build_tiny_components, tiny_lora_state_dict
from servers import ROOT
from test_engine import GatedPipeline, Hold, as_tensor, req, wait_until
from test_mixed_batching import TOLERANCE, tiny_pipeline


def write_adapter(path, transformer, seed: int, metadata: dict | None = None):
    save_file(tiny_lora_state_dict(transformer, seed=seed), str(path), metadata=metadata)
    return path


def alone(request, seed: int):
    """The request's image with the adapter of `seed` loaded by name on a fresh pipeline."""
    pipe = tiny_pipeline()
    pipe.load_adapter(tiny_lora_state_dict(pipe.transformer, seed=seed), "alone")
    return pipe(request.image, request.prompt, num_inference_steps=request.num_inference_steps, size=request.size,
                seed=request.seed, adapter="alone", output_type="pt").images


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def store_engine(tmp_path, start_engine):
    def make(budget_bytes: int = 2**30, gated: bool = False):
        pipe = tiny_pipeline(GatedPipeline) if gated else tiny_pipeline()
        if gated:
            pipe.hold = Hold()
        store = AdapterStore(pipe.adapters, [tmp_path / "store"], budget_bytes)
        (tmp_path / "store").mkdir(exist_ok=True)
        return start_engine(pipe, adapter_store=store, max_batch_rows=12), store, tmp_path / "store"

    return make


def test_a_file_added_while_serving_is_loaded_on_the_preparing_thread(store_engine, caplog):
    engine, store, directory = store_engine()
    with pytest.raises(InputError, match="'fresh' is not an adapter of this server; adapters: identity, sketch, "
                                         "structure"):
        engine.submit(req(1, adapter="fresh"))
    write_adapter(directory / "fresh.safetensors", engine.pipe.transformer, seed=11)
    loads = counter("dsd_adapter_loads_total", outcome="loaded")
    request = req(1, adapter="fresh", num_inference_steps=3)
    with caplog.at_level(logging.INFO, logger="dsd_model.serving.adapter_store"):
        result = engine.submit(request).future.result(timeout=60)
    assert (as_tensor(result.image) - alone(request, seed=11)).abs().max() <= TOLERANCE
    assert counter("dsd_adapter_loads_total", outcome="loaded") == loads + 1
    [record] = [r for r in caplog.records if r.getMessage().startswith("loaded adapter 'fresh'")]
    assert record.threadName == "dsd-engine-prepare"
    hits = counter("dsd_adapter_cache_hits_total")
    engine.submit(req(2, adapter="fresh", num_inference_steps=2)).future.result(timeout=60)
    assert counter("dsd_adapter_cache_hits_total") == hits + 1
    assert [a.name for a in store.loaded] == ["fresh"]


def test_a_replaced_file_serves_its_new_content_while_running_requests_keep_the_old(store_engine):
    engine, store, directory = store_engine(gated=True)
    path = write_adapter(directory / "style.safetensors", engine.pipe.transformer, seed=21)
    hold = engine.pipe.hold
    hold.close()
    old = engine.submit(req(1, adapter="style", num_inference_steps=4))
    wait_until(lambda: hold.waiting.is_set())
    partial = directory / ".style.partial"
    write_adapter(partial, engine.pipe.transformer, seed=22)
    partial.replace(path)  # how `dsd adapters publish --replace` writes: atomically
    new = engine.submit(req(2, adapter="style", num_inference_steps=3))
    wait_until(lambda: new.state is not None)
    hold.open()
    old_image, new_image = old.future.result(timeout=60).image, new.future.result(timeout=60).image
    assert (as_tensor(old_image) - alone(old.request, seed=21)).abs().max() <= TOLERANCE
    assert (as_tensor(new_image) - alone(new.request, seed=22)).abs().max() <= TOLERANCE
    one = store.loaded[0].nbytes
    assert REGISTRY.get_sample_value("dsd_adapter_cache_bytes") == one  # the superseded version left with its request
    loads = counter("dsd_adapter_loads_total", outcome="loaded")
    path.touch()  # the same content again: a hit, no second copy
    engine.submit(req(3, adapter="style", num_inference_steps=2)).future.result(timeout=60)
    assert counter("dsd_adapter_loads_total", outcome="loaded") == loads
    assert REGISTRY.get_sample_value("dsd_adapter_cache_bytes") == one


def test_a_half_written_replacement_is_never_served(store_engine):
    engine, store, directory = store_engine()
    path = write_adapter(directory / "style.safetensors", engine.pipe.transformer, seed=21)
    engine.submit(req(1, adapter="style", num_inference_steps=2)).future.result(timeout=60)
    whole = write_adapter(directory / "next.bin", engine.pipe.transformer, seed=22).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a writer that is not done yet
    failures = counter("dsd_adapter_loads_total", outcome="failed")
    request = req(2, adapter="style", num_inference_steps=3)
    result = engine.submit(request).future.result(timeout=60)
    assert (as_tensor(result.image) - alone(request, seed=21)).abs().max() <= TOLERANCE  # the earlier version
    assert counter("dsd_adapter_loads_total", outcome="failed") == failures + 1


def test_a_bad_adapter_file_fails_only_the_requests_naming_it(store_engine):
    engine, store, directory = store_engine()
    (directory / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    state = tiny_lora_state_dict(engine.pipe.transformer, seed=5)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, str(directory / "misfit.safetensors"))
    good = write_adapter(directory / "good.safetensors", engine.pipe.transformer, seed=6)
    assert good.exists()
    jobs = {name: engine.submit(req(i, adapter=name, num_inference_steps=2))
            for i, name in enumerate(["broken", "good", "misfit", "identity"])}
    for name in ("broken", "misfit"):
        with pytest.raises(InputError) as error:
            jobs[name].future.result(timeout=60)
        assert error.value.field == "adapter" and f"'{name}' cannot be loaded" in error.value.message
    assert "not a readable safetensors file" in str(jobs["broken"].future.exception())
    assert "lora_A.weight has shape" in str(jobs["misfit"].future.exception())
    assert [jobs[name].future.result(timeout=60).seed for name in ("good", "identity")] == [1, 3]


def test_an_adapter_trained_on_another_base_is_refused_naming_both_digests(store_engine):
    engine, store, directory = store_engine()
    other = "0" * 32
    write_adapter(directory / "foreign.safetensors", engine.pipe.transformer, seed=7, metadata={BASE_DIGEST_KEY: other})
    write_adapter(directory / "native.safetensors", engine.pipe.transformer, seed=7,
                  metadata={BASE_DIGEST_KEY: engine.pipe.adapters.base_digest})
    with pytest.raises(InputError, match=f"trained on base transformer {other}, but this server runs base "
                                         f"transformer {engine.pipe.adapters.base_digest}"):
        engine.submit(req(1, adapter="foreign", num_inference_steps=2)).future.result(timeout=60)
    assert engine.submit(req(2, adapter="native", num_inference_steps=2)).future.result(timeout=60).seed == 2


def test_a_small_budget_evicts_the_least_recently_used_adapter_but_never_one_in_use(store_engine):
    engine, store, directory = store_engine(gated=True)
    for seed, name in enumerate("abc", start=31):
        write_adapter(directory / f"{name}.safetensors", engine.pipe.transformer, seed=seed)
    store.budget_bytes = store.registry.read(directory / "a.safetensors", "a").nbytes  # room for one
    evictions = counter("dsd_adapter_evictions_total")
    hold = engine.pipe.hold
    hold.close()
    running = engine.submit(req(1, adapter="a", num_inference_steps=4))
    wait_until(lambda: hold.waiting.is_set())
    second = engine.submit(req(2, adapter="b", num_inference_steps=2))
    wait_until(lambda: second.state is not None)
    assert {a.name for a in store.loaded} == {"a", "b"}  # over budget: both are in use
    hold.open()
    first_image = running.future.result(timeout=60).image
    second.future.result(timeout=60)
    wait_until(lambda: len(store.loaded) == 1)  # back within budget once they were released
    assert counter("dsd_adapter_evictions_total") == evictions + 1
    engine.submit(req(3, adapter="c", num_inference_steps=2)).future.result(timeout=60)
    assert [a.name for a in store.loaded] == ["c"] and counter("dsd_adapter_evictions_total") == evictions + 2
    assert (as_tensor(first_image) - alone(running.request, seed=31)).abs().max() <= TOLERANCE


def test_publish_writes_the_adapter_with_its_provenance_and_list_shows_it(tmp_path, capsys):
    pipe = tiny_pipeline()
    run = tmp_path / "run"
    run.mkdir()
    write_adapter(run / "adapter.safetensors", pipe.transformer, seed=3,
                  metadata={BASE_DIGEST_KEY: pipe.adapters.base_digest, "rank": "4"})
    (run / "config.json").write_text(json.dumps({"rank": 4, "max_steps": 10}, indent=2))
    with (run / "eval.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([("step", "metric", "mean", "n"), (5, "dino", 0.5, 4), (10, "dino", 0.75, 4),
                          (10, "clip_i", 0.8, 4)])
    store = tmp_path / "store"
    assert main(["adapters", "publish", str(run), "night", str(store)]) == 0
    header, metadata = read_header(store / "night.safetensors")
    assert metadata[BASE_DIGEST_KEY] == pipe.adapters.base_digest and metadata["rank"] == "4"
    canonical = json.dumps({"max_steps": 10, "rank": 4}, separators=(",", ":"), sort_keys=True)
    assert metadata["training_config_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert json.loads(metadata["eval_summary"]) == {"step": 10, "dino": 0.75, "clip_i": 0.8}
    assert main(["adapters", "publish", str(run), "night", str(store)]) == 2
    assert "pass --replace" in capsys.readouterr().err
    assert main(["adapters", "publish", str(run / "adapter.safetensors"), "night", str(store), "--replace"]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", str(store)]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["name"], listed["rank"], listed["base_transformer_digest"]) == ("night", 4, pipe.adapters.base_digest)
    assert not list(store.glob(".*"))  # no partial file left behind


def test_dsd_generate_takes_an_adapter_store_file_by_name(tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    store.mkdir()
    write_adapter(store / "ink.safetensors", build_tiny_components()["transformer"], seed=51)
    monkeypatch.setenv("DSD_PROFILE", "tiny")
    monkeypatch.setenv("DSD_ADAPTER_DIRS", json.dumps([str(store)]))
    arguments = ["generate", "--image", str(ROOT / "tests" / "assets" / "reference.png"), "--prompt", "a toy",
                 "--steps", "2", "--size", "64", "--seed", "3"]
    assert main([*arguments, "--out", str(tmp_path / "ink.png"), "--adapter", "ink"]) == 0
    assert "adapter ink" in capsys.readouterr().out
    assert main([*arguments, "--out", str(tmp_path / "none.png"), "--adapter", "nope"]) == 2
    assert "--adapter: 'nope' is not an adapter of DSD_ADAPTERS or DSD_ADAPTER_DIRS; adapters: identity, ink, " \
           "structure" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses --mode with --adapter
        main([*arguments, "--out", str(tmp_path / "both.png"), "--adapter", "ink", "--mode", "identity"])
