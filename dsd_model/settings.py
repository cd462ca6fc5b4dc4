"""One typed settings object for every knob of the service, read once from the environment (prefix ``DSD_``).

Secrets (the API key) and process plumbing come from the environment; everything else has a default that says why.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .limits import check_size


MIN_WEBHOOK_KEY_BYTES = 24
"""The shortest signing key the Standard Webhooks specification allows."""


def resolve_device(device: str) -> str:
    """`auto` = cuda when available, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """`auto` = bfloat16 on cuda (what FLUX.1-dev was trained in), float32 elsewhere."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


class Settings(BaseSettings):
    """Where the weights are, how to run them, and the limits of the service.

    With no ``model_dir`` the embedded tiny profile is used: the real classes at a few hundred KB, built in-process
    from a fixed seed. It runs anywhere and produces noise-like images by design.
    """

    model_config = SettingsConfigDict(env_prefix="DSD_", extra="ignore", hide_input_in_errors=True)
    """Errors name the setting and the rule but never echo the value: a malformed secret would end up in the log."""

    profile: Literal["auto", "tiny", "real"] = Field(
        "auto",
        description="`auto` picks `real` when model_dir is set and `tiny` otherwise; `tiny` ignores model_dir.",
    )
    model_dir: Path | None = Field(
        None,
        description="Local FLUX.1-dev directory in diffusers layout (model_index.json, vae/, text_encoder*/, ...). "
        "Never downloaded: it must exist on disk.",
    )
    transformer_path: Path | None = Field(
        None,
        description="DSD transformer weights: a fused directory written by `dsd convert`, or the official DSD "
        "transformer directory/file (converted while loading). Defaults to <model_dir>/dsd_transformer.",
    )
    adapters: dict[str, Path] = Field(
        default_factory=dict,
        description='Named LoRA adapter files, e.g. {"identity": "/w/identity.safetensors"}. JSON in DSD_ADAPTERS.',
    )
    default_adapter: str | None = Field(
        None, description="Adapter used when a request names no mode; the first loaded adapter when unset, since a "
        "service with one adapter (the official release) should serve it without further settings.",
    )
    mode_adapters: dict[Literal["identity", "structure"], str] = Field(
        default_factory=dict,
        description='Adapter each request mode selects, e.g. {"identity": "dsd"} to serve the official LoRA loaded '
        "under another name. JSON in DSD_MODE_ADAPTERS. A mode not listed selects the adapter of its own name, so "
        "adapters named after the modes need no mapping.",
    )
    adapter_dirs: list[Path] = Field(
        default_factory=list, description='Adapter store: directories of `<name>.safetensors` adapter files that '
        'requests may name (`adapter`), e.g. ["/adapters"]. JSON in DSD_ADAPTER_DIRS. A file is loaded on first use '
        "and a file added or replaced is served without a restart (`dsd adapters publish` writes one atomically).",
    )
    adapter_cache_bytes: int = Field(
        8 * 2**30, ge=0, description="Memory for adapter store adapters loaded at once (least recently used ones are "
        "dropped beyond it, never while in use); 8 GiB hold about 19 rank-128 FLUX attention adapters (420 MiB each "
        "in bfloat16), beside the 24 GB model on an 80 GB GPU. Adapters of DSD_ADAPTERS are pinned and not counted.",
    )
    verify_weights: Literal["sizes", "full", "off"] = Field(
        "sizes", description="Check the weights against their lock file (weights.lock.json, written by `dsd weights "
        "pull`) before loading, and stop the start on a difference: `sizes` costs one stat per file and catches a "
        "missing or truncated file before minutes of loading; `full` also hashes every byte (about a minute for the "
        "~35 GB of FLUX.1-dev and DSD at the hash rate of one core, longer on a slow volume); `off` skips it. "
        "Without a lock file nothing is checked.",
    )
    weights_lock: Path | None = Field(
        None, description="The lock file to check the weights against. Unset: weights.lock.json in model_dir's "
        "parent (where `dsd weights pull` writes it) or in model_dir, when one is there.",
    )
    fuse_adapters: bool = Field(
        False,
        description="Fold the single configured adapter into the weights for speed (only with exactly one adapter).",
    )
    device: str = Field("auto", description="`auto` = cuda when available, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto` = bfloat16 on cuda (what FLUX.1-dev was trained in), float32 on cpu."
    )
    size: int = Field(512, description="Default reference/output side in pixels; the official DSD size is 512.")
    max_sequence_length: int = Field(
        512, ge=16, le=512, description="T5 prompt tokens; 512 is the official value and FLUX.1-dev's maximum."
    )

    # ---- engine
    max_batch_rows: int = Field(
        8, ge=3, le=256, description="Transformer rows per batched forward (a true-CFG request counts 3); "
        "8 keeps one H100 forward at the official canvas near its compute roofline without growing step latency much.",
    )
    max_queue: int = Field(
        64, ge=1, le=100_000, description="Waiting requests per replica before 429; about a minute of work at the "
        "official settings, so clients retry elsewhere instead of waiting minutes.",
    )
    batching: Literal["step", "request"] = Field("step", description="`request` = whole-request batching (comparison).")
    pack_sizes: Literal["auto", "on", "off"] = Field(
        "auto", description="`on`: requests of different canvas sizes share one forward, smaller canvases padded into "
        "the largest one's token grid with the padding masked out; `off`: each size is a batch of its own, stepped in "
        "turn. `auto` = on for cpu, where a forward's fixed cost outweighs the padding (tiny profile: a 64 px forward "
        "costs 3.2 ms + 2.7 ms per row), off for cuda, where a forward costs its tokens. Never with the step cache.",
    )
    request_priorities: bool = Field(
        True, description="Honour a request's `priority` (-10 to 10, higher first); off ranks every request by its "
        "arrival alone, and a request that sets one is told so in `notices`.",
    )
    priority_step_s: float = Field(
        1.0, ge=0, le=3600, description="Queue rank one level of `priority` is worth, in seconds: a priority-10 request "
        "goes ahead of requests that arrived up to 10 s before it, and no request is overtaken after waiting longer "
        "than the largest priority difference allows (20 s by default).",
    )
    jobs_aging_s: float = Field(
        60.0, ge=0, le=86_400, description="Queued jobs rank this much later than they arrived: synchronous requests "
        "(REST, gRPC) arriving within it go first, and a job that has waited this long goes ahead of every newer "
        "request, so jobs never starve; a minute keeps interactive latency while a job waits at most a minute more.",
    )
    prepare_ahead: int = Field(
        8, ge=1, le=256, description="Waiting requests prepared (prompt and reference encoded) off the denoising "
        "thread before they are admitted; 8 covers a full batch of one-row joiners at one step boundary, and each "
        "holds only its latents and embeddings (about 5 MiB at the official canvas in bfloat16).",
    )

    # ---- speed (GPU)
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the transformer blocks (regional: one graph for all 57 FLUX blocks). "
        "`auto` = on for cuda, where fused kernels pay off, off on cpu, where compiling costs more than it saves.",
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = Field(
        "default", description="torch.compile mode. `default` compiles fastest; at the official canvas every matrix "
        "multiply is large enough for cuBLAS, so autotuning gains little; `reduce-overhead` adds CUDA graphs.",
    )
    compile_row_buckets: list[int] = Field(
        [1, 2, 3, 4, 6, 8], min_length=1, description="Row counts a forward is padded up to, warmed up at start-up, "
        "so varying batches never compile while serving. Threes because a true-CFG request has three rows; up to "
        "max_batch_rows (8) padding wastes at most a sixth of a forward.",
    )
    compile_sizes: list[int] = Field(
        [512], min_length=1, description="Reference sizes compiled at start-up (the official 512); other sizes compile "
        "on their first request.",
    )
    compile_warmup: bool = Field(
        True, description="Compile every (size, row bucket, adapter) at start-up, so no request waits for a compile.",
    )
    compile_cache_dir: Path | None = Field(
        None, description="Directory (a persistent volume) for compiled artefacts, so a restart loads instead of "
        "compiling; unset keeps torch's per-process temporary cache.",
    )
    attention_backend: Literal[
        "native", "flash", "_flash_3", "sage", "_native_cudnn", "_native_flash", "_native_efficient"
    ] = Field(
        "native", description="diffusers attention backend; a backend whose kernels or device are missing falls back "
        "to native SDPA with a log line. `native` lets PyTorch pick flash/cuDNN kernels, fast on Hopper already.",
    )
    lora_fusion: Literal["auto", "unfused", "per_adapter"] = Field(
        "auto", description="`per_adapter` folds the most-used adapter of each forward into the weights (re-folded from "
        "a kept copy of the base weights when it changes) and applies the other rows' adapters as differences, saving "
        "the LoRA matmuls of uniform traffic (~30% of an adapted layer at rank 512) at the cost of one copy of the "
        "adapted weights; `unfused` applies every row's LoRA beside the base weights. `auto` = per_adapter on cuda "
        "without fp8, unfused elsewhere (fp8 weights cannot absorb a LoRA).",
    )
    quantization: Literal["none", "fp8"] = Field(
        "none", description="`fp8`: float8 weights and activations in the transformer blocks (torchao; compute "
        "capability 8.9+). Opt-in because it changes images slightly (drift reported by benchmarks/gpu_bench.py).",
    )
    step_cache_threshold: float = Field(
        0.0, ge=0, le=1, description="Per-row step cache: a row whose first-block residual changed less than this "
        "(relative L1) since its last full step reuses the rest of the model. 0 disables it: it trades exactness "
        "for speed, so it is opt-in (0.05-0.1 skips about half of the blocks on FLUX).",
    )

    # ---- caches
    redis_url: str | None = Field(
        None, description="Redis for the condition-latent and enhancement caches, e.g. redis://127.0.0.1:6379/0; "
        "unset disables them (every reference is then encoded by the VAE). A cache may evict: jobs use "
        "jobs_redis_url, and fall back to this one only when it is unset.",
    )
    latent_cache_ttl_s: int = Field(
        86_400, ge=1, description="Lifetime of a cached reference; a day spans a product session's reuse of one "
        "reference, and Redis's own eviction bounds memory before that.",
    )
    latent_cache_max_entry_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest cached value; the largest canvas (1024 x 2048) takes 4 MiB in "
        "float32, the official one 1 MiB.",
    )
    latent_cache_timeout_s: float = Field(
        0.1, gt=0, le=5, description="Connect and read timeout of one Redis call; a healthy Redis answers in about "
        "1 ms for the official canvas (benchmarks/latent_cache.py), so this only cuts off a stuck one.",
    )
    prompt_cache_size: int = Field(
        64, ge=0, le=10_000, description="Prompts whose embeddings are kept in-process (0 disables); one T5 "
        "embedding is 4 MiB in bfloat16 (512 x 4096), so 64 take 256 MiB of accelerator memory.",
    )

    # ---- prompt enhancement
    enhance_base_url: str | None = Field(
        None, description="OpenAI-compatible API root of a vision-language model that rewrites short prompts into the "
        "detailed captions DSD was trained on, e.g. https://api.openai.com/v1. Unset: enhancement is off, and a request "
        "asking for it is served with its own prompt and a notice saying so.",
    )
    enhance_model: str | None = Field(None, description="Model name the enhancement server expects; it must read images.")
    enhance_api_key: SecretStr | None = Field(None, description="Bearer token of the enhancement server; local servers "
                                              "usually need none.")
    enhance_timeout_s: float = Field(
        10.0, gt=0, le=120, description="Longest wait for an enhanced prompt before the request goes on with its own "
        "prompt; a hosted VLM writes a caption in 2-5 s, and a longer wait would add more latency than a 28-step "
        "generation on one GPU takes.",
    )
    enhance_default: bool = Field(
        False, description="Enhance the prompts of requests that do not say (`enhance_prompt` absent); off because "
        "enhancement sends the reference to another service and changes what a given prompt generates.",
    )
    enhance_concurrency: int = Field(
        8, ge=1, le=256, description="Enhancement calls in flight per replica; one batch's worth of joiners "
        "(max_batch_rows), so enhancement never holds back a full batch; later calls wait within enhance_timeout_s.",
    )
    enhance_cache_ttl_s: int = Field(
        86_400, ge=1, description="Lifetime of a cached enhanced prompt (Redis or in-process); a day, like the latent "
        "cache, spans a product session's retries of one reference and prompt.",
    )
    enhance_cache_size: int = Field(
        1024, ge=1, le=1_000_000, description="Enhanced prompts kept in-process when DSD_REDIS_URL is unset; an entry "
        "is a few KB at most, so 1024 take a few MB.",
    )

    # ---- transports
    api_key: SecretStr | None = Field(None, description="When set, requests need `Authorization: Bearer <key>`.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC listen port (0 disables the gRPC server).")
    grpc_host: str = Field("0.0.0.0", description="gRPC listen address.")
    grpc_tls_cert: Path | None = Field(
        None, description="PEM certificate chain of the gRPC server; with grpc_tls_key it turns on TLS. Unset: "
        "plaintext, for a mesh or ingress that terminates TLS in front of the pod.",
    )
    grpc_tls_key: Path | None = Field(None, description="PEM private key of grpc_tls_cert.")
    grpc_tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, gRPC clients must present a certificate it signed (mutual TLS). "
        "Unset: any client may connect, and the API key authenticates it.",
    )
    max_upload_bytes: int = Field(20 * 2**20, ge=1024, description="Largest request body / reference upload.")
    body_read_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Time to receive a whole request body before 408; the largest upload "
        "(20 MiB) arrives in 120 s at 1.4 Mbit/s, a slow mobile uplink, while a client that trickles bytes to hold "
        "a connection is cut off.",
    )
    header_read_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Time to receive a request's line and headers, from the connection's start or "
        "the end of the previous response, before 408 and a closed connection (nginx's client_header_timeout). A "
        "request head is a few KB at most, sent in well under a second even on a slow mobile link, while a client "
        "that trickles it to hold a connection is cut off; uvicorn has no such limit of its own.",
    )
    body_min_rate_bytes_s: int = Field(
        8192, ge=1, le=2**30, description="Slowest average rate of a request body after body_rate_grace_s before "
        "408 (Apache mod_reqtimeout's MinRate): every byte received adds 1/rate s to the body's time, up to "
        "body_read_timeout_s. 8 KiB/s (64 kbit/s) is below any uplink that can send a reference within "
        "body_read_timeout_s, while clients that trickle a few bytes a second to hold the upload slots "
        "(max_concurrent_uploads) lose them after the grace instead of after body_read_timeout_s.",
    )
    body_rate_grace_s: float = Field(
        10.0, gt=0, le=600, description="Time a request body may take before body_min_rate_bytes_s applies: room for "
        "TCP slow start and a mobile link's stall at the start of an upload.",
    )
    max_concurrent_uploads: int = Field(
        64, ge=1, le=10_000, description="Request bodies read at once per replica before 503; as many as the "
        "admission queue holds, and it bounds body memory and the /tmp spool at 64 x 20 MiB = 1.25 GiB.",
    )
    strict_images: bool = Field(
        False, description="Refuse references that need a conversion to 8-bit RGB (transparency, 16-bit or float "
        "pixels, CMYK, several frames) instead of converting them and reporting it in `notices`; off because product "
        "backends send such images and the official DSD code converts everything to RGB.",
    )
    max_concurrent_decodes: int = Field(
        2, ge=1, le=64, description="Reference decodes running at once; the rest wait. A 40 MP reference takes up to "
        "about 0.5 GB while it is decoded, so 2 bound that to about 1 GB, and 2 decodes of typical uploads (under "
        "0.3 s each) keep ahead of a GPU generating about one image per second.",
    )
    max_images: int = Field(4, ge=1, le=16, description="Images per request (each is one engine request).")
    default_deadline_s: float = Field(300.0, gt=0, description="Deadline when a request sets none.")
    max_deadline_s: float = Field(600.0, gt=0, description="Largest deadline a request may ask for.")
    drain_timeout_s: float = Field(
        660.0, gt=0, description="Shutdown waits this long for running work; longer than the largest deadline."
    )

    # ---- OpenAI Images API (/v1/images/*)
    image_url_secret: SecretStr | None = Field(
        None, description="Key signing the URLs of `response_format=url` outputs (HMAC-SHA256; from a Secret). Every "
        "replica needs the same key to serve the others' URLs. Unset: a random key per process, so a URL works only "
        "on the replica that made it, and only until it restarts.",
    )
    image_url_ttl_s: int = Field(
        3600, ge=60, le=7 * 86_400, description="Lifetime of an image URL and of the stored image behind it; an hour, "
        "as OpenAI's own image URLs, so clients written for those fetch in time, while the store holds only an hour "
        "of outputs.",
    )
    image_store_memory_bytes: int = Field(
        256 * 2**20, ge=2**20, description="Bytes of URL images kept in-process when DSD_REDIS_URL is unset; past it "
        "the oldest are dropped (their URLs answer 404). 256 MiB hold about 500 PNGs of the official 512 px.",
    )
    public_url: str | None = Field(
        None, description="Scheme, host and path prefix that image URLs start with, as clients reach the service "
        "(e.g. https://dsd.example.com behind the ingress). Unset: the scheme and Host of the request itself, which "
        "behind a TLS-terminating proxy is the proxy's plain-HTTP hop.",
    )

    # ---- provenance and safety
    watermark: bool = Field(
        True, description="Embed the invisible DWT-DCT-SVD watermark (service and request tag) in every output of at "
        "least 256 px a side; on by default because it is cheap next to generation: 0.25-0.4 s of one CPU core "
        "per 512 px image, off the denoising thread (benchmarks/watermark.py).",
    )
    watermark_service_id: str = Field(
        "dsd-serve", min_length=1, description="Names this service in the watermark (as a 32-bit hash); the same "
        "value must be given to `dsd verify` and is used by `POST /verify`.",
    )
    c2pa_cert_chain: Path | None = Field(
        None, description="PEM certificate chain (signing certificate first) for C2PA Content Credentials, e.g. from "
        "a mounted Secret. Unset: outputs go out unsigned, which is logged and shown by dsd_c2pa_signing_enabled 0.",
    )
    c2pa_private_key: Path | None = Field(None, description="PEM private key of the C2PA signing certificate.")
    c2pa_algorithm: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = Field(
        "es256", description="Signature algorithm of the C2PA key; ES256 (P-256) is what most C2PA CAs issue.",
    )
    c2pa_include_prompt: bool = Field(
        False, description="Write the prompt into the C2PA manifest; off because a prompt can be personal data.",
    )
    c2pa_trust_anchors: Path | None = Field(
        None, description="PEM root certificates that `POST /verify` trusts; unset, a valid signature reports "
        "`Valid` rather than `Trusted`.",
    )
    output_check_backend: Literal["classifier", "nudenet"] = Field(
        "classifier", description="What checks outputs: `classifier`, the transformers model at output_check_model "
        "(unset: no check); `nudenet`, NudeNet's packaged ONNX detector (the `[safety]` extra), which needs no "
        "model path. `classifier` by default because NudeNet is an optional extra; the gpu overlay sets `nudenet`.",
    )
    output_check_model: Path | None = Field(
        None, description="Local image-classification model (transformers layout) run on every output, e.g. an NSFW "
        "classifier. Unset: outputs are not checked. Never downloaded.",
    )
    output_check_labels: list[str] | None = Field(
        None, description="Labels of the output check that count as unsafe (JSON list). Unset: the backend's own: "
        '["nsfw"] for a classifier; for NudeNet its exposed genitalia, breast, buttocks and anus classes.',
    )
    output_check_threshold: float = Field(
        0.5, ge=0, le=1, description="An output is unsafe when an unsafe label scores at least this; 0.5 is the "
        "argmax decision of a two-label classifier.",
    )
    output_check_action: Literal["block", "blur"] = Field(
        "block", description="`block` withholds the images (422 content_policy); `blur` returns them blurred.",
    )
    input_check_backend: Literal["classifier", "nudenet"] = Field(
        "classifier", description="What checks references, as output_check_backend (NudeNet's FACE_FEMALE and "
        "FACE_MALE classes make it a real-person check too).",
    )
    input_check_model: Path | None = Field(
        None, description="Local image-classification model run on every reference, e.g. a face / real-person "
        "detector. Unset: references are not checked.",
    )
    input_check_labels: list[str] | None = Field(
        None, description='Labels that trigger the input policy (JSON list). Unset: ["face"] for a classifier, the '
        "output check's default classes for NudeNet.",
    )
    input_check_threshold: float = Field(0.5, ge=0, le=1, description="As output_check_threshold, for references.")
    input_check_policy: Literal["require_consent", "refuse"] = Field(
        "require_consent", description="A flagged reference needs `consent: true` in the request (`require_consent`) "
        "or is always refused (`refuse`).",
    )

    # ---- identity scores
    identity_default: bool = Field(
        False, description="Score every output against its reference when a request does not say (`identity` "
        "absent); off because scoring costs CPU time per image (about 0.2 s for a face at 512 px, "
        "benchmarks/identity.py).",
    )
    identity_face_threshold: float = Field(
        0.6, gt=0, le=2, description="Face distance under which an output shows the reference's person: dlib's own "
        "threshold for its 128-d descriptors (99.38 % of LFW pairs fall on the right side).",
    )
    identity_encoder_path: Path | None = Field(
        None, description="Local DINOv2 (or CLIP) directory, transformers layout, that scores references without a "
        "face. Unset: the tiny profile uses its random encoder (labelled `tiny-random-dino`), the real profile scores "
        "faces only. Never downloaded.",
    )
    max_best_of: int = Field(
        8, ge=1, le=16, description="Largest `best_of`: each candidate is one engine request, so 8 fill one batch of "
        "max_batch_rows (8) one-row requests.",
    )

    # ---- asynchronous jobs
    jobs_redis_url: str | None = Field(
        None, description="Redis of the job queue, job state, results, idempotency keys and webhook outbox, e.g. "
        "redis://dsd-jobs-redis:6379/0; unset falls back to redis_url. Jobs must not be evicted, so this Redis runs "
        "`maxmemory-policy noeviction` with persistence (AOF), apart from the evicting cache: the service refuses "
        "to start on an evicting one. Unset with redis_url unset: jobs live in the process.",
    )
    jobs_result_ttl_s: int = Field(
        86_400, ge=1, description="Lifetime of a job's state, results and idempotency key, counted from submission "
        "and again from its end; a day covers a product backend's retries and a user's return to a result, and "
        "results are then gone (410).",
    )
    jobs_visibility_timeout_s: float = Field(
        30.0, ge=1, le=3600, description="A claimed job whose replica sent no heartbeat for this long is reclaimed "
        "by another replica. The heartbeat runs every third of it, so a few slow Redis calls never lose a job; it "
        "is also how long a job of a killed replica waits before it runs again.",
    )
    jobs_pull_below: int = Field(
        1, ge=1, le=100_000, description="A replica claims a queued job only while fewer than this many requests "
        "wait in its engine: with 1 it claims only when the running batch has taken everything waiting, so long "
        "jobs go to the replicas with room instead of queueing behind busy ones.",
    )
    jobs_max_backlog: int = Field(
        1000, ge=1, le=1_000_000, description="Jobs queued or running in the shared queue before submissions get "
        "429 / RESOURCE_EXHAUSTED: each keeps its reference (up to DSD_MAX_UPLOAD_BYTES) in Redis until it runs, so "
        "this bounds Redis memory (about 1 GB for typical 1 MB uploads); KEDA adds replicas long before.",
    )
    jobs_room_wait_s: float = Field(
        10.0, gt=0, le=600, description="Longest wait of a claimed job for room in this replica's engine (interactive "
        "requests filled it after the claim) before the job goes back to the queue, without counting as an attempt, "
        "for a replica with room: about one generation on a GPU, the time a busy batch takes to free a row.",
    )
    jobs_max_attempts: int = Field(
        3, ge=1, le=100, description="Runs of one job before it fails: each lost replica costs one, so a job that "
        "kills its replica cannot take down the fleet one replica after another.",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="Standard Webhooks signing secret (`whsec_` + base64, from a Secret); without it jobs "
        "that name a webhook are refused, since unsigned callbacks cannot be trusted by the receiver.",
    )
    webhook_allow: list[str] = Field(
        default_factory=list, description='Hosts and CIDRs webhooks may reach even though they are private, '
        'loopback or link-local, e.g. ["10.0.0.0/8", "hooks.internal"]. JSON in DSD_WEBHOOK_ALLOW. Empty: public '
        "addresses only, so a request cannot point the service at the cluster's internal endpoints.",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="One delivery attempt; receivers should "
                                     "answer at once and work later, as the Standard Webhooks spec advises.")
    webhook_dns_timeout_s: float = Field(
        2.0, gt=0, le=30, description="Longest wait for the addresses of a webhook host; a healthy resolver answers "
        "in milliseconds and the C library retries a lost packet within about a second, so a lookup still pending "
        "after 2 s is a black-holed resolver: the submission gets 503, a delivery is retried later.",
    )
    webhook_dns_threads: int = Field(
        4, ge=1, le=64, description="Threads of the webhook host lookups (their own pool: a stuck resolver holds these "
        "and nothing else); 4 lookups at once cover bursts of submissions, the rest wait within the lookup timeout.",
    )
    webhook_backoff_s: float = Field(
        1.0, gt=0, le=600, description="Wait before the first retry; it doubles after each failed attempt, up to a "
        "minute between attempts.",
    )
    webhook_retry_for_s: float = Field(
        900.0, gt=0, le=86_400, description="Attempts stop this long after the first one; a quarter of an hour "
        "rides out a receiver's deploy or restart. Undelivered events stay readable with GET /v1/jobs/{id}.",
    )

    @field_validator("webhook_allow")
    @classmethod
    def _check_allow(cls, entries: list[str]) -> list[str]:
        import ipaddress

        for entry in entries:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError as exc:
                    raise ValueError(f"webhook_allow entry {entry!r} is not a CIDR: {exc}") from exc
            elif not entry or any(char in entry for char in " :@?#"):
                raise ValueError(f"webhook_allow entry {entry!r} is neither a host name, an IP address nor a CIDR")
        return entries

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        value = secret.get_secret_value()
        try:
            key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            key = b""
        if not value.startswith("whsec_") or len(key) < MIN_WEBHOOK_KEY_BYTES:
            raise ValueError(f"DSD_WEBHOOK_SECRET must be `whsec_` followed by the base64 of at least "
                             f"{MIN_WEBHOOK_KEY_BYTES} random bytes (Standard Webhooks format), e.g. `whsec_$(openssl "
                             "rand -base64 32)`")
        return secret

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ValueError(f"public_url must be an http(s) URL without query or fragment, got {url!r}")
            url = url.rstrip("/")
        return url

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: int) -> int:
        return check_size(value)

    @field_validator("compile_sizes")
    @classmethod
    def _check_compile_sizes(cls, value: list[int]) -> list[int]:
        return [check_size(size) for size in value]

    @field_validator("compile_row_buckets")
    @classmethod
    def _check_buckets(cls, value: list[int]) -> list[int]:
        if min(value) < 1:
            raise ValueError(f"compile_row_buckets must be positive row counts, got {value}")
        return value

    @model_validator(mode="after")
    def _check_real(self) -> "Settings":
        if self.pack_sizes == "on" and self.step_cache_threshold > 0:
            raise ValueError("pack_sizes 'on' cannot be combined with the step cache (DSD_STEP_CACHE_THRESHOLD > 0): "
                             "the cache compares whole rows of one canvas size")
        if self.lora_fusion == "per_adapter" and self.quantization == "fp8":
            raise ValueError("lora_fusion 'per_adapter' cannot fold adapters into fp8 weights; use 'unfused' with fp8")
        if self.profile == "real" and self.model_dir is None:
            raise ValueError("profile `real` needs model_dir (DSD_MODEL_DIR) pointing at a local FLUX.1-dev directory")
        if self.fuse_adapters and len(self.adapters) != 1:
            raise ValueError(f"fuse_adapters needs exactly one adapter, {len(self.adapters)} are configured")
        if self.default_adapter is not None and self.adapters and self.default_adapter not in self.adapters:
            raise ValueError(
                f"default_adapter {self.default_adapter!r} is not one of the configured adapters {sorted(self.adapters)}"
            )
        unloaded = {mode: name for mode, name in self.mode_adapters.items() if name not in self.adapters}
        if unloaded and self.resolved_profile == "real":
            raise ValueError(f"DSD_MODE_ADAPTERS maps {unloaded} to adapters that DSD_ADAPTERS does not configure "
                             f"({', '.join(self.adapters) or 'none'})")
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            given, missing = ("cert", "key") if self.grpc_tls_key is None else ("key", "cert")
            raise ValueError(f"DSD_GRPC_TLS_{given.upper()} is set without DSD_GRPC_TLS_{missing.upper()}; "
                             "TLS needs both the certificate and its private key")
        if self.grpc_tls_client_ca is not None and self.grpc_tls_cert is None:
            raise ValueError("DSD_GRPC_TLS_CLIENT_CA needs DSD_GRPC_TLS_CERT and DSD_GRPC_TLS_KEY: client "
                             "certificates are only verified over TLS")
        if (self.c2pa_cert_chain is None) != (self.c2pa_private_key is None):
            raise ValueError("C2PA signing needs both c2pa_cert_chain and c2pa_private_key (DSD_C2PA_CERT_CHAIN, "
                             "DSD_C2PA_PRIVATE_KEY), or neither")
        if self.enhance_base_url is not None and self.enhance_model is None:
            raise ValueError("DSD_ENHANCE_BASE_URL needs DSD_ENHANCE_MODEL: the model the enhancement server runs")
        if self.enhance_default and self.enhance_base_url is None:
            raise ValueError("DSD_ENHANCE_DEFAULT enhances every prompt and needs DSD_ENHANCE_BASE_URL and "
                             "DSD_ENHANCE_MODEL")
        if self.drain_timeout_s <= self.max_deadline_s:
            raise ValueError(
                f"drain_timeout_s ({self.drain_timeout_s}) must exceed max_deadline_s ({self.max_deadline_s}) so that "
                "shutdown never cuts a request that is still within its deadline"
            )
        return self

    @property
    def resolved_jobs_redis_url(self) -> str | None:
        return self.jobs_redis_url or self.redis_url

    @property
    def resolved_profile(self) -> Literal["tiny", "real"]:
        if self.profile == "auto":
            return "real" if self.model_dir is not None else "tiny"
        return self.profile

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    @property
    def resolved_pack_sizes(self) -> bool:
        if self.pack_sizes == "auto":
            return self.resolved_device() == "cpu" and self.step_cache_threshold == 0
        return self.pack_sizes == "on"

    def resolved_dtype(self):
        return resolve_dtype(self.dtype, self.resolved_device())
