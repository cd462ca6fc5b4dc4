"""The HTTP server under hostile or unlucky conditions: invalid settings, SIGTERM with work running, clients that
trickle their request heads or bodies, odd ids on the job routes, and property-based fuzzing of every operation
against its OpenAPI document."""

import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from dsd_serve.ids import request_id
from helpers import png_bytes, random_image
from servers import BENTOML, ROOT, free_port, start_service, wait_ready

REFERENCE = base64.b64encode(png_bytes(random_image(96, 80, seed=1))).decode()
BODY_READ_TIMEOUT_S = 2.0
HEAD_TIMEOUT_S = 2.0
UPLOAD_CAP = 21
TRICKLERS = 20
RATE_GRACE_S = 2.0
JOB_ROUTES = ("GET /v1/jobs/{}", "GET /v1/jobs/{}/events", "POST /v1/jobs/{}/cancel", "GET /v1/jobs/{}/images/0")
ODD_JOB_IDS = ("%F0%9F%98%80", "%ff%fe", "%00", "%09", "%0D", "%20", "0123456789abcdef0123456789ab%0A", "a" * 12_000)
"""The long one keeps the request head under h11's 16 KiB limit on an incomplete head, so it reaches the app however
the connection splits it; longer heads are the next test's."""


def body(**overrides) -> dict:
    return dict(image=REFERENCE, prompt="the same toy on a beach", steps=2, size=64, seed=5) | overrides


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    service = start_service(tmp_path_factory.mktemp("robust"), max_batch_rows="3",
                            body_read_timeout_s=str(BODY_READ_TIMEOUT_S), max_concurrent_uploads=str(UPLOAD_CAP),
                            header_read_timeout_s=str(HEAD_TIMEOUT_S))
    try:
        wait_ready(service)
        yield service
    finally:
        code = service.stop()
    assert code == 0, service.log_tail()


@pytest.mark.parametrize("settings, expected", [
    ({"DSD_MAX_BATCH_ROWS": "2"}, ("max_batch_rows", "greater than or equal to 3")),
    ({"DSD_GRPC_TLS_CERT": "/nonexistent/chain.pem", "DSD_GRPC_TLS_KEY": "/nonexistent/key.pem"},
     ("DSD_GRPC_TLS_CERT '/nonexistent/chain.pem' cannot be read: No such file or directory",)),
])
def test_an_invalid_setting_stops_the_server_at_once(tmp_path, settings, expected):
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="True",
               DSD_GRPC_PORT=str(free_port()), **settings)
    started = time.monotonic()
    process = subprocess.Popen(
        [str(BENTOML), "serve", "service:DSDService", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # a server that kept running: its arbiter stops the workers on SIGTERM
            os.killpg(process.pid, signal.SIGTERM)
            process.communicate(timeout=60)
    assert process.returncode != 0
    assert time.monotonic() - started < 30
    assert all(text in stderr for text in expected), stderr[-2000:]


def test_sigterm_answers_503_until_the_running_request_returned(tmp_path):
    service = start_service(tmp_path, max_batch_rows="3")
    try:
        wait_ready(service)
        long_response, returned = [], threading.Event()

        def run_long():
            long_response.append(httpx.post(f"{service.url}/generate", json=body(steps=100, num_images=4, size=128),
                                            timeout=300))
            returned.set()

        def probe() -> tuple | str:
            try:
                generate = httpx.post(f"{service.url}/generate", json={}, timeout=30)
                ready = httpx.get(f"{service.url}/readyz", timeout=30)
            except httpx.TransportError as exc:
                return repr(exc)
            return generate.status_code, generate.headers.get("retry-after"), ready.status_code

        admitted = service.metric("dsd_queue_wait_seconds_count")
        long_request = threading.Thread(target=run_long)
        long_request.start()
        service.wait_for_metric("dsd_queue_wait_seconds_count", minimum=admitted + 1)
        os.kill(service.process.pid, signal.SIGTERM)  # the arbiter only, as Kubernetes signals PID 1
        end = time.monotonic() + 60
        while httpx.get(f"{service.url}/readyz", timeout=30).status_code != 503 and not returned.is_set():
            assert time.monotonic() < end, "the worker did not start draining within 60 s"
            time.sleep(0.02)
        assert not returned.is_set(), "the long request ended before the drain began; it is too short to test with"
        probes = []
        while not returned.is_set():
            probes.append(probe())
            time.sleep(0.02)
        long_request.join()
        assert long_response[0].status_code == 200, long_response[0].text
        # Every answer from the draining server is 503; once it has sent the long response it closes, so the probes
        # sent since (however many ran before this thread saw that response) find no server.
        answered = list(itertools.takewhile(lambda result: not isinstance(result, str), probes))
        assert answered and set(answered) == {(503, "5", 503)}, probes
        assert all(isinstance(result, str) for result in probes[len(answered):]), probes
        assert service.process.wait(timeout=60) == 0
    finally:
        service.stop()


def trickle(port: int, results: dict, name: str, stop: threading.Event, start: bytes | None = None) -> None:
    """Send `start` (by default the head of a request to `POST /generate`, or `POST /verify` for odd `name`s, and
    the start of its body), then a byte every 0.2 s, until the server answers or closes."""
    if start is None:
        route, content_type = ("/verify", "image/png") if name % 2 else ("/generate", "application/json")
        start = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                 "Content-Length: 100000\r\n\r\n{\"prompt\": \"").encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(start)
        sock.settimeout(0.2)
        received = b""
        while not stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b"a")
                except OSError:
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        results[name] = (time.monotonic() - started, received)


