"""The job store on a real redis-server (loopback), driven directly as the replicas drive it: durability, memory
pressure, claims and reclaims, requeue, cancel, the webhook outbox, queue positions and idempotency namespaces."""

import asyncio
import base64
import json
import time

import pytest
from pydantic import ValidationError

from dsd_model.serving.enhance import RedisCache
from dsd_model.settings import Settings
from dsd_serve.job_store import (OUTBOX, STREAM, EvictingJobStore, IdempotencyConflict, JobSpec, JobStoreFull,
                                 MemoryJobStore, RedisJobStore, caller_of, open_store)
from dsd_serve.jobs import Jobs
from dsd_serve.schemas import GenerateParams
from servers import start_service

HOOK = "http://127.0.0.1:9/hook"
CALLER = caller_of("Bearer one")


def spec(**overrides) -> JobSpec:
    values = dict(webhook=HOOK, webhook_events=["job.succeeded", "job.canceled"])
    values.update(overrides)
    return JobSpec(GenerateParams(prompt="the toy in a garden", steps=2, size=64), **values)


def store(fresh_redis, visibility_s: float = 30.0, backlog: int = 1000) -> RedisJobStore:
    return RedisJobStore(fresh_redis.url, ttl_s=600, visibility_timeout_s=visibility_s, max_backlog=backlog)


def submit(job_store: RedisJobStore, key: str | None = None, caller: str = CALLER, image: bytes = b"canvas",
           fingerprint: str = "request", **overrides) -> str:
    job_id, _ = job_store.submit(spec(**overrides), image, fingerprint, key, caller)
    return job_id


def run_to_end(job_store: RedisJobStore, state: str = "succeeded", result: bytes = b"image") -> str:
    """Claim, start and end the next job as a replica does; returns its id."""
    claim = job_store.claim()
    assert claim is not None
    job_store.start(claim.job_id)
    fields = {"result": json.dumps({"count": 1})} if state == "succeeded" else {"error": "{}"}
    assert job_store.finish(claim.job_id, state, fields, [result] if state == "succeeded" else [])
    job_store.done(claim)
    return claim.job_id


def test_an_evicting_job_redis_stops_the_start_naming_the_setting(fresh_redis, tmp_path):
    fresh_redis.client().config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(EvictingJobStore, match="DSD_JOBS_REDIS_URL.*noeviction"):
        open_store(Settings(redis_url=fresh_redis.url))
    assert Settings(redis_url="redis://cache:6379/0").resolved_jobs_redis_url == "redis://cache:6379/0"
    assert Settings(redis_url="redis://cache:6379/0",
                    jobs_redis_url="redis://jobs:6379/0").resolved_jobs_redis_url == "redis://jobs:6379/0"
    service = start_service(tmp_path, jobs_redis_url=fresh_redis.url)
    try:
        assert service.process.wait(timeout=120) != 0
    finally:
        service.stop()
    assert "DSD_JOBS_REDIS_URL" in service.log_tail() and "allkeys-lru" in service.log_tail()


def test_a_full_job_store_refuses_new_jobs_and_loses_no_accepted_one(fresh_redis):
    """A job Redis shared with the caches by mistake (noeviction): cache traffic fills it; submissions then get
    `JobStoreFull` (503), the caches fail open, and every accepted job still runs to a stored end."""
    client = fresh_redis.client()
    client.config_set("maxmemory", str(client.info("memory")["used_memory"] + 3 * 2**20))
    jobs = Jobs(Settings(jobs_redis_url=fresh_redis.url))
    assert jobs.store.claim() is None, "a replica is waiting for jobs"
    cache = RedisCache(fresh_redis.url, ttl_s=3600, timeout_s=1.0)
    accepted, refused = [], None
    for index in range(200):
        cache.put(f"dsd:enhance:{index}", "a caption " * 20_000)
        try:
            accepted.append(asyncio.run(jobs.call("submit", spec(), b"r" * 100_000, f"request-{index}", None,
                                                  CALLER))[0])
        except JobStoreFull as exc:
            refused = exc
            break
    assert refused is not None and "full" in str(refused) and len(accepted) >= 3, len(accepted)
    assert client.dbsize() > len(accepted), "cache entries were written before the memory ran out"
    cache.put("dsd:enhance:after", "a caption " * 20_000)
    assert cache.get("dsd:enhance:after") is None, "the cache failed open"
    ended = {run_to_end(jobs.store, result=b"o" * 100_000) for _ in accepted}
    assert ended == set(accepted)
    for job_id in accepted:
        assert jobs.store.get(job_id)["state"] == "succeeded"
        assert jobs.store.image(job_id, 0) == b"o" * 100_000
    assert client.xlen(STREAM) == 0 and client.zcard(OUTBOX) == len(accepted), "every webhook is in the outbox"
    jobs.stop(timeout=1)


