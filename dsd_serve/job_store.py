"""The job store and queue shared by every replica: `RedisJobStore` on Redis, `MemoryJobStore` in one process.

With Redis the queue is a Stream with one consumer group: a replica claims an entry (XREADGROUP), keeps it with a
heartbeat from the moment of the claim, and the entry leaves the stream when the job ends, so the stream holds only
queued and running jobs. An entry whose replica stopped sending heartbeats for the visibility timeout is claimed by
another replica (XAUTOCLAIM, following its cursor over all pending entries). Submission, the end of a job (written
once, together with its webhook in the outbox and the removal of its queue entry), cancellation and giving a job back
to the queue are Lua scripts, so concurrent replicas never interleave them. Job hashes and idempotency keys carry the
result TTL.

Jobs must not be evicted: the store refuses a Redis whose `maxmemory-policy` evicts (`check_durable`). When that Redis
is full, submissions are refused (`JobStoreFull`) while the scripts that end accepted jobs still run (`allow-oom`), so
an accepted job is never lost to memory pressure.

Webhook outbox: `dsd:webhooks:due` (sorted set of delivery ids by the time they are due) and `dsd:webhook:<id>` (the
delivery: URL, event, when the job ended, attempts, and the lease and replica of the attempt in flight). Any replica takes a due delivery for a lease (`take_delivery`), sends
it, and then removes it or schedules its retry; a replica that dies mid-attempt leaves it to another once the lease
ends.
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
OUTBOX = "dsd:webhooks:due"
CLAIM_BLOCK_S = 0.5
"""How long one claim waits for a new entry; bounds how late a replica notices that it has room again."""
POSITIONS_MAX_AGE_S = 0.25
"""How old the queue order used for positions may be: one read of the queue serves every watcher of this replica in
that time, however many `MOVED` events arrive."""


class JobStoreError(Exception):
    """The job store (Redis), or the webhook host's resolver at submission, does not answer; the request may be
    retried."""


class JobStoreFull(JobStoreError):
    """The job store reached its memory limit: new jobs are refused until running ones end or results expire."""


class EvictingJobStore(RuntimeError):
    """The job Redis may evict keys (its `maxmemory-policy` is not `noeviction`): queued jobs, results and
    idempotency keys would silently disappear under memory pressure."""


class IdempotencyConflict(InputError):
    def __init__(self):
        super().__init__("Idempotency-Key", "was used for a different request body; use a new key for a different "
                         "request")


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


def caller_of(credential: str | None) -> str:
    """The namespace of a caller's idempotency keys: a digest of the credential it presented (the Authorization
    header), so one caller's key can neither replay nor reveal another caller's job."""
    return hashlib.sha256((credential or "").encode()).hexdigest()[:32]


@dataclass
class JobSpec:
    """What a job runs: the generation parameters, whom to tell when it ends, and what was done to the upload to
    make the stored reference (`dsd_model.images` notices, reported with the result)."""

    params: GenerateParams
    webhook: str | None = None
    webhook_events: list[str] = field(default_factory=lambda: list(webhooks.EVENTS))
    notices: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"params": self.params.model_dump(mode="json"), "webhook": self.webhook,
                           "webhook_events": self.webhook_events, "notices": self.notices})

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        document = json.loads(text)
        return cls(GenerateParams.model_validate(document["params"]), document["webhook"], document["webhook_events"],
                   document.get("notices", []))

    def fingerprint(self, upload: bytes) -> str:
        """Equal for equal requests however they were encoded (JSON or multipart, field order)."""
        request = json.dumps({"params": self.params.model_dump(mode="json"), "webhook": self.webhook,
                              "webhook_events": self.webhook_events})
        return hashlib.sha256(request.encode() + hashlib.sha256(upload).digest()).hexdigest()

    def webhook_for(self, state: str) -> str | None:
        """The URL to tell that the job ended in `state`, or None when it is not subscribed."""
        return self.webhook if self.webhook and f"job.{state}" in self.webhook_events else None


@dataclass
class Claim:
    """A job this replica took from the queue; `entry` names it in the queue."""

    job_id: str
    entry: str
    reclaimed: bool = False


@dataclass
class Delivery:
    """One webhook event to send: `id` is its `webhook-id` (`<job id>.<state>`, the same on every attempt), `ended`
    when the job ended (Unix seconds), `attempts` counts this one, `lease` marks this replica's hold on it."""

    id: str
    job_id: str
    url: str
    event: str
    ended: float
    attempts: int
    lease: str


