"""`POST /generate` on the real BentoML server (loopback, tiny profile)."""

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from dsd_model.loading import load_pipeline
from dsd_model.settings import Settings
from helpers import png_bytes, random_image, transparent_image, unmarked
from servers import start_service, wait_ready
from test_inputs import png_header

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
REFERENCE = png_bytes(random_image(96, 80, seed=1))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    main = start_service(tmp_path_factory.mktemp("main"), api_key=KEY, max_queue="32", max_batch_rows="12")
    tight = start_service(tmp_path_factory.mktemp("tight"), max_queue="1", max_batch_rows="3",
                          max_upload_bytes="100000")
    try:
        wait_ready(main)
        wait_ready(tight)
        yield main, tight
    finally:
        codes = main.stop(), tight.stop()
    assert codes == (0, 0), (main.log_tail(), tight.log_tail())


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def tight(servers):
    return servers[1]


def body(**overrides) -> dict:
    values = dict(image=base64.b64encode(REFERENCE).decode(), prompt="the same toy on a beach", steps=3, size=64,
                  seed=5)
    values.update(overrides)
    return values


def post(server, payload: dict, headers=AUTH, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json=payload, headers=headers, timeout=timeout)


def decode(response: httpx.Response, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(response.json()["images"][index])))


def test_success_and_same_seed_same_bytes(server):
    first = post(server, body())
    assert first.status_code == 200, first.text
    document = first.json()
    assert document["seeds"] == [5]
    assert document["profile"] == "tiny" and "noise-like" in document["notice"]
    assert document["size"] == 64 and document["mode"] is None
    assert first.headers["x-request-id"] == document["request_id"]
    assert set(document["timings"]) == {"queue_s", "run_s", "total_s"}
    image = decode(first)
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    again = post(server, body())
    assert again.json()["images"] == document["images"]
    other = post(server, body(seed=6))
    assert other.json()["images"] != document["images"]