def test_reclaim_follows_the_cursor_past_live_entries(fresh_redis):
    live, dead, rescuer = (store(fresh_redis, visibility_s=1) for _ in range(3))
    for _ in range(10):
        submit(live)
    stale_job = submit(live)
    live_claims = [live.claim() for _ in range(10)]
    stale_claim = dead.claim()
    assert stale_claim.job_id == stale_job and all(claim is not None for claim in live_claims)
    time.sleep(1.2)
    assert all(live.heartbeat(claim) for claim in live_claims)
    found = rescuer.claim()
    assert found is not None and found.job_id == stale_job and found.reclaimed
    assert rescuer.claim() is None, "the live entries stay with their replica"


def test_requeue_checks_ownership_and_state(fresh_redis):
    slow, other = store(fresh_redis, visibility_s=1), store(fresh_redis, visibility_s=1)
    job_id = submit(slow)
    mine = slow.claim()
    slow.start(job_id)
    time.sleep(1.2)
    theirs = other.claim()
    assert theirs.job_id == job_id and theirs.reclaimed
    other.start(job_id)
    assert not slow.requeue(mine, refund=True), "the stale replica no longer owns the job"
    assert slow.get(job_id)["state"] == "running" and slow.get(job_id)["attempts"] == "2"
    assert other.finish(job_id, "succeeded", {"result": json.dumps({"count": 0})})
    other.done(theirs)
    assert not other.requeue(theirs, refund=True)
    assert other.get(job_id)["state"] == "succeeded" and fresh_redis.client().xlen(STREAM) == 0


def test_requeue_for_lack_of_room_gives_back_the_attempt(fresh_redis):
    job_store = store(fresh_redis)
    job_id = submit(job_store)
    claim = job_store.claim()
    assert job_store.start(job_id) == ("queued", 1)
    assert job_store.requeue(claim, refund=True)
    view = job_store.get(job_id)
    assert view["state"] == "queued" and view["attempts"] == "0" and view["position"] == 1
    again = job_store.claim()
    assert again.job_id == job_id and again.entry != claim.entry
    assert job_store.start(job_id) == ("queued", 1)


def test_cancelling_a_queued_job_removes_its_entry_and_queues_its_webhook(fresh_redis):
    job_store = store(fresh_redis)
    first, second, third = submit(job_store), submit(job_store), submit(job_store, webhook_events=["job.failed"])
    assert job_store.backlog() == 3 and job_store.get(third)["position"] == 3
    assert job_store.cancel(second) == "queued" and job_store.cancel(third) == "queued"
    assert job_store.get(second)["state"] == "canceled"
    client = fresh_redis.client()
    assert client.xlen(STREAM) == 1 and job_store.backlog() == 1
    assert client.zrange(OUTBOX, 0, -1) == [f"{second}.canceled".encode()], "only the subscribed event is sent"
    assert run_to_end(job_store) == first, "the cancelled jobs are not claimed"
    assert job_store.claim() is None


