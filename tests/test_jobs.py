"""Asynchronous jobs across two real replicas sharing one real redis-server (append-only), and one replica without
Redis (in-process jobs, short result TTL). Tiny profile, 64 px, few steps."""

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from standardwebhooks import Webhook

from helpers import png_bytes, random_image, unmarked
from servers import RedisServer, descendants, start_service, wait_ready

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
REFERENCE = png_bytes(random_image(96, 80, seed=3))
VISIBILITY_S = 3
B_BACKLOG = 6
"""Jobs queued or running beyond which replica `b` refuses submissions (`a` keeps the default)."""
KEY = "jobs-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHORT_TTL_S = 4
TERMINAL = {"succeeded", "failed", "canceled"}
ROUNDING = 2
"""Largest pixel difference of one request run alone or sharing forwards with another (float rounding)."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Replicas `a` and `b` on one Redis with AOF, and `local` without Redis."""
    redis = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True)
    redis.start()
    shared = dict(redis_url=redis.url, jobs_visibility_timeout_s=str(VISIBILITY_S), max_batch_rows="3",
                  webhook_secret=SECRET, webhook_allow='["127.0.0.1"]', webhook_backoff_s="0.2",
                  webhook_timeout_s="3", webhook_dns_timeout_s="1")
    settings = {"a": shared, "b": {**shared, "jobs_max_backlog": str(B_BACKLOG)}}
    found = {name: start_service(tmp_path_factory.mktemp(name), **values) for name, values in settings.items()}
    found["local"] = start_service(tmp_path_factory.mktemp("local"), jobs_result_ttl_s=str(SHORT_TTL_S), api_key=KEY,
                                   jobs_max_backlog="1", max_batch_rows="3")
    found.update(redis=redis, settings=settings, workdirs=tmp_path_factory)
    try:
        for name in ("a", "b", "local"):
            wait_ready(found[name])
        yield found
    finally:
        running = [found[name] for name in ("a", "b", "local") if found[name].process.poll() is None]
        codes = [server.stop() for server in running]
        redis.stop()
    assert codes == [0] * len(running), [server.log_tail() for server in running]


def restart(cluster, name: str) -> None:
    """Start replica `name` again (after it was killed) with its settings."""
    cluster[name] = start_service(cluster["workdirs"].mktemp(name), **cluster["settings"][name])
    wait_ready(cluster[name])


def body(**overrides) -> dict:
    values = dict(image=base64.b64encode(REFERENCE).decode(), prompt="the toy in a garden", steps=2, size=64, seed=7)
    values.update(overrides)
    return values


def submit(server, headers=None, **overrides) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/jobs", json=body(**overrides), headers=headers or {}, timeout=60)


def wait_for(server, job_id: str, until=lambda view: view["status"] in TERMINAL, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while True:
        view = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()
        if until(view):
            return view
        assert time.monotonic() < end, view
        time.sleep(0.05)


def test_submit_poll_and_fetch_images_from_either_replica(cluster):
    a, b = cluster["a"], cluster["b"]
    response = submit(a, num_images=2, output_format="jpeg")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] in ("queued", "running") and response.headers["location"] == f"/v1/jobs/{job['id']}"
    done = wait_for(b, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"step": 4, "total": 4}
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["result"]["seeds"] == [7, 8] and done["result"]["format"] == "jpeg"
    assert done["result"]["notices"] == [unmarked(64)]
    image = httpx.get(f"{b.url}{done['result']['images'][1]}", timeout=10)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)


def test_multipart_job_and_prefer_respond_async(cluster):
    a = cluster["a"]
    fields = {"prompt": "the toy in a garden", "steps": "2", "size": "64", "seed": "7",
              "webhook_events": "job.failed"}
    response = httpx.post(f"{a.url}/v1/jobs", data=fields, files={"image": ("r.png", REFERENCE, "image/png")},
                          timeout=60)
    assert response.status_code == 202, response.text
    deferred = httpx.post(f"{a.url}/generate", json=body(), headers={"Prefer": "respond-async"}, timeout=60)
    assert deferred.status_code == 202 and deferred.json()["links"]["events"].endswith("/events")
    first, second = (wait_for(a, r.json()["id"]) for r in (response, deferred))
    images = [np.asarray(Image.open(io.BytesIO(httpx.get(f"{a.url}{view['result']['images'][0]}", timeout=10).content)),
                         dtype=np.int16) for view in (first, second)]
    assert np.abs(images[0] - images[1]).max() <= ROUNDING


