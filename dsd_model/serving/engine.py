"""The serving engine: one per model replica, owning the pipeline on three threads.

- The denoising thread only runs forwards. At every step boundary it drops cancelled and expired requests, admits
  prepared waiting requests, runs one `DSDPipeline.step` for one canvas size, and hands the requests whose schedules
  ended to the finishing thread. Requests with different step counts, seeds, guidance, CFG scales and adapters share
  forwards (each adapter's LoRA applies to its own rows). Each canvas size is a batch of its own, and the batches
  of different sizes are stepped in turn, one forward each, so a size never waits for another to drain; with
  `pack_sizes` every size shares one forward instead (smaller canvases packed into the largest one's grid). With
  nothing to run it sleeps on the engine's condition (until the next deadline at most); it never polls.
- The preparing thread runs `DSDPipeline.prepare` for the first `prepare_ahead` waiting requests: the request's
  adapter (an adapter store loads it on first use), latent-cache lookups in Redis, VAE encode, prompt encode, noise.
  A request is admitted only once prepared, so none of that stalls the running batches.
- The finishing thread runs `DSDPipeline.finish` (VAE decode) and resolves each request's future. It also decodes
  the previews a request asked for (`GenerationRequest.preview_steps`) into `partial` events, before any final
  decode waiting beside them, so a request's partial images always come before its `done`.

Order: waiting requests are ranked by arrival, shifted by class and priority. Interactive requests (REST, gRPC) rank
as they arrive; queued jobs rank `jobs_aging_s` later, so an interactive request arriving meanwhile goes first, and a
job that has waited that long is ahead of every newer request; a request's `priority` moves it `priority_step_s`
seconds per level. Within one canvas size, admission follows the rank and the first request that does not fit (or is
not prepared yet) stops it, so none is overtaken; sizes do not block each other, so a request's wait never depends
on how many requests of another size arrive after it.

One request's fate is its own: a fault while preparing, stepping or decoding one request fails that request only
(a forward that raises is retried with each request alone), a cancelled or expired request leaves at the next step
boundary, and a future whose waiter cancelled it cancels its request and is never an error to resolve. A fault that
kills a thread fails every request in the engine at once and the engine refuses new ones (`EngineFailed`), so the
replica's liveness probe fails and it is restarted, instead of holding requests that would never resolve.

Transports call `submit` from any thread or event loop and await `Job.result()` or iterate `Job.events()`.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Literal

import torch
from PIL import Image

from .. import limits
from ..adapters import LoadedAdapter
from ..errors import (
    DeadlineExceeded, Draining, EngineFailed, InputError, InternalError, QueueFull, RequestCancelled,
)
from ..pipeline import DenoiseState, DSDPipeline, GenerationRequest, validate_request
from . import metrics

if TYPE_CHECKING:
    from .adapter_store import AdapterStore
    from .latent_cache import LatentCache

logger = logging.getLogger(__name__)

PriorityClass = Literal["interactive", "batch"]


@dataclass
class EngineConfig:
    max_batch_rows: int = 8
    """Transformer rows per forward (per canvas size); a request with true CFG counts three."""
    max_queue: int = 64
    """Waiting requests beyond the running batches; past it `submit` raises `QueueFull` at once."""
    batching: Literal["step", "request"] = "step"
    """`step`: admit at every step boundary, return each result when its own schedule ends. `request`: admit only
    into an empty engine and return the batch's results together (whole-request batching, what adaptive/dynamic
    batchers do; kept for comparison)."""
    prepare_ahead: int = 8
    """Waiting requests prepared before a batch slot frees for them; each holds its noise, condition latents and
    prompt embeddings meanwhile. As many as can join at one step boundary (`max_batch_rows` one-row requests)."""
    warmup_steps: int = 2
    jobs_aging_s: float = 60.0
    """How much later than its arrival a queued job (`priority_class="batch"`) ranks: interactive requests arriving
    within this go first, and after it the job is ahead of every newer request, so it never starves."""
    priority_step_s: float = 1.0
    """Seconds of rank one level of a request's `priority` is worth."""
    pack_sizes: bool = False
    """Step every running canvas size in one forward (`DSDPipeline.step` packs smaller canvases into the largest
    one's token grid, the padding masked out) within one row budget, instead of one forward per size in turn. Worth
    it where each forward has a fixed cost larger than the padding (the CPU, small canvases); on a GPU a forward costs
    its tokens, and padding a 512 px row to 1024 px would cost 3.4x its tokens."""

    def __post_init__(self):
        if self.max_batch_rows < 3:
            raise ValueError(f"max_batch_rows must be at least 3 (one CFG request), got {self.max_batch_rows}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (a request waits in the queue until admitted), got {self.max_queue}")
        if self.batching not in ("step", "request"):
            raise ValueError(f"batching must be 'step' or 'request', got {self.batching!r}")
        if self.prepare_ahead < 1:
            raise ValueError(f"prepare_ahead must be >= 1 (a request is prepared before it runs), got {self.prepare_ahead}")
        if self.jobs_aging_s < 0 or self.priority_step_s < 0:
            raise ValueError(f"jobs_aging_s and priority_step_s must be >= 0, got {self.jobs_aging_s} and "
                             f"{self.priority_step_s}")


