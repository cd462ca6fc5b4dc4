"""Condition latents in Redis: the VAE posterior of a reference canvas, keyed by content and shared by replicas.

Product backends send the same reference with many prompts; a hit replaces the VAE encode by one GET. The value is
the posterior's parameters (mean and log-variance), not a sample, so a hit reproduces a miss exactly for the same
seed (DESIGN.md section 4).

    key    dsd:condition:p<preprocessing version>:<VAE identity>:<size>:<sha256 of the preprocessed reference>

The digest is of the reference as the VAE sees it (cropped, resized, composited on its background, converted), not
of the uploaded bytes: the same upload with another background or size is another canvas and another entry.
    value  b"DSDL" | header length (4 bytes, little endian) | JSON {shape, dtype, sha256 of the data} | raw data

Fail-open: Redis unreachable, slow (past `timeout_s`) or holding a value that does not decode is counted in
`dsd_cache_errors_total` and served as a miss. After a failed call the cache is skipped for `backoff_s`, then tried
again, so it resumes by itself when Redis is back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from urllib.parse import urlsplit

import redis
import torch
from diffusers import AutoencoderKL
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import images
from ..pipeline import VAE_SCALE_FACTOR
from ..settings import Settings
from . import metrics

logger = logging.getLogger(__name__)

MAGIC = b"DSDL"


def tensor_bytes(tensor: torch.Tensor):
    """The raw bytes of `tensor` (any dtype, any device) as a contiguous buffer."""
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def vae_identity(vae: AutoencoderKL) -> str:
    """Which VAE computes the latents: a digest of its config and weights, then its dtype and device type.
    Reads every weight once (a fraction of a second for the FLUX VAE): compute it at load, not per request."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor_bytes(tensor))
    return f"{digest.hexdigest()[:16]}-{dtype_name(vae.dtype)}-{vae.device.type}"


def encode_parameters(parameters: torch.Tensor) -> bytes:
    data = tensor_bytes(parameters)
    header = {"shape": list(parameters.shape), "dtype": dtype_name(parameters.dtype),
              "sha256": hashlib.sha256(data).hexdigest()}
    encoded = json.dumps(header).encode()
    return MAGIC + len(encoded).to_bytes(4, "little") + encoded + data.tobytes()


