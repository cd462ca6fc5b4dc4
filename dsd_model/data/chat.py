"""A client for OpenAI-compatible chat completions (hosted APIs and local servers alike).

    complete(messages) -> text      one request: retries with backoff on timeouts, connection errors, 408, 429
                                    and 5xx (Retry-After honoured, capped), replies cached on disk by request
    ask_json(messages, parse)       asks until `parse` accepts the reply, telling the model what was wrong

Errors say what the caller does next: `ChatError` (the server cannot serve: stop the stage, resume later),
`ChatRejected` (the server refused this one request) and `MalformedReply` (no usable answer): the last two are
recorded as failures of their item and the run goes on.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TypeVar

import httpx

from .manifest import write_atomic
from .settings import ChatSettings, Endpoint

T = TypeVar("T")
Item = TypeVar("Item")

RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)


class ChatError(RuntimeError):
    """The server cannot serve requests (unreachable, refusing the key, still failing after every retry)."""


class ChatTimeout(ChatError):
    """The server gave no answer within `request_timeout_s`, on every attempt."""


class ChatRejected(RuntimeError):
    """The server refused this one request with a client error (e.g. HTTP 400 for an oversized input)."""


class MalformedReply(ValueError):
    """A reply without the expected content."""


class TruncatedReply(MalformedReply):
    """A reply the server cut off at the request's `max_tokens` (`finish_reason` `length`)."""


class ChatClient:
    def __init__(self, endpoint: Endpoint, settings: ChatSettings):
        self.endpoint = endpoint
        self.timeout_s = settings.request_timeout_s
        self.max_retries = settings.max_retries
        self.backoff_s = settings.backoff_s
        self.max_backoff_s = settings.max_backoff_s
        self.cache_dir = settings.resolved_cache_dir
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self._http = httpx.Client(
            base_url=endpoint.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=settings.request_timeout_s,
            limits=httpx.Limits(max_connections=settings.concurrency),
        )

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self._http.close()

    def complete(self, messages: list[dict], fresh: bool = False, whole: bool = False) -> str:
        """The assistant's reply text to `messages`, from the cache when this exact request was answered before
        (unless `fresh`: then the server is asked again and the cache updated). With `whole`, a reply cut off at
        `max_tokens` raises `TruncatedReply` and is not cached."""
        body = {
            "model": self.endpoint.model,
            "messages": messages,
            "temperature": self.endpoint.temperature,
            "max_tokens": self.endpoint.max_tokens,
        }
        cache_path = self._cache_path(body)
        if cache_path is not None and cache_path.exists() and not fresh:
            return json.loads(cache_path.read_text(encoding="utf-8"))["reply"]
        response = self._post(body)
        reply = _reply_text(response)
        if whole and response["choices"][0].get("finish_reason") == "length":
            raise TruncatedReply(f"reply cut off at max_tokens={self.endpoint.max_tokens}")
        if cache_path is not None:
            write_atomic(cache_path, json.dumps({"reply": reply}, ensure_ascii=False).encode("utf-8"))
        return reply

    def ask_json(self, messages: list[dict], parse: Callable[[dict], T], attempts: int, fresh: bool = False) -> T:
        """Ask until `parse(extract_json(reply))` succeeds; after each bad reply the model is told what was wrong.
        `fresh` bypasses cached replies (retrying an item that failed on them)."""
        messages = list(messages)
        for _ in range(attempts):
            reply = None
            try:
                reply = self.complete(messages, fresh)
                return parse(extract_json(reply))
            except MalformedReply as exc:
                error = exc
                if reply is not None:
                    messages += [
                        {"role": "assistant", "content": reply},
                        {
                            "role": "user",
                            "content": f"That reply could not be used: {exc}. Answer again, ending with the JSON "
                            "object in a ```json code block.",
                        },
                    ]
        raise MalformedReply(f"no usable reply in {attempts} attempt(s); last problem: {error}")

    def _post(self, body: dict) -> dict:
        field = f"{self.endpoint.role}_base_url"
        url = f"{self.endpoint.base_url.rstrip('/')}/chat/completions"
        for attempt in range(self.max_retries + 1):
            wait, timed_out = None, False
            try:
                response = self._http.post("chat/completions", json=body)
            except httpx.TimeoutException:
                problem, timed_out = f"no answer within {self.timeout_s} s (request_timeout_s)", True
            except httpx.ConnectError as exc:
                problem = f"is unreachable ({exc})"
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__}: {exc})"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise MalformedReply(f"HTTP 200 with a body that is not JSON: {response.text[:200]!r}") from exc
                detail = f"HTTP {status}: {response.text[:300]}"
                if status in (401, 403):
                    raise ChatError(f"{self.endpoint.role}_api_key: refused by {url} ({detail})")
                if status == 404:
                    raise ChatError(
                        f"{field} / {self.endpoint.role}_model: {url} or model {self.endpoint.model!r} not found "
                        f"({detail})"
                    )
                if status not in RETRYABLE_STATUS:
                    raise ChatRejected(detail)
                problem, wait = detail, _retry_after(response)
            if attempt < self.max_retries:
                time.sleep(min(wait if wait is not None else self._backoff(attempt), self.max_backoff_s))
        error = ChatTimeout if timed_out else ChatError
        raise error(f"{field} {url!r}: {problem}; gave up after {self.max_retries + 1} attempt(s)")

    def _backoff(self, attempt: int) -> float:
        delay = self.backoff_s * 2**attempt
        return delay / 2 + random.uniform(0, delay / 2)

    def _cache_path(self, body: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps({"base_url": self.endpoint.base_url, **body}, sort_keys=True, ensure_ascii=False)
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"


def _reply_text(response: dict) -> str:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise MalformedReply(f"response has no choices[0].message.content: {str(response)[:200]}") from exc
    if not isinstance(content, str) or not content.strip():
        raise MalformedReply(f"empty reply (finish_reason {response['choices'][0].get('finish_reason')!r})")
    return content


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        date = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, date.timestamp() - time.time())


def extract_json(text: str) -> dict:
    """The last JSON object in a reply: bare, in a ```json code fence, after a chain of thought or before trailing
    text."""
    decoder = json.JSONDecoder()
    found, position = None, text.find("{")
    while position != -1:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            position = text.find("{", position + 1)
            continue
        if isinstance(value, dict):
            found = value
        position = text.find("{", end)
    if found is None:
        raise MalformedReply(f"no JSON object in the reply: {text[:200]!r}")
    return found


def map_unordered(
    function: Callable[[Item], T], items: Iterable[Item], concurrency: int
) -> Iterator[tuple[Item, Future]]:
    """Run `function` on `items` in `concurrency` threads, yielding (item, finished future) as each completes.

    With `concurrency` 1 the work runs in the calling thread, in order. When the consumer stops (an exception,
    Ctrl-C), work not yet started is cancelled.
    """
    if concurrency == 1:
        for item in items:
            future = Future()
            try:
                future.set_result(function(item))
            except Exception as exc:
                future.set_exception(exc)
            yield item, future
        return
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        futures = {pool.submit(function, item): item for item in items}
        for future in as_completed(futures):
            yield futures[future], future
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
