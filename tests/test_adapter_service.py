"""Adapters through the real service: a freshly trained adapter serves as a named mode with no conversion step
(training → file → service), and the official LoRA file serves under a name that is no mode, as the default adapter
and as the mode DSD_MODE_ADAPTERS maps to it, over REST and gRPC alike."""

import base64
import concurrent.futures
import io
import json
import time

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from dsd_model import DSDPipeline
from dsd_model.tiny import build_tiny_components
from dsd_model.adapters import BASE_DIGEST_KEY
from dsd_model.data.pairs import Pair, write_pairs
from dsd_model.serving.adapter_store import read_header
from dsd_model.tiny import tiny_lora_state_dict
from dsd_model.training import TrainConfig, train
from dsd_serve.grpc_stubs import dsd_pb2 as pb
from dsd_serve.grpc_stubs import dsd_pb2_grpc
from helpers import png_bytes, random_image, write_tiny_weights
from servers import start_service, wait_ready


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    components = write_tiny_weights(root)
    dataset = root / "dataset"
    (dataset / "images").mkdir(parents=True)
    pairs = []
    for i in range(2):
        random_image(64, 64, seed=i).save(dataset / f"images/{i}_ref.png")
        random_image(64, 64, seed=10 + i).save(dataset / f"images/{i}_tgt.png")
        pairs.append(Pair(id=str(i), reference=f"images/{i}_ref.png", target=f"images/{i}_tgt.png", caption="a toy"))
    write_pairs(dataset, pairs)
    pipe = DSDPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    config = TrainConfig(dataset=dataset, output_dir=root / "run", size=64, max_steps=3, rank=4, learning_rate=1e-2,
                         checkpoint_every=100, seed=0)
    result = train(config, pipe)
    return root, pipe, result.adapter_path


def test_trained_adapter_serves_as_a_mode(trained, tmp_path):
    root, pipe, adapter = trained
    assert read_header(adapter)[1][BASE_DIGEST_KEY] == pipe.adapters.base_digest
    server = start_service(tmp_path, profile="real", model_dir=str(root / "flux"),
                           transformer_path=str(root / "fused"), adapters=json.dumps({"structure": str(adapter)}))
    try:
        wait_ready(server)
        reference = png_bytes(random_image(seed=7))
        payload = dict(image=base64.b64encode(reference).decode(), prompt="a toy", steps=3, size=64, seed=2,
                       mode="structure")
        response = httpx.post(f"{server.url}/generate", json=payload, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["profile"] == "real"
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))), dtype=np.int16)
        missing = httpx.post(f"{server.url}/generate", json=payload | {"mode": "identity"}, timeout=60)
        assert missing.status_code == 422 and "no adapter loaded" in missing.json()["error"]["message"]
    finally:
        assert server.stop() == 0, server.log_tail()

    image = Image.open(io.BytesIO(reference)).convert("RGB")
    kwargs = dict(num_inference_steps=3, size=64, seed=2)
    base = np.asarray(pipe(image, "a toy", **kwargs).images[0], dtype=np.int16)
    pipe.load_adapter(adapter, "structure")
    adapted = np.asarray(pipe(image, "a toy", adapter="structure", **kwargs).images[0], dtype=np.int16)
    assert np.abs(served - adapted).max() <= 1
    assert np.abs(adapted - base).max() > 1


