"""Prompt enhancement: a vision-language model rewrites a short prompt into the detailed caption DSD was trained on.

    PromptEnhancer.enhance(reference, prompt) -> Enhancement     the caption, or the reason there is none

The official DSD inference code asks a VLM (Gemini) to do this before every generation. Here it is opt-in: the
reference (the canvas-sized image the pipeline reads) and the prompt go to an OpenAI-compatible chat server
(`dsd_model.data.chat.ChatClient`) with the versioned instructions `prompts/enhance_<PROMPT_VERSION>.txt`.

Replies are cached by (reference pixels, prompt, model, instructions version): in Redis under `dsd:enhance:` when
`redis_url` is set, else in-process; a reply cut off at the token limit is not cached. Every fault is the request's
own and fails open: a slow, failing or refusing server, an unusable or cut-off reply, or an unreachable Redis leave the
prompt as given, with the reason in `notice`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import ClassVar, Literal

from PIL import Image

from ..data.chat import ChatClient, ChatTimeout, MalformedReply, TruncatedReply
from ..data.settings import ChatSettings, Endpoint
from ..settings import Settings
from .latent_cache import connect, failure_kind, without_credentials

logger = logging.getLogger(__name__)

PROMPT_VERSION = "v1"
"""The instructions in use; part of every cache key, so new instructions never serve replies to old ones."""
KEY_PREFIX = "dsd:enhance:"
MAX_REPLY_TOKENS = 512
"""Room for the longest caption the T5 window (512 tokens) takes; a reply cut off there would not fit it either."""


def instructions(version: str = PROMPT_VERSION) -> str:
    return (resources.files(__package__) / "prompts" / f"enhance_{version}.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Enhancement:
    prompt: str | None
    """The enhanced prompt; None when the prompt stays as given."""
    outcome: Literal["enhanced", "cached", "failed", "too_long"]
    notice: str | None = None
    """Why the prompt stays as given (for `failed` and `too_long`)."""


class _ServingChat(ChatSettings):
    """`ChatClient` settings of the serving path, all given explicitly: replies are cached by `PromptEnhancer`."""

    resolved_cache_dir: ClassVar[None] = None


class MemoryCache:
    """At most `max_entries` texts for `ttl_s` seconds each, least recently used evicted first; thread-safe."""

    def __init__(self, max_entries: int, ttl_s: int):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            expires, text = self._entries.get(key, (0.0, None))
            if expires <= time.monotonic():
                self._entries.pop(key, None)
                return None
            self._entries.move_to_end(key)
            return text

    def put(self, key: str, text: str) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + self.ttl_s, text)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class RedisCache:
    """Texts in Redis for `ttl_s` seconds; a failing Redis is a miss (logged once until it answers again)."""

    def __init__(self, url: str, ttl_s: int, timeout_s: float):
        self.redis = connect(url, timeout_s)
        self.address = without_credentials(url)
        self.ttl_s = ttl_s
        self._failing = False

    def get(self, key: str) -> str | None:
        try:
            value = self.redis.get(key)
        except Exception as exc:  # fail-open: no cache fault may fail a request
            self._failed("get", exc)
            return None
        self._failing = False
        return None if value is None else value.decode("utf-8")

    def put(self, key: str, text: str) -> None:
        try:
            self.redis.set(key, text.encode("utf-8"), ex=self.ttl_s)
        except Exception as exc:  # fail-open: no cache fault may fail a request
            self._failed("put", exc)
            return
        self._failing = False

    def _failed(self, operation: str, exc: Exception) -> None:
        if not self._failing:
            logger.warning("enhanced-prompt cache at %s failed on %s (%s: %s); enhancing without it",
                           self.address, operation, failure_kind(exc), exc)
        self._failing = True


class PromptEnhancer:
    """Enhanced prompts from the chat server `settings` name, at most `enhance_concurrency` calls in flight, each
    given up after `enhance_timeout_s` (waiting for a free call included)."""

    def __init__(self, settings: Settings):
        api_key = settings.enhance_api_key.get_secret_value() if settings.enhance_api_key else None
        self.model = settings.enhance_model
        self.timeout_s = settings.enhance_timeout_s
        self.instructions = instructions()
        # no retries: a retry would double the worst-case latency added to the request for a prompt it can do without
        self.client = ChatClient(
            Endpoint(role="enhance", base_url=settings.enhance_base_url, model=settings.enhance_model,
                     api_key=api_key, temperature=0.0, max_tokens=MAX_REPLY_TOKENS),
            _ServingChat(request_timeout_s=self.timeout_s, max_retries=0, backoff_s=0.0, max_backoff_s=0.0,
                         concurrency=settings.enhance_concurrency, cache=False),
        )
        self.cache = (RedisCache(settings.redis_url, settings.enhance_cache_ttl_s, settings.latent_cache_timeout_s)
                      if settings.redis_url else MemoryCache(settings.enhance_cache_size, settings.enhance_cache_ttl_s))
        self._calls = ThreadPoolExecutor(settings.enhance_concurrency, thread_name_prefix="dsd-enhance")

    def close(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        self.client.__exit__(None, None, None)

    def key(self, reference: Image.Image, prompt: str) -> str:
        image_digest = hashlib.sha256(reference.tobytes()).hexdigest()
        entry = json.dumps([image_digest, reference.size, prompt, self.model, PROMPT_VERSION], ensure_ascii=False)
        return f"{KEY_PREFIX}{PROMPT_VERSION}:{hashlib.sha256(entry.encode('utf-8')).hexdigest()}"

    async def enhance(self, reference: Image.Image, prompt: str) -> Enhancement:
        """The enhanced prompt for `prompt` about the subject of `reference` (RGB, as the pipeline reads it)."""
        key = await asyncio.to_thread(self.key, reference, prompt)
        cached = await asyncio.to_thread(self.cache.get, key)
        if cached is not None:
            return Enhancement(cached, "cached")
        call = asyncio.get_running_loop().run_in_executor(self._calls, self._ask, reference, prompt, key)
        try:
            return Enhancement(await asyncio.wait_for(call, self.timeout_s), "enhanced")
        except (TimeoutError, ChatTimeout):  # whichever of the two equal deadlines is seen first
            reason = f"no answer within {self.timeout_s:g} s"
        except TruncatedReply:
            return Enhancement(None, "too_long", f"enhance_prompt: the enhancement model's reply was cut off at "
                               f"{MAX_REPLY_TOKENS} tokens; the prompt was used as given")
        except MalformedReply as exc:
            reason = "the enhancement model's reply was unusable"
            logger.warning("prompt enhancement failed: %s", exc)
        except Exception as exc:  # fail-open: the request goes on with its own prompt
            reason = "the enhancement model is unavailable"
            logger.warning("prompt enhancement failed: %s: %s", type(exc).__name__, exc)
        return Enhancement(None, "failed", f"enhance_prompt: {reason}; the prompt was used as given")

    def _ask(self, reference: Image.Image, prompt: str, key: str) -> str:
        buffer = io.BytesIO()
        reference.save(buffer, format="JPEG", quality=90)
        image_url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        messages = [
            {"role": "system", "content": self.instructions},
            {"role": "user", "content": [{"type": "text", "text": f"Request: {prompt}"},
                                         {"type": "image_url", "image_url": {"url": image_url}}]},
        ]
        text = self.client.complete(messages, whole=True).strip()
        self.cache.put(key, text)
        return text


def open_enhancer(settings: Settings) -> PromptEnhancer | None:
    """The prompt enhancer `settings` describe, or None when `enhance_base_url` is unset."""
    if settings.enhance_base_url is None:
        return None
    enhancer = PromptEnhancer(settings)
    logger.info("prompt enhancement with %s at %s (instructions %s, %s by default, cache %s)", enhancer.model,
                without_credentials(settings.enhance_base_url), PROMPT_VERSION,
                "on" if settings.enhance_default else "off", type(enhancer.cache).__name__)
    return enhancer
