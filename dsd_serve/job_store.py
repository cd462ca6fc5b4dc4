"""The job store and queue shared by every replica: `RedisJobStore` on Redis, `MemoryJobStore` in one process.

With Redis the queue is a Stream with one consumer group: a replica claims an entry (XREADGROUP), keeps it with a
heartbeat while it runs, and acknowledges and deletes it when the result is stored, so the stream holds only queued and
running jobs. An entry whose replica stopped sending heartbeats for the visibility timeout is claimed by another
replica (XAUTOCLAIM). Submission with an idempotency key, the end of a job (written once) and cancellation are Lua
scripts, so concurrent replicas never interleave them. Job hashes and idempotency keys carry the result TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Iterable

import redis
import redis.asyncio

from dsd_model.errors import InputError, QueueFull
from dsd_model.settings import Settings

from . import webhooks
from .schemas import GenerateParams

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL = frozenset(STATES[2:])
JOB_ID = re.compile(r"^[0-9a-f]{28}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
STREAM, GROUP = "dsd:jobs", "workers"
MOVED = "dsd:jobs:moved"
"""Channel told whenever a job leaves or re-enters the queue (the positions of the queued jobs changed)."""
CLAIM_BLOCK_S = 0.5
"""How long one claim waits for a new entry; bounds how late a replica notices that it has room again."""


class IdempotencyConflict(InputError):
    def __init__(self, job_id: str):
        super().__init__("Idempotency-Key", f"was used for job {job_id} with a different request body; use a new key "
                         "for a different request")


def new_job_id() -> str:
    """12 hex digits of the submission time in milliseconds, then 16 random ones: unguessable, and an id alone
    tells whether its results have expired."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def submitted_at(job_id: str) -> float:
    return int(job_id[:12], 16) / 1000


def check_idempotency_key(key: str | None) -> str | None:
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise InputError("Idempotency-Key", "must be 1 to 255 printable ASCII characters without spaces")
    return key


@dataclass
class JobSpec:
    """What a job runs: the generation parameters, and whom to tell when it ends."""

    params: GenerateParams
    webhook: str | None = None
    webhook_events: list[str] = field(default_factory=lambda: list(webhooks.EVENTS))

    def to_json(self) -> str:
        return json.dumps({"params": self.params.model_dump(mode="json"), "webhook": self.webhook,
                           "webhook_events": self.webhook_events})

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        document = json.loads(text)
        return cls(GenerateParams.model_validate(document["params"]), document["webhook"], document["webhook_events"])

    def fingerprint(self, image: bytes) -> str:
        """Equal for equal requests however they were encoded (JSON or multipart, field order)."""
        return hashlib.sha256(self.to_json().encode() + hashlib.sha256(image).digest()).hexdigest()


@dataclass
class Claim:
    """A job this replica took from the queue; `entry` names it in the queue."""

    job_id: str
    entry: str
    reclaimed: bool = False


SUBMIT = """
local existing = KEYS[2] ~= '' and redis.call('GET', KEYS[2])
if existing then return {existing, 0} end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[3]) then return {'', -1} end
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[2])
local entry = redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'entry', entry)
return {ARGV[1], 1}
"""
"""KEYS: job hash, idempotency key ('' for none), stream. ARGV: job id, ttl, largest backlog, then the job's fields.
Returns the job id and 1; the id of the job that already holds the idempotency key and 0; or -1 when the stream holds
the largest backlog already."""
BACKLOG_RETRY_S = 10.0
"""Retry hint when the queue is full: about one job's time on a GPU, after which a slot is likely free."""

FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or state == 'succeeded' or state == 'failed' or state == 'canceled' then return 0 end
redis.call('HDEL', KEYS[1], 'image', 'cancel')
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if KEYS[2] ~= '' then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return 1
"""
"""KEYS: job hash, its idempotency key or ''. ARGV: ttl, then the final fields. Writes only the first end of a job."""

CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then redis.call('HSET', KEYS[1], 'cancel', '1') end
return state
"""

HEARTBEAT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if pending[1] and pending[1][2] == ARGV[2] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
  return 1
end
return 0
"""
"""KEYS: stream. ARGV: group, consumer, entry. Resets the entry's idle time while this consumer still owns it; 0 when
another replica has reclaimed it."""

START = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return {state or '', 0} end
redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[1], 'replica', ARGV[2])
return {state, redis.call('HINCRBY', KEYS[1], 'attempts', 1)}
"""