def decode_parameters(value: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor `encode_parameters` wrote, or `ValueError` saying why `value` is not one of `shape` and `dtype`."""
    if not value.startswith(MAGIC) or len(value) < len(MAGIC) + 4:
        raise ValueError(f"does not start with {MAGIC!r} and a header length")
    start = len(MAGIC) + 4
    end = start + int.from_bytes(value[len(MAGIC) : start], "little")
    header = json.loads(value[start:end])
    data = value[end:]
    expected = {"shape": list(shape), "dtype": dtype_name(dtype), "sha256": hashlib.sha256(data).hexdigest()}
    if header != expected:
        raise ValueError(f"header {header} does not match {expected}")
    if len(data) != torch.Size(shape).numel() * dtype.itemsize:
        raise ValueError(f"holds {len(data)} bytes of data, expected {torch.Size(shape).numel() * dtype.itemsize}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A lazily connecting client whose every call gives up after `timeout_s`, for caches that serve without Redis."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_read_size=2**20,  # a cached latent of the official canvas (1 MiB) in one read, not 32
        # one immediate reconnect replaces a pooled connection that Redis closed; a timeout is never retried
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )


def failure_kind(exc: Exception) -> str:
    if isinstance(exc, redis.TimeoutError):
        return "timeout"
    if isinstance(exc, redis.ConnectionError):
        return "unavailable"
    return "error"


class LatentCache:
    """Posterior parameters of `vae` for (uploaded-bytes digest, size), in Redis at `url`. Used from the engine's
    preparing thread, never its denoising thread, so a slow Redis delays only the request being prepared (by
    `timeout_s` at most); see the module docstring for the key, the value and the fail-open rules."""

    def __init__(self, url: str, vae: AutoencoderKL, ttl_s: int, max_entry_bytes: int, timeout_s: float,
                 backoff_s: float = 1.0):
        self.redis = connect(url, timeout_s)
        self.address = without_credentials(url)
        self.timeout_s = timeout_s
        self.vae_id = vae_identity(vae)
        self.channels = 2 * vae.config.latent_channels
        self.dtype = vae.dtype
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.backoff_s = backoff_s
        self._retry_at = 0.0
        self._failing = False

    def key(self, image_digest: str, size: int) -> str:
        return f"dsd:condition:p{images.PREPROCESS_VERSION}:{self.vae_id}:{size}:{image_digest}"

    def shape(self, size: int) -> tuple[int, int, int, int]:
        """Posterior parameters of the size x 2*size canvas: mean and log-variance on the channel axis."""
        return (1, self.channels, size // VAE_SCALE_FACTOR, 2 * size // VAE_SCALE_FACTOR)

    def get(self, image_digest: str, size: int) -> torch.Tensor | None:
        """The cached parameters (on the CPU), or None for a miss, a failure, or during the back-off."""
        if self._skipped("get"):
            return None
        key = self.key(image_digest, size)
        started = time.perf_counter()
        try:
            value = self.redis.get(key)
        except Exception as exc:  # fail-open: no cache fault may fail a request
            self._failed("get", exc)
            return None
        finally:
            metrics.CACHE_DURATION.labels(operation="get").observe(time.perf_counter() - started)
        self._succeeded()
        if value is None:
            metrics.CACHE_MISSES.inc()
            return None
        metrics.CACHE_READ_BYTES.inc(len(value))
        try:
            parameters = decode_parameters(value, self.shape(size), self.dtype)
        except ValueError as exc:
            metrics.CACHE_ERRORS.labels(operation="get", kind="corrupt").inc()
            logger.warning("latent cache entry %s is unusable (%s); encoding the reference again", key, exc)
            return None
        metrics.CACHE_HITS.inc()
        return parameters

    def put(self, image_digest: str, size: int, parameters: torch.Tensor) -> None:
        """Store `parameters` for `ttl_s` seconds; a value over `max_entry_bytes` is not stored."""
        if self._skipped("put"):
            return
        value = encode_parameters(parameters)
        if len(value) > self.max_entry_bytes:
            metrics.CACHE_ERRORS.labels(operation="put", kind="too_large").inc()
            return
        started = time.perf_counter()
        try:
            self.redis.set(self.key(image_digest, size), value, ex=self.ttl_s)
        except Exception as exc:  # fail-open: no cache fault may fail a request
            self._failed("put", exc)
            return
        finally:
            metrics.CACHE_DURATION.labels(operation="put").observe(time.perf_counter() - started)
        self._succeeded()
        metrics.CACHE_WRITTEN_BYTES.inc(len(value))

    def _skipped(self, operation: str) -> bool:
        if time.monotonic() < self._retry_at:
            metrics.CACHE_ERRORS.labels(operation=operation, kind="skipped").inc()
            return True
        return False

    def _failed(self, operation: str, exc: Exception) -> None:
        metrics.CACHE_ERRORS.labels(operation=operation, kind=failure_kind(exc)).inc()
        self._retry_at = time.monotonic() + self.backoff_s
        if not self._failing:
            logger.warning("latent cache at %s failed (%s: %s); serving without it, retrying every %.1f s",
                           self.address, type(exc).__name__, exc, self.backoff_s)
        self._failing = True

    def _succeeded(self) -> None:
        if self._failing:
            logger.info("latent cache at %s is back", self.address)
        self._failing = False


def open_latent_cache(settings: Settings, vae: AutoencoderKL) -> LatentCache | None:
    """The latent cache `settings` describe, or None when `redis_url` is unset. Connects lazily: a Redis that is
    down at start-up only means misses until it is up."""
    if settings.redis_url is None:
        logger.warning("latent cache disabled (DSD_REDIS_URL is not set): every reference is encoded by the VAE")
        return None
    cache = LatentCache(settings.redis_url, vae, ttl_s=settings.latent_cache_ttl_s,
                        max_entry_bytes=settings.latent_cache_max_entry_bytes,
                        timeout_s=settings.latent_cache_timeout_s)
    logger.info("latent cache at %s (ttl %d s, entries up to %d bytes, VAE %s)", cache.address, cache.ttl_s,
                cache.max_entry_bytes, cache.vae_id)
    return cache