def test_multipart_upload_equals_json(server):
    fields = {"prompt": "the same toy on a beach", "steps": "3", "size": "64", "seed": "5"}
    response = httpx.post(f"{server.url}/generate", data=fields, files={"image": ("ref.png", REFERENCE, "image/png")},
                          headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["images"] == post(server, body()).json()["images"]


def test_several_images_and_formats(server):
    response = post(server, body(num_images=2, output_format="jpeg", seed=10, mode="structure"))
    assert response.status_code == 200, response.text
    assert response.json()["seeds"] == [10, 11]
    assert [decode(response, i).format for i in range(2)] == ["JPEG", "JPEG"]
    webp = post(server, body(output_format="webp"))
    assert decode(webp).format == "WEBP"
    random_seed = post(server, body(seed=None))
    assert isinstance(random_seed.json()["seeds"][0], int)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "overrides, status, field, message",
    [
        ({"image": b64(b"not an image")}, 422, "image", "not a decodable image"),
        ({"image": b64(REFERENCE[:80])}, 422, "image", "truncated or corrupt"),
        ({"image": "@@@not-base64@@@"}, 422, "image", "not valid base64"),
        ({"image": b64(png_header(30000, 30000))}, 422, "image", "too large"),
        ({"image": b64(png_bytes(random_image(8, 8)))}, 422, "image", "at least 16 px"),
        ({"prompt": ""}, 422, "prompt", "at least 1 character"),
        ({"prompt": "x" * 2001}, 422, "prompt", "at most 2000 characters"),
        ({"steps": 0}, 422, "steps", "greater than or equal to 1"),
        ({"exact": "maybe"}, 422, "exact", "valid boolean"),
        ({"steps": 101}, 422, "steps", "less than or equal to 100"),
        ({"size": 100}, 422, "size", "multiple of 16"),
        ({"size": 2048}, 422, "size", "less than or equal to 1024"),
        ({"guidance": 25.0}, 422, "guidance", "less than or equal to 20"),
        ({"image_guidance": -1}, 422, "image_guidance", "greater than or equal to 0"),
        ({"num_images": 5}, 422, "num_images", "limit of 4"),
        ({"deadline_s": 10_000}, 422, "deadline_s", "limit of 600"),
        ({"mode": "sketch"}, 422, "mode", "'identity' or 'structure'"),
        ({"output_format": "gif"}, 422, "output_format", "'png', 'jpeg' or 'webp'"),
        ({"colour": "red"}, 422, "colour", "unknown field"),
        ({"seed": -3}, 422, "seed", "greater than or equal to 0"),
        ({"steps": True}, 422, "steps", "not a boolean; accepted: integer from 1 to 100"),
        ({"guidance": False}, 422, "guidance", "not a boolean; accepted: number from 0.0 to 20.0"),
        ({"image": "data:image/png," + b64(REFERENCE)}, 422, "image", "data URI that is not base64"),
        ({"image": "data:image/png;base64,@@@"}, 422, "image", "not valid base64"),
        ({"prompt": "a" * 600}, 422, "prompt", "is 602 T5 tokens long; the limit is 512 tokens"),
        ({"negative_prompt": "a" * 600}, 422, "negative_prompt", "the limit is 512 tokens"),
        ({"background": "white"}, 422, "background", "should match pattern"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(server, overrides, status, field, message):
    response = post(server, body(**overrides))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert message in error["message"]
    assert error["request_id"]


def test_conversions_are_reported_in_notices(server):
    assert post(server, body()).json()["notices"] == [unmarked(64)]
    response = post(server, body(image=b64(png_bytes(transparent_image())), background="#102030", prompt="a" * 100))
    assert response.status_code == 200, response.text
    assert response.json()["notices"] == [
        "image: transparency composited on #102030",
        "prompt: 102 CLIP tokens, only the first 77 reach the pooled CLIP embedding",
        unmarked(64),
    ]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(server, literal):
    text = json.dumps(body())[:-1] + f', "guidance": {literal}}}'
    response = httpx.post(f"{server.url}/generate", content=text, timeout=60,
                          headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "guidance"
    assert "finite" in response.json()["error"]["message"]


def send_json_text(server, text: str) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", content=text, timeout=60,
                      headers={**AUTH, "content-type": "application/json"})


def with_raw_field(name: str, literal: str) -> str:
    return json.dumps(body())[:-1] + f', "{name}": {literal}}}'


@pytest.mark.parametrize(
    "text, status, field, message",
    [
        (with_raw_field("seed", "9" * 5000), 422, "seed", "accepted: integer from 0 to"),
        (with_raw_field("steps", "-" + "9" * 5000), 422, "steps", "accepted: integer from 1 to 100"),
        (with_raw_field("guidance", "1e400"), 422, "guidance", "finite"),
        (with_raw_field("extra", "9" * 5000), 422, "extra", "unknown field"),
        (with_raw_field("extra", "[" * 100_000 + "]" * 100_000), 400, None, "nests arrays or objects too deeply"),
        ("[" * 100_000 + "]" * 100_000, 400, None, "nests arrays or objects too deeply"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, 400, None, "nests arrays or objects too deeply"),
        (json.dumps(body(prompt="\ud800")), 422, "prompt", "unicode"),
        ("[1, 2]", 400, None, "must be a JSON object"),
        ("", 400, None, "not valid JSON"),
    ],
)
def test_malformed_json_of_any_shape_is_a_4xx(server, text, status, field, message):
    response = send_json_text(server, text)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and message in error["message"], error


def test_base64_as_common_tools_write_it(server):
    plain = b64(REFERENCE)
    wrapped = "\n".join(plain[i:i + 76] for i in range(0, len(plain), 76)) + "\n"
    expected = post(server, body()).json()["images"]
    for image in (wrapped, "data:image/png;base64," + plain, "data:image/png;base64," + wrapped.replace("\n", "\r\n")):
        response = post(server, body(image=image))
        assert response.status_code == 200, response.text
        assert response.json()["images"] == expected


def multipart(server, boundary: str, fields: dict[str, bytes]) -> httpx.Response:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="ref.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + REFERENCE + f"\r\n--{boundary}--\r\n".encode())
    return httpx.post(f"{server.url}/generate", content=b"".join(parts), timeout=60,
                      headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"})


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"prompt": b"x" * 70_000}, "prompt", "exceeds the limit of 65536 bytes"),
        ({"prompt": b"caf\xe9 au lait"}, "prompt", "is not valid UTF-8"),
        ({"prompt": b"a toy", "negative_prompt": b"\xff"}, "negative_prompt", "is not valid UTF-8"),
        ({"prompt": b"a toy", "steps": b"true"}, "steps", "accepted: integer from 1 to 100"),
        ({"prompt": b"a toy", "seed": b"9" * 5000}, "seed", "accepted: integer from 0 to"),
        ({"prompt": b"a toy", "image_guidance": b"false"}, "image_guidance", "accepted: number from 0.0 to 20.0"),
    ],
)
def test_multipart_fields_are_refused_by_name(server, fields, field, message):
    response = multipart(server, "dsd-boundary-1", fields)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and message in error["message"], error