def test_official_lora_under_another_name_serves_the_default_and_its_mapped_mode(tmp_path):
    components = write_tiny_weights(tmp_path)
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tiny_lora_state_dict(components["transformer"], seed=3), str(lora))
    server = start_service(tmp_path, profile="real", model_dir=str(tmp_path / "flux"),
                           transformer_path=str(tmp_path / "fused"), adapters=json.dumps({"dsd": str(lora)}),
                           mode_adapters=json.dumps({"identity": "dsd"}))
    reference = png_bytes(random_image(seed=7))
    payload = dict(image=base64.b64encode(reference).decode(), prompt="a toy", steps=3, size=64, seed=2)
    try:
        wait_ready(server)
        served = {}
        for mode in (None, "identity"):
            body = payload if mode is None else payload | {"mode": mode}
            response = httpx.post(f"{server.url}/generate", json=body, timeout=120)
            assert response.status_code == 200, response.text
            assert response.json()["mode"] == mode
            served[mode] = base64.b64decode(response.json()["images"][0])
        refused = httpx.post(f"{server.url}/generate", json=payload | {"mode": "structure"}, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "mode"
        message = refused.json()["error"]["message"]
        assert "modes served: identity; loaded adapters: dsd; omit the mode to use the default adapter 'dsd'" in message

        with grpc.insecure_channel(f"127.0.0.1:{server.env['DSD_GRPC_PORT']}") as channel:
            stub = dsd_pb2_grpc.DSDServiceStub(channel)
            request = pb.GenerateRequest(image=reference, prompt="a toy", steps=3, size=64, seed=2)
            for mode in (pb.MODE_UNSPECIFIED, pb.MODE_IDENTITY):
                request.mode = mode
                assert list(stub.Generate(request, timeout=120).images) == [served[None]]
            request.mode = pb.MODE_STRUCTURE
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(request, timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details() == message
    finally:
        assert server.stop() == 0, server.log_tail()
    assert served[None] == served["identity"]

    pipe = DSDPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(io.BytesIO(reference)).convert("RGB")
    kwargs = dict(num_inference_steps=3, size=64, seed=2)
    base = np.asarray(pipe(image, "a toy", **kwargs).images[0], dtype=np.int16)
    pipe.load_adapter(lora, "dsd")
    adapted = np.asarray(pipe(image, "a toy", adapter="dsd", **kwargs).images[0], dtype=np.int16)
    served_pixels = np.asarray(Image.open(io.BytesIO(served[None])), dtype=np.int16)
    assert np.abs(served_pixels - adapted).max() <= 1
    assert np.abs(adapted - base).max() > 1


def test_store_adapters_serve_side_by_side_over_rest_grpc_and_jobs(tmp_path):
    """Three adapters of a store directory (one of them added while serving) beside the pinned modes: each request
    names one, concurrent requests share the replica, and every image is its adapter's."""
    components = build_tiny_components()
    store = tmp_path / "store"
    store.mkdir()
    for seed, name in ((41, "night"), (42, "watercolor")):
        save_file(tiny_lora_state_dict(components["transformer"], seed=seed), str(store / f"{name}.safetensors"))
    server = start_service(tmp_path, adapter_dirs=json.dumps([str(store)]), max_batch_rows="12")
    reference = png_bytes(random_image(seed=9))
    payload = dict(image=base64.b64encode(reference).decode(), prompt="a toy", steps=3, size=64)
    try:
        wait_ready(server)
        listing = httpx.get(f"{server.url}/v1/adapters", timeout=10).json()
        assert listing["default"] == "identity" and len(listing["base_transformer_digest"]) == 32
        assert {(a["name"], a["source"], a["loaded"]) for a in listing["adapters"]} == {
            ("identity", "pinned", True), ("structure", "pinned", True), ("night", "store", False),
            ("watercolor", "store", False)}
        save_file(tiny_lora_state_dict(components["transformer"], seed=43), str(store / "ink.safetensors"))
        names = ["night", "watercolor", "ink", "structure"]
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            responses = list(pool.map(lambda i: httpx.post(
                f"{server.url}/generate", json=payload | {"adapter": names[i], "seed": i, "priority": i}, timeout=120),
                range(len(names))))
        served = {}
        for name, response in zip(names, responses):
            assert response.status_code == 200, response.text
            assert response.json()["adapter"] == name and response.json()["mode"] is None
            served[name] = base64.b64decode(response.json()["images"][0])
        assert server.metric("dsd_forward_rows_total", adapter="ink") > 0
        listed = {a["name"]: a for a in httpx.get(f"{server.url}/v1/adapters", timeout=10).json()["adapters"]}
        assert listed["ink"]["loaded"] and listed["ink"]["rank"] == 4 and listed["identity"]["modes"] == ["identity"]

        unknown = httpx.post(f"{server.url}/generate", json=payload | {"adapter": "nope"}, timeout=60)
        assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "adapter"
        assert "'nope' is not an adapter of this server; adapters: identity, ink, night, structure, watercolor" in \
            unknown.json()["error"]["message"]
        both = httpx.post(f"{server.url}/generate", json=payload | {"adapter": "ink", "mode": "identity"}, timeout=60)
        assert both.status_code == 422 and both.json()["error"]["field"] == "adapter"

        with grpc.insecure_channel(f"127.0.0.1:{server.env['DSD_GRPC_PORT']}") as channel:
            stub = dsd_pb2_grpc.DSDServiceStub(channel)
            adapters = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
            assert {a.name for a in adapters.adapters} == {"identity", "structure", "night", "watercolor", "ink"}
            assert adapters.base_transformer_digest == listing["base_transformer_digest"]
            reply = stub.Generate(pb.GenerateRequest(image=reference, prompt="a toy", steps=3, size=64, seed=1,
                                                     adapter="watercolor"), timeout=120)
            assert reply.adapter == "watercolor"
            grpc_image = reply.images[0]
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(pb.GenerateRequest(image=reference, prompt="a toy", steps=3, size=64, adapter="nope"),
                              timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(error.value.trailing_metadata())["field"] == "adapter"

        job = httpx.post(f"{server.url}/v1/jobs", json=payload | {"adapter": "night", "seed": 0}, timeout=60).json()
        end = time.monotonic() + 120
        while (view := httpx.get(f"{server.url}/v1/jobs/{job['id']}", timeout=10).json())["status"] != "succeeded":
            assert view["status"] in ("queued", "running") and time.monotonic() < end, view
            time.sleep(0.1)
        assert view["result"]["adapter"] == "night"
        job_image = httpx.get(f"{server.url}/v1/jobs/{job['id']}/images/0", timeout=10).content
    finally:
        assert server.stop() == 0, server.log_tail()

    pipe = DSDPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(io.BytesIO(reference)).convert("RGB")
    pixels = {}
    for seed, name in ((41, "night"), (42, "watercolor"), (43, "ink"), (2, "structure")):  # the tiny "structure": 2
        pipe.load_adapter(tiny_lora_state_dict(pipe.transformer, seed=seed), name)
    for i, name in enumerate(names):
        local = np.asarray(pipe(image, "a toy", num_inference_steps=3, size=64, seed=i, adapter=name).images[0],
                           dtype=np.int16)
        pixels[name] = local
        assert np.abs(np.asarray(Image.open(io.BytesIO(served[name])), dtype=np.int16) - local).max() <= 1, name
    assert np.abs(np.asarray(Image.open(io.BytesIO(grpc_image)), dtype=np.int16) - pixels["watercolor"]).max() <= 1
    assert np.abs(np.asarray(Image.open(io.BytesIO(job_image)), dtype=np.int16) - pixels["night"]).max() <= 1
