"""What every transport shares: the loaded pipeline, its engine, and the request path between them.

    transport → Runtime.submit(params, image bytes) → Submission (engine jobs) → result() / events() → encode
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator, Callable, TypeVar

from PIL import Image, ImageColor

from dsd_model import GenerationRequest, InputError, limits
from dsd_model.images import Reference, read_reference
from dsd_model.loading import MODES, TINY_NOTICE, adapter_for_mode, load_pipeline
from dsd_model.scoring.identity import IdentityScore, open_identity_scorer
from dsd_model.serving import metrics, provenance
from dsd_model.serving.adapter_store import AdapterInfo, AdapterStore
from dsd_model.serving.engine import Engine, EngineConfig, Event, Job, JobResult, PriorityClass
from dsd_model.serving.enhance import open_enhancer
from dsd_model.serving.identity import Candidate, IdentityStage
from dsd_model.serving.latent_cache import open_latent_cache
from dsd_model.serving.outputs import OutputStage
from dsd_model.serving.provenance import Claim
from dsd_model.settings import Settings

from .schemas import GenerateParams

logger = logging.getLogger(__name__)
T = TypeVar("T")

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def canvas_digest(image: Image.Image) -> str:
    """sha256 of a preprocessed reference (its size, mode and pixels): the latent-cache key of what the VAE encodes,
    so two requests share condition latents only when their canvases are the same, whatever the upload's bytes,
    background or conversions were."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc `malloc_trim`): the buffers of a large decode are freed
    in a worker thread's arena, where they would otherwise stay resident. A no-op on other C libraries."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


@dataclass
class GenerationResult:
    images: list[bytes]
    seeds: list[int]
    request_id: str
    queue_seconds: float
    run_seconds: float
    total_seconds: float
    identity: list[IdentityScore] | None = None
    """The identity score of each image, when the request asked for scores."""
    candidates: list[Candidate] | None = None
    """Every candidate of a best-of request with its score, in seed order."""

    def identity_json(self) -> dict:
        """`identity` and `candidates` as JSON values (None when not scored), for responses and job results."""
        return {"identity": None if self.identity is None else [score.to_dict() for score in self.identity],
                "candidates": None if self.candidates is None else [c.to_dict() for c in self.candidates]}