@dataclass
class Event:
    """A progress event: `queued` (with `position`), `started`, `step` (i of total), `partial` (the preview `image`
    after step i of total), `done` or `failed`; `at` is its `time.monotonic()` instant."""

    kind: Literal["queued", "started", "step", "partial", "done", "failed"]
    request_id: str
    position: int = 0
    step: int = 0
    total: int = 0
    error: str = ""
    at: float = field(default_factory=time.monotonic)
    image: Image.Image | None = None


@dataclass
class Job:
    """One submitted request: its future, its progress events, and a cancel switch. Cancelling `future` cancels the
    job too."""

    request: GenerationRequest
    request_id: str
    deadline: float | None
    submitted: float
    priority: int = 0
    priority_class: PriorityClass = "interactive"
    rank: tuple[float, int] = (0.0, 0)
    """Admission order (lower first): arrival shifted by class and priority, then submission order."""
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    started: float | None = None
    finished: float | None = None
    state: DenoiseState | None = None
    adapter: LoadedAdapter | None = None
    """The adapter the preparing thread resolved (held in the adapter store until the job settles)."""
    _wake: Callable[[], None] = lambda: None
    _history: list[Event] = field(default_factory=list)
    _listeners: list[Callable[[Event], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.future.add_done_callback(lambda future: future.cancelled() and self.cancel())

    @property
    def size(self) -> int:
        return self.request.size

    @property
    def rows(self) -> int:
        return self.request.max_rows

    @property
    def history(self) -> list[Event]:
        with self._lock:
            return list(self._history)

    def cancel(self, reason: str = "cancelled") -> None:
        """Leave the batch at the next step boundary (or never start). `reason` "timeout": the caller's copy of the
        deadline fired first (a gRPC deadline), so the job ends as timed out rather than cancelled."""
        self.cancel_reason = reason
        self.cancelled.set()
        self._wake()

    def emit(self, event: Event) -> None:
        with self._lock:
            self._history.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    async def result(self, cancel_reason: Callable[[], str] = lambda: "cancelled") -> "JobResult":
        """The job's result. Cancelling the wait cancels the job for the reason `cancel_reason()` gives then; the
        engine's future itself is shielded, so the reason is set before the job is cancelled."""
        try:
            return await asyncio.shield(asyncio.wrap_future(self.future))
        except asyncio.CancelledError:
            self.cancel(cancel_reason())
            raise

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
    """Owns `pipe`; see the module docstring for its threads and the batching policy. With a `latent_cache`,
    requests that carry an `image_digest` take their condition latents from it (on the preparing thread). With an
    `adapter_store`, a request may name any adapter of the store, loaded on the preparing thread on first use."""

    def __init__(self, pipe: DSDPipeline, config: EngineConfig | None = None,
                 latent_cache: LatentCache | None = None, adapter_store: AdapterStore | None = None):
        self.pipe = pipe
        self.config = config or EngineConfig()
        self.latent_cache = latent_cache
        self.adapter_store = adapter_store
        self._waiting: list[Job] = []
        """Sorted by `Job.rank`."""
        self._running: list[Job] = []
        self._finishing: deque[Job] = deque()
        self._previews: deque[tuple[Job, DenoiseState]] = deque()
        """Jobs with a preview to decode, each with a copy of its state at that step holding the preview."""
        self._lock = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._draining = False
        self._stopped = False
        self._failed: str | None = None
        self._ready = threading.Event()
        self._request_seconds = 0.0
        self._last_size = 0
        """Canvas size of the last forward: the next forward is of the next larger size running (in turn)."""
        self._order = itertools.count()
        self._failure_listeners: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self, warmup: bool = True) -> None:
        """Start the threads; with `warmup`, run one short generation per named adapter before `ready`."""
        if self._threads:
            raise RuntimeError("engine already started")
        for name, loop in (("denoise", self._denoise_loop), ("prepare", self._prepare_loop),
                           ("finish", self._finish_loop)):
            self._threads.append(threading.Thread(target=self._run, args=(name, loop), name=f"dsd-engine-{name}",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()
        if warmup:
            self._warm_up()
        self._ready.set()
        logger.info("engine ready (max_batch_rows=%d, max_queue=%d, prepare_ahead=%d)", self.config.max_batch_rows,
                    self.config.max_queue, self.config.prepare_ahead)

    def _warm_up(self) -> None:
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        for adapter in self.pipe.adapters.names or [None]:
            request = GenerationRequest(image=image, prompt="warm-up", num_inference_steps=self.config.warmup_steps,
                                        size=64, seed=0, adapter=adapter)
            self.submit(request, request_id=f"warmup-{adapter}").future.result()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._draining and self._failed is None

    @property
    def alive(self) -> bool:
        """False once a thread died of an unexpected fault: the process should be restarted."""
        return self._failed is None

    @property
    def draining(self) -> bool:
        return self._draining

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """Call `listener(reason)` (on the dying thread) when a thread dies and the engine fails."""
        self._failure_listeners.append(listener)

    def stop_admitting(self) -> None:
        """Refuse new requests from now on (`Draining`); queued and running ones continue."""
        with self._lock:
            self._draining = True
            self._lock.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting, let queued and running requests finish (deadlines still apply), stop the threads.
        Returns False when `timeout` passed first; what was left is then cancelled."""
        self.stop_admitting()
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._busy:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._lock.wait(remaining)
            clean = not self._busy
            for job in list(self._waiting) + self._running:
                job.cancelled.set()
            self._stopped = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        return clean

    @property
    def _busy(self) -> bool:
        return bool(self._waiting or self._running or self._finishing or self._previews)

    # ------------------------------------------------------------------ admission

    def submit(self, request: GenerationRequest, deadline: float | None = None, request_id: str | None = None,
               priority: int = 0, priority_class: PriorityClass = "interactive") -> Job:
        """Queue `request`. `deadline` is a `time.monotonic()` instant; `priority` (higher first, within
        [MIN_PRIORITY, MAX_PRIORITY]) and `priority_class` rank it (see the module docstring). Raises `InputError`,
        `QueueFull` or `Draining` at once instead of waiting."""
        validate_request(request)
        self.check_adapter(request.adapter)
        if isinstance(priority, bool) or not isinstance(priority, int) or not (
                limits.MIN_PRIORITY <= priority <= limits.MAX_PRIORITY):
            raise InputError("priority", f"{priority!r} is not an integer in [{limits.MIN_PRIORITY}, "
                                         f"{limits.MAX_PRIORITY}]")
        if priority_class not in ("interactive", "batch"):
            raise ValueError(f"priority_class must be 'interactive' or 'batch', got {priority_class!r}")
        submitted = time.monotonic()
        shift = (self.config.jobs_aging_s if priority_class == "batch" else 0.0) - priority * self.config.priority_step_s
        job = Job(request=request, request_id=request_id or uuid.uuid4().hex, deadline=deadline, submitted=submitted,
                  priority=priority, priority_class=priority_class, rank=(submitted + shift, next(self._order)),
                  _wake=self._wake)
        with self._lock:
            self._refuse_when_full()
            position = bisect.bisect(self._waiting, job.rank, key=lambda waiting: waiting.rank)
            self._waiting.insert(position, job)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._lock.notify_all()
        job.emit(Event("queued", job.request_id, position=position + 1, total=request.num_inference_steps))
        return job

    def check_adapter(self, name: str | None) -> None:
        """Raise an `InputError` listing the adapters there are unless `name` (None: the base model) is one."""
        if name is None:
            return
        if self.adapter_store is not None:
            self.adapter_store.check(name)
        elif name not in self.pipe.adapters.names:
            raise InputError("adapter", f"{name!r} is not loaded; loaded: {self.pipe.adapters.names}")

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def check_admission(self) -> None:
        """Raise `Draining` or `QueueFull` where `submit` would now, without queuing anything: transports call it
        before costly work (decoding the reference) for a request that would be refused anyway."""
        with self._lock:
            self._refuse_when_full()

    def _refuse_when_full(self) -> None:
        """Count and raise a rejection when no request is admitted (caller holds the lock)."""
        if self._failed is not None:
            metrics.REQUESTS_REJECTED.labels(reason="engine_failed").inc()
            raise EngineFailed(self._failed)
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
        """Requests admitted and not yet resolved: denoising or being decoded."""
        return len(self._running) + len(self._finishing)

    # ------------------------------------------------------------------ the threads

    def _run(self, name: str, loop: Callable[[], None]) -> None:
        """Run one thread's loop; an exception that escapes it fails the engine (`_fail`)."""
        try:
            loop()
        except BaseException as exc:
            logger.critical("engine thread %r died; failing every request and refusing new ones", name, exc_info=exc)
            self._fail(name, exc)

    def _fail(self, thread: str, exc: BaseException) -> None:
        """Fail every request in the engine, refuse new ones, stop the other threads; `alive` turns False."""
        metrics.ENGINE_FAILURES.labels(thread=thread).inc()
        with self._lock:
            self._failed = f"{thread} thread: {type(exc).__name__}"
            jobs = self._waiting + self._running + list(self._finishing)
            self._waiting.clear()
            self._running.clear()
            self._finishing.clear()
            self._previews.clear()
            self._stopped = True
            metrics.QUEUE_DEPTH.set(0)
            self._lock.notify_all()
        for job in jobs:
            self._settle(job, error=InternalError(job.request_id))
        for listener in self._failure_listeners:
            listener(self._failed)

    def _wait_for(self, take: Callable[[], object], timeout: Callable[[], float | None] = lambda: None):
        """Sleep on the condition until `take()` (called with the lock held) returns work; None once stopped and
        idle."""
        with self._lock:
            while True:
                if self._failed is not None:
                    return None
                work = take()
                if work:
                    return work
                if self._stopped and not self._busy:
                    return None
                self._lock.wait(timeout())

    def _denoise_loop(self) -> None:
        while batch := self._wait_for(self._next_batch, self._until_next_deadline):
            self._step(batch)

    def _prepare_loop(self) -> None:
        while job := self._wait_for(self._next_to_prepare):
            self._prepare(job)

    def _finish_loop(self) -> None:
        while job := self._wait_for(self._next_to_finish):
            self._finish(job)

    # ------------------------------------------------------------------ denoising (the denoising thread)

    def _next_batch(self) -> list[Job]:
        """Drop cancelled and expired jobs, admit, and return the jobs of the next canvas size to step (caller holds
        the lock)."""
        self._drop_finished_early()
        self._admit()
        if self.config.batching == "request" and self._running and all(job.state.done for job in self._running):
            # a whole-request batch whose last unfinished request was cancelled or expired returns the rest now
            self._finishing.extend(self._running)
            self._running.clear()
            self._lock.notify_all()
        sizes = sorted({job.size for job in self._running if not job.state.done})
        metrics.SIZE_GROUPS.set(len(sizes))
        if not sizes:
            return []
        if self.config.pack_sizes:
            return [job for job in self._running if not job.state.done]
        size = next((s for s in sizes if s > self._last_size), sizes[0])
        self._last_size = size
        return [job for job in self._running if job.size == size and not job.state.done]

    def _until_next_deadline(self) -> float | None:
        deadlines = [job.deadline for job in self._waiting if job.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _drop_finished_early(self) -> None:
        """Remove cancelled and expired jobs from the queue and the batches (caller holds the lock)."""
        now = time.monotonic()
        for container in (self._waiting, self._running):
            for job in list(container):
                if job.cancelled.is_set() and job.cancel_reason != "timeout":
                    container.remove(job)
                    metrics.REQUESTS_CANCELLED.inc()
                    self._settle(job, error=RequestCancelled(job.request_id))
                elif job.cancelled.is_set() or (job.deadline is not None and now >= job.deadline):
                    container.remove(job)
                    metrics.REQUESTS_TIMED_OUT.inc()
                    step = job.state.step_index if job.state is not None else 0
                    self._settle(job, error=DeadlineExceeded(job.request_id, step, job.request.num_inference_steps))
        metrics.QUEUE_DEPTH.set(len(self._waiting))

    def _admit(self) -> None:
        """Move prepared waiting jobs into the batch of their canvas size, in rank order, while they fit its row
        budget. In each size the first job that does not fit (or is not prepared yet) stops admission of that size,
        so none is overtaken by a job of its own size; other sizes go on (caller holds the lock). With `pack_sizes`
        every size shares one forward and one budget, so the first job that does not fit stops all admission.
        Whole-request batching admits only into an empty engine, the sizes of the first waiting job only."""
        if not self._waiting or (self.config.batching == "request" and self._running):
            return
        budget = (lambda job: 0) if self.config.pack_sizes else (lambda job: job.size)
        rows = Counter()
        for job in self._running:
            rows[budget(job)] += job.rows
        blocked = set()
        if self.config.batching == "request":
            blocked = {job.size for job in self._waiting} - {self._waiting[0].size}
        now = time.monotonic()
        for job in list(self._waiting):
            if budget(job) in blocked or job.size in blocked:
                continue
            if job.state is None or rows[budget(job)] + job.rows > self.config.max_batch_rows:
                blocked.add(budget(job))
                continue
            self._waiting.remove(job)
            rows[budget(job)] += job.rows
            self._running.append(job)
            job.started = now
            metrics.QUEUE_WAIT.labels(priority_class=job.priority_class).observe(now - job.submitted)
            job.emit(Event("started", job.request_id, total=job.request.num_inference_steps))
        metrics.QUEUE_DEPTH.set(len(self._waiting))

    def _step(self, batch: list[Job]) -> None:
        """One step of `batch` (one canvas size); if the forward raises, each job is stepped alone so that only a job
        whose own forward fails is failed."""
        started = time.monotonic()
        try:
            self.pipe.step([job.state for job in batch])
            stepped = batch
        except Exception:
            logger.exception("step of %s failed%s", [job.request_id for job in batch],
                             "; stepping each request alone" if len(batch) > 1 else "")
            stepped = [job for job in batch if self._step_alone(job)] if len(batch) > 1 else []
        else:
            metrics.STEP_DURATION.observe(time.monotonic() - started)
            self._count_forward(batch)
        for job in stepped:
            job.emit(Event("step", job.request_id, step=job.state.step_index, total=job.state.num_steps))
        failed = [job for job in batch if job not in stepped]
        previews = [(job, dataclasses.replace(job.state, extras={"preview": job.state.extras.pop("preview")}))
                    for job in stepped if "preview" in job.state.extras]
        with self._lock:
            self._previews.extend(previews)
            for job in failed:
                self._running.remove(job)
            finished = [job for job in self._running if job.state.done]
            if self.config.batching == "request" and len(finished) < len(self._running):
                finished = []  # a whole-request batch returns all its results together, when its longest request ends
            for job in finished:
                self._running.remove(job)
                self._finishing.append(job)
            self._lock.notify_all()
        for job in failed:
            self._settle(job, error=InternalError(job.request_id))

    def _count_forward(self, batch: list[Job]) -> None:
        rows = Counter()
        for job in batch:
            adapter = job.adapter.name if job.adapter is not None else "none"
            rows[(adapter, str(job.size))] += job.state.request.rows_at(job.state.step_index - 1)
        for (adapter, size), count in rows.items():
            metrics.FORWARD_ROWS.labels(adapter=adapter, size=size).inc(count)
        metrics.BATCH_ROWS.observe(sum(rows.values()))
        metrics.FORWARDS.labels(kind="mixed" if len({job.adapter for job in batch}) > 1 else "single").inc()

    def _step_alone(self, job: Job) -> bool:
        try:
            self.pipe.step([job.state])
        except Exception:
            logger.exception("step of request %s failed", job.request_id)
            return False
        return True

    # ------------------------------------------------------------------ preparing (the preparing thread)

    def _next_to_prepare(self) -> Job | None:
        """The first waiting job not prepared yet, while fewer than `prepare_ahead` prepared jobs wait (caller holds
        the lock)."""
        prepared = 0
        for job in self._waiting:
            if job.state is not None:
                prepared += 1
            elif not job.cancelled.is_set() and prepared < self.config.prepare_ahead:
                return job
        return None

    def _prepare(self, job: Job) -> None:
        try:
            job.adapter = self._acquire_adapter(job.request.adapter)
            state = self.pipe.prepare([job.request], [self._condition_parameters(job.request)], [job.adapter])[0]
        except Exception as exc:  # a fault while preparing fails this request, never the engine
            if not isinstance(exc, InputError):
                logger.exception("preparing %s failed", job.request_id)
            with self._lock:
                if job in self._waiting:
                    self._waiting.remove(job)
                    metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._settle(job, error=exc if isinstance(exc, InputError) else InternalError(job.request_id))
            return
        with self._lock:
            job.state = state
            self._lock.notify_all()

    def _acquire_adapter(self, name: str | None) -> LoadedAdapter | None:
        if self.adapter_store is not None:
            return self.adapter_store.acquire(name)
        return self.pipe.adapters.get(name)

    def _condition_parameters(self, request: GenerationRequest) -> torch.Tensor | None:
        """Condition-latent distribution through the latent cache: a hit skips the VAE, a miss is encoded and
        stored. None where there is no cache or no digest: `prepare` encodes those."""
        if self.latent_cache is None or request.image_digest is None:
            return None
        parameters = self.latent_cache.get(request.image_digest, request.size)
        if parameters is None:
            parameters = self.pipe.encode_condition_distribution(request.image, request.size)
            self.latent_cache.put(request.image_digest, request.size, parameters)
        return parameters

    # ------------------------------------------------------------------ finishing (the finishing thread)

    def _next_to_finish(self) -> Job | tuple[Job, DenoiseState] | None:
        if self._previews:
            return self._previews.popleft()
        return self._finishing[0] if self._finishing else None

    def _finish(self, work: Job | tuple[Job, DenoiseState]) -> None:
        if isinstance(work, tuple):
            self._emit_preview(*work)
            return
        job = work
        try:
            image = self.pipe.finish(job.state)
        except Exception:  # a fault while decoding fails this request, never the engine
            logger.exception("decoding %s failed", job.request_id)
            image = None
        with self._lock:
            self._finishing.popleft()
        if image is None:
            self._settle(job, error=InternalError(job.request_id))
        else:
            run = time.monotonic() - job.started
            self._request_seconds = run if not self._request_seconds else 0.8 * self._request_seconds + 0.2 * run
            self._settle(job, JobResult(image=image, seed=job.state.seed, request_id=job.request_id,
                                        queue_seconds=job.started - job.submitted, run_seconds=run))

    def _emit_preview(self, job: Job, state: DenoiseState) -> None:
        """Decode the preview into a `partial` event; the preview of a job that ended (cancelled, expired) is
        dropped, and a fault while decoding one costs the request that partial image only."""
        if not job.cancelled.is_set() and not job.future.done():
            try:
                image = self.pipe.preview(state)
            except Exception:
                logger.exception("decoding the preview of %s after step %d failed", job.request_id, state.step_index)
            else:
                job.emit(Event("partial", job.request_id, step=state.step_index, total=state.num_steps, image=image))
        with self._lock:
            self._lock.notify_all()

    # ------------------------------------------------------------------ outcomes

    def _settle(self, job: Job, result: JobResult | None = None, error: Exception | None = None) -> None:
        """Resolve the job's future, emit its last event, release its adapter, and wake the threads and `drain` (the
        job has left the engine). A future its waiter already cancelled stays cancelled: nobody waits for the
        outcome, which is not an error."""
        job.finished = time.monotonic()
        if self.adapter_store is not None and job.adapter is not None:
            self.adapter_store.release(job.adapter)
            job.adapter = None
        try:
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
        except InvalidStateError:
            pass
        if error is None:
            job.emit(Event("done", job.request_id, step=job.state.num_steps, total=job.state.num_steps))
        else:
            job.emit(Event("failed", job.request_id, error=str(error)))
        self._wake()