def read_events(server, job_id: str) -> list[dict]:
    events = []
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def test_server_sent_events_follow_the_job_to_its_end(cluster):
    a, b = cluster["a"], cluster["b"]
    job = submit(a, steps=60, image_guidance=2.0).json()
    events = read_events(b, job["id"])
    assert events[-1]["status"] == "succeeded" and events[-1]["result"]["images"]
    steps = [event["progress"]["step"] for event in events if event["status"] == "running"]
    assert steps == sorted(set(steps)) and steps and len(events) >= 2
    assert [event["status"] for event in events].count("succeeded") == 1


def test_cancel_a_running_job(cluster):
    a, b = cluster["a"], cluster["b"]
    job = submit(a, steps=60).json()
    wait_for(a, job["id"], until=lambda view: view["progress"]["step"] >= 1)
    cancelled = httpx.post(f"{b.url}/v1/jobs/{job['id']}/cancel", timeout=10)
    assert cancelled.status_code == 202, cancelled.text
    view = wait_for(a, job["id"])
    assert view["status"] == "canceled" and view["error"]["code"] == "cancelled"
    assert view["progress"]["step"] < 60
    again = httpx.post(f"{a.url}/v1/jobs/{job['id']}/cancel", timeout=10)
    assert again.status_code == 409 and again.json()["error"]["field"] == "job_id"
    image = httpx.get(f"{a.url}/v1/jobs/{job['id']}/images/0", timeout=10)
    assert image.status_code == 409


class Receiver:
    """A loopback webhook receiver that answers 500 to the first `failures` deliveries, then 204."""

    def __init__(self, failures: int):
        self.failures, self.deliveries = failures, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers["content-length"]))
                receiver.deliveries.append((time.time(), dict(self.headers), data))
                self.send_response(500 if len(receiver.deliveries) <= receiver.failures else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_webhook_is_signed_and_retried_after_a_500(cluster):
    a = cluster["a"]
    receiver = Receiver(failures=2)
    try:
        job = submit(a, webhook=receiver.url).json()
        wait_for(a, job["id"])
        end = time.monotonic() + 30
        while len(receiver.deliveries) < 3 and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        receiver.server.shutdown()
    assert len(receiver.deliveries) == 3
    ids = {headers["webhook-id"] for _, headers, _ in receiver.deliveries}
    assert ids == {f"{job['id']}.succeeded"}
    _, headers, data = receiver.deliveries[-1]
    payload = Webhook(SECRET).verify(data, headers)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"another secret of 32 bytes.....").decode()).verify(data, headers)
    gaps = [later[0] - earlier[0] for earlier, later in zip(receiver.deliveries, receiver.deliveries[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps
    rejected = sum(server.metric("dsd_webhook_attempts_total", outcome="rejected") for server in (a, cluster["b"]))
    assert rejected >= 2


def test_a_job_past_its_deadline_fails_naming_the_field_and_sends_job_failed(cluster):
    a = cluster["a"]
    receiver = Receiver(failures=0)
    try:
        job = submit(a, steps=100, size=512, image_guidance=2.0, deadline_s=0.3, webhook=receiver.url, webhook_events=["job.failed"]).json()
        view = wait_for(a, job["id"])
        end = time.monotonic() + 30
        while not receiver.deliveries and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        receiver.server.shutdown()
    assert view["status"] == "failed" and view["result"] is None
    assert view["error"]["code"] == "deadline_exceeded" and view["error"]["field"] == "deadline_s"
    (delivery,) = receiver.deliveries
    assert Webhook(SECRET).verify(delivery[2], delivery[1])["type"] == "job.failed"
    keyed = httpx.post(f"{a.url}/generate", json=body(steps=100, size=512, image_guidance=2.0, deadline_s=0.3),
                       headers={"Idempotency-Key": f"late-{time.time_ns()}"}, timeout=60)
    assert keyed.status_code == 504 and keyed.json()["error"]["field"] == "deadline_s"


def test_idempotency_key_same_body_different_body_and_concurrent_duplicates(cluster):
    a, b = cluster["a"], cluster["b"]
    key = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first = submit(a, headers=key)
    replay = submit(b, headers=key)
    assert first.status_code == replay.status_code == 202
    assert replay.json()["id"] == first.json()["id"] and replay.headers["idempotent-replayed"] == "true"
    conflict = submit(a, headers=key, prompt="something else")
    assert conflict.status_code == 422 and conflict.json()["error"]["field"] == "Idempotency-Key"

    racing = {"Idempotency-Key": f"race-{time.time_ns()}"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: submit((a, b)[i % 2], headers=racing), range(8)))
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert sum("idempotent-replayed" not in answer.headers for answer in answers) == 1

    sync_key = {"Idempotency-Key": f"sync-{time.time_ns()}"}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda server: httpx.post(f"{server.url}/generate", json=body(seed=11),
                                                          headers=sync_key, timeout=60), (a, b)))
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    assert results[0].json()["request_id"] == results[1].json()["request_id"]
    assert results[0].json()["images"] == results[1].json()["images"]
    job = wait_for(a, results[0].json()["request_id"])
    assert job["attempts"] >= 1 and job["result"]["seeds"] == [11]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"steps": 0}, "steps"),
        ({"num_images": 9}, "num_images"),
        ({"image": base64.b64encode(b"not an image").decode()}, "image"),
        ({"webhook": "ftp://127.0.0.1/hook"}, "webhook"),
        ({"webhook": "http://10.0.0.1/hook"}, "webhook"),
        ({"webhook": "http://[::1]:9/hook"}, "webhook"),
        ({"webhook": "http://[64:ff9b::a9fe:a9fe]/hook"}, "webhook"),
        ({"webhook": "http://224.0.0.1/hook"}, "webhook"),
        ({"webhook": f"http://{'a' * 64}.example.com/hook"}, "webhook"),
        ({"webhook_events": ["job.exploded"]}, "webhook_events"),
        ({"mode": "sketch"}, "mode"),
    ],
)
def test_bad_job_input_names_the_field(cluster, overrides, field):
    response = submit(cluster["a"], **overrides)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_bad_ids_keys_and_indexes_name_the_field(cluster):
    a = cluster["a"]
    url = a.url
    assert httpx.get(f"{url}/v1/jobs/nope", timeout=10).json()["error"]["field"] == "job_id"
    unknown = httpx.get(f"{url}/v1/jobs/{'0' * 12}{'a' * 16}", timeout=10)
    assert unknown.status_code == 410 and "expired" in unknown.json()["error"]["message"]
    fresh = f"{int(time.time() * 1000):012x}{'b' * 16}"
    for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel"), ("GET", "/images/0")):
        response = httpx.request(method, f"{url}/v1/jobs/{fresh}{path}", timeout=10)
        assert response.status_code == 404 and response.json()["error"]["field"] == "job_id", (path, response.text)
    job = submit(a).json()
    wait_for(a, job["id"])
    for index, status in (("x", 422), ("5", 404)):
        response = httpx.get(f"{url}/v1/jobs/{job['id']}/images/{index}", timeout=10)
        assert response.status_code == status and response.json()["error"]["field"] == "index"
    bad_key = submit(a, headers={"Idempotency-Key": "has space"})
    assert bad_key.status_code == 422 and bad_key.json()["error"]["field"] == "Idempotency-Key"
    unsigned = submit(cluster["local"], webhook="https://example.com/hook", headers=AUTH)
    assert unsigned.status_code == 422 and unsigned.json()["error"]["field"] == "webhook"