@dataclass
class Submission:
    """The engine jobs of one transport request (one per requested image, or per candidate under best_of)."""

    params: GenerateParams
    size: int
    request_id: str
    provenance_id: str
    """The id the images' watermark and C2PA manifest carry, made by the server for this request
    (`Claim.provenance_id`); `request_id` may be the client's."""
    jobs: list[Job]
    arrived: float
    finish: Callable[[Image.Image], bytes]
    """Checks, marks, encodes and signs one output image (`OutputStage.finish` bound to this request)."""
    notices: list[str] = field(default_factory=list)
    """What was done to the inputs (`dsd_model.images`, `DSDPipeline.check_prompt`, prompt enhancement) and what the
    outputs lack (`OutputStage.notices`), for the response."""
    enhanced_prompt: str | None = None
    """The prompt the jobs generate from when enhancement replaced `params.prompt`."""
    adapter: str | None = None
    """The adapter the images are generated with (named by the request or selected by its mode)."""
    reference: Image.Image | None = None
    """The reference as the model saw it: what identity scores compare with."""
    identity: IdentityStage | None = None
    """Set when the request wants identity scores."""

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel every job; `reason` as in `Job.cancel`."""
        for job in self.jobs:
            job.cancel(reason)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(image index, event) for every job, as they happen, until all jobs ended."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: Job) -> None:
            async for event in job.events():
                await queue.put((index, event))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(self.jobs)]
        try:
            remaining = len(tasks)
            while remaining:
                index, event = await queue.get()
                if event is None:
                    remaining -= 1
                else:
                    yield index, event
        finally:
            for task in tasks:
                task.cancel()

    async def result(self, cancel_reason: Callable[[], str] = lambda: "cancelled") -> GenerationResult:
        """Wait for every image; if the wait is cancelled (client gone, or the transport's deadline fired) the jobs are
        cancelled too, for the reason `cancel_reason()` gives then."""
        try:
            results: list[JobResult] = await asyncio.gather(*(job.result(cancel_reason) for job in self.jobs))
        except BaseException:
            self.cancel(cancel_reason())
            raise
        timings = dict(queue_seconds=max(r.queue_seconds for r in results),  # over every best-of candidate
                       run_seconds=max(r.run_seconds for r in results))
        identity = candidates = None
        if self.identity is not None:
            keep = self.params.num_images if self.params.best_of is not None else None
            selection = await self.identity.select(self.reference, [r.image for r in results],
                                                   [r.seed for r in results], keep)
            results = [results[i] for i in selection.indices]
            identity, candidates = selection.identity, selection.candidates
        images = await asyncio.to_thread(lambda: [self.finish(r.image) for r in results])
        return GenerationResult(
            images=images,
            seeds=[r.seed for r in results],
            request_id=self.request_id,
            total_seconds=time.monotonic() - self.arrived,
            identity=identity,
            candidates=candidates,
            **timings,
        )


class Runtime:
    """One model replica: settings, pipeline and engine, started and drained with the server."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.pipe = load_pipeline(self.settings)
        self.adapter_store = AdapterStore(self.pipe.adapters, self.settings.adapter_dirs,
                                          self.settings.adapter_cache_bytes)
        self.engine = Engine(
            self.pipe,
            EngineConfig(
                max_batch_rows=self.settings.max_batch_rows,
                max_queue=self.settings.max_queue,
                batching=self.settings.batching,
                prepare_ahead=self.settings.prepare_ahead,
                jobs_aging_s=self.settings.jobs_aging_s,
                priority_step_s=self.settings.priority_step_s,
                pack_sizes=self.settings.resolved_pack_sizes,
            ),
            latent_cache=open_latent_cache(self.settings, self.pipe.vae),
            adapter_store=self.adapter_store,
        )
        self.outputs = OutputStage(self.settings)
        self.enhancer = open_enhancer(self.settings)
        self.identity = IdentityStage(self.settings, open_identity_scorer(self.settings, self.profile))
        self._decoder = ThreadPoolExecutor(self.settings.max_concurrent_decodes, thread_name_prefix="dsd-decode")
        """Decodes wait here for a thread, so waiting holds no thread of either transport's event loop."""

    @property
    def profile(self) -> str:
        return self.pipe.profile

    @property
    def notice(self) -> str | None:
        return TINY_NOTICE if self.profile == "tiny" else None

    def start(self) -> None:
        self.engine.start()

    def drain(self) -> bool:
        drained = self.engine.drain(timeout=self.settings.drain_timeout_s)
        if self.enhancer is not None:
            self.enhancer.close()
        self.identity.close()
        return drained

    def check_limits(self, params: GenerateParams, image: bytes) -> str | None:
        """Refuse a request beyond the service's limits with an `InputError` naming the field; the adapter it names,
        or the one its mode selects."""
        if params.num_images > self.settings.max_images:
            raise InputError("num_images", f"{params.num_images} exceeds the limit of {self.settings.max_images}")
        deadline_s = params.deadline_s if params.deadline_s is not None else self.settings.default_deadline_s
        if deadline_s > self.settings.max_deadline_s:
            raise InputError("deadline_s", f"{deadline_s} exceeds the limit of {self.settings.max_deadline_s} s")
        if len(image) > self.settings.max_upload_bytes:
            raise InputError("image", f"{len(image)} bytes exceeds the limit of {self.settings.max_upload_bytes}")
        self.identity.check(params.identity, params.best_of, params.num_images)
        if params.adapter is not None:
            if params.mode is not None:
                raise InputError("adapter", "cannot be given together with `mode`; name the adapter, or the mode that "
                                            "selects one (DSD_MODE_ADAPTERS)")
            self.engine.check_adapter(params.adapter)
            return params.adapter
        return adapter_for_mode(self.pipe, params.mode, self.adapter_store.names())

    def adapters(self) -> list[AdapterInfo]:
        """Every adapter this replica serves (pinned and store), with the modes that select each."""
        modes = {mode: self.pipe.mode_adapters.get(mode, mode) for mode in MODES}
        return self.adapter_store.listing(modes)

    async def check_request(self, params: GenerateParams, image: bytes) -> Reference:
        """Everything `submit` refuses about the request itself (limits, mode, prompt windows, the reference, the
        safety input check), without queuing it: what a job is checked with when it is submitted. Returns the
        reference reduced to the canvas it feeds."""
        self.check_limits(params, image)
        await asyncio.to_thread(self.check_prompts, params)
        size = params.size if params.size is not None else self.settings.size
        reference = await self.read_reference(image, size, ImageColor.getrgb(params.background))
        await asyncio.to_thread(self.outputs.safety.check_input, reference.image, params.consent, "job-submission")
        return reference

    async def decode(self, function: Callable[[], T]) -> T:
        """`function()` (a decode of uploaded bytes) on the decode pool: at most `max_concurrent_decodes` run at once,
        whichever route they serve, and each hands its memory back to the system when done."""

        def run() -> T:
            try:
                return function()
            finally:
                release_free_memory()

        return await asyncio.get_running_loop().run_in_executor(self._decoder, run)

    async def read_reference(self, image: bytes, size: int, background: tuple[int, int, int]) -> Reference:
        """The reference reduced to the canvas it feeds."""
        return await self.decode(partial(read_reference, image, "image", size=size, background=background,
                                         strict=self.settings.strict_images))

    async def verify(self, image: bytes) -> dict:
        """The provenance of an encoded image (`provenance.verify`), read on the decode pool."""
        return await self.decode(partial(provenance.verify, image, self.settings.watermark_service_id,
                                         self.settings.c2pa_trust_anchors))

    def check_prompts(self, params: GenerateParams) -> list[str]:
        notices = self.pipe.check_prompt(params.prompt, "prompt")
        if params.negative_prompt:
            notices += self.pipe.check_prompt(params.negative_prompt, "negative_prompt")
        return notices

    async def enhance_prompt(self, params: GenerateParams, reference: Reference) -> tuple[str | None, list[str]]:
        """The enhanced prompt when the request asks for one (or the server enhances by default) and it fits the T5
        window, with its notices; (None, why not) when the prompt stays as given."""
        wanted = params.enhance_prompt if params.enhance_prompt is not None else self.settings.enhance_default
        if not wanted:
            return None, []
        if self.enhancer is None:
            metrics.PROMPT_ENHANCEMENTS.labels(outcome="failed").inc()
            return None, ["enhance_prompt: this server has no enhancement model configured (DSD_ENHANCE_BASE_URL); "
                          "the prompt was used as given"]
        enhancement = await self.enhancer.enhance(reference.image, params.prompt)
        if enhancement.prompt is None:
            metrics.PROMPT_ENHANCEMENTS.labels(outcome=enhancement.outcome).inc()
            return None, [enhancement.notice]
        try:
            notices = await asyncio.to_thread(self.pipe.check_prompt, enhancement.prompt, "enhanced_prompt")
        except InputError as exc:
            metrics.PROMPT_ENHANCEMENTS.labels(outcome="too_long").inc()
            return None, [f"{exc}; the prompt was used as given"]
        metrics.PROMPT_ENHANCEMENTS.labels(outcome=enhancement.outcome).inc()
        return enhancement.prompt, notices

    async def submit(self, params: GenerateParams, image: bytes, request_id: str | None = None,
                     priority_class: PriorityClass = "interactive", preview_steps: tuple[int, ...] = (),
                     output_quality: int | None = None) -> Submission:
        """Validate against the service limits, refuse at once what the engine would refuse, decode the reference
        into the canvas it feeds, enhance the prompt when asked, and queue one engine job per image, ranked by
        `priority_class` (`batch` for queued jobs) and the request's `priority`. Raises `InputError`, `QueueFull` or
        `Draining` at once. `preview_steps`: steps after which each job emits a `partial` event with a preview
        (`GenerationRequest.preview_steps`); `output_quality`: JPEG/WebP quality of the outputs (`encode_image`)."""
        arrived = time.monotonic()
        request_id = request_id or uuid.uuid4().hex
        adapter = self.check_limits(params, image)
        deadline_s = params.deadline_s if params.deadline_s is not None else self.settings.default_deadline_s
        size = params.size if params.size is not None else self.settings.size
        prompt_notices = await asyncio.to_thread(self.check_prompts, params)
        self.engine.check_admission()
        reference = await self.read_reference(image, size, ImageColor.getrgb(params.background))
        await asyncio.to_thread(self.outputs.safety.check_input, reference.image, params.consent, request_id)
        enhanced_prompt, enhance_notices = await self.enhance_prompt(params, reference)
        prompt = enhanced_prompt or params.prompt
        image_digest = canvas_digest(reference.image)
        priority, priority_notices = self.priority(params)
        first_seed = params.seed if params.seed is not None else secrets.randbelow(limits.MAX_SEED)
        jobs: list[Job] = []
        try:
            for index in range(self.identity.candidates(params.num_images, params.best_of)):
                request = GenerationRequest(
                    image=reference.image,
                    prompt=prompt,
                    negative_prompt=params.negative_prompt,
                    num_inference_steps=params.steps,
                    guidance_scale=params.guidance,
                    image_guidance_scale=params.image_guidance,
                    text_guidance_scale=params.text_guidance,
                    size=size,
                    seed=(first_seed + index) % (limits.MAX_SEED + 1),
                    adapter=adapter,
                    image_digest=image_digest,
                    exact=params.exact,
                    preview_steps=preview_steps,
                )
                jobs.append(self.engine.submit(request, deadline=arrived + deadline_s, request_id=f"{request_id}-{index}",
                                               priority=priority, priority_class=priority_class))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        provenance_id = uuid.uuid4().hex
        logger.info("request %s: provenance id %s", request_id, provenance_id)
        claim = Claim(request_id=request_id, provenance_id=provenance_id, model=self.outputs.model_name,
                      adapter=adapter, profile=self.profile, prompt=prompt)
        finish = partial(self.outputs.finish, output_format=params.output_format, claim=claim,
                         quality=output_quality)
        scored = self.identity.wanted(params.identity, params.best_of)
        return Submission(params=params, size=size, request_id=request_id, provenance_id=provenance_id, jobs=jobs,
                          arrived=arrived, finish=finish, adapter=adapter,
                          notices=reference.notices + prompt_notices + enhance_notices + priority_notices
                          + self.outputs.notices(size) + (self.identity.notices() if scored else []),
                          enhanced_prompt=enhanced_prompt, reference=reference.image,
                          identity=self.identity if scored else None)

    def priority(self, params: GenerateParams) -> tuple[int, list[str]]:
        """The request's priority as the engine ranks it, and a notice when the server ignores it."""
        if params.priority is None or params.priority == 0:
            return 0, []
        if not self.settings.request_priorities:
            return 0, [f"priority: {params.priority} was ignored; this server ranks every request alike "
                       "(DSD_REQUEST_PRIORITIES=false)"]
        return params.priority, []
