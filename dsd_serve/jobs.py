"""Asynchronous jobs: submission and queries on the shared store (`job_store`), and the worker that runs jobs on
this replica.

    submit (the same checks as /generate) → store (state, canvas-sized reference, queue entry, idempotency key)
           → Worker of a replica with room → Runtime.submit → progress and the result into the store (stored once,
           with its webhook in the outbox) → the outbox sender of any replica → webhook

A replica claims a job only while its engine has room (DSD_JOBS_PULL_BELOW) and sends a heartbeat from the claim
on; a job whose replica stopped sending heartbeats for DSD_JOBS_VISIBILITY_TIMEOUT_S is claimed by another replica,
so it runs at least once, and its end is written once. A claimed job that finds no room in the engine within
DSD_JOBS_ROOM_WAIT_S goes back to the queue without counting as an attempt. State, results and idempotency keys live
DSD_JOBS_RESULT_TTL_S, so with Redis every replica answers for every job; without Redis jobs are lost with the
process.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from datetime import datetime, timezone

import httpx
import redis

from dsd_model.errors import ContentPolicyError, DeadlineExceeded, Draining, InputError, QueueFull, RequestCancelled
from dsd_model.serving import metrics
from dsd_model.settings import Settings

from . import webhooks
from .job_store import (CLAIM_BLOCK_S, JOB_ID, TERMINAL, Claim, Delivery, EvictingJobStore, JobSpec, JobStoreError,
                        JobStoreFull, cancelled_error, caller_of, check_idempotency_key, open_store, submitted_at)

__all__ = ["TERMINAL", "JobEnded", "JobNotFound", "Jobs", "JobSpec", "JobStoreError", "caller_of", "cancelled_error"]

logger = logging.getLogger(__name__)

RETRY_SUBMIT_S = 0.2
"""Wait before submitting again when the engine queue filled between the claim and the submission."""
STORE_RETRY_S = 1.0
"""Wait of the worker after a failed Redis call (Redis restarting or unreachable)."""
EVICTING_RETRY_S = 30.0
"""Wait of the worker before it looks again at a job store that may evict (an operator has to change it)."""
OUTBOX_POLL_S = 0.1
"""How often a replica looks for due webhook deliveries; bounds how late a retry goes out after its backoff."""
DELIVERIES_IN_FLIGHT = 16
"""Webhook attempts one replica runs at once; more due deliveries wait in the outbox, where any replica takes them."""
LEASE_MARGIN_S = 5.0
"""A delivery's lease outlasts its attempt (lookup and POST timeouts) by this much before another replica retries it."""


class JobNotFound(LookupError):
    """No such job: never issued (`expired` False), or its results are past DSD_JOBS_RESULT_TTL_S."""

    def __init__(self, message: str, expired: bool = False):
        self.expired = expired
        super().__init__(message)


class JobEnded(Exception):
    """The job already ended, so it cannot be cancelled; or it has not succeeded, so it has no images."""


def error_of(exc: BaseException) -> dict:
    """The stored error of a failed job: a client fault names its field, anything else is an internal error."""
    if isinstance(exc, InputError):
        return {"code": "invalid_argument", "message": str(exc), "field": exc.field}
    if isinstance(exc, ContentPolicyError):
        return {"code": "content_policy", "message": str(exc), "field": exc.field}
    if isinstance(exc, DeadlineExceeded):
        return {"code": "deadline_exceeded", "message": str(exc), "field": "deadline_s"}
    return {"code": "internal", "message": "internal error; the server log names the job id", "field": None}


