"""The serving engine: one per model replica, owning the pipeline on one worker thread.

Requests are batched at every denoising step (continuous batching): at each step boundary the engine drops
cancelled and expired requests, admits compatible waiting requests (same canvas size and adapter) up to a row
budget, runs one batched forward through `DSDPipeline.step`, and finishes the requests whose schedules ended.
Requests with different step counts, seeds, guidance and CFG scales share forwards.

Adapters take turns: the running batch admits requests of its own kind only while the oldest waiting request is
of the same kind; otherwise it drains and the next batch takes the oldest waiting request's kind.

Transports call `submit` from any thread or event loop and await `Job.result()` or iterate `Job.events()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Literal

import torch
from PIL import Image

from . import metrics
from .errors import DeadlineExceeded, Draining, InputError, InternalError, QueueFull, RequestCancelled
from .pipeline import DenoiseState, DSDPipeline, GenerationRequest, validate_request

if TYPE_CHECKING:
    from .latent_cache import LatentCache

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_rows: int = 8
    """Transformer rows per forward; a request with true CFG counts three."""
    max_queue: int = 64
    """Waiting requests beyond the running batch; past it `submit` raises `QueueFull` at once."""
    batching: Literal["step", "request"] = "step"
    """`step`: admit at every step boundary, return each result when its own schedule ends. `request`: admit only
    into an empty batch and return the batch's results together (whole-request batching, what adaptive/dynamic
    batchers do; kept for comparison)."""
    warmup_steps: int = 2

    def __post_init__(self):
        if self.max_batch_rows < 3:
            raise ValueError(f"max_batch_rows must be at least 3 (one CFG request), got {self.max_batch_rows}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (a request waits in the queue until admitted), got {self.max_queue}")
        if self.batching not in ("step", "request"):
            raise ValueError(f"batching must be 'step' or 'request', got {self.batching!r}")


@dataclass
class Event:
    """A progress event: `queued` (with `position`), `started`, `step` (i of total), `done` or `failed`."""

    kind: Literal["queued", "started", "step", "done", "failed"]
    request_id: str
    position: int = 0
    step: int = 0
    total: int = 0
    error: str = ""


@dataclass
class Job:
    """One submitted request: its future, its progress events, and a cancel switch."""

    request: GenerationRequest
    request_id: str
    deadline: float | None
    submitted: float
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    finished: float | None = None
    state: DenoiseState | None = None
    _history: list[Event] = field(default_factory=list)
    _listeners: list[Callable[[Event], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> tuple:
        return (self.request.size, self.request.adapter)

    @property
    def rows(self) -> int:
        return self.request.max_rows

    @property
    def history(self) -> list[Event]:
        with self._lock:
            return list(self._history)

    def cancel(self) -> None:
        """Leave the batch at the next step boundary (or never start)."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        with self._lock:
            self._history.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    async def result(self) -> "JobResult":
        return await asyncio.wrap_future(self.future)

    async def events(self) -> AsyncIterator[Event]:
        """Every event of this job, from the first, ending after `done` or `failed`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def listener(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        with self._lock:
            backlog = list(self._history)
            self._listeners.append(listener)
        try:
            for event in backlog:
                queue.put_nowait(event)
            while True:
                event = await queue.get()
                yield event
                if event.kind in ("done", "failed"):
                    return
        finally:
            with self._lock:
                self._listeners.remove(listener)


@dataclass
class JobResult:
    image: Image.Image
    seed: int
    request_id: str
    queue_seconds: float
    run_seconds: float


class Engine:
    """Owns `pipe` on one worker thread; see the module docstring for the batching policy. With a `latent_cache`,
    requests that carry an `image_digest` take their condition latents from it."""

    def __init__(self, pipe: DSDPipeline, config: EngineConfig | None = None,
                 latent_cache: LatentCache | None = None):
        self.pipe = pipe
        self.config = config or EngineConfig()
        self.latent_cache = latent_cache
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._draining = False
        self._stopped = False
        self._ready = threading.Event()
        self._request_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self, warmup: bool = True) -> None:
        """Start the worker thread; with `warmup`, run one short generation per adapter before `ready`."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="dsd-engine", daemon=True)
        self._thread.start()
        if warmup:
            self._warm_up()
        self._ready.set()
        logger.info("engine ready (max_batch_rows=%d, max_queue=%d)", self.config.max_batch_rows,
                    self.config.max_queue)

    def _warm_up(self) -> None:
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        for adapter in self.pipe.adapters.names or [None]:
            request = GenerationRequest(image=image, prompt="warm-up", num_inference_steps=self.config.warmup_steps,
                                        size=64, seed=0, adapter=adapter)
            self.submit(request, request_id=f"warmup-{adapter}").future.result()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    def stop_admitting(self) -> None:
        """Refuse new requests from now on (`Draining`); queued and running ones continue."""
        with self._lock:
            self._draining = True
            self._lock.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting, let queued and running requests finish (deadlines still apply), stop the worker.
        Returns False when `timeout` passed first; what was left is then cancelled."""
        self.stop_admitting()
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._waiting or self._running:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._lock.wait(remaining if remaining is not None else 0.5)
            clean = not (self._waiting or self._running)
            for job in list(self._waiting) + self._running:
                job.cancel()
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return clean

    # ------------------------------------------------------------------ admission

    def submit(self, request: GenerationRequest, deadline: float | None = None, request_id: str | None = None) -> Job:
        """Queue `request`. `deadline` is a `time.monotonic()` instant. Raises `InputError`, `QueueFull` or
        `Draining` at once instead of waiting."""
        validate_request(request)
        if request.adapter is not None and request.adapter not in self.pipe.adapters.names:
            raise InputError("adapter", f"{request.adapter!r} is not loaded; loaded: {self.pipe.adapters.names}")
        job = Job(request=request, request_id=request_id or uuid.uuid4().hex, deadline=deadline,
                  submitted=time.monotonic())
        with self._lock:
            self._refuse_when_full()
            self._waiting.append(job)
            position = len(self._waiting)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._lock.notify_all()
        job.emit(Event("queued", job.request_id, position=position, total=request.num_inference_steps))
        return job

    def check_admission(self) -> None:
        """Raise `Draining` or `QueueFull` where `submit` would now, without queuing anything: transports call it
        before costly work (decoding the reference) for a request that would be refused anyway."""
        with self._lock:
            self._refuse_when_full()

    def _refuse_when_full(self) -> None:
        """Count and raise a rejection when no request is admitted (caller holds the lock)."""
        if self._draining or self._stopped:
            metrics.REQUESTS_REJECTED.labels(reason="draining").inc()
            raise Draining()
        if len(self._waiting) >= self.config.max_queue:
            metrics.REQUESTS_REJECTED.labels(reason="queue_full").inc()
            raise QueueFull(len(self._waiting), self._retry_after())

    def _retry_after(self) -> float:
        """Seconds until a queue slot is likely free: one average request time per batch of waiting requests."""
        per_request = self._request_seconds or 1.0
        batches = math.ceil((len(self._waiting) + 1) / max(1, self.config.max_batch_rows))
        return max(1.0, math.ceil(per_request * batches))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stopped and not self._running and not self._waiting:
                    return
                self._drop_finished_early()
                admitted = self._admit()
            try:
                self._prepare(admitted)
            except Exception:  # a fault while preparing fails the admitted requests, never the engine
                logger.exception("preparing %s failed", [job.request_id for job in admitted])
                self._fail_all(admitted)
            batch = [job for job in self._running if job.state is not None and not job.state.done]
            try:
                if batch:
                    self._step(batch)
            except Exception:  # a fault in one forward fails its batch, never the engine
                logger.exception("step of batch %s failed", [job.request_id for job in batch])
                self._fail_all(batch)
            with self._lock:
                self._lock.notify_all()

    def _fail_all(self, jobs: list[Job]) -> None:
        with self._lock:
            for job in jobs:
                if job in self._running:
                    self._running.remove(job)
        for job in jobs:
            self._fail(job, InternalError(job.request_id))

    def _drop_finished_early(self) -> None:
        """Remove cancelled and expired jobs from the queue and the batch (caller holds the lock)."""
        now = time.monotonic()
        for container in (self._waiting, self._running):
            for job in list(container):
                if job.cancelled.is_set():
                    container.remove(job)
                    metrics.REQUESTS_CANCELLED.inc()
                    self._fail(job, RequestCancelled(job.request_id))
                elif job.deadline is not None and now >= job.deadline:
                    container.remove(job)
                    metrics.REQUESTS_TIMED_OUT.inc()
                    step = job.state.step_index if job.state is not None else 0
                    self._fail(job, DeadlineExceeded(job.request_id, step, job.request.num_inference_steps))
        metrics.QUEUE_DEPTH.set(len(self._waiting))

    def _admit(self) -> list[Job]:
        """Move waiting jobs into the batch, first come first served, while they share the batch's canvas size and
        adapter and fit the row budget; the first job that does not stops admission, so none is overtaken
        (caller holds the lock)."""
        if not self._waiting or (self.config.batching == "request" and self._running):
            return []
        key = self._running[0].key if self._running else self._waiting[0].key
        rows = sum(job.rows for job in self._running)
        admitted = []
        while self._waiting and self._waiting[0].key == key and rows + self._waiting[0].rows <= self.config.max_batch_rows:
            job = self._waiting.popleft()
            rows += job.rows
            admitted.append(job)
        self._running.extend(admitted)
        metrics.QUEUE_DEPTH.set(len(self._waiting))
        return admitted

    def _prepare(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        now = time.monotonic()
        for job in jobs:
            job.started = now
            metrics.QUEUE_WAIT.observe(now - job.submitted)
            job.emit(Event("started", job.request_id, total=job.request.num_inference_steps))
        self.pipe.set_adapter(jobs[0].request.adapter)
        requests = [job.request for job in jobs]
        states = self.pipe.prepare(requests, self._condition_parameters(requests))
        for job, state in zip(jobs, states):
            job.state = state

    def _condition_parameters(self, requests: list[GenerationRequest]) -> list[torch.Tensor | None] | None:
        """Condition-latent distributions through the latent cache: a hit skips the VAE, a miss is encoded once per
        distinct reference and stored. None where there is no cache or no digest: `prepare` encodes those."""
        if self.latent_cache is None:
            return None
        found: dict[tuple[str, int], torch.Tensor] = {}
        for request in requests:
            key = (request.image_digest, request.size)
            if request.image_digest is None or key in found:
                continue
            parameters = self.latent_cache.get(*key)
            if parameters is None:
                parameters = self.pipe.encode_condition_distribution(request.image, request.size)
                self.latent_cache.put(*key, parameters)
            found[key] = parameters
        return [found.get((request.image_digest, request.size)) for request in requests]

    def _step(self, batch: list[Job]) -> None:
        self.pipe.set_adapter(batch[0].request.adapter)
        rows = sum(job.state.rows for job in batch)
        started = time.monotonic()
        self.pipe.step([job.state for job in batch])
        metrics.STEP_DURATION.observe(time.monotonic() - started)
        metrics.BATCH_ROWS.observe(rows)
        for job in batch:
            job.emit(Event("step", job.request_id, step=job.state.step_index, total=job.state.num_steps))
        finished = [job for job in self._running if job.state is not None and job.state.done]
        if self.config.batching == "request" and len(finished) < len(self._running):
            finished = []  # a whole-request batch returns all its results together, when its longest request ends
        for job in finished:
            image = self.pipe.finish(job.state)
            with self._lock:
                self._running.remove(job)
            job.finished = time.monotonic()
            run = job.finished - job.started
            self._request_seconds = run if not self._request_seconds else 0.8 * self._request_seconds + 0.2 * run
            job.future.set_result(JobResult(image=image, seed=job.state.seed, request_id=job.request_id,
                                            queue_seconds=job.started - job.submitted, run_seconds=run))
            job.emit(Event("done", job.request_id, step=job.state.num_steps, total=job.state.num_steps))

    def _fail(self, job: Job, error: EngineError) -> None:
        job.finished = time.monotonic()
        if not job.future.done():
            job.future.set_exception(error)
        job.emit(Event("failed", job.request_id, error=str(error)))
