"""The OpenAI Images API (`/v1/images/*`, `/v1/models`) with the official `openai` SDK against the real service on
loopback (tiny profile): two replicas sharing a Redis, and one without Redis and with a queue of one."""

import base64
import hashlib
import hmac
import io
import json
import threading
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from safetensors.torch import save_file

from dsd_model.tiny import build_tiny_components, tiny_lora_state_dict
from helpers import png_bytes, random_image
from servers import RedisServer, start_service, wait_ready

KEY = "test-key-0123456789"
SECRET = "url-signing-secret-0123456789"
REFERENCE = png_bytes(random_image(96, 80, seed=1))
UPLOAD = ("reference.png", REFERENCE, "image/png")
LONG = dict(size="512x512", extra_body={"steps": 100, "image_guidance": 2.0})
"""A request of many seconds on any CPU (100 steps of 3 rows at 512 px), to be cut short."""
KNOBS = {"seed": 5, "steps": 3, "exact": True}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`main` and `replica` share a Redis and the URL signing secret (the replica's requests have 1 s); `tight` has
    neither, and a queue of one."""
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    store = tmp_path_factory.mktemp("adapters")
    save_file(tiny_lora_state_dict(build_tiny_components()["transformer"], seed=61), str(store / "ink.safetensors"))
    shared = dict(api_key=KEY, redis_url=redis.url, image_url_secret=SECRET)
    main = start_service(tmp_path_factory.mktemp("main"), **shared, max_queue="32", max_batch_rows="12",
                         adapter_dirs=json.dumps([str(store)]))
    replica = start_service(tmp_path_factory.mktemp("replica"), **shared, default_deadline_s="1")
    tight = start_service(tmp_path_factory.mktemp("tight"), max_queue="1", max_batch_rows="3")
    try:
        for server in (main, replica, tight):
            wait_ready(server)
        yield main, replica, tight
    finally:
        codes = main.stop(), replica.stop(), tight.stop()
        redis.stop()
    assert codes == (0, 0, 0), (main.log_tail(), replica.log_tail(), tight.log_tail())


@pytest.fixture(scope="module")
def server(cluster):
    return cluster[0]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120) as sdk:
        yield sdk


def edit(client, **overrides):
    values = dict(image=UPLOAD, prompt="the same toy on a beach", size="64x64", extra_body=KNOBS)
    values.update(overrides)
    return client.images.edit(**values)


def generate(server, **fields) -> dict:
    """`POST /generate` (multipart), the service's own API, for comparison."""
    values = {"prompt": "the same toy on a beach", "size": 64, **KNOBS, **fields}
    response = httpx.post(f"{server.url}/generate", data={k: str(v).lower() if isinstance(v, bool) else str(v)
                                                          for k, v in values.items()},
                          files={"image": UPLOAD}, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_edit_equals_generate_byte_for_byte(client, server):
    response = edit(client)
    assert response.size == "64x64" and response.output_format == "png" and response.background == "opaque"
    assert response.usage.steps == 3 and response.usage.rows == 3 and response.usage.images == 1
    (image,) = response.data
    assert image.revised_prompt is None and image.seed == 5
    assert decoded(image.b64_json).size == (64, 64)
    assert image.b64_json == generate(server)["images"][0]
    # the JSON variant, with the reference as a data URI, is the same request
    data_uri = "data:image/png;base64," + base64.b64encode(REFERENCE).decode()
    document = client.post("/images/edits", cast_to=object, body={
        "images": [{"image_url": data_uri}], "prompt": "the same toy on a beach", "size": "64x64", **KNOBS})
    assert document["data"][0]["b64_json"] == image.b64_json


def test_n_images_have_consecutive_seeds_and_true_cfg_counts_three_rows(client, server):
    response = edit(client, n=3, extra_body={**KNOBS, "seed": 40, "image_guidance": 2.0, "steps": 4})
    assert [image.seed for image in response.data] == [40, 41, 42]
    assert len({image.b64_json for image in response.data}) == 3
    # true CFG runs from step 2 on: 1 + 1 + 3 + 3 rows per image
    assert response.usage.steps == 12 and response.usage.rows == 24 and response.usage.images == 3
    same = generate(server, seed=40, image_guidance=2.0, steps=4, num_images=3)
    assert [image.b64_json for image in response.data] == same["images"]


@pytest.mark.parametrize("output_format, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_each_output_format(client, server, output_format, pil_format):
    response = edit(client, output_format=output_format)
    assert response.output_format == output_format
    assert decoded(response.data[0].b64_json).format == pil_format
    assert response.data[0].b64_json == generate(server, output_format=output_format)["images"][0]
    if output_format != "png":
        smaller = edit(client, output_format=output_format, output_compression=10)
        assert len(base64.b64decode(smaller.data[0].b64_json)) < len(base64.b64decode(response.data[0].b64_json))


def test_url_output_is_served_by_any_replica_until_it_expires(client, cluster):
    main, replica, _ = cluster
    b64 = edit(client).data[0].b64_json
    url = edit(client, response_format="url").data[0].url
    assert url.startswith(f"{main.url}/v1/images/")
    fetched = httpx.get(url, timeout=30)  # the URL is its own credential: no API key
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(b64)
    assert int(fetched.headers["cache-control"].rpartition("=")[2]) > 3500
    on_replica = httpx.get(url.replace(main.url, replica.url), timeout=30)
    assert on_replica.status_code == 200 and on_replica.content == fetched.content

    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    image_path = parts.path

    def fetch(path=image_path, **changes):
        return httpx.get(f"{main.url}{path}", params={**query, **changes}, timeout=30)

    flipped = query["signature"][:-1] + ("0" if query["signature"][-1] != "0" else "1")
    later = str(int(query["expires"]) + 3600)
    other_id = image_path.replace(image_path.split("/")[3], "0" * 32)
    for tampered in (fetch(signature=flipped), fetch(expires=later), fetch(other_id), fetch(signature="")):
        assert tampered.status_code == 403, tampered.text
        assert tampered.json()["error"]["type"] == "permission_error"
    image_id = image_path.split("/")[3]
    past = str(int(time.time()) - 1)
    signed = hmac.new(SECRET.encode(), f"{image_id}.{past}".encode(), hashlib.sha256).hexdigest()
    expired = fetch(expires=past, signature=signed)
    assert expired.status_code == 410 and expired.json()["error"]["code"] == "expired"


def test_url_output_without_redis_is_kept_in_process(cluster):
    tight = cluster[2]
    with openai.OpenAI(base_url=f"{tight.url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        url = edit(sdk, response_format="url", output_format="webp").data[0].url
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)


def test_stream_sends_partial_images_in_order_then_the_same_final_image(client):
    final = edit(client, extra_body={**KNOBS, "steps": 6}).data[0].b64_json
    events = list(edit(client, stream=True, partial_images=2, extra_body={**KNOBS, "steps": 6}))
    assert [event.type for event in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    partials = [np.asarray(decoded(event.b64_json), dtype=np.int16) for event in events[:2]]
    assert all(partial.shape == (64, 64, 3) for partial in partials)
    assert not np.array_equal(partials[0], partials[1])
    completed = events[-1]
    assert completed.b64_json == final
    assert completed.size == "64x64" and completed.output_format == "png" and completed.usage.steps == 6
    # three partial images over three steps: the evenly spaced steps 1, 2 (and 2 again) give two
    fewer = list(edit(client, stream=True, partial_images=3))
    assert [event.type for event in fewer].count("image_edit.partial_image") == 2


def test_a_stream_closed_early_cancels_its_request(client, server):
    before = server.metric("dsd_requests_cancelled_total")
    stream = edit(client, stream=True, partial_images=1, **LONG)
    first = next(iter(stream))
    assert first.type == "image_edit.partial_image"
    stream.close()
    server.wait_for_metric("dsd_requests_cancelled_total", minimum=before + 1, timeout=60)


def test_a_failure_after_the_stream_began_is_an_error_event(cluster):
    replica = cluster[1]
    with openai.OpenAI(base_url=f"{replica.url}/v1", api_key=KEY, max_retries=0, timeout=120) as sdk:
        stream = edit(sdk, stream=True, partial_images=1, **LONG)
        with pytest.raises(openai.APIError) as raised:
            list(stream)
    assert raised.value.code == "deadline_exceeded" and "passed its deadline" in raised.value.message
    assert raised.value.body["type"] == "server_error"


@pytest.mark.parametrize("overrides, param, words", [
    (dict(size="100x100"), "size", "square sizes from 64x64 to 1024x1024"),
    (dict(size="512x768"), "size", "square sizes"),
    (dict(image=[UPLOAD, UPLOAD]), "image", "2 references given"),
    (dict(background="transparent"), "background", "opaque"),
    (dict(n=5), "n", "exceeds the limit of 4"),
    (dict(n=17), "n", "less than or equal to 16"),
    (dict(output_format="gif"), "output_format", "'png', 'jpeg' or 'webp'"),
    (dict(partial_images=2), "partial_images", "stream=true"),
    (dict(stream=True, n=2), "n", "send n=1"),
    (dict(extra_body={"steps": 0}), "steps", "greater than or equal to 1"),
    (dict(extra_body={"mask_blur": 3}), "mask_blur", "not a field of this API"),
    (dict(prompt=""), "prompt", "at least 1 character"),
])
def test_bad_requests_raise_bad_request_error_with_param(client, overrides, param, words):
    with pytest.raises(openai.BadRequestError) as raised:
        edit(client, **overrides)
    assert raised.value.param == param and words in raised.value.message
    assert raised.value.body["type"] == "invalid_request_error"


def test_http_references_are_not_fetched(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.post("/images/edits", cast_to=object, body={
            "images": [{"image_url": "http://127.0.0.1:9/reference.png"}], "prompt": "a toy"})
    assert raised.value.param == "images" and "fetches no URLs" in raised.value.message


def test_models_list_modes_and_adapters(client):
    listed = client.models.list()
    assert [model.id for model in listed.data] == ["dsd-identity", "dsd-structure", "identity", "ink", "structure"]
    assert all(model.owned_by == "dsd-serve" and model.created > 0 for model in listed.data)
    assert client.models.retrieve("dsd-structure").id == "dsd-structure"
    # a model name selects that mode: `dsd-structure`, or the adapter it serves by its own name
    structure = edit(client, model="dsd-structure").data[0].b64_json
    assert edit(client, model="structure").data[0].b64_json == structure
    assert structure != edit(client, model="dsd-identity").data[0].b64_json
    assert edit(client, model="ink").data[0].b64_json not in (structure, edit(client, model="identity").data[0].b64_json)
    with pytest.raises(openai.NotFoundError) as raised:
        edit(client, model="gpt-image-1")
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    assert "dsd-identity" in raised.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1")


def test_generations_point_to_edits(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="a toy on a beach")
    assert "/v1/images/edits" in raised.value.message and raised.value.param == "image"


def test_bearer_key_is_required(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as raised:
            edit(wrong)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    assert raised.value.body["type"] == "authentication_error"
    missing = httpx.post(f"{server.url}/v1/images/edits", files={"image": UPLOAD}, data={"prompt": "a toy"},
                         timeout=30)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"


def test_queue_full_is_a_rate_limit_error_the_sdk_retries_after(cluster):
    tight = cluster[2]
    results = {}

    def send(name, **fields):
        body = {"prompt": "a toy", "size": "64", "image_guidance": "2.0", **fields}
        results[name] = httpx.post(f"{tight.url}/generate", data=body, files={"image": UPLOAD}, timeout=120)

    started = tight.metric("dsd_queue_wait_seconds_count")
    running = threading.Thread(target=send, args=("running",), kwargs=dict(steps="100"))
    running.start()
    tight.wait_for_metric("dsd_queue_wait_seconds_count", minimum=started + 1)
    waiting = threading.Thread(target=send, args=("waiting",), kwargs=dict(steps="2"))
    waiting.start()
    tight.wait_for_metric("dsd_queue_depth", minimum=1)
    with openai.OpenAI(base_url=f"{tight.url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        with pytest.raises(openai.RateLimitError) as raised:
            edit(sdk)
        headers = raised.value.response.headers
        assert int(headers["retry-after"]) >= 1 and raised.value.body["type"] == "rate_limit_error"
        # the SDK waits what Retry-After says before its retry (when retries are on)
        assert sdk._should_retry(raised.value.response)
        assert sdk._parse_retry_after_header(headers) == int(headers["retry-after"])
    running.join(120)
    waiting.join(120)
    assert results["running"].status_code == 200 and results["waiting"].status_code == 200


def test_requests_are_counted_under_the_openai_transport(client, server):
    edit(client)
    assert server.metric("dsd_request_duration_seconds_count", transport="openai", outcome="ok") >= 1
    assert server.metric("dsd_request_duration_seconds_count", transport="openai", outcome="invalid_argument") >= 1
    assert "/v1/images/edits" in httpx.get(f"{server.url}/docs.json", timeout=10).json()["paths"]


def test_in_process_store_drops_the_oldest_images_past_its_budget():
    from dsd_model.settings import Settings
    from dsd_serve.http import ClientFault
    from dsd_serve.image_urls import ImageURLs

    urls = ImageURLs(Settings(profile="tiny", image_store_memory_bytes=2**20, image_url_secret=SECRET))
    images = [bytes([i]) * 400_000 for i in range(3)]
    links = [urlsplit(urls.publish(data, "png", "http://dsd.test/")) for data in images]
    assert all(link.netloc == "dsd.test" for link in links)

    def open_(link):
        query = {name: values[0] for name, values in parse_qs(link.query).items()}
        return urls.open(link.path.split("/")[3], query["expires"], query["signature"])

    with pytest.raises(ClientFault) as raised:
        open_(links[0])
    assert raised.value.status == 404
    assert [open_(link) for link in links[1:]] == [(data, "image/png") for data in images[1:]]
    with pytest.raises(ClientFault) as too_large:
        urls.publish(bytes(2**20 + 1), "png", "http://dsd.test")
    assert too_large.value.status == 503 and "b64_json" in too_large.value.message


def test_identity_scores_and_best_of_arrive_as_extra_fields(client):
    scored = edit(client, n=2, extra_body={**KNOBS, "identity": True})
    assert [image.identity["scorer"] for image in scored.data] == ["tiny-random-dino"] * 2
    best = edit(client, extra_body={**KNOBS, "best_of": 3})
    assert len(best.data) == 1 and len(best.candidates) == 3
    assert best.data[0].seed == next(c["seed"] for c in best.candidates if c["returned"])
    with pytest.raises(openai.BadRequestError) as raised:
        edit(client, stream=True, extra_body={**KNOBS, "best_of": 2})
    assert raised.value.param == "best_of"
