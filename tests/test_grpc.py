"""The gRPC API on the real BentoML server (loopback, tiny profile): results, progress, status codes, health."""

import base64
import concurrent.futures
import datetime
import ipaddress
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dsd_model.settings import Settings
from dsd_serve.grpc_server import GrpcServer, status_for, tls_files
from dsd_serve.grpc_stubs import dsd_pb2 as pb
from dsd_serve.grpc_stubs import dsd_pb2_grpc
from dsd_serve.runtime import Runtime
from helpers import png_bytes, random_image, transparent_image, unmarked
from servers import ROOT, Server, start_service, wait_ready

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
    assert response.mode == pb.MODE_UNSPECIFIED and response.format == pb.OUTPUT_FORMAT_PNG
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


def test_exact_request_under_load_equals_it_alone_over_both_transports(main):
    """Concurrent requests share the server's forwards; an exact one still returns the bytes it returns alone."""
    alone = main.stub.Generate(request(exact=True, steps=4), metadata=AUTH, timeout=120).images[0]
    rest_body = dict(image=base64.b64encode(REFERENCE).decode(), prompt="the same toy on a beach", steps=4, size=64,
                     seed=5, exact=True)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        load = [pool.submit(main.stub.Generate, request(seed=100 + i, steps=6, image_guidance=1.5 * (i % 2)),
                            metadata=AUTH, timeout=120) for i in range(4)]
        time.sleep(0.05)
        grpc_exact = pool.submit(main.stub.Generate, request(exact=True, steps=4), metadata=AUTH, timeout=120)
        rest_exact = pool.submit(httpx.post, f"{main.server.url}/generate", json=rest_body,
                                 headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert all(len(future.result().images) == 1 for future in load)
        assert grpc_exact.result().images[0] == alone
        assert rest_exact.result().status_code == 200, rest_exact.result().text
        assert base64.b64decode(rest_exact.result().json()["images"][0]) == alone


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
        unmarked(64),
    ]
    assert list(main.stub.Generate(request(), metadata=AUTH, timeout=120).notices) == [unmarked(64)]


def test_api_key_is_required(main):
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
        error = rpc_error(main.stub.Generate, request(), metadata=metadata, timeout=30)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in error.details()


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_deadline_reaches_the_engine_and_counts_as_a_timeout(main, rpc):
    timed_out = main.server.metric("dsd_requests_timed_out_total")
    cancelled = main.server.metric("dsd_requests_cancelled_total")
    slow = request(steps=100, image_guidance=2.0, num_images=2)
    if rpc == "Generate":
        error = rpc_error(main.stub.Generate, slow, metadata=AUTH, timeout=1.0)
    else:
        error = rpc_error(list, main.stub.GenerateStream(slow, metadata=AUTH, timeout=1.0))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    main.server.wait_for_metric("dsd_requests_timed_out_total", minimum=timed_out + 2, timeout=30)
    assert main.server.metric("dsd_requests_cancelled_total") == cancelled


