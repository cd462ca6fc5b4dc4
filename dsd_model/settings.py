"""One typed settings object for every knob of the service, read once from the environment (prefix ``DSD_``).

Secrets (the API key) and process plumbing come from the environment; everything else has a default that says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .limits import check_size


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

    model_config = SettingsConfigDict(env_prefix="DSD_", extra="ignore")

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

    # ---- caches
    redis_url: str | None = Field(
        None, description="Redis for the condition-latent cache, e.g. redis://127.0.0.1:6379/0; unset disables it "
        "(every reference is then encoded by the VAE).",
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
    max_images: int = Field(4, ge=1, le=16, description="Images per request (each is one engine request).")
    default_deadline_s: float = Field(300.0, gt=0, description="Deadline when a request sets none.")
    max_deadline_s: float = Field(600.0, gt=0, description="Largest deadline a request may ask for.")
    drain_timeout_s: float = Field(
        660.0, gt=0, description="Shutdown waits this long for running work; longer than the largest deadline."
    )

    # ---- asynchronous jobs
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
        if secret is not None:
            from standardwebhooks import Webhook

            try:
                Webhook(secret.get_secret_value())
            except Exception as exc:
                raise ValueError("webhook_secret must be `whsec_` followed by base64 (Standard Webhooks format)") from exc
        return secret

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: int) -> int:
        return check_size(value)

    @model_validator(mode="after")
    def _check_real(self) -> "Settings":
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
        if self.drain_timeout_s <= self.max_deadline_s:
            raise ValueError(
                f"drain_timeout_s ({self.drain_timeout_s}) must exceed max_deadline_s ({self.max_deadline_s}) so that "
                "shutdown never cuts a request that is still within its deadline"
            )
        return self

    @property
    def resolved_profile(self) -> Literal["tiny", "real"]:
        if self.profile == "auto":
            return "real" if self.model_dir is not None else "tiny"
        return self.profile

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def resolved_dtype(self):
        return resolve_dtype(self.dtype, self.resolved_device())