def test_the_end_of_a_job_and_its_webhook_are_one_step_and_survive_a_lost_ack(fresh_redis):
    job_store, rescuer = store(fresh_redis, visibility_s=1), store(fresh_redis, visibility_s=1)
    job_id = submit(job_store)
    claim = job_store.claim()
    job_store.start(job_id)
    assert job_store.finish(job_id, "succeeded", {"result": json.dumps({"count": 0})})
    client = fresh_redis.client()
    assert client.xlen(STREAM) == 0, "the entry left the queue with the end, before any XACK"
    delivery = rescuer.take_delivery(lease_s=5)
    assert delivery.id == f"{job_id}.succeeded" and delivery.url == HOOK and delivery.attempts == 1
    assert job_store.take_delivery(lease_s=5) is None, "leased to one replica at a time"
    assert not job_store.settle_delivery(
        type(delivery)(**{**delivery.__dict__, "lease": "someone else"}), None), "only the lease holder settles it"
    assert rescuer.settle_delivery(delivery, retry_at=time.time())
    retried = job_store.take_delivery(lease_s=0.5)
    assert retried.id == delivery.id and retried.attempts == 2
    time.sleep(0.6)
    taken_over = rescuer.take_delivery(lease_s=5)
    assert taken_over.attempts == 3, "a lease that ended (its replica died mid-attempt) passes to another replica"
    assert not job_store.settle_delivery(retried, None)
    assert rescuer.settle_delivery(taken_over, None) and client.zcard(OUTBOX) == 0
    assert job_store.requeue(claim, refund=False) is False


def test_positions_are_read_once_for_every_watcher(fresh_redis):
    job_store = store(fresh_redis)
    job_ids = [submit(job_store) for _ in range(30)]
    client = fresh_redis.client()
    client.config_resetstat()
    positions = [job_store.get(job_id)["position"] for job_id in job_ids]
    assert positions == list(range(1, 31))
    calls = client.info("commandstats").get("cmdstat_xrange", {}).get("calls", 0)
    assert calls <= 2, f"{calls} XRANGE calls for 30 watchers"


def test_idempotency_keys_belong_to_their_caller_and_a_conflict_names_no_job(fresh_redis):
    job_store = store(fresh_redis)
    mine = submit(job_store, key="order-1", caller=caller_of("Bearer one"))
    theirs = submit(job_store, key="order-1", caller=caller_of("Bearer two"))
    assert mine != theirs
    assert submit(job_store, key="order-1", caller=caller_of("Bearer one")) == mine
    with pytest.raises(IdempotencyConflict) as conflict:
        submit(job_store, key="order-1", caller=caller_of("Bearer two"), fingerprint="another request")
    assert conflict.value.field == "Idempotency-Key"
    assert theirs not in str(conflict.value) and mine not in str(conflict.value)


def test_in_process_jobs_keep_the_same_promises():
    job_store = MemoryJobStore(ttl_s=600, max_backlog=10)
    first, second = (job_store.submit(spec(), b"canvas", "request", None, CALLER)[0] for _ in range(2))
    assert job_store.cancel(second) == "queued" and job_store.backlog() == 1
    delivery = job_store.take_delivery(lease_s=5)
    assert delivery.id == f"{second}.canceled" and job_store.take_delivery(lease_s=5) is None
    assert job_store.settle_delivery(delivery, retry_at=time.time() - 1)
    assert job_store.take_delivery(lease_s=5).attempts == 2
    claim = job_store.claim()
    assert claim.job_id == first and job_store.start(first) == ("queued", 1)
    assert job_store.requeue(claim, refund=True) and job_store.get(first)["attempts"] == "0"
    assert job_store.submit(spec(), b"canvas", "request", "key", CALLER)[0] != \
        job_store.submit(spec(), b"canvas", "request", "key", caller_of("Bearer two"))[0]


def test_a_webhook_secret_that_is_not_whsec_base64_stops_the_start_without_echoing_it():
    for secret in ("nope", "whsec_nope", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValidationError, match="DSD_WEBHOOK_SECRET must be `whsec_`") as refused:
            Settings(webhook_secret=secret)
        assert secret not in str(refused.value)
    assert Settings(webhook_secret="whsec_" + base64.b64encode(bytes(24)).decode()).webhook_secret is not None