def test_undecodable_request_is_invalid_argument_and_counted(main):
    labels = dict(transport="grpc", mode="unknown", outcome="invalid_argument")
    before = main.server.metric("dsd_request_duration_seconds_count", **labels)
    raw = main.channel.unary_unary(f"/{SERVICE}/Generate")
    for garbage in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\x0f" + REFERENCE[:64]):
        error = rpc_error(raw, garbage, metadata=AUTH, timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        expected = f"the request ({len(garbage)} bytes) is not a serialized dsd.v1.GenerateRequest message"
        assert error.details() == expected
        assert dict(error.trailing_metadata())["x-request-id"]
    assert main.server.metric("dsd_request_duration_seconds_count", **labels) == before + 2


def test_invalid_utf8_strings_are_invalid_argument_naming_the_field(main):
    cases = {
        "Generate": (request(prompt="PROMPT"), "prompt"),
        "SubmitJob": (pb.SubmitJobRequest(request=request(negative_prompt="PROMPT")), "request.negative_prompt"),
        "GetJob": (pb.JobRef(id="PROMPT"), "id"),
    }
    for method, (message, field) in cases.items():
        raw = main.channel.unary_unary(f"/{SERVICE}/{method}")
        error = rpc_error(raw, message.SerializeToString().replace(b"PROMPT", b"PR\xffMPT"), metadata=AUTH, timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
        assert error.details() == f"{field}: is not valid UTF-8"
        assert dict(error.trailing_metadata())["field"] == field


def test_odd_job_ids_are_not_found_without_echoing_them_whole(main):
    for job_id in ("a" * 100_000, "\x00", "😀", "0123456789abcdef0123456789ab\n"):
        for call in (main.stub.GetJob, main.stub.CancelJob, lambda ref, **kw: list(main.stub.WatchJob(ref, **kw))):
            error = rpc_error(call, pb.JobRef(id=job_id), metadata=AUTH, timeout=30)
            assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()[:200]
            assert error.details().endswith("is not a job id (28 hexadecimal digits)") and len(error.details()) < 200
            assert dict(error.trailing_metadata())["field"] == "id"


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


def write_certificates(directory) -> dict:
    """A CA, a server certificate it signed for 127.0.0.1 and localhost, and a client certificate it signed; PEM
    files in `directory`, returned by name."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsd test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(name: str, usage, alternative_names):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alternative_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        certificate = builder.sign(ca_key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return certificate.public_bytes(serialization.Encoding.PEM), key_pem

    files = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    files["server"], files["server_key"] = issue(
        "dsd server", ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    files["client"], files["client_key"] = issue("dsd client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    paths = {}
    for name, data in files.items():
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """In-process gRPC servers on one tiny runtime: `tls` (server certificate) and `mtls` (client certificates
    required too), with the certificate files."""
    certificates = write_certificates(tmp_path_factory.mktemp("certificates"))
    common = dict(profile="tiny", grpc_host="127.0.0.1", grpc_port=0, grpc_tls_cert=certificates["server"],
                  grpc_tls_key=certificates["server_key"])
    runtime = Runtime(Settings(**common))
    runtime.start()
    servers = {"tls": GrpcServer(Settings(**common)),
               "mtls": GrpcServer(Settings(**common, grpc_tls_client_ca=certificates["ca"]))}
    for server in servers.values():
        server.start()
        server.attach(runtime)
    yield servers, certificates
    runtime.drain()
    for server in servers.values():
        server.stop()


def secure_channel(server: GrpcServer, certificates: dict, client_certificate: bool) -> grpc.Channel:
    client = {}
    if client_certificate:
        client = dict(private_key=certificates["client_key"].read_bytes(),
                      certificate_chain=certificates["client"].read_bytes())
    credentials = grpc.ssl_channel_credentials(root_certificates=certificates["ca"].read_bytes(), **client)
    return grpc.secure_channel(f"127.0.0.1:{server.port}", credentials)


def generate_over(channel: grpc.Channel) -> pb.GenerateResponse:
    with channel:
        return dsd_pb2_grpc.DSDServiceStub(channel).Generate(request(steps=2), timeout=60)


def test_tls_serves_verified_clients_and_refuses_plaintext(tls):
    servers, certificates = tls
    response = generate_over(secure_channel(servers["tls"], certificates, client_certificate=False))
    assert list(response.seeds) == [5] and response.images[0].startswith(b"\x89PNG")
    error = rpc_error(generate_over, grpc.insecure_channel(f"127.0.0.1:{servers['tls'].port}"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tls):
    servers, certificates = tls
    error = rpc_error(generate_over, secure_channel(servers["mtls"], certificates, client_certificate=False))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    response = generate_over(secure_channel(servers["mtls"], certificates, client_certificate=True))
    assert list(response.seeds) == [5] and response.images[0].startswith(b"\x89PNG")


def test_unreadable_or_mismatched_tls_files_are_refused_naming_the_setting(tmp_path):
    certificates = write_certificates(tmp_path)
    (tmp_path / "key.pem").write_text("not a key")
    (tmp_path / "unreadable.pem").write_bytes(certificates["server_key"].read_bytes())
    (tmp_path / "unreadable.pem").chmod(0)
    cases = {
        (tmp_path / "missing.pem", certificates["server_key"], None):
            r"DSD_GRPC_TLS_CERT '.*missing.pem' cannot be read: No such file",
        (certificates["server"], tmp_path / "key.pem", None): r"DSD_GRPC_TLS_KEY '.*key.pem' is not a PEM unencrypted",
        (certificates["server"], certificates["client_key"], None):
            r"DSD_GRPC_TLS_KEY '.*client_key.pem' is not the private key of the first certificate",
        (certificates["server"], certificates["server_key"], tmp_path / "key.pem"):
            r"DSD_GRPC_TLS_CLIENT_CA '.*key.pem' is not a PEM CA bundle",
    }
    if os.geteuid() != 0:  # root reads files whatever their mode
        cases[(certificates["server"], tmp_path / "unreadable.pem", None)] = (
            r"DSD_GRPC_TLS_KEY '.*unreadable.pem' cannot be read: Permission denied")
    for (cert, key, client_ca), message in cases.items():
        with pytest.raises(ValueError, match=message):
            tls_files(Settings(grpc_tls_cert=cert, grpc_tls_key=key, grpc_tls_client_ca=client_ca))
    files = tls_files(Settings(grpc_tls_cert=certificates["server"], grpc_tls_key=certificates["server_key"]))
    assert files == (certificates["server_key"].read_bytes(), certificates["server"].read_bytes(), None)


def test_example_client_speaks_mutual_tls(tls, tmp_path):
    servers, certificates = tls
    (tmp_path / "reference.png").write_bytes(REFERENCE)
    command = [sys.executable, str(ROOT / "examples/grpc_client.py"), "--target", f"127.0.0.1:{servers['mtls'].port}",
               "--image", str(tmp_path / "reference.png"), "--prompt", "a toy", "--steps", "2", "--size", "64",
               "--seed", "5", "--out", str(tmp_path / "out.png"), "--tls-ca", str(certificates["ca"])]
    client_certificate = ["--tls-cert", str(certificates["client"]), "--tls-key", str(certificates["client_key"])]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.startswith("UNAVAILABLE")
    done = subprocess.run(command + client_certificate, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "seed 5" in done.stdout and (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")