def job_stub(server):
    from dsd_serve.grpc_stubs import dsd_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.env['DSD_GRPC_PORT']}",
                                    options=[("grpc.max_receive_message_length", 64 * 2**20)])
    return dsd_pb2_grpc.DSDServiceStub(channel)


def test_grpc_jobs_share_the_queue_with_rest(cluster):
    from dsd_serve.grpc_stubs import dsd_pb2 as pb

    a, b = cluster["a"], cluster["b"]
    request = pb.GenerateRequest(image=REFERENCE, prompt="the toy in a garden", steps=6, size=64, seed=7)
    key = f"grpc-{time.time_ns()}"
    job = job_stub(a).SubmitJob(pb.SubmitJobRequest(request=request, idempotency_key=key), timeout=30)
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) and len(job.id) == 28
    again = job_stub(b).SubmitJob(pb.SubmitJobRequest(request=request, idempotency_key=key), timeout=30)
    assert again.id == job.id
    updates = list(job_stub(b).WatchJob(pb.JobRef(id=job.id), timeout=60))
    final = updates[-1]
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.step == final.total == 6
    assert [u.state for u in updates].count(pb.JOB_STATE_SUCCEEDED) == 1
    assert final.result.seeds == [7] and final.result.request_id == job.id
    assert list(final.result.notices) == [unmarked(64)]
    rest = httpx.get(f"{a.url}/v1/jobs/{job.id}/images/0", timeout=10).content
    assert final.result.images[0] == rest
    assert job_stub(a).GetJob(pb.JobRef(id=job.id), timeout=10).result.images[0] == rest
    with pytest.raises(grpc.RpcError) as ended:
        job_stub(a).CancelJob(pb.JobRef(id=job.id), timeout=10)
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as unknown:
        job_stub(a).GetJob(pb.JobRef(id="nope"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as conflict:
        job_stub(a).SubmitJob(pb.SubmitJobRequest(request=pb.GenerateRequest(image=REFERENCE, prompt="other"),
                                                  idempotency_key=key), timeout=30)
    assert conflict.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(conflict.value.trailing_metadata())["field"] == "Idempotency-Key"
    with pytest.raises(grpc.RpcError) as invalid:
        job_stub(a).SubmitJob(pb.SubmitJobRequest(request=request, webhook="gopher://x"), timeout=30)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(invalid.value.trailing_metadata())["field"] == "webhook"


def test_in_process_jobs_without_redis_expire_after_the_ttl(cluster):
    local = cluster["local"]
    assert submit(local).status_code == 401
    job = submit(local, headers=AUTH).json()
    assert httpx.get(f"{local.url}/v1/jobs/{job['id']}", timeout=10).status_code == 401
    done = wait_for(local, job["id"])
    assert done["status"] == "succeeded"
    assert done["expires_at"] == pytest.approx(done["finished_at"] + SHORT_TTL_S)
    time.sleep(max(0.0, done["expires_at"] - time.time()) + 0.5)
    gone = httpx.get(f"{local.url}/v1/jobs/{job['id']}", headers=AUTH, timeout=10)
    assert gone.status_code == 410 and "DSD_JOBS_RESULT_TTL_S" in gone.json()["error"]["message"]
    image = httpx.get(f"{local.url}{done['result']['images'][0]}", headers=AUTH, timeout=10)
    assert image.status_code == 410


def test_a_full_queue_refuses_new_jobs_with_429_but_replays_known_keys(cluster):
    local = cluster["local"]
    blockers = [submit(local, headers=AUTH, steps=100, image_guidance=2.0, seed=i).json()["id"] for i in range(2)]
    for job_id in blockers:
        wait_for(local, job_id, until=lambda view: view["status"] == "running")
    key = {**AUTH, "Idempotency-Key": f"full-{time.time_ns()}"}
    queued = submit(local, headers=key)
    assert queued.status_code == 202 and queued.json()["position"] == 1
    full = submit(local, headers=AUTH, seed=9)
    assert full.status_code == 429 and full.json()["error"]["code"] == "resource_exhausted"
    assert int(full.headers["retry-after"]) > 0
    assert submit(local, headers=key).json()["id"] == queued.json()["id"]
    for job_id in blockers:
        httpx.post(f"{local.url}/v1/jobs/{job_id}/cancel", headers=AUTH, timeout=10)
    assert wait_for(local, queued.json()["id"])["status"] == "succeeded"


def test_queued_jobs_survive_a_redis_restart(cluster):
    a, b, redis = cluster["a"], cluster["b"], cluster["redis"]
    # blockers of 4 images x 100 CFG steps at 512 px keep both replicas busy far longer than the test needs them to
    blockers = [submit(a, steps=100, size=512, image_guidance=2.0, num_images=4, seed=i).json()["id"]
                for i in range(4)]
    queued = []
    try:
        for job_id in blockers:
            wait_for(a, job_id, until=lambda view: view["status"] == "running")
        queued = [submit(a, seed=i).json()["id"] for i in range(3)]
        views = [httpx.get(f"{b.url}/v1/jobs/{job_id}", timeout=10).json() for job_id in queued]
        assert [(view["status"], view["position"]) for view in views] == [("queued", 1), ("queued", 2), ("queued", 3)]
        refused = submit(b, seed=9)
        assert len(blockers + queued) >= B_BACKLOG and refused.status_code == 429, refused.text
        cancel_queued_job_tells_its_webhook(a, b, redis, queued)
        redis.restart()
    finally:
        cancelled = [httpx.post(f"{b.url}/v1/jobs/{job_id}/cancel", timeout=10).status_code for job_id in blockers]
    assert [wait_for(a, job_id)["status"] for job_id in queued] == ["succeeded"] * 3
    # on a loaded machine a blocker may finish before its cancel (409) or while it takes effect (202, succeeded)
    ends = [(code, wait_for(a, job_id)["status"]) for code, job_id in zip(cancelled, blockers)]
    assert set(ends) <= {(202, "canceled"), (202, "succeeded"), (409, "succeeded")}, ends


def cancel_queued_job_tells_its_webhook(a, b, redis, queued: list[str]) -> None:
    """A queued job cancelled behind `queued` ends at once, leaves the queue and sends `job.canceled`."""
    receiver = Receiver(failures=0)
    try:
        job = submit(a, seed=5, webhook=receiver.url).json()
        assert job["status"] == "queued" and job["position"] == len(queued) + 1
        length = redis.client().xlen("dsd:jobs")
        cancelled = httpx.post(f"{b.url}/v1/jobs/{job['id']}/cancel", timeout=10)
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "canceled"
        assert redis.client().xlen("dsd:jobs") == length - 1, "its entry no longer counts toward the backlog"
        end = time.monotonic() + 30
        while not receiver.deliveries and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        receiver.server.shutdown()
    (delivery,) = receiver.deliveries
    assert delivery[1]["webhook-id"] == f"{job['id']}.canceled"
    assert Webhook(SECRET).verify(delivery[2], delivery[1])["data"]["status"] == "canceled"


class BlockingReceiver:
    """A loopback webhook receiver: the first attempt gets 500, the second is held until `release` and then
    accepted (204), later ones are accepted at once. `accepted` lists the `webhook-id` of every accepted attempt; an
    application handles each id once, as Standard Webhooks asks."""

    def __init__(self):
        self.attempts: list[dict] = []
        self.accepted: list[str] = []
        self.holding, self.release = threading.Event(), threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers["content-length"]))
                Webhook(SECRET).verify(data, dict(self.headers))
                receiver.attempts.append(dict(self.headers))
                if len(receiver.attempts) == 1:
                    self.answer(500)
                    return
                if len(receiver.attempts) == 2:
                    receiver.holding.set()
                    receiver.release.wait(60)
                receiver.accepted.append(self.headers["webhook-id"])
                self.answer(204)

            def answer(self, status: int) -> None:
                try:
                    self.send_response(status)
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def owner_of(cluster, consumer: str) -> str:
    """The replica (a or b) whose process runs the job-store consumer `consumer` (host-pid-suffix)."""
    return "a" if int(consumer.split("-")[-2]) in descendants(cluster["a"].process.pid) else "b"