def test_malformed_bodies(server, tight):
    bad_json = httpx.post(f"{server.url}/generate", content=b"{not json", timeout=30,
                          headers={**AUTH, "content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    text = httpx.post(f"{server.url}/generate", content=b"hello", timeout=30,
                      headers={**AUTH, "content-type": "text/plain"})
    assert text.status_code == 415
    no_file = httpx.post(f"{server.url}/generate", data={"prompt": "a toy"}, files={"other": ("x", b"1")},
                         headers=AUTH, timeout=30)
    assert no_file.status_code == 422 and no_file.json()["error"]["field"] == "image"
    too_large = post(tight, body(image=b64(b"\0" * 200_000)), headers={})
    assert too_large.status_code == 413
    assert "exceeds the limit" in too_large.json()["error"]["message"]


def test_auth(server):
    assert post(server, body(), headers={}).status_code == 401
    wrong = post(server, body(), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    for probe in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.url + probe, timeout=10).status_code == 200


def test_queue_full_is_429_with_retry_after(tight):
    results = {}

    def send(name, **overrides):
        results[name] = post(tight, body(**overrides), headers={})

    started = tight.metric("dsd_queue_wait_seconds_count")
    long_running = threading.Thread(target=send, args=("long",), kwargs=dict(steps=100, image_guidance=2.0))
    long_running.start()
    tight.wait_for_metric("dsd_queue_wait_seconds_count", minimum=started + 1)
    waiting = threading.Thread(target=send, args=("waiting",), kwargs=dict(steps=2, image_guidance=2.0))
    waiting.start()
    tight.wait_for_metric("dsd_queue_depth", minimum=1)
    rejected = post(tight, body(), headers={})
    assert rejected.status_code == 429, rejected.text
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["code"] == "resource_exhausted"
    long_running.join(120)
    waiting.join(120)
    assert results["long"].status_code == 200 and results["waiting"].status_code == 200
    assert tight.metric("dsd_requests_rejected_total", reason="queue_full") >= 1


def test_deadline_is_504_and_frees_the_slot(server):
    before = server.metric("dsd_requests_timed_out_total")
    response = post(server, body(steps=100, size=512, image_guidance=2.0, deadline_s=0.5))
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert server.metric("dsd_requests_timed_out_total") == before + 1
    assert post(server, body(steps=1)).status_code == 200


def test_client_disconnect_cancels_the_request(server):
    before = server.metric("dsd_requests_cancelled_total")
    with pytest.raises(httpx.TimeoutException):  # 100 steps of 3 rows at 512 px: many seconds of work on any CPU
        post(server, body(steps=100, size=512, image_guidance=2.0), timeout=1.0)
    server.wait_for_metric("dsd_requests_cancelled_total", minimum=before + 1, timeout=30)


def test_concurrent_requests_equal_their_solo_results(server):
    pipe = load_pipeline(Settings(profile="tiny"))
    cases = [
        dict(steps=2 + i % 4, seed=100 + i, mode="identity" if i % 3 else "structure",
             image_guidance=1.5 if i % 2 else 1.0, text_guidance=1.0 + i / 4)
        for i in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda case: post(server, body(**case)), cases))
    reference = Image.open(io.BytesIO(REFERENCE)).convert("RGB")
    for case, response in zip(cases, responses):
        assert response.status_code == 200, response.text
        solo = pipe(reference, "the same toy on a beach", num_inference_steps=case["steps"], size=64,
                    seed=case["seed"], image_guidance_scale=case["image_guidance"],
                    text_guidance_scale=case["text_guidance"], adapter=case["mode"]).images[0]
        served = np.asarray(decode(response), dtype=np.int16)
        # batched kernels differ from solo ones in the last float bits; after 8-bit rounding at most one level
        assert np.abs(served - np.asarray(solo, dtype=np.int16)).max() <= 1, case


def test_healthy_after_everything_and_metrics_counted(server):
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert post(server, body(steps=1)).status_code == 200
    assert server.metric("dsd_request_duration_seconds_count", transport="http", outcome="ok") >= 1
    assert server.metric("dsd_request_duration_seconds_count", transport="http", outcome="invalid_argument") >= 1
    assert server.metric("dsd_request_duration_seconds_count", transport="http", outcome="unauthenticated") >= 1
    assert server.metric("dsd_step_duration_seconds_count") >= 1
    assert server.metric("dsd_batch_rows_count") >= 1
    docs = httpx.get(f"{server.url}/docs.json", timeout=10).json()
    assert "/generate" in docs["paths"]