class Jobs:
    """The job API of one replica: submission and queries on the shared store, and the worker that runs jobs here.
    Every method may be called from any event loop; store calls run in threads. Raises `EvictingJobStore` when the
    job Redis may evict keys."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = open_store(settings)
        self.resolver = webhooks.Resolver(settings)
        self.worker: Worker | None = None

    async def call(self, method: str, *args):
        try:
            return await asyncio.to_thread(getattr(self.store, method), *args)
        except redis.OutOfMemoryError as exc:
            raise JobStoreFull("the job store is full (its Redis reached maxmemory); retry when running jobs have "
                               "ended") from exc
        except redis.RedisError as exc:
            raise JobStoreError(f"the job store is unreachable ({type(exc).__name__})") from exc
        except EvictingJobStore as exc:
            logger.error("%s", exc)
            raise JobStoreError("the job store is misconfigured (it may evict jobs); the server log says how to fix "
                                "it") from exc

    async def submit(self, runtime, spec: JobSpec, upload: bytes, idempotency_key: str | None,
                     caller: str) -> tuple[str, bool]:
        """Check the request as `Runtime.submit` would, then queue it with the canvas-sized reference (not the
        upload). `caller` (`caller_of`) namespaces the idempotency key. Raises `InputError` naming the field,
        `ContentPolicyError` when the safety input check refuses the reference."""
        reference = await check_input(runtime, spec, upload, self.resolver, self.settings)
        spec.notices = reference.notices
        canvas = await asyncio.to_thread(png, reference.image)
        return await self.call("submit", spec, canvas, spec.fingerprint(upload),
                               check_idempotency_key(idempotency_key), caller)

    async def view(self, job_id: str) -> dict:
        """The job's status document; raises `JobNotFound` for a malformed, unknown or expired id."""
        if not JOB_ID.match(job_id):
            raise JobNotFound(f"{job_id!r} is not a job id (28 hexadecimal digits)")
        view = job_view(job_id, await self.call("get", job_id), self.settings)
        if view is not None:
            return view
        if time.time() - submitted_at(job_id) > self.settings.jobs_result_ttl_s:
            raise JobNotFound(f"job {job_id} and its results expired; results are kept "
                              f"{self.settings.jobs_result_ttl_s} s (DSD_JOBS_RESULT_TTL_S)", expired=True)
        raise JobNotFound(f"no job {job_id}")

    async def cancel(self, job_id: str) -> dict:
        """Cancel a queued job at once, a running one at its next step; raises `JobEnded` when it already ended."""
        view = await self.view(job_id)
        if view["status"] in TERMINAL:
            raise JobEnded(f"job {job_id} already {view['status']}")
        await self.call("cancel", job_id)
        return await self.view(job_id)

    def watch(self, job_id: str):
        """Async context manager giving `wait(timeout)`, which returns once the job may have changed or after
        `timeout`; read the job (`view`) again after each."""
        return self.store.watch(job_id)

    @staticmethod
    def result_of(view: dict) -> dict:
        """The result of a job `view`; raises `JobEnded` unless it succeeded."""
        if view["result"] is None:
            raise JobEnded(f"job {view['id']} is {view['status']}; images exist once it succeeded")
        return view["result"]

    async def images(self, view: dict) -> list[bytes]:
        return [await self.call("image", view["id"], index) for index in range(len(self.result_of(view)["images"]))]

    def start_worker(self, runtime) -> None:
        self.worker = Worker(self.store, runtime, self.resolver, self.settings)
        self.worker.start()

    def stop_claiming(self) -> None:
        if self.worker is not None:
            self.worker.claiming.clear()

    def stop(self, timeout: float) -> None:
        if self.worker is not None:
            self.worker.stop(timeout)
        self.resolver.close()
        self.store.close()


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


async def check_input(runtime, spec: JobSpec, upload: bytes, resolver: webhooks.Resolver, settings: Settings):
    """Refuse at submission what the run would refuse, so a client learns the field at once; returns the reference
    reduced to the canvas it feeds."""
    unknown = sorted(set(spec.webhook_events) - set(webhooks.EVENTS))
    if unknown:
        raise InputError("webhook_events", f"{unknown} are not events; choose from {list(webhooks.EVENTS)}")
    if spec.webhook is not None:
        if settings.webhook_secret is None:
            raise InputError("webhook", "this server has no webhook secret (DSD_WEBHOOK_SECRET), so it sends none")
        try:
            await webhooks.check_url(spec.webhook, resolver, settings)
        except webhooks.LookupTimeout as exc:
            raise JobStoreError(f"{exc}; retry the submission") from exc
    return await runtime.check_request(spec.params, upload)


class Run:
    """A job claimed by this replica: its claim, its engine submission once it has one, and why it was stopped
    (`lost` to another replica, or `cancelled` by a client) when it was."""

    def __init__(self, claim: Claim, task: asyncio.Task):
        self.claim = claim
        self.task = task
        self.submission = None
        self.stopped: str | None = None
        self.ending = False
        """Its end is being stored: the entry leaves the queue, and the heartbeat stops mattering."""

    def stop(self, why: str) -> None:
        self.stopped = why
        if self.submission is not None:
            self.submission.cancel()
        else:
            self.task.cancel()


