"""Provenance and safety on the real BentoML server (loopback, tiny profile), through REST and gRPC.

`guarded` signs with a development chain, requires consent for references its input check flags (threshold 0: every
reference) and runs an output check that passes everything (threshold 1). `strict` is unsigned and blocks every
output (threshold 0)."""

import base64
import io
import time

import grpc
import httpx
import pytest
from PIL import Image

from dsd_model.serving.provenance import TRAINED_ALGORITHMIC_MEDIA, Watermark, provenance_tag, read_credentials
from dsd_model.tiny import write_tiny_classifier
from dsd_serve.grpc_stubs import dsd_pb2 as pb
from dsd_serve.grpc_stubs import dsd_pb2_grpc
from dsd_model.serving.provenance import write_development_chain
from helpers import png_bytes, random_image, unmarked
from servers import start_service, wait_ready

REFERENCE = png_bytes(random_image(96, 80, seed=1))
MARK = Watermark("dsd-serve")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    chain, key, root = write_development_chain(tmp_path_factory.mktemp("c2pa"))
    classifier = write_tiny_classifier(tmp_path_factory.mktemp("classifier"), labels=("safe", "nsfw"))
    checks = dict(output_check_model=str(classifier), input_check_model=str(classifier),
                  input_check_labels='["nsfw"]')
    guarded = start_service(tmp_path_factory.mktemp("guarded"), c2pa_cert_chain=str(chain), c2pa_private_key=str(key),
                            c2pa_trust_anchors=str(root), input_check_threshold="0", output_check_threshold="1",
                            **checks)
    strict = start_service(tmp_path_factory.mktemp("strict"), output_check_model=str(classifier),
                           output_check_threshold="0")
    try:
        wait_ready(guarded)
        wait_ready(strict)
        yield guarded, strict, root
    finally:
        codes = guarded.stop(), strict.stop()
    assert codes == (0, 0), (guarded.log_tail(), strict.log_tail())


def generate(server, request_id: str = "prov-rest", **overrides) -> httpx.Response:
    values = dict(image=base64.b64encode(REFERENCE).decode(), prompt="the same toy on a beach", steps=2, size=256,
                  seed=3, consent=True)
    values.update(overrides)
    return httpx.post(f"{server.url}/generate", json=values, headers={"x-request-id": request_id}, timeout=120)


def grpc_stub(server) -> tuple[grpc.Channel, dsd_pb2_grpc.DSDServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.env['DSD_GRPC_PORT']}",
                                    options=[("grpc.max_receive_message_length", 64 * 2**20)])
    return channel, dsd_pb2_grpc.DSDServiceStub(channel)


def grpc_request(**overrides) -> pb.GenerateRequest:
    values = dict(image=REFERENCE, prompt="the same toy on a beach", steps=2, size=256, seed=3, consent=True)
    values.update(overrides)
    return pb.GenerateRequest(**values)


