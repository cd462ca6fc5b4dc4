"""The HTTP server under hostile or unlucky conditions: invalid settings, SIGTERM with work running, clients that
trickle their bodies, and property-based fuzzing of `POST /generate` against its OpenAPI document."""

import base64
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
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from helpers import png_bytes, random_image
from servers import BENTOML, ROOT, free_port, start_service, wait_ready

REFERENCE = base64.b64encode(png_bytes(random_image(96, 80, seed=1))).decode()
BODY_READ_TIMEOUT_S = 2.0
UPLOAD_CAP = 21
TRICKLERS = 20


def body(**overrides) -> dict:
    return dict(image=REFERENCE, prompt="the same toy on a beach", steps=2, size=64, seed=5) | overrides


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    service = start_service(tmp_path_factory.mktemp("robust"), max_batch_rows="3",
                            body_read_timeout_s=str(BODY_READ_TIMEOUT_S), max_concurrent_uploads=str(UPLOAD_CAP))
    try:
        wait_ready(service)
        yield service
    finally:
        code = service.stop()
    assert code == 0, service.log_tail()


def test_an_invalid_setting_stops_the_server_at_once(tmp_path):
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="True",
               DSD_MAX_BATCH_ROWS="2")
    started = time.monotonic()
    finished = subprocess.run(
        [str(BENTOML), "serve", "service:DSDService", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert finished.returncode != 0
    assert time.monotonic() - started < 30
    assert "max_batch_rows" in finished.stderr and "greater than or equal to 3" in finished.stderr


def test_sigterm_answers_503_until_the_running_request_returned(tmp_path):
    service = start_service(tmp_path, max_batch_rows="3")
    try:
        wait_ready(service)
        long_response = []

        def run_long():
            long_response.append(httpx.post(f"{service.url}/generate", json=body(steps=100), timeout=300))

        admitted = service.metric("dsd_queue_wait_seconds_count")
        long_request = threading.Thread(target=run_long)
        long_request.start()
        service.wait_for_metric("dsd_queue_wait_seconds_count", minimum=admitted + 1)
        os.kill(service.process.pid, signal.SIGTERM)  # the arbiter only, as Kubernetes signals PID 1
        probes = []
        while long_request.is_alive():
            try:
                generate = httpx.post(f"{service.url}/generate", json={}, timeout=30)
                ready = httpx.get(f"{service.url}/readyz", timeout=30)
                probes.append((generate.status_code, generate.headers.get("retry-after"), ready.status_code))
            except httpx.TransportError as exc:
                probes.append((repr(exc), None, None))
            time.sleep(0.02)
        long_request.join()
        assert long_response[0].status_code == 200, long_response[0].text
        # the last probe may have been sent as the server closed, just after it sent the long request's response
        assert len(probes) >= 3 and set(probes[:-1]) == {(503, "5", 503)}, probes
        assert service.process.wait(timeout=60) == 0
    finally:
        service.stop()


def trickle(port: int, results: dict, name: str, stop: threading.Event) -> None:
    """Send headers and a body that never completes, a byte every 0.2 s, until the server answers or closes."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"prompt\": \"")
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
    """`count` trickling clients, started 20 ms apart; `during()` runs once they all are; {name: (seconds, reply)}."""
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


def test_fuzzing_generate_gets_no_5xx_and_conforming_responses(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/api/openapi.json")
    assert schema.raw_schema["openapi"].startswith("3.1")
    operation = schema["/generate"]["POST"]
    cases = st.one_of(*(
        operation.as_strategy(generation_mode=mode, media_type=media_type)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        for media_type in ("application/json", "multipart/form-data")
    ))
    statuses = {}

    # Positive data may still be refused: no schema can say which strings decode to an image.
    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def fuzz(case):
        response = case.call_and_validate(base_url=server.url, excluded_checks=[positive_data_acceptance], timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    fuzz()
    assert sum(statuses.values()) >= 50 and max(statuses) < 500, statuses