def trickle_all(server, count: int, during=None) -> dict:
    """`count` trickling clients (`trickle`), started 20 ms apart; `during()` runs once they all are; {name:
    (seconds, reply)}."""
    port = int(server.url.rsplit(":", 1)[1])
    results, stop = {}, threading.Event()
    threads = [threading.Thread(target=trickle, args=(port, results, i, stop)) for i in range(count)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    if during is not None:
        during()
    for thread in threads:
        thread.join(timeout=60)
    stop.set()
    return results


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_slow_uploads_are_cut_off_while_a_normal_request_succeeds(server):
    normal = {}
    results = trickle_all(server, TRICKLERS, during=lambda: normal.update(
        response=httpx.post(f"{server.url}/generate", json=body(), timeout=120)))
    assert normal["response"].status_code == 200, normal["response"].text
    assert [status_of(reply) for _, reply in results.values()] == [408] * TRICKLERS
    for elapsed, reply in results.values():
        assert BODY_READ_TIMEOUT_S <= elapsed < BODY_READ_TIMEOUT_S + 10, elapsed
        assert b"body_read_timeout_s=2 s" in reply


def test_uploads_past_the_cap_get_503_with_retry_after(server):
    results = trickle_all(server, UPLOAD_CAP + 1)
    statuses = sorted(status_of(reply) for _, reply in results.values())
    assert statuses == [408] * UPLOAD_CAP + [503]
    (refused,) = [(elapsed, reply) for elapsed, reply in results.values() if status_of(reply) == 503]
    assert refused[0] < BODY_READ_TIMEOUT_S
    assert b"retry-after: 1" in refused[1].lower() and b"max_concurrent_uploads=21" in refused[1]
    assert server.metric("dsd_requests_rejected_total", reason="uploads_full") == 1
    assert httpx.post(f"{server.url}/generate", json=body(), timeout=120).status_code == 200


def test_fuzzing_every_operation_gets_no_5xx_no_dropped_connection_and_conforming_responses(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/api/openapi.json")
    assert schema.raw_schema["openapi"].startswith("3.1")
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    generate = schema["/generate"]["POST"]
    cases = st.one_of(
        *(generate.as_strategy(generation_mode=mode, media_type="multipart/form-data") for mode in modes),
        *(schema.as_strategy(generation_mode=mode) for mode in modes),
    )
    statuses, operations = {}, set()

    # Positive data may still be refused: no schema can say which strings decode to an image, or which strings are
    # job ids. A dropped connection fails the call itself.
    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def fuzz(case):
        response = case.call_and_validate(base_url=server.url, excluded_checks=[positive_data_acceptance], timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        operations.add(case.operation.label)

    fuzz()
    assert sum(statuses.values()) >= 200 and max(statuses) < 500, statuses
    every = {operation.ok().label for operation in schema.get_all_operations()}
    assert operations == every and {"POST /generate", "POST /v1/images/edits", "GET /v1/adapters"} <= every


def test_docs_json_is_a_valid_openapi_document_of_every_route(server):
    document = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert {"/generate", "/verify", "/v1/jobs", "/v1/jobs/{job_id}", "/readyz", "/metrics"} <= set(document["paths"])
    assert "400" in document["paths"]["/v1/jobs"]["post"]["responses"]


@pytest.mark.parametrize("job_id", ODD_JOB_IDS, ids=lambda value: value[:16])
def test_odd_job_ids_get_a_json_404_naming_job_id_on_every_job_route(server, job_id):
    for route in JOB_ROUTES:
        method, path = route.split()
        response = httpx.request(method, server.url + path.format(job_id), timeout=30)
        assert response.status_code == 404, (route, response.text[:300])
        error = response.json()["error"]
        assert error["field"] == "job_id" and "is not a job id (28 hexadecimal digits)" in error["message"]
        assert len(error["message"]) < 200 and len(response.headers["x-request-id"]) == 32


def test_a_100k_character_job_id_gets_a_bounded_answer(server):
    """Too long for httpx: sent over a socket. Arriving whole, the id is refused like any other; arriving in parts,
    the head is refused by h11's 16 KiB limit on an incomplete head (uvicorn's plain 400)."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /v1/jobs/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(30)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, content = reply.partition(b"\r\n\r\n")
    assert len(head) < 1024, head[:200]
    if status_of(reply) == 404:
        error = json.loads(content)["error"]
        assert error["field"] == "job_id" and "... (100000 characters) is not a job id" in error["message"]
    else:
        assert (status_of(reply), content) == (400, b"Invalid HTTP request received.")


def test_image_index_must_be_ascii_digits(server):
    job_id = f"{int(time.time() * 1000):012x}{'0' * 16}"
    for index, status in (("%C2%B2", 422), ("%D9%A3", 422), ("-1", 422), ("9" * 5000, 422), ("0", 404)):
        response = httpx.get(f"{server.url}/v1/jobs/{job_id}/images/{index}", timeout=30)
        assert response.status_code == status, (index, response.text[:300])
        error = response.json()["error"]
        assert error["field"] == ("index" if status == 422 else "job_id") and error["request_id"] == job_id


def test_a_request_id_is_echoed_only_when_it_is_a_short_token():
    assert request_id("abc-1.2_3") == "abc-1.2_3"
    for odd in ("abc\n", "a b", "é", "a" * 65, "", None):
        assert request_id(odd) != odd and len(request_id(odd)) == 32


def test_a_trickled_request_head_gets_408_after_header_read_timeout_s(server):
    port = int(server.url.rsplit(":", 1)[1])
    results, give_up = {}, threading.Event()
    timer = threading.Timer(HEAD_TIMEOUT_S + 30, give_up.set)
    timer.start()
    try:
        trickle(port, results, "head", give_up, start=b"GET /livez HTTP/1.1\r\nX-Slow: ")
        kept_alive = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /livez HTTP/1.1\r\nX-Slow: "
        trickle(port, results, "second head", give_up, start=kept_alive)
    finally:
        timer.cancel()
    for elapsed, reply in results.values():
        assert HEAD_TIMEOUT_S <= elapsed < HEAD_TIMEOUT_S + 10, elapsed
        assert b"408 Request Timeout" in reply and b"header_read_timeout_s=2 s" in reply
    assert results["second head"][1].startswith(b"HTTP/1.1 200 OK")
    assert httpx.get(f"{server.url}/livez", timeout=30).status_code == 200


def test_a_pipelined_request_that_runs_past_the_head_timeout_is_answered(server):
    """The head timeout runs only while a head is awaited: a request read from the same packet as the one before it
    (HTTP/1.1 pipelining) may run longer than header_read_timeout_s."""
    port = int(server.url.rsplit(":", 1)[1])
    payload = json.dumps(body(steps=100, size=128, num_images=3)).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        sock.settimeout(120)
        reply = b""
        while reply.count(b"HTTP/1.1 ") < 2 or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, reply[:300]
            reply += chunk
    first, second = reply.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"200") and second.startswith(b"200"), reply[:300]


def test_trickling_bodies_lose_their_upload_slots_at_the_minimum_rate(tmp_path):
    """As many trickling bodies as there are upload slots (the default 64) hold them for body_rate_grace_s, not for
    body_read_timeout_s (120 s by default): a normal request gets through long before."""
    service = start_service(tmp_path, max_batch_rows="3", body_rate_grace_s=str(RATE_GRACE_S))
    try:
        wait_ready(service)
        slots = 64
        normal = {}

        def generate_until_admitted():
            started = time.monotonic()
            while (response := httpx.post(f"{service.url}/generate", json=body(), timeout=120)).status_code == 503:
                assert response.json()["error"]["message"].startswith(f"{slots} request bodies are being received")
                time.sleep(float(response.headers["retry-after"]) / 4)
            normal.update(response=response, waited=time.monotonic() - started)

        results = trickle_all(service, slots, during=generate_until_admitted)
        assert normal["response"].status_code == 200, normal["response"].text
        assert normal["waited"] < 60, normal["waited"]  # the slots stay taken for 120 s without the minimum rate
        assert [status_of(reply) for _, reply in results.values()] == [408] * slots
        for elapsed, reply in results.values():
            assert RATE_GRACE_S <= elapsed < RATE_GRACE_S + 30, elapsed
            assert b"below the minimum of body_min_rate_bytes_s=8192 after body_rate_grace_s=2 s" in reply
    finally:
        code = service.stop()
    assert code == 0, service.log_tail()
