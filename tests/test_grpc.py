"""The gRPC API on the real BentoML server (loopback, tiny profile): results, progress, status codes, health."""

import base64
import logging
import math
import os
import signal
import time
from dataclasses import dataclass

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dsd_serve.grpc_server import status_for
from dsd_serve.grpc_stubs import dsd_pb2 as pb
from dsd_serve.grpc_stubs import dsd_pb2_grpc
from helpers import png_bytes, random_image, transparent_image
from servers import Server, start_service, wait_ready

KEY = "test-key-0123456789"
AUTH = (("authorization", f"Bearer {KEY}"),)
REFERENCE = png_bytes(random_image(96, 80, seed=1))
SERVICE = "dsd.v1.DSDService"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Endpoint:
    """A started server and a gRPC channel to it."""

    server: Server
    channel: grpc.Channel
    stub: dsd_pb2_grpc.DSDServiceStub

    @classmethod
    def connect(cls, server: Server) -> "Endpoint":
        channel = grpc.insecure_channel(f"127.0.0.1:{server.env['DSD_GRPC_PORT']}")
        return cls(server, channel, dsd_pb2_grpc.DSDServiceStub(channel))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    main = start_service(tmp_path_factory.mktemp("main"), api_key=KEY)
    tight = start_service(tmp_path_factory.mktemp("tight"), max_queue="1", max_batch_rows="3")
    try:
        wait_ready(main)
        wait_ready(tight)
        endpoints = Endpoint.connect(main), Endpoint.connect(tight)
        for endpoint in endpoints:
            wait_health(endpoint.channel, SERVING)
        yield endpoints
        for endpoint in endpoints:
            endpoint.channel.close()
    finally:
        codes = main.stop(), tight.stop()
    assert codes == (0, 0), (main.log_tail(), tight.log_tail())


@pytest.fixture(scope="module")
def main(servers):
    return servers[0]


@pytest.fixture(scope="module")
def tight(servers):
    return servers[1]


def request(**overrides) -> pb.GenerateRequest:
    values = dict(image=REFERENCE, prompt="the same toy on a beach", steps=3, size=64, seed=5)
    values.update(overrides)
    return pb.GenerateRequest(**values)