def jpeg_again(data: bytes, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="JPEG", quality=quality, subsampling=0)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_rest_output_is_marked_signed_and_verifiable(servers):
    guarded, _, root = servers
    response = generate(guarded, output_format="png")
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["request_id"] == "prov-rest" and document["notices"] == []
    provenance_id = document["provenance_id"]
    data = base64.b64decode(document["images"][0])
    mark = MARK.read(Image.open(io.BytesIO(data)))
    assert mark["present"] and mark["provenance_tag"] == provenance_tag(provenance_id)
    assert MARK.read(jpeg_again(data, 90))["provenance_tag"] == provenance_tag(provenance_id)
    credentials = read_credentials(data, root)
    assert credentials["validation_state"] == "Trusted"
    assert credentials["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA
    generation = credentials["generation"]
    assert generation["provenance_id"] == provenance_id and generation["adapter"] == "identity"
    assert generation["profile"] == "tiny" and "prompt" not in generation

    verified = httpx.post(f"{guarded.url}/verify", content=data, headers={"content-type": "image/png"}, timeout=30)
    assert verified.status_code == 200, verified.text
    report = verified.json()
    assert report["watermark"]["present"] and report["watermark"]["provenance_tag"] == provenance_tag(provenance_id)
    assert report["c2pa"]["validation_state"] == "Trusted"
    assert report["c2pa"]["generation"]["provenance_id"] == provenance_id
    assert guarded.metric("dsd_c2pa_signing_enabled") == 1
    assert guarded.metric("dsd_watermarks_total", result="embedded") >= 1
    assert guarded.metric("dsd_safety_decisions_total", check="output", decision="pass") >= 1


def test_a_client_cannot_stamp_an_id_of_its_choosing(servers):
    """Provenance carries an id the server makes for each request: not the client's X-Request-ID, which stays in
    the response and the log, and not an id of an earlier request that the client sends as its own."""
    guarded, _, root = servers
    first = generate(guarded, request_id="chosen-id").json()
    again = generate(guarded, request_id="chosen-id").json()
    copied = generate(guarded, request_id=first["provenance_id"]).json()
    documents = (first, again, copied)
    assert [document["request_id"] for document in documents] == ["chosen-id", "chosen-id", first["provenance_id"]]
    provenance_ids = [document["provenance_id"] for document in documents]
    assert len(set(provenance_ids)) == 3 and all(len(value) == 32 for value in provenance_ids)
    for document, provenance_id in zip(documents, provenance_ids):
        data = base64.b64decode(document["images"][0])
        assert MARK.read(Image.open(io.BytesIO(data)))["provenance_tag"] == provenance_tag(provenance_id)
        generation = read_credentials(data, root)["generation"]
        assert generation["provenance_id"] == provenance_id and "request_id" not in generation
        assert b"chosen-id" not in data


def test_verify_refuses_what_is_not_an_image(servers):
    guarded, _, _ = servers
    garbage = httpx.post(f"{guarded.url}/verify", content=b"not an image", headers={"content-type": "image/png"},
                         timeout=30)
    assert garbage.status_code == 422 and garbage.json()["error"]["field"] == "image"
    wrong = httpx.post(f"{guarded.url}/verify", json={"image": "x"}, timeout=30)
    assert wrong.status_code == 415 and "image/png" in wrong.json()["error"]["message"]
    plain = httpx.post(f"{guarded.url}/verify", content=REFERENCE, headers={"content-type": "image/png"}, timeout=30)
    assert plain.status_code == 200
    assert plain.json()["watermark"]["present"] is None and plain.json()["c2pa"]["present"] is False
    limit = 20 * 2**20
    oversized = httpx.post(f"{guarded.url}/verify", content=b"\0" * (limit + 1), headers={"content-type": "image/png"},
                           timeout=30)
    assert oversized.status_code == 413 and f"limit of {limit} bytes" in oversized.json()["error"]["message"]


def test_verify_waits_for_the_model_like_generate(tmp_path):
    """A server whose model never loads (its weights directory is missing) answers /verify 503, as /generate: the
    upload limits, the decode pool and the API key all come with the loaded runtime."""
    server = start_service(tmp_path, profile="real", model_dir=str(tmp_path / "missing"), api_key="secret")
    try:
        end = time.monotonic() + 120
        while True:  # until the liveness probe says that the load failed
            try:
                if httpx.get(f"{server.url}/livez", timeout=30).status_code == 503:
                    break
            except httpx.TransportError:
                pass
            assert server.process.poll() is None and time.monotonic() < end, server.log_tail()
            time.sleep(0.3)
        response = httpx.post(f"{server.url}/verify", content=REFERENCE, headers={"content-type": "image/png"},
                              timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "unavailable"
    finally:
        server.stop()


def test_grpc_output_is_marked_and_signed(servers):
    guarded, _, root = servers
    channel, stub = grpc_stub(guarded)
    with channel:
        response = stub.Generate(grpc_request(output_format=pb.OUTPUT_FORMAT_JPEG), timeout=120,
                                 metadata=(("x-request-id", "prov-grpc"),))
    data = response.images[0]
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    mark = MARK.read(Image.open(io.BytesIO(data)))
    assert response.request_id == "prov-grpc" and len(response.provenance_id) == 32
    assert mark["present"] and mark["provenance_tag"] == provenance_tag(response.provenance_id)
    credentials = read_credentials(data, root)
    assert credentials["validation_state"] == "Trusted"
    assert credentials["generation"]["provenance_id"] == response.provenance_id and b"prov-grpc" not in data


def test_small_outputs_are_counted_unmarked_and_said_once(servers):
    guarded, _, _ = servers
    before = guarded.metric("dsd_watermarks_total", result="too_small")
    response = generate(guarded, size=64, num_images=2, output_format="webp")
    assert response.status_code == 200, response.text
    assert response.json()["notices"] == [unmarked(64)]
    assert guarded.metric("dsd_watermarks_total", result="too_small") == before + 2
    for image in response.json()["images"]:
        assert read_credentials(base64.b64decode(image))["validation_state"] == "Valid"
    channel, stub = grpc_stub(guarded)
    with channel:
        small = stub.Generate(grpc_request(size=128), timeout=120)
    assert list(small.notices) == [unmarked(128)]


def test_reference_without_consent_is_refused(servers):
    guarded, _, _ = servers
    response = generate(guarded, consent=False)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "content_policy" and error["field"] == "consent" and "input" in error["message"]
    channel, stub = grpc_stub(guarded)
    with channel, pytest.raises(grpc.RpcError) as raised:
        stub.Generate(grpc_request(consent=False), timeout=120)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    trailing = dict(raised.value.trailing_metadata())
    assert trailing["check"] == "input" and trailing["field"] == "consent"
    assert guarded.metric("dsd_safety_decisions_total", check="input", decision="block") >= 2
    assert guarded.metric("dsd_safety_decisions_total", check="input", decision="consented") >= 1
    assert guarded.metric("dsd_request_duration_seconds_count", outcome="content_policy") >= 2


def test_blocked_output_leaks_no_image_and_unsigned_mode_is_reported(servers):
    _, strict, _ = servers
    response = generate(strict, size=64, consent=False)
    assert response.status_code == 422
    assert set(response.json()) == {"error"} and len(response.content) < 1024
    error = response.json()["error"]
    assert error["code"] == "content_policy" and "output" in error["message"] and error["field"] is None
    channel, stub = grpc_stub(strict)
    with channel, pytest.raises(grpc.RpcError) as raised:
        stub.Generate(grpc_request(size=64), timeout=120)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(raised.value.trailing_metadata())["check"] == "output"
    assert strict.metric("dsd_safety_decisions_total", check="output", decision="block") >= 2
    assert strict.metric("dsd_c2pa_signing_enabled") == 0
    assert "C2PA signing is OFF" in strict.log.read_text()
    log = strict.log.read_text()
    assert "safety checks: input OFF (not configured)" in log
    assert "request prov-rest: output check block (label 'nsfw'" in log


def wait_for_job(server, job_id: str, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while (view := httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json())["status"] in ("queued", "running"):
        assert time.monotonic() < end, view
        time.sleep(0.05)
    return view


def test_jobs_refuse_an_unconsented_reference_at_submission(servers):
    guarded, _, _ = servers
    body = dict(image=base64.b64encode(REFERENCE).decode(), prompt="the same toy on a beach", steps=2, size=64)
    for response in (httpx.post(f"{guarded.url}/v1/jobs", json=body, timeout=60),
                     httpx.post(f"{guarded.url}/generate", json=body, timeout=60,
                                headers={"Idempotency-Key": f"consent-{time.time_ns()}"})):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "content_policy" and error["field"] == "consent"
    channel, stub = grpc_stub(guarded)
    with channel, pytest.raises(grpc.RpcError) as raised:
        stub.SubmitJob(pb.SubmitJobRequest(request=grpc_request(size=64, consent=False)), timeout=60)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(raised.value.trailing_metadata())["field"] == "consent"


def test_a_job_whose_output_is_withheld_ends_with_content_policy(servers):
    _, strict, _ = servers
    body = dict(image=base64.b64encode(REFERENCE).decode(), prompt="the same toy on a beach", steps=2, size=64)
    job = httpx.post(f"{strict.url}/v1/jobs", json=body, timeout=60)
    assert job.status_code == 202, job.text
    view = wait_for_job(strict, job.json()["id"])
    assert view["status"] == "failed" and view["error"]["code"] == "content_policy", view
    assert "output" in view["error"]["message"] and view["result"] is None
    keyed = httpx.post(f"{strict.url}/generate", json=body, headers={"Idempotency-Key": f"out-{time.time_ns()}"},
                       timeout=120)
    assert keyed.status_code == 422, keyed.text
    assert keyed.json()["error"]["code"] == "content_policy" and len(keyed.content) < 1024
