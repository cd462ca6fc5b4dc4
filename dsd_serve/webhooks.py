"""Job webhooks: Standard Webhooks signatures (`webhook-id`, `webhook-timestamp`, `webhook-signature`), retried with
exponential backoff for a bounded time, only to http(s) URLs whose addresses are public or allow-listed.

The address check runs when a job is submitted (the field `webhook` is refused with 422) and again before every
attempt, so a name that later resolves to an internal address is refused too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from dsd_model.errors import InputError
from dsd_model.serving import metrics
from dsd_model.settings import Settings

logger = logging.getLogger(__name__)

EVENTS = ("job.succeeded", "job.failed", "job.canceled")
"""Event types a job may subscribe to; all of them when it names none."""
MAX_URL_CHARS = 2048
MAX_BACKOFF_S = 60.0


def allowed(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address, allow: list[str]) -> bool:
    if address.is_global:
        return True
    for entry in allow:
        if entry.lower() == host.lower():
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


async def check_url(url: str, settings: Settings) -> None:
    """Raise `InputError("webhook", ...)` unless `url` is http(s) and every address its host resolves to is public
    or allow-listed (DSD_WEBHOOK_ALLOW)."""
    if len(url) > MAX_URL_CHARS:
        raise InputError("webhook", f"URL of {len(url)} characters exceeds the limit of {MAX_URL_CHARS}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError("webhook", f"{url!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise InputError("webhook", "URLs with credentials are not accepted; authenticate by the signature")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InputError("webhook", f"{url!r} has an invalid port") from exc
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError("webhook", f"host {parts.hostname!r} does not resolve ({exc.strerror})") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not allowed(parts.hostname, address, settings.webhook_allow):
            raise InputError("webhook", f"host {parts.hostname!r} resolves to {address}, a private, loopback or "
                             "reserved address; the operator may allow it with DSD_WEBHOOK_ALLOW")


def signed_headers(secret: str, message_id: str, body: str) -> dict[str, str]:
    now = datetime.now(timezone.utc)
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, now, body),
    }


def client(settings: Settings) -> httpx.AsyncClient:
    """The client of every delivery of one replica (its connections and TLS context are reused)."""
    return httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)


async def deliver(client: httpx.AsyncClient, url: str, message_id: str, payload: dict, ended_at: float,
                  settings: Settings) -> bool:
    """POST `payload` to `url`, signed, until a 2xx answer or DSD_WEBHOOK_RETRY_FOR_S passed. Every attempt is logged
    and counted; returns whether it was delivered. `ended_at` (wall clock) is when the job ended, for the latency."""
    secret = settings.webhook_secret.get_secret_value()
    body = json.dumps(payload, separators=(",", ":"))
    give_up = time.monotonic() + settings.webhook_retry_for_s
    delay = settings.webhook_backoff_s
    attempt = 0
    while True:
        attempt += 1
        try:
            await check_url(url, settings)
            response = await client.post(url, content=body, headers=signed_headers(secret, message_id, body))
            outcome = "delivered" if 200 <= response.status_code < 300 else "rejected"
            detail = f"HTTP {response.status_code}"
        except InputError as exc:
            outcome, detail = "refused", exc.message
        except httpx.HTTPError as exc:
            outcome, detail = "unreachable", f"{type(exc).__name__}: {exc}"
        metrics.WEBHOOK_ATTEMPTS.labels(outcome=outcome).inc()
        logger.info("webhook %s attempt %d to %s: %s (%s)", message_id, attempt, url, outcome, detail)
        if outcome == "delivered":
            metrics.WEBHOOK_LATENCY.observe(max(0.0, time.time() - ended_at))
            return True
        if time.monotonic() + delay > give_up:
            metrics.WEBHOOK_ABANDONED.inc()
            logger.warning("webhook %s to %s abandoned after %d attempts", message_id, url, attempt)
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_S)