class Worker:
    """Claims jobs while the engine has room and runs each as a `Runtime.submit`, and sends the webhooks due in the
    outbox, on its own thread and event loop. Shutdown: `claiming` is cleared (no new claims), jobs the engine
    refuses are given back to the queue, and `stop` waits for the running ones to store their results; webhook
    attempts in flight are abandoned to the outbox, where another replica sends them once their lease ends."""

    def __init__(self, store, runtime, resolver: webhooks.Resolver, settings: Settings):
        self.store, self.runtime, self.resolver, self.settings = store, runtime, resolver, settings
        self.claiming = threading.Event()
        self.claiming.set()
        self.starting = 0
        """Claimed jobs not yet in the engine queue; they count as waiting."""
        self.tasks: set[asyncio.Task] = set()
        """Jobs running here."""
        self.deliveries: set[asyncio.Task] = set()
        """Webhook attempts in flight."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dsd-jobs", daemon=True)
        self._main: asyncio.Future | None = None
        self._sender: asyncio.Future | None = None
        self._webhooks: httpx.AsyncClient | None = None

    def start(self) -> None:
        self._thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._claim_loop(), self._loop)
        self._sender = asyncio.run_coroutine_threadsafe(self._send_loop(), self._loop)

    def stop(self, timeout: float) -> None:
        self.claiming.clear()
        try:
            self._main.result(timeout=CLAIM_BLOCK_S + STORE_RETRY_S + 5)
        except TimeoutError:
            logger.warning("the job claim loop did not stop; its claim is reclaimed after the visibility timeout")
        try:
            asyncio.run_coroutine_threadsafe(self._wind_down(), self._loop).result(timeout)
        except TimeoutError:
            logger.warning("jobs still running at shutdown are left to another replica")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _wind_down(self) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        self._sender.cancel()
        for delivery in list(self.deliveries):
            delivery.cancel()
        if self._webhooks is not None:
            await self._webhooks.aclose()

    def has_room(self) -> bool:
        return self.runtime.engine.queue_depth + self.starting < self.settings.jobs_pull_below

    async def _claim_loop(self) -> None:
        last_backlog = 0.0
        while self.claiming.is_set():
            try:
                if time.monotonic() - last_backlog > 1.0:
                    metrics.JOBS_BACKLOG.set(await asyncio.to_thread(self.store.backlog))
                    last_backlog = time.monotonic()
                if not self.has_room():
                    await asyncio.sleep(0.05)
                    continue
                claim = await asyncio.to_thread(self.store.claim)
            except redis.RedisError as exc:
                logger.warning("job queue unreachable (%s); retrying in %.0f s", exc, STORE_RETRY_S)
                await asyncio.sleep(STORE_RETRY_S)
                continue
            except EvictingJobStore as exc:
                logger.error("no jobs are claimed: %s", exc)
                await asyncio.sleep(EVICTING_RETRY_S)
                continue
            if claim is None:
                continue
            if not self.claiming.is_set():
                await asyncio.to_thread(self.store.requeue, claim, False)
                return
            self.starting += 1
            task = asyncio.create_task(self._run(claim))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, claim: Claim) -> None:
        run = Run(claim, asyncio.current_task())
        watch = asyncio.create_task(self._watch(run))
        try:
            await self._execute(run)
        except asyncio.CancelledError:
            if run.stopped is None:
                raise
            asyncio.current_task().uncancel()
            if run.stopped == "cancelled":
                await self._finish(run, "canceled", {"error": json.dumps(cancelled_error())})
        except Draining:
            await asyncio.to_thread(self.store.requeue, claim, True)
        except Exception as exc:
            if not isinstance(exc, (InputError, ContentPolicyError, DeadlineExceeded, redis.RedisError)):
                logger.error("job %s failed", claim.job_id, exc_info=exc)
            if isinstance(exc, redis.RedisError):
                logger.warning("job %s: the store is unreachable (%s); another replica will run it", claim.job_id, exc)
            else:
                await self._finish(run, "failed", {"error": json.dumps(error_of(exc))})
        finally:
            watch.cancel()
            if run.submission is None:
                self.starting -= 1

    async def _execute(self, run: Run) -> None:
        store, claim = self.store, run.claim
        previous, attempts = await asyncio.to_thread(store.start, claim.job_id)
        if claim.reclaimed and previous == "running":
            metrics.JOBS_RECLAIMED.inc()
            logger.info("job %s reclaimed from a replica that stopped sending heartbeats", claim.job_id)
        if attempts == 0:
            await asyncio.to_thread(store.done, claim)
            return
        if attempts > self.settings.jobs_max_attempts:
            error = {"code": "internal", "field": None,
                     "message": f"the job's replica was lost on each of {attempts - 1} runs; it is not run again"}
            await self._finish(run, "failed", {"error": json.dumps(error)})
            return
        loaded = await asyncio.to_thread(store.reference, claim.job_id)
        if loaded is None:
            await asyncio.to_thread(store.done, claim)
            return
        spec, image = loaded
        give_up = time.monotonic() + self.settings.jobs_room_wait_s
        while True:
            try:
                submission = await self.runtime.submit(spec.params, image, request_id=claim.job_id,
                                                       priority_class="batch")
                break
            except QueueFull:
                if time.monotonic() > give_up:
                    logger.info("job %s found no room in the engine for %g s; back to the queue", claim.job_id,
                                self.settings.jobs_room_wait_s)
                    await asyncio.to_thread(store.requeue, claim, True)
                    return
                await asyncio.sleep(RETRY_SUBMIT_S)
        run.submission = submission
        self.starting -= 1
        await self._follow(run, spec)

    async def _follow(self, run: Run, spec: JobSpec) -> None:
        """Record progress, pass cancellation on, and store the result."""
        store, claim, submission = self.store, run.claim, run.submission
        steps = [0] * len(submission.jobs)
        total = spec.params.steps * len(submission.jobs)
        try:
            async for index, event in submission.events():
                if event.kind == "step":
                    steps[index] = event.step
                    try:
                        await asyncio.to_thread(store.progress, claim.job_id, sum(steps), total)
                    except redis.RedisError as exc:
                        logger.warning("job %s: progress not recorded (%s)", claim.job_id, exc)
            try:
                result = await submission.result()
            except RequestCancelled:
                if run.stopped == "lost":
                    return
                if run.stopped == "cancelled" or await asyncio.to_thread(store.cancel_requested, claim.job_id):
                    await self._finish(run, "canceled", {"error": json.dumps(cancelled_error())})
                else:
                    await asyncio.to_thread(store.requeue, claim, True)
                return
        except BaseException:
            submission.cancel()
            raise
        params = spec.params
        summary = {"count": len(result.images), "seeds": result.seeds, "format": params.output_format,
                   "mode": params.mode, "adapter": submission.adapter, "provenance_id": submission.provenance_id,
                   "size": submission.size,
                   "profile": self.runtime.profile,
                   "notice": self.runtime.notice, "notices": spec.notices + submission.notices,
                   "timings": {"queue_s": result.queue_seconds, "run_s": result.run_seconds,
                               "total_s": result.total_seconds}, **result.identity_json()}
        await self._finish(run, "succeeded", {"result": json.dumps(summary), "step": total, "total": total},
                           result.images)

    async def _watch(self, run: Run) -> None:
        """From the claim on: a heartbeat every third of the visibility timeout, and a look for a client's cancel
        every 0.25 s; stops the run when another replica reclaimed the job or a client cancelled it."""
        beat = self.settings.jobs_visibility_timeout_s / 3
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(0.25, beat))
            if run.ending:
                return
            try:
                if time.monotonic() - last >= beat:
                    last = time.monotonic()
                    if not await asyncio.to_thread(self.store.heartbeat, run.claim):
                        logger.warning("job %s was reclaimed by another replica or ended; stopping here",
                                       run.claim.job_id)
                        run.stop("lost")
                        return
                if await asyncio.to_thread(self.store.cancel_requested, run.claim.job_id):
                    run.stop("cancelled")
                    return
            except redis.RedisError as exc:
                logger.warning("job %s heartbeat failed (%s)", run.claim.job_id, exc)

    async def _finish(self, run: Run, state: str, fields: dict, images: list[bytes] = ()) -> None:
        """Store the end once (its webhook goes into the outbox in the same step) and release the queue entry.
        Redis being unreachable is retried for a visibility timeout; after that another replica runs the job again."""
        run.ending = True
        claim = run.claim
        give_up = time.monotonic() + self.settings.jobs_visibility_timeout_s
        while True:
            try:
                stored = await asyncio.to_thread(self.store.finish, claim.job_id, state, fields, images)
                await asyncio.to_thread(self.store.done, claim)
                break
            except redis.RedisError:
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(STORE_RETRY_S)
        if stored:
            metrics.JOBS_FINISHED.labels(state=state).inc()
            metrics.JOB_DURATION.labels(state=state).observe(max(0.0, time.time() - submitted_at(claim.job_id)))

    async def _send_loop(self) -> None:
        """Take due webhook deliveries from the outbox (any replica's) and send each once."""
        self._webhooks = webhooks.client(self.settings)
        lease_s = self.settings.webhook_timeout_s + self.settings.webhook_dns_timeout_s + LEASE_MARGIN_S
        while True:
            delivery = None
            if len(self.deliveries) < DELIVERIES_IN_FLIGHT:
                try:
                    delivery = await asyncio.to_thread(self.store.take_delivery, lease_s)
                except redis.RedisError as exc:
                    logger.warning("webhook outbox unreachable (%s); retrying in %.0f s", exc, STORE_RETRY_S)
                    await asyncio.sleep(STORE_RETRY_S)
                    continue
            if delivery is None:
                await asyncio.sleep(OUTBOX_POLL_S)
                continue
            task = asyncio.create_task(self._send(delivery))
            self.deliveries.add(task)
            task.add_done_callback(self.deliveries.discard)

    async def _send(self, delivery: Delivery) -> None:
        """One attempt of `delivery`, then remove it (sent, refused for good, or past DSD_WEBHOOK_RETRY_FOR_S) or
        schedule the next one. Every attempt is logged and counted."""
        try:
            view = job_view(delivery.job_id, await asyncio.to_thread(self.store.get, delivery.job_id), self.settings)
        except redis.RedisError as exc:
            logger.warning("webhook %s: the job store is unreachable (%s); it is attempted again after its lease",
                           delivery.id, exc)
            return
        if view is None:
            outcome, detail = "refused", "the job expired before its webhook was sent"
        else:
            payload = {"type": delivery.event, "timestamp": iso_time(view["finished_at"] or delivery.ended),
                       "data": view}
            outcome, detail = await webhooks.attempt(self._webhooks, self.resolver, delivery.url, delivery.id,
                                                     payload, self.settings)
        metrics.WEBHOOK_ATTEMPTS.labels(outcome=outcome).inc()
        logger.info("webhook %s attempt %d to %s: %s (%s)", delivery.id, delivery.attempts, delivery.url, outcome,
                    detail)
        retry_at = time.time() + webhooks.backoff(delivery.attempts, self.settings)
        if outcome == "delivered":
            metrics.WEBHOOK_LATENCY.observe(max(0.0, time.time() - delivery.ended))
            retry_at = None
        elif view is None or retry_at > delivery.ended + self.settings.webhook_retry_for_s:
            metrics.WEBHOOK_ABANDONED.inc()
            logger.warning("webhook %s to %s abandoned after %d attempts", delivery.id, delivery.url,
                           delivery.attempts)
            retry_at = None
        try:
            await asyncio.to_thread(self.store.settle_delivery, delivery, retry_at)
        except redis.RedisError as exc:
            logger.warning("webhook %s: the outbox is unreachable (%s); it is attempted again after its lease",
                           delivery.id, exc)


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_view(job_id: str, fields: dict | None, settings: Settings) -> dict | None:
    """The status document of a job (REST body, webhook data): state, position, progress, times, error, results."""
    if fields is None:
        return None
    result = json.loads(fields["result"]) if "result" in fields else None
    if result is not None:
        result["images"] = [f"/v1/jobs/{job_id}/images/{index}" for index in range(result.pop("count"))]
    finished = float(fields["finished"]) if "finished" in fields else None
    return {
        "id": job_id,
        "status": fields["state"],
        "position": fields.get("position"),
        "progress": {"step": int(fields.get("step", 0)), "total": int(fields.get("total", 0))},
        "attempts": int(fields.get("attempts", 0)),
        "created_at": float(fields["created"]),
        "started_at": float(fields["started"]) if "started" in fields else None,
        "finished_at": finished,
        "expires_at": (finished or float(fields["created"])) + settings.jobs_result_ttl_s,
        "error": json.loads(fields["error"]) if "error" in fields else None,
        "result": result,
        "links": {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events",
                  "cancel": f"/v1/jobs/{job_id}/cancel"},
    }