def stream_id(entry: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry.partition("-")
    return int(milliseconds), int(sequence or 0)


SUBMIT = """#!lua
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
the largest backlog already. Without `allow-oom`, Redis refuses it whole when its memory is full."""
BACKLOG_RETRY_S = 10.0
"""Retry hint when the queue is full: about one job's time on a GPU, after which a slot is likely free."""

END_JOB = """#!lua flags=allow-oom
local function end_job()
  redis.call('HDEL', KEYS[1], 'image', 'cancel')
  redis.call('HSET', KEYS[1], unpack(ARGV, 8))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  if KEYS[2] ~= '' then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
  local entry = redis.call('HGET', KEYS[1], 'entry')
  if entry then
    redis.call('XACK', KEYS[3], ARGV[2], entry)
    redis.call('XDEL', KEYS[3], entry)
  end
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[5], 'url', ARGV[4], 'event', ARGV[6], 'ended', ARGV[3], 'attempts', 0)
    redis.call('EXPIRE', KEYS[5], ARGV[7])
    redis.call('ZADD', KEYS[4], 'NX', ARGV[3], ARGV[5])
  end
end
"""
"""Writes the end of a job: its final fields, the TTL of the job and its idempotency key, the removal of its queue
entry and, when the job subscribed to the event, its webhook delivery in the outbox; all or nothing. KEYS: job hash,
idempotency key or '', stream, outbox, delivery. ARGV: ttl, group, now, webhook URL or '', delivery id, event,
delivery ttl, then the final fields. `allow-oom`: the end of an accepted job is stored even when Redis is full."""

FINISH = END_JOB + """
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or state == 'succeeded' or state == 'failed' or state == 'canceled' then return 0 end
end_job()
return 1
"""
"""Writes only the first end of a job; returns whether this call wrote it."""

CANCEL = END_JOB + """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then redis.call('HSET', KEYS[1], 'cancel', '1') end
if state == 'queued' then end_job() end
return state
"""
"""Ends a queued job as cancelled (its entry leaves the queue at once), asks the replica of a running one to stop;
returns the state before."""

HEARTBEAT = """#!lua flags=allow-oom
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if pending[1] and pending[1][2] == ARGV[2] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
  return 1
end
return 0
"""
"""KEYS: stream. ARGV: group, consumer, entry. Resets the entry's idle time while this consumer still owns it; 0 when
another replica has reclaimed it or the job ended."""

START = """#!lua flags=allow-oom
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return {state or '', 0} end
redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[1], 'replica', ARGV[2])
return {state, redis.call('HINCRBY', KEYS[1], 'attempts', 1)}
"""

REQUEUE = """#!lua flags=allow-oom
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not (pending[1] and pending[1][2] == ARGV[2]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[4])
redis.call('HSET', KEYS[2], 'state', 'queued', 'entry', entry)
if ARGV[5] == '1' and state == 'running' then redis.call('HINCRBY', KEYS[2], 'attempts', -1) end
return 1
"""
"""KEYS: stream, job hash. ARGV: group, consumer, entry, job id, 1 to give back the attempt. Puts a job this consumer
still owns and that has not ended back at the end of the queue; 0 (and nothing changed but the release of the entry)
when another replica reclaimed it or it ended."""

TAKE = """#!lua flags=allow-oom
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not due) or tonumber(due) > tonumber(ARGV[2]) then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], ARGV[2] + ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], 'lease', ARGV[4], 'sender', ARGV[5])
redis.call('HINCRBY', KEYS[2], 'attempts', 1)
return redis.call('HGETALL', KEYS[2])
"""
"""KEYS: outbox, delivery. ARGV: delivery id, now, lease seconds, lease token, this replica. Leases a due delivery
(it is due again when the lease ends) and counts the attempt; nothing when another replica took it first."""

SETTLE = """#!lua flags=allow-oom
if redis.call('HGET', KEYS[2], 'lease') ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  redis.call('HDEL', KEYS[2], 'lease')
end
return 1
"""
"""KEYS: outbox, delivery. ARGV: delivery id, lease token, the time of the next attempt or '' to remove it. Only the
holder of the lease settles a delivery."""


@dataclass
class QueueOrder:
    """The unclaimed entries in queue order, as read at `taken`."""

    taken: float
    positions: dict[str, int]
    newest: tuple[int, int]


class RedisJobStore:
    """Jobs in Redis: hash `dsd:job:<id>` (state, spec, reference, progress, results), `dsd:idem:<caller>:<key>`,
    the stream `dsd:jobs` with the consumer group `workers`, and the webhook outbox. Calls block; callers run them in
    a thread."""

    def __init__(self, url: str, ttl_s: int, visibility_timeout_s: float, max_backlog: int,
                 webhook_keep_s: float = 86_400):
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=5 + CLAIM_BLOCK_S, socket_connect_timeout=5,
                                           health_check_interval=10)
        self.ttl_s = ttl_s
        self.max_backlog = max_backlog
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.webhook_keep_s = int(webhook_keep_s)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.durable = False
        self._cursor = "0-0"
        self._order: QueueOrder | None = None
        self._order_lock = threading.Lock()
        self._submit = self.client.register_script(SUBMIT)
        self._finish = self.client.register_script(FINISH)
        self._cancel = self.client.register_script(CANCEL)
        self._heartbeat = self.client.register_script(HEARTBEAT)
        self._start = self.client.register_script(START)
        self._requeue = self.client.register_script(REQUEUE)
        self._take = self.client.register_script(TAKE)
        self._settle = self.client.register_script(SETTLE)

    @staticmethod
    def key(job_id: str) -> str:
        return f"dsd:job:{job_id}"

    @staticmethod
    def channel(job_id: str) -> str:
        return f"dsd:job:{job_id}:changed"

    @staticmethod
    def delivery_key(delivery_id: str) -> str:
        return f"dsd:webhook:{delivery_id}"

    def check_durable(self) -> None:
        """Raise `EvictingJobStore` unless the Redis keeps every key under memory pressure (`noeviction`). Checked
        once; raises `redis.RedisError` while Redis cannot be reached (callers check again later)."""
        if self.durable:
            return
        policy = self.client.info("memory").get("maxmemory_policy")
        if policy != "noeviction":
            raise EvictingJobStore(
                f"the job store {redacted(self.url)} runs maxmemory-policy {policy}, which evicts queued jobs, results "
                "and idempotency keys under memory pressure; point DSD_JOBS_REDIS_URL at a Redis with "
                "maxmemory-policy noeviction and appendonly yes (deploy/k8s/redis ships one), apart from the "
                "evicting cache of DSD_REDIS_URL")
        self.durable = True

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

    def submit(self, spec: JobSpec, image: bytes, fingerprint: str, idempotency_key: str | None,
               caller: str) -> tuple[str, bool]:
        """Store and queue a job with its reference `image`; returns (job id, True), or (the earlier job's id, False)
        for a key this caller used with the same request (`fingerprint`). Raises `IdempotencyConflict` for a known
        key with another request, `QueueFull` when `max_backlog` jobs are queued or running, and
        `redis.OutOfMemoryError` when Redis is full."""
        self.check_durable()
        job_id = new_job_id()
        idem = f"dsd:idem:{caller}:{idempotency_key}" if idempotency_key else ""
        fields = {"state": "queued", "spec": spec.to_json(), "image": image, "created": repr(time.time()),
                  "fingerprint": fingerprint, "idempotency_key": idem, "attempts": 0}
        values = [item for pair in fields.items() for item in pair]
        found, created = self._submit(keys=[self.key(job_id), idem, STREAM],
                                      args=[job_id, self.ttl_s, self.max_backlog, *values])
        if created == -1:
            raise QueueFull(self.max_backlog, BACKLOG_RETRY_S)
        found = found.decode()
        if not created and self.client.hget(self.key(found), "fingerprint") not in (None, fingerprint.encode()):
            raise IdempotencyConflict()
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
        """1 + the entries no replica has claimed yet that were queued before `entry`, from the queue order of at
        most POSITIONS_MAX_AGE_S ago (read again sooner for an entry newer than it)."""
        if not entry:
            return 1
        order = self._order
        if order is None or time.monotonic() - order.taken > POSITIONS_MAX_AGE_S or (
                entry not in order.positions and stream_id(entry) > order.newest):
            order = self._read_order(time.monotonic())
        return order.positions.get(entry, 1)

    def _read_order(self, wanted: float) -> QueueOrder:
        """The queue order as read at `wanted` or later (concurrent callers share one read)."""
        with self._order_lock:
            order = self._order
            if order is not None and order.taken >= wanted:
                return order
            taken = time.monotonic()
            groups = {g["name"].decode(): g for g in self.client.xinfo_groups(STREAM)}
            last = groups[GROUP]["last-delivered-id"].decode() if GROUP in groups else "0-0"
            entries = self.client.xrange(STREAM, min=f"({last}", max="+", count=self.max_backlog * 2)
            positions = {entry.decode(): index for index, (entry, _) in enumerate(entries, start=1)}
            newest = stream_id(entries[-1][0].decode()) if entries else stream_id(last)
            self._order = QueueOrder(taken, positions, newest)
            return self._order

    def reference(self, job_id: str) -> tuple[JobSpec, bytes] | None:
        spec, image = self.client.hmget(self.key(job_id), ("spec", "image"))
        return None if spec is None or image is None else (JobSpec.from_json(spec.decode()), image)

    def image(self, job_id: str, index: int) -> bytes | None:
        return self.client.hget(self.key(job_id), f"image:{index}")

    def _end_args(self, job_id: str, state: str, values: dict) -> tuple[list, list]:
        """KEYS and ARGV of END_JOB for `job_id` ending in `state` with the final fields `values`."""
        spec, idem = self.client.hmget(self.key(job_id), ("spec", "idempotency_key"))
        webhook = JobSpec.from_json(spec.decode()).webhook_for(state) if spec is not None else None
        delivery = f"{job_id}.{state}"
        keys = [self.key(job_id), (idem or b"").decode(), STREAM, OUTBOX, self.delivery_key(delivery)]
        pairs = [item for pair in values.items() for item in pair]
        args = [self.ttl_s, GROUP, repr(time.time()), webhook or "", delivery, f"job.{state}", self.webhook_keep_s,
                *pairs]
        return keys, args

    def cancel(self, job_id: str) -> str | None:
        """End a queued job as cancelled at once (with its webhook), ask the replica running one to stop; returns
        the state before."""
        values = {"state": "canceled", "finished": repr(time.time()), "error": json.dumps(cancelled_error())}
        keys, args = self._end_args(job_id, "canceled", values)
        state = self._cancel(keys=keys, args=args)
        if state == b"queued":
            self._tell(job_id, "canceled")
        return None if state is None else state.decode()

    def cancel_requested(self, job_id: str) -> bool:
        return self.client.hget(self.key(job_id), "cancel") == b"1"

    def start(self, job_id: str) -> tuple[str, int]:
        """Mark a claimed job running; returns its previous state and its attempts, 0 attempts when it ended."""
        state, attempts = self._start(keys=[self.key(job_id)], args=[repr(time.time()), self.consumer])
        self._tell(job_id, "running")
        return state.decode(), int(attempts)

    def progress(self, job_id: str, step: int, total: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key(job_id), mapping={"step": step, "total": total}).publish(self.channel(job_id), "step")
        pipe.execute()

    def finish(self, job_id: str, state: str, fields: dict, images: Iterable[bytes] = ()) -> bool:
        """Write the job's end (and queue its webhook) unless one was written already; returns whether this call
        wrote it."""
        values = {"state": state, "finished": repr(time.time()), **fields}
        values.update({f"image:{index}": data for index, data in enumerate(images)})
        keys, args = self._end_args(job_id, state, values)
        stored = bool(self._finish(keys=keys, args=args))
        if stored:
            self._tell(job_id, state)
        return stored

    def _tell(self, job_id: str, state: str) -> None:
        self.client.pipeline(transaction=False).publish(self.channel(job_id), state).publish(MOVED, job_id).execute()

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def claim(self) -> Claim | None:
        """A job whose replica stopped sending heartbeats, or one no replica has claimed; None when there is none
        within CLAIM_BLOCK_S."""
        self.check_durable()
        try:
            stale = self._reclaim()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._ensure_group()
            stale = None
        if stale is not None:
            return stale
        answer = self.client.xreadgroup(GROUP, self.consumer, {STREAM: ">"}, count=1, block=int(CLAIM_BLOCK_S * 1000))
        if not answer:
            return None
        entry, fields = answer[0][1][0]
        return Claim(fields[b"id"].decode(), entry.decode())

    def _reclaim(self) -> Claim | None:
        """The first entry idle past the visibility timeout, scanning the pending entries from where the last scan
        stopped to their end (XAUTOCLAIM looks at a few entries per call and returns where to go on)."""
        while True:
            cursor, stale, _ = self.client.xautoclaim(STREAM, GROUP, self.consumer, self.visibility_ms, self._cursor,
                                                      count=1)
            self._cursor = cursor.decode()
            if stale:
                entry, fields = stale[0]
                return Claim(fields[b"id"].decode(), entry.decode(), reclaimed=True)
            if self._cursor == "0-0":
                return None

    def heartbeat(self, claim: Claim) -> bool:
        return bool(self._heartbeat(keys=[STREAM], args=[GROUP, self.consumer, claim.entry]))

    def done(self, claim: Claim) -> None:
        self.client.pipeline(transaction=False).xack(STREAM, GROUP, claim.entry).xdel(STREAM, claim.entry).execute()

    def requeue(self, claim: Claim, refund: bool) -> bool:
        """Give a claimed job back to the end of the queue, unless another replica reclaimed it or it ended; with
        `refund` the attempt it was counted as is given back (it never ran). Returns whether it was queued again."""
        queued = bool(self._requeue(keys=[STREAM, self.key(claim.job_id)],
                                    args=[GROUP, self.consumer, claim.entry, claim.job_id, int(refund)]))
        if queued:
            self._tell(claim.job_id, "queued")
        return queued

    def backlog(self) -> int:
        """Entries no replica has claimed yet (the stream holds only queued and running jobs)."""
        try:
            pending = self.client.xpending(STREAM, GROUP)["pending"]
        except redis.ResponseError:
            pending = 0
        return max(0, self.client.xlen(STREAM) - pending)

    def take_delivery(self, lease_s: float) -> Delivery | None:
        """The webhook delivery due first, leased to this replica for `lease_s`; None when none is due."""
        now = time.time()
        for delivery_id in self.client.zrangebyscore(OUTBOX, "-inf", now, start=0, num=4):
            delivery_id = delivery_id.decode()
            token = secrets.token_hex(8)
            values = self._take(keys=[OUTBOX, self.delivery_key(delivery_id)],
                                args=[delivery_id, repr(now), repr(lease_s), token, self.consumer])
            if values:
                fields = {values[i].decode(): values[i + 1].decode() for i in range(0, len(values), 2)}
                return Delivery(delivery_id, delivery_id.rpartition(".")[0], fields["url"], fields["event"],
                                float(fields["ended"]), int(fields["attempts"]), token)
        return None

    def settle_delivery(self, delivery: Delivery, retry_at: float | None) -> bool:
        """Remove a delivery (sent, or given up: `retry_at` None) or schedule its next attempt; False when this
        replica's lease had ended and another replica holds it."""
        return bool(self._settle(keys=[OUTBOX, self.delivery_key(delivery.id)],
                                 args=[delivery.id, delivery.lease, "" if retry_at is None else repr(retry_at)]))

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
        self.keys: dict[tuple[str, str], tuple[str, float]] = {}
        self.queue: list[str] = []
        self.outbox: dict[str, dict] = {}
        self.lock = threading.Condition()

    def check_durable(self) -> None:
        """Nothing is evicted here (and nothing survives the process)."""

    def _expire(self) -> None:
        now = time.time()
        for job_id in [job_id for job_id, job in self.jobs.items() if job["expires"] < now]:
            del self.jobs[job_id]
        for key in [key for key, (_, expires) in self.keys.items() if expires < now]:
            del self.keys[key]

    def submit(self, spec: JobSpec, image: bytes, fingerprint: str, idempotency_key: str | None,
               caller: str) -> tuple[str, bool]:
        slot = (caller, idempotency_key) if idempotency_key else None
        with self.lock:
            self._expire()
            if slot in self.keys:
                found = self.keys[slot][0]
                if found in self.jobs and self.jobs[found]["fingerprint"] != fingerprint:
                    raise IdempotencyConflict()
                return found, False
            if len(self.queue) >= self.max_backlog:
                raise QueueFull(len(self.queue), BACKLOG_RETRY_S)
            job_id = new_job_id()
            expires = time.time() + self.ttl_s
            self.jobs[job_id] = {"state": "queued", "spec": spec.to_json(), "image": image,
                                 "created": repr(time.time()), "fingerprint": fingerprint, "slot": slot,
                                 "attempts": "0", "expires": expires, "images": []}
            if slot:
                self.keys[slot] = (job_id, expires)
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
            elif state == "queued":
                self._end(job_id, "canceled", {"error": json.dumps(cancelled_error())}, [])
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
            self._end(job_id, state, fields, list(images))
            return True

    def _end(self, job_id: str, state: str, fields: dict, images: list[bytes]) -> None:
        """The end of a job and its webhook; called with the lock held."""
        job = self.jobs[job_id]
        job.pop("image", None)
        job.pop("cancel", None)
        now = time.time()
        job.update(state=state, finished=repr(now), images=images, expires=now + self.ttl_s, **fields)
        if job["slot"]:
            self.keys[job["slot"]] = (job_id, job["expires"])
        if job_id in self.queue:
            self.queue.remove(job_id)
        webhook = JobSpec.from_json(job["spec"]).webhook_for(state)
        if webhook:
            self.outbox[f"{job_id}.{state}"] = {"url": webhook, "event": f"job.{state}", "ended": now, "attempts": 0,
                                                "due": now, "lease": ""}

    def claim(self) -> Claim | None:
        with self.lock:
            if not self.queue:
                self.lock.wait(CLAIM_BLOCK_S)
            if not self.queue:
                return None
            job_id = self.queue.pop(0)
            return Claim(job_id, job_id)

    def heartbeat(self, claim: Claim) -> bool:
        with self.lock:
            job = self.jobs.get(claim.job_id)
            return job is not None and job["state"] not in TERMINAL

    def done(self, claim: Claim) -> None:
        """Claimed jobs already left the in-memory queue."""

    def requeue(self, claim: Claim, refund: bool) -> bool:
        with self.lock:
            job = self.jobs.get(claim.job_id)
            if job is None or job["state"] in TERMINAL:
                return False
            if refund and job["state"] == "running":
                job["attempts"] = str(int(job["attempts"]) - 1)
            job["state"] = "queued"
            self.queue.append(claim.job_id)
            self.lock.notify_all()
            return True

    def backlog(self) -> int:
        with self.lock:
            return len(self.queue)

    def take_delivery(self, lease_s: float) -> Delivery | None:
        now = time.time()
        with self.lock:
            for delivery_id, entry in self.outbox.items():
                if entry["due"] <= now:
                    entry.update(due=now + lease_s, lease=secrets.token_hex(8), attempts=entry["attempts"] + 1)
                    return Delivery(delivery_id, delivery_id.rpartition(".")[0], entry["url"], entry["event"],
                                    entry["ended"], entry["attempts"], entry["lease"])
        return None

    def settle_delivery(self, delivery: Delivery, retry_at: float | None) -> bool:
        with self.lock:
            entry = self.outbox.get(delivery.id)
            if entry is None or entry["lease"] != delivery.lease:
                return False
            if retry_at is None:
                del self.outbox[delivery.id]
            else:
                entry.update(due=retry_at, lease="")
            return True

    def close(self) -> None:
        """Nothing to close."""


def redacted(url: str) -> str:
    """`url` without its password, for messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def open_store(settings: Settings) -> RedisJobStore | MemoryJobStore:
    """The job store `settings` describe. Raises `EvictingJobStore` when its Redis may evict; a Redis that cannot be
    reached yet is checked on first use instead."""
    url = settings.resolved_jobs_redis_url
    if url:
        store = RedisJobStore(url, settings.jobs_result_ttl_s, settings.jobs_visibility_timeout_s,
                              settings.jobs_max_backlog, settings.webhook_retry_for_s + 3600)
        try:
            store.check_durable()
        except redis.RedisError as exc:
            logger.warning("the job store %s cannot be reached (%s); its eviction policy is checked on first use",
                           redacted(url), exc)
        return store
    logger.warning("DSD_JOBS_REDIS_URL and DSD_REDIS_URL are unset: jobs run in this process and are lost when it "
                   "stops")
    return MemoryJobStore(settings.jobs_result_ttl_s, settings.jobs_max_backlog)


def cancelled_error() -> dict:
    return {"code": "cancelled", "message": "the job was cancelled", "field": None}