def test_a_webhook_outlives_the_replica_sending_it(cluster):
    receiver = BlockingReceiver()
    try:
        job = submit(cluster["a"], webhook=receiver.url, webhook_events=["job.succeeded"]).json()
        assert receiver.holding.wait(60), "the second attempt never came"
        message = f"{job['id']}.succeeded"
        sender = cluster["redis"].client().hget(f"dsd:webhook:{message}", "sender").decode()
        victim = owner_of(cluster, sender)
        cluster[victim].kill()
        receiver.release.set()
        end = time.monotonic() + 60
        while len(receiver.attempts) < 3 or cluster["redis"].client().zcard("dsd:webhooks:due"):
            assert time.monotonic() < end, receiver.attempts
            time.sleep(0.05)
    finally:
        receiver.release.set()
        receiver.server.shutdown()
    assert {headers["webhook-id"] for headers in receiver.attempts} == {message}
    assert len(receiver.accepted) >= 2, "the killed replica's attempt was accepted, and the survivor sent it again"
    assert set(receiver.accepted) == {message}, "after deduplication by webhook-id the application saw one event"
    restart(cluster, victim)


def test_a_job_of_a_killed_replica_finishes_on_the_other_stored_once(cluster):
    a, redis = cluster["a"], cluster["redis"]
    job = submit(a, steps=100, num_images=2).json()
    wait_for(a, job["id"], until=lambda view: view["progress"]["step"] >= 2)
    victim = owner_of(cluster, redis.client().hget(f"dsd:job:{job['id']}", "replica").decode())
    survivor = cluster["b" if victim == "a" else "a"]
    cluster[victim].kill()
    assert httpx.get(f"{survivor.url}/v1/jobs/{job['id']}", timeout=10).json()["status"] == "running"
    reclaimed_before = survivor.metric("dsd_jobs_reclaimed_total")
    finished_before = survivor.metric("dsd_jobs_finished_total", state="succeeded")
    done = wait_for(survivor, job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] >= 2
    assert len(done["result"]["images"]) == 2
    assert survivor.metric("dsd_jobs_reclaimed_total") >= reclaimed_before + 1
    assert survivor.metric("dsd_jobs_finished_total", state="succeeded") == finished_before + 1
    assert redis.client().xlen("dsd:jobs") == 0