def health_status(channel, service: str = SERVICE) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def wait_health(channel, status: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while health_status(channel) != status or health_status(channel, "") != status:
        assert time.monotonic() < end, f"health stayed away from {status}"
        time.sleep(0.05)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value


def test_unary_equals_rest_and_stream(main):
    metadata = AUTH + (("x-request-id", "grpc-test-1"),)
    response, call = main.stub.Generate.with_call(request(), metadata=metadata, timeout=120)
    assert list(response.seeds) == [5] and response.size == 64
    assert response.mode == pb.MODE_IDENTITY and response.format == pb.OUTPUT_FORMAT_PNG
    assert response.profile == "tiny" and "noise-like" in response.notice
    assert response.request_id == "grpc-test-1"
    assert ("x-request-id", "grpc-test-1") in [(item.key, item.value) for item in call.trailing_metadata()]
    assert 0 < response.timings.run_s <= response.timings.total_s

    body = dict(image=base64.b64encode(REFERENCE).decode(), prompt="the same toy on a beach", steps=3, size=64, seed=5)
    rest = httpx.post(f"{main.server.url}/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert rest.status_code == 200, rest.text
    assert [base64.b64decode(image) for image in rest.json()["images"]] == list(response.images)

    events = list(main.stub.GenerateStream(request(), metadata=AUTH, timeout=120))
    assert list(events[-1].result.images) == list(response.images) and list(events[-1].result.seeds) == [5]


def test_stream_events_are_ordered_and_complete(main):
    events = list(main.stub.GenerateStream(request(num_images=2, seed=7, steps=4), metadata=AUTH, timeout=120))
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[-1] == "result" and "result" not in kinds[:-1]
    for index in (0, 1):
        mine = [event for event in events[:-1] if getattr(event, event.WhichOneof("event")).image_index == index]
        assert mine[0].WhichOneof("event") == "queued" and mine[0].queued.position >= 1
        assert [(event.step.step, event.step.total) for event in mine[1:]] == [(step, 4) for step in range(1, 5)]
    result = events[-1].result
    assert list(result.seeds) == [7, 8] and len(result.images) == 2 and result.images[0] != result.images[1]


@pytest.mark.parametrize(
    "overrides, field, message",
    [
        ({"image": b"not an image"}, "image", "not a decodable image"),
        ({"image": b""}, "image", "is empty"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"steps": 101}, "steps", "less than or equal to 100"),
        ({"size": 100}, "size", "multiple of 16"),
        ({"guidance": math.nan}, "guidance", "finite number"),
        ({"image_guidance": 25.0}, "image_guidance", "less than or equal to 20"),
        ({"seed": 2**63}, "seed", "less than or equal to 9223372036854775807"),
        ({"num_images": 5}, "num_images", "limit of 4"),
        ({"mode": 7}, "mode", "'identity' or 'structure'"),
        ({"output_format": 9}, "output_format", "'png', 'jpeg' or 'webp'"),
        ({"prompt": "a" * 600}, "prompt", "is 602 T5 tokens long; the limit is 512 tokens"),
        ({"background": "white"}, "background", "should match pattern"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(main, overrides, field, message):
    error = rpc_error(main.stub.Generate, request(**overrides), metadata=AUTH, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: ") and message in error.details()
    trailing = dict(error.trailing_metadata())
    assert trailing["field"] == field and trailing["x-request-id"]


def test_conversions_are_reported_in_notices(main):
    response = main.stub.Generate(request(image=png_bytes(transparent_image()), background="#102030", prompt="a" * 100),
                                  metadata=AUTH, timeout=120)
    assert list(response.notices) == [
        "image: transparency composited on #102030",
        "prompt: 102 CLIP tokens, only the first 77 reach the pooled CLIP embedding",
    ]
    assert list(main.stub.Generate(request(), metadata=AUTH, timeout=120).notices) == []


def test_api_key_is_required(main):
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
        error = rpc_error(main.stub.Generate, request(), metadata=metadata, timeout=30)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in error.details()


def test_deadline_reaches_the_engine(main):
    def ended_early() -> float:
        return main.server.metric("dsd_requests_timed_out_total") + main.server.metric("dsd_requests_cancelled_total")

    before = ended_early()
    error = rpc_error(main.stub.Generate, request(steps=100, image_guidance=2.0), metadata=AUTH, timeout=1.0)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    end = time.monotonic() + 30
    while ended_early() < before + 1:
        assert time.monotonic() < end, "the expired request stayed in the engine"
        time.sleep(0.05)


def test_health_and_reflection(main):
    assert health_status(main.channel) == SERVING and health_status(main.channel, "") == SERVING
    error = rpc_error(health_status, main.channel, "no.such.Service")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    reflection = reflection_pb2_grpc.ServerReflectionStub(main.channel)
    [answer] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name for service in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    query = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
    [answer] = reflection.ServerReflectionInfo(iter([query]))
    assert answer.file_descriptor_response.file_descriptor_proto


def test_internal_errors_name_the_request_and_are_logged(caplog):
    with caplog.at_level(logging.ERROR):
        code, message, _, outcome = status_for(RuntimeError("broken"), "req-42")
    assert code == grpc.StatusCode.INTERNAL and outcome == "error"
    assert "req-42" in message and "broken" not in message
    assert "req-42" in caplog.text and "broken" in caplog.text


def test_latency_is_recorded_by_outcome(main):
    for outcome in ("ok", "invalid_argument", "unauthenticated", "timeout"):
        assert main.server.metric("dsd_request_duration_seconds_count", transport="grpc", outcome=outcome) >= 1, outcome


def occupy(endpoint: Endpoint):
    """On the tight server: a long request running in the whole row budget and a short one filling the queue."""
    running = endpoint.stub.GenerateStream(request(steps=100, image_guidance=2.0), timeout=120)
    assert [next(running).WhichOneof("event") for _ in range(2)] == ["queued", "step"]
    waiting = endpoint.stub.Generate.future(request(steps=2, image_guidance=2.0), timeout=120)
    endpoint.server.wait_for_metric("dsd_queue_depth", minimum=1)
    return running, waiting


def test_full_queue_is_resource_exhausted_and_a_cancelled_stream_frees_its_slot(tight):
    running, waiting = occupy(tight)

    error = rpc_error(tight.stub.Generate, request(), timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(error.trailing_metadata())["retry-after-s"]) >= 1

    cancelled = tight.server.metric("dsd_requests_cancelled_total")
    running.cancel()
    assert rpc_error(list, running).code() == grpc.StatusCode.CANCELLED
    tight.server.wait_for_metric("dsd_requests_cancelled_total", minimum=cancelled + 1, timeout=30)
    assert list(waiting.result(timeout=60).seeds) == [5]


def test_sigterm_turns_health_not_serving_while_admitted_work_finishes(tight):
    watch = health_pb2_grpc.HealthStub(tight.channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=120)
    assert next(watch).status == SERVING
    running, waiting = occupy(tight)

    os.killpg(tight.server.process.pid, signal.SIGTERM)
    assert next(watch).status == NOT_SERVING
    watch.cancel()
    error = rpc_error(tight.stub.Generate, request(), timeout=30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(error.trailing_metadata())["retry-after-s"] == "5"
    assert next(running).WhichOneof("event") == "step"

    running.cancel()
    assert list(waiting.result(timeout=60).seeds) == [5]
    assert tight.server.process.wait(timeout=60) == 0