class RedisJobStore:
    """Jobs in Redis: hash `dsd:job:<id>` (state, spec, reference, progress, results), `dsd:idem:<key>`, and the
    stream `dsd:jobs` with the consumer group `workers`. Calls block; callers run them in a thread."""

    def __init__(self, url: str, ttl_s: int, visibility_timeout_s: float, max_backlog: int):
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=5 + CLAIM_BLOCK_S, socket_connect_timeout=5,
                                           health_check_interval=10)
        self.ttl_s = ttl_s
        self.max_backlog = max_backlog
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._submit = self.client.register_script(SUBMIT)
        self._finish = self.client.register_script(FINISH)
        self._cancel = self.client.register_script(CANCEL)
        self._heartbeat = self.client.register_script(HEARTBEAT)
        self._start = self.client.register_script(START)

    @staticmethod
    def key(job_id: str) -> str:
        return f"dsd:job:{job_id}"

    @staticmethod
    def channel(job_id: str) -> str:
        return f"dsd:job:{job_id}:changed"

    @asynccontextmanager
    async def watch(self, job_id: str):
        """`wait(timeout)`: returns once the job may have changed (a message on its channel or MOVED), or after
        `timeout`; without Redis it just waits out the timeout, so callers read the job again either way."""
        client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=5)
        pubsub = client.pubsub()

        async def wait(timeout: float) -> None:
            deadline = time.monotonic() + timeout
            try:
                if not pubsub.subscribed:
                    await pubsub.subscribe(self.channel(job_id), MOVED)
                while (remaining := deadline - time.monotonic()) > 0:
                    if await pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining) is not None:
                        return
            except redis.RedisError:
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))

        try:
            await wait(0)
            yield wait
        finally:
            await pubsub.aclose()
            await client.aclose()

    def submit(self, spec: JobSpec, image: bytes, idempotency_key: str | None) -> tuple[str, bool]:
        """Store and queue a job; returns (job id, True), or (the earlier job's id, False) for a known idempotency
        key with the same request. Raises `IdempotencyConflict` for a known key with another request, `QueueFull`
        when `max_backlog` jobs are queued or running."""
        job_id = new_job_id()
        fingerprint = spec.fingerprint(image)
        fields = {"state": "queued", "spec": spec.to_json(), "image": image, "created": repr(time.time()),
                  "fingerprint": fingerprint, "idempotency_key": idempotency_key or "", "attempts": 0}
        idem = f"dsd:idem:{idempotency_key}" if idempotency_key else ""
        values = [item for pair in fields.items() for item in pair]
        found, created = self._submit(keys=[self.key(job_id), idem, STREAM],
                                      args=[job_id, self.ttl_s, self.max_backlog, *values])
        if created == -1:
            raise QueueFull(self.max_backlog, BACKLOG_RETRY_S)
        found = found.decode()
        if not created and self.client.hget(self.key(found), "fingerprint") not in (None, fingerprint.encode()):
            raise IdempotencyConflict(found)
        return found, bool(created)

    def get(self, job_id: str) -> dict | None:
        """The job's fields (results as their count), with its queue `position` while queued; None when unknown."""
        names = ("state", "spec", "created", "started", "finished", "step", "total", "attempts", "error", "result",
                 "entry", "replica")
        values = self.client.hmget(self.key(job_id), names)
        if values[0] is None:
            return None
        fields = {name: value.decode() for name, value in zip(names, values) if value is not None}
        if fields["state"] == "queued":
            fields["position"] = self.position(fields.get("entry", ""))
        return fields

    def position(self, entry: str) -> int:
        """1 + the entries no replica has claimed yet that were queued before `entry`."""
        if not entry:
            return 1
        groups = {g["name"].decode(): g for g in self.client.xinfo_groups(STREAM)}
        last = groups[GROUP]["last-delivered-id"].decode() if GROUP in groups else "0-0"
        if tuple(map(int, entry.split("-"))) <= tuple(map(int, last.split("-"))):
            return 1
        return len(self.client.xrange(STREAM, min=f"({last}", max=entry, count=100_000))

    def reference(self, job_id: str) -> tuple[JobSpec, bytes] | None:
        spec, image = self.client.hmget(self.key(job_id), ("spec", "image"))
        return None if spec is None or image is None else (JobSpec.from_json(spec.decode()), image)

    def image(self, job_id: str, index: int) -> bytes | None:
        return self.client.hget(self.key(job_id), f"image:{index}")

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once, ask the replica running it to stop; returns the state before."""
        state = self._cancel(keys=[self.key(job_id)])
        if state == b"queued":
            self.finish(job_id, "canceled", {"error": json.dumps(cancelled_error())})
        return None if state is None else state.decode()

    def cancel_requested(self, job_id: str) -> bool:
        return self.client.hget(self.key(job_id), "cancel") == b"1"

    def start(self, job_id: str) -> tuple[str, int]:
        """Mark a claimed job running; returns its previous state and its attempts, 0 attempts when it ended."""
        state, attempts = self._start(keys=[self.key(job_id)], args=[repr(time.time()), self.consumer])
        self.client.pipeline().publish(self.channel(job_id), "running").publish(MOVED, job_id).execute()
        return state.decode(), int(attempts)

    def progress(self, job_id: str, step: int, total: int) -> None:
        pipe = self.client.pipeline()
        pipe.hset(self.key(job_id), mapping={"step": step, "total": total}).publish(self.channel(job_id), "step")
        pipe.execute()

    def finish(self, job_id: str, state: str, fields: dict, images: Iterable[bytes] = ()) -> bool:
        """Write the job's end unless one was written already; returns whether this call wrote it."""
        values = {"state": state, "finished": repr(time.time()), **fields}
        values.update({f"image:{index}": data for index, data in enumerate(images)})
        idem = self.client.hget(self.key(job_id), "idempotency_key") or b""
        pairs = [item for pair in values.items() for item in pair]
        idem_key = f"dsd:idem:{idem.decode()}" if idem else ""
        stored = bool(self._finish(keys=[self.key(job_id), idem_key], args=[self.ttl_s, *pairs]))
        if stored:
            self.client.pipeline().publish(self.channel(job_id), state).publish(MOVED, job_id).execute()
        return stored

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim(self) -> Claim | None:
        """A job no replica has claimed, or one whose replica stopped sending heartbeats; None when there is none
        within CLAIM_BLOCK_S."""
        try:
            _, stale, _ = self.client.xautoclaim(STREAM, GROUP, self.consumer, self.visibility_ms, "0-0", count=1)
            if stale:
                entry, fields = stale[0]
                return Claim(fields[b"id"].decode(), entry.decode(), reclaimed=True)
            answer = self.client.xreadgroup(GROUP, self.consumer, {STREAM: ">"}, count=1,
                                            block=int(CLAIM_BLOCK_S * 1000))
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._ensure_group()
            return None
        if not answer:
            return None
        entry, fields = answer[0][1][0]
        return Claim(fields[b"id"].decode(), entry.decode())

    def heartbeat(self, claim: Claim) -> bool:
        return bool(self._heartbeat(keys=[STREAM], args=[GROUP, self.consumer, claim.entry]))

    def done(self, claim: Claim) -> None:
        self.client.pipeline().xack(STREAM, GROUP, claim.entry).xdel(STREAM, claim.entry).execute()

    def requeue(self, claim: Claim) -> None:
        """Give a claimed job back to the queue (this replica is shutting down before it ran)."""
        entry = self.client.xadd(STREAM, {"id": claim.job_id})
        self.client.hset(self.key(claim.job_id), mapping={"state": "queued", "entry": entry})
        self.done(claim)
        self.client.pipeline().publish(self.channel(claim.job_id), "queued").publish(MOVED, claim.job_id).execute()

    def backlog(self) -> int:
        """Entries no replica has claimed yet (the stream holds only queued and running jobs)."""
        try:
            pending = self.client.xpending(STREAM, GROUP)["pending"]
        except redis.ResponseError:
            pending = 0
        return max(0, self.client.xlen(STREAM) - pending)

    def close(self) -> None:
        self.client.close()


