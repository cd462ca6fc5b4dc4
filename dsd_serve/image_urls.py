"""Signed URLs of generated images (`response_format=url` of the OpenAI Images API), served by the service itself:

    GET /v1/images/<id>/content?expires=<unix seconds>&signature=<hex HMAC-SHA256(key, "<id>.<expires>")>

The image waits in the result store for `image_url_ttl_s`: Redis at `DSD_REDIS_URL` when set, so any replica serves
any replica's URLs (with the same `image_url_secret`), else this process's memory, bounded by
`image_store_memory_bytes`. No object store is involved. The signature is checked before the expiry is read, so a URL
whose expiry was changed is refused as tampered (403); an intact URL past its expiry is gone (410).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict

from dsd_model.settings import Settings

from .http import MEDIA_TYPES, ClientFault

logger = logging.getLogger(__name__)

KEY_PREFIX = "dsd:image:"
IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
STORE_TIMEOUT_S = 2.0
"""One Redis call of the image store: a PNG of the largest size (a few MB) moves in milliseconds on a cluster network;
a stuck Redis fails the request within this instead of holding it."""


class MemoryImages:
    """Images in this process for `ttl_s` each, at most `max_bytes` in all (the oldest dropped first); thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, image_id: str, output_format: str, data: bytes, ttl_s: int) -> None:
        if len(data) > self.max_bytes:
            raise ClientFault(503, "unavailable", f"the image of {len(data)} bytes exceeds the in-process image "
                              f"store (image_store_memory_bytes={self.max_bytes}); ask for response_format=b64_json")
        now = time.monotonic()
        with self._lock:
            self._images[image_id] = (now + ttl_s, output_format, data)
            self._bytes += len(data)
            while self._bytes > self.max_bytes or next(iter(self._images.values()))[0] <= now:
                self._bytes -= len(self._images.popitem(last=False)[1][2])

    def get(self, image_id: str) -> tuple[str, bytes] | None:
        with self._lock:
            expires, output_format, data = self._images.get(image_id, (0.0, "", b""))
        return (output_format, data) if expires > time.monotonic() else None


class RedisImages:
    """Images in Redis under `dsd:image:<id>` (a hash of format and data) with the URL's lifetime as TTL. Unlike the
    caches this store does not fail open: an image that cannot be stored has no URL, so the request fails (503)."""

    def __init__(self, url: str):
        from dsd_model.serving.latent_cache import connect, without_credentials  # imports torch: at start-up only

        self.redis = connect(url, STORE_TIMEOUT_S)
        self.address = without_credentials(url)

    def put(self, image_id: str, output_format: str, data: bytes, ttl_s: int) -> None:
        try:
            with self.redis.pipeline() as pipe:
                pipe.hset(KEY_PREFIX + image_id, mapping={"format": output_format, "data": data})
                pipe.expire(KEY_PREFIX + image_id, ttl_s)
                pipe.execute()
        except Exception as exc:
            raise self.unavailable("store", exc) from exc

    def get(self, image_id: str) -> tuple[str, bytes] | None:
        try:
            output_format, data = self.redis.hmget(KEY_PREFIX + image_id, ["format", "data"])
        except Exception as exc:
            raise self.unavailable("read", exc) from exc
        return None if data is None else (output_format.decode("ascii"), data)

    def unavailable(self, operation: str, exc: Exception) -> ClientFault:
        logger.warning("image store at %s failed to %s an image (%s: %s)", self.address, operation,
                       type(exc).__name__, exc)
        return ClientFault(503, "unavailable", "the image store is unavailable; retry, or ask for "
                           "response_format=b64_json", headers={"Retry-After": "5"})


class ImageURLs:
    """Stores images and hands out signed URLs for them; reads them back for a URL that is intact and unexpired."""

    def __init__(self, settings: Settings):
        self.ttl_s = settings.image_url_ttl_s
        self.public_url = settings.public_url
        if settings.image_url_secret is not None:
            self.key = settings.image_url_secret.get_secret_value().encode()
        else:
            self.key = secrets.token_bytes(32)
            logger.warning("DSD_IMAGE_URL_SECRET is unset: image URLs are signed with a key of this process, so only "
                           "this replica serves them, until it restarts")
        if settings.redis_url:
            self.store = RedisImages(settings.redis_url)
        else:
            self.store = MemoryImages(settings.image_store_memory_bytes)
            logger.warning("DSD_REDIS_URL is unset: URL images are kept in this process (at most %d bytes), so only "
                           "this replica serves them", settings.image_store_memory_bytes)

    def signature(self, image_id: str, expires: str) -> str:
        return hmac.new(self.key, f"{image_id}.{expires}".encode(), hashlib.sha256).hexdigest()

    def publish(self, data: bytes, output_format: str, base_url: str) -> str:
        """Store `data` and return its signed URL under `public_url` (or `base_url`, the request's own). Blocking."""
        image_id = secrets.token_hex(16)
        expires = str(int(time.time()) + self.ttl_s)
        self.store.put(image_id, output_format, data, self.ttl_s)
        root = self.public_url or base_url.rstrip("/")
        return f"{root}/v1/images/{image_id}/content?expires={expires}&signature={self.signature(image_id, expires)}"

    def open(self, image_id: str, expires: str, signature: str) -> tuple[bytes, str]:
        """The image and its media type; `ClientFault` 403 (tampered), 410 (expired) or 404 (dropped). Blocking."""
        if not (IMAGE_ID.match(image_id) and expires.isdigit()
                and hmac.compare_digest(self.signature(image_id, expires), signature)):
            raise ClientFault(403, "invalid_signature", "the image URL's signature does not match its id and expiry; "
                              "use the URL exactly as the response gave it", field="signature")
        if int(expires) <= time.time():
            raise ClientFault(410, "expired", f"the image URL expired at {int(expires)} (Unix time); image URLs "
                              f"last image_url_ttl_s={self.ttl_s} s, so fetch sooner or ask for b64_json",
                              field="expires")
        found = self.store.get(image_id)
        if found is None:
            raise ClientFault(404, "not_found", "the image is no longer stored (dropped early for room, or stored by "
                              "another replica without a shared DSD_REDIS_URL)", field="id")
        output_format, data = found
        return data, MEDIA_TYPES[output_format]