class MemoryJobStore:
    """The same contract inside this process, for a service without Redis: nothing survives a restart, and only
    this replica sees its jobs."""

    poll_s = 0.1
    """How often a watcher reads the job again: in one process that costs a dictionary lookup."""

    def __init__(self, ttl_s: int, max_backlog: int):
        self.ttl_s = ttl_s
        self.max_backlog = max_backlog
        self.jobs: dict[str, dict] = {}
        self.keys: dict[str, tuple[str, float]] = {}
        self.queue: list[str] = []
        self.lock = threading.Condition()

    def _expire(self) -> None:
        now = time.time()
        for job_id in [job_id for job_id, job in self.jobs.items() if job["expires"] < now]:
            del self.jobs[job_id]
        for key in [key for key, (_, expires) in self.keys.items() if expires < now]:
            del self.keys[key]

    def submit(self, spec: JobSpec, image: bytes, idempotency_key: str | None) -> tuple[str, bool]:
        fingerprint = spec.fingerprint(image)
        with self.lock:
            self._expire()
            if idempotency_key in self.keys:
                found = self.keys[idempotency_key][0]
                if found in self.jobs and self.jobs[found]["fingerprint"] != fingerprint:
                    raise IdempotencyConflict(found)
                return found, False
            if len(self.queue) >= self.max_backlog:
                raise QueueFull(len(self.queue), BACKLOG_RETRY_S)
            job_id = new_job_id()
            expires = time.time() + self.ttl_s
            self.jobs[job_id] = {"state": "queued", "spec": spec.to_json(), "image": image, "created": repr(time.time()),
                                 "fingerprint": fingerprint, "idempotency_key": idempotency_key, "attempts": "0",
                                 "expires": expires, "images": []}
            if idempotency_key:
                self.keys[idempotency_key] = (job_id, expires)
            self.queue.append(job_id)
            self.lock.notify_all()
            return job_id, True

    @asynccontextmanager
    async def watch(self, job_id: str):
        """`wait(timeout)`: returns after `poll_s` (at most `timeout`); callers read the job again."""

        async def wait(timeout: float) -> None:
            await asyncio.sleep(min(timeout, self.poll_s))

        yield wait

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            self._expire()
            job = self.jobs.get(job_id)
            if job is None:
                return None
            fields = {k: v for k, v in job.items() if isinstance(v, str)}
            if job["state"] == "queued":
                fields["position"] = self.queue.index(job_id) + 1 if job_id in self.queue else 1
            return fields

    def reference(self, job_id: str) -> tuple[JobSpec, bytes] | None:
        with self.lock:
            job = self.jobs.get(job_id)
            return None if job is None or "image" not in job else (JobSpec.from_json(job["spec"]), job["image"])

    def image(self, job_id: str, index: int) -> bytes | None:
        with self.lock:
            images = self.jobs.get(job_id, {}).get("images", [])
            return images[index] if 0 <= index < len(images) else None

    def cancel(self, job_id: str) -> str | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            state = job["state"]
            if state == "running":
                job["cancel"] = "1"
        if state == "queued":
            self.finish(job_id, "canceled", {"error": json.dumps(cancelled_error())})
        return state

    def cancel_requested(self, job_id: str) -> bool:
        with self.lock:
            return self.jobs.get(job_id, {}).get("cancel") == "1"

    def start(self, job_id: str) -> tuple[str, int]:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job["state"] in TERMINAL:
                return ("" if job is None else job["state"]), 0
            state = job["state"]
            job.update(state="running", started=repr(time.time()), attempts=str(int(job["attempts"]) + 1))
            return state, int(job["attempts"])

    def progress(self, job_id: str, step: int, total: int) -> None:
        with self.lock:
            if job_id in self.jobs:
                self.jobs[job_id].update(step=str(step), total=str(total))

    def finish(self, job_id: str, state: str, fields: dict, images: Iterable[bytes] = ()) -> bool:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job["state"] in TERMINAL:
                return False
            job.pop("image", None)
            job.pop("cancel", None)
            job.update(state=state, finished=repr(time.time()), images=list(images), expires=time.time() + self.ttl_s,
                       **fields)
            if job["idempotency_key"]:
                self.keys[job["idempotency_key"]] = (job_id, job["expires"])
            if job_id in self.queue:
                self.queue.remove(job_id)
            return True

    def claim(self) -> Claim | None:
        with self.lock:
            if not self.queue:
                self.lock.wait(CLAIM_BLOCK_S)
            if not self.queue:
                return None
            job_id = self.queue.pop(0)
            return Claim(job_id, job_id)

    def heartbeat(self, claim: Claim) -> bool:
        return True

    def done(self, claim: Claim) -> None:
        """Claimed jobs already left the in-memory queue."""

    def requeue(self, claim: Claim) -> None:
        with self.lock:
            if claim.job_id in self.jobs:
                self.jobs[claim.job_id]["state"] = "queued"
                self.queue.insert(0, claim.job_id)
                self.lock.notify_all()

    def backlog(self) -> int:
        with self.lock:
            return len(self.queue)

    def close(self) -> None:
        """Nothing to close."""


def open_store(settings: Settings) -> RedisJobStore | MemoryJobStore:
    if settings.redis_url:
        return RedisJobStore(settings.redis_url, settings.jobs_result_ttl_s, settings.jobs_visibility_timeout_s,
                             settings.jobs_max_backlog)
    logger.warning("DSD_REDIS_URL is unset: jobs run in this process and are lost when it stops")
    return MemoryJobStore(settings.jobs_result_ttl_s, settings.jobs_max_backlog)


def cancelled_error() -> dict:
    return {"code": "cancelled", "message": "the job was cancelled", "field": None}
