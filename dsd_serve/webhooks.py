"""Job webhooks: Standard Webhooks signatures (`webhook-id`, `webhook-timestamp`, `webhook-signature`), sent only to
http(s) URLs whose addresses are public or allow-listed, and only to the address that was checked.

A URL is checked when a job is submitted (the field `webhook` is refused with 422) and again before every attempt:
its host is looked up once (`Resolver`: a thread pool of its own, a timeout), every address it resolves to must be
public (`public`: private, loopback, link-local, multicast and reserved ranges are refused, also when they hide in an
IPv6 translation range such as NAT64 or 6to4), and the attempt connects to the first of those addresses with the Host
header and the TLS server name set to the host. A second lookup, which a name could answer differently (DNS
rebinding), never happens. Retries and their schedule live in the job store's outbox (`job_store`); this module
sends one attempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks import Webhook

from dsd_model.errors import InputError
from dsd_model.settings import Settings

logger = logging.getLogger(__name__)

EVENTS = ("job.succeeded", "job.failed", "job.canceled")
"""Event types a job may subscribe to; all of them when it names none."""
MAX_URL_CHARS = 2048
MAX_LABEL_CHARS = 63
MAX_HOST_CHARS = 253
"""DNS limits (RFC 1035): a label of 63 octets, a name of 253 characters."""
MAX_BACKOFF_S = 60.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

IPV4_IN_IPV6 = (
    ipaddress.ip_network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated)
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64, well-known prefix
)
"""IPv6 ranges whose last 32 bits are an IPv4 address that the packet reaches: judged by that IPv4 address."""
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
"""6to4: bits 16 to 48 are the IPv4 address of the tunnel's end, judged like the address itself."""
REFUSED = (
    ipaddress.ip_network("64:ff9b:1::/48"),  # NAT64 for local use: the operator picks where the IPv4 address sits
    ipaddress.ip_network("2001::/32"),  # Teredo: tunnels to an IPv4 address hidden in the address
    ipaddress.ip_network("fec0::/10"),  # site-local (deprecated, private)
    ipaddress.ip_network("192.88.99.0/24"),  # 6to4 relay anycast (deprecated): forwards into any 6to4 network
    ipaddress.ip_network("192.0.0.0/24"),  # IETF protocol assignments (dummy address, NAT64 discovery, ...)
    ipaddress.ip_network("3fff::/20"),  # documentation (RFC 9637)
    ipaddress.ip_network("5f00::/16"),  # segment routing identifiers (RFC 9602)
)
"""Ranges refused whatever Python's `is_global` says of them."""


def public(address: Address) -> bool:
    """Whether `address` reaches the public internet and nothing else: not private, loopback, link-local, multicast,
    reserved or unspecified, and not an IPv6 form of such an IPv4 address (mapped, compatible, NAT64, 6to4)."""
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in IPV4_IN_IPV6) and not address.is_loopback and \
                not address.is_unspecified:
            return public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address in SIX_TO_FOUR:
            return public(address.sixtofour)
    if any(address in network for network in REFUSED if network.version == address.version):
        return False
    return address.is_global and not address.is_multicast


def allowed(host: str, address: Address, allow: list[str]) -> bool:
    if public(address):
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


class LookupTimeout(Exception):
    """The resolver did not answer within DSD_WEBHOOK_DNS_TIMEOUT_S."""


class Resolver:
    """Addresses of webhook hosts, looked up on a thread pool of their own (`webhook_dns_threads`) within
    `webhook_dns_timeout_s`: a black-holed resolver holds these threads and nothing else. Uses `socket.getaddrinfo`
    as it is when called, so a process may route lookups elsewhere by replacing it."""

    def __init__(self, settings: Settings):
        self.timeout_s = settings.webhook_dns_timeout_s
        self.pool = ThreadPoolExecutor(settings.webhook_dns_threads, thread_name_prefix="dsd-dns")

    async def addresses(self, host: str, port: int) -> list[Address]:
        lookup = partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            async with asyncio.timeout(self.timeout_s):
                infos = await asyncio.get_running_loop().run_in_executor(self.pool, lookup)
        except TimeoutError as exc:
            raise LookupTimeout(f"the lookup of webhook host {host!r} took longer than {self.timeout_s:g} s "
                                "(DSD_WEBHOOK_DNS_TIMEOUT_S)") from exc
        except socket.gaierror as exc:
            raise InputError("webhook", f"host {host!r} does not resolve ({exc.strerror})") from exc
        return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Destination:
    """Where one attempt goes: `url` with the checked address as its host, `host` the Host header, `server_name`
    the name the TLS certificate must carry (sent as SNI)."""

    url: str
    host: str
    server_name: str


def check_host_name(host: str) -> None:
    """Refuse a host name that DNS cannot carry, naming the limit (an IDNA encoder would raise on it later)."""
    if len(host) > MAX_HOST_CHARS:
        raise InputError("webhook", f"host name of {len(host)} characters exceeds the limit of {MAX_HOST_CHARS}")
    for label in host.removesuffix(".").split("."):
        if not 1 <= len(label) <= MAX_LABEL_CHARS:
            raise InputError("webhook", f"host name label of {len(label)} characters; a label has 1 to "
                             f"{MAX_LABEL_CHARS}")
    try:
        host.encode("idna")
    except UnicodeError as exc:
        raise InputError("webhook", f"host {host!r} is not a valid internationalised domain name ({exc})") from exc


async def check_url(url: str, resolver: Resolver, settings: Settings) -> Destination:
    """The destination of `url`: raises `InputError("webhook", ...)` unless it is http(s) and every address its
    host resolves to is public or allow-listed (DSD_WEBHOOK_ALLOW), `LookupTimeout` when the lookup takes too long."""
    if len(url) > MAX_URL_CHARS:
        raise InputError("webhook", f"URL of {len(url)} characters exceeds the limit of {MAX_URL_CHARS}")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InputError("webhook", f"{url!r} is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError("webhook", f"{url!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise InputError("webhook", "URLs with credentials are not accepted; authenticate by the signature")
    host = parts.hostname
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
        check_host_name(host)
    addresses = [literal] if literal is not None else await resolver.addresses(host, port)
    for address in addresses:
        if not allowed(host, address, settings.webhook_allow):
            raise InputError("webhook", f"host {host!r} resolves to {address}, a private, loopback, multicast or "
                             "reserved address; the operator may allow it with DSD_WEBHOOK_ALLOW")
    address = addresses[0]
    netloc = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    return Destination(urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), parts.netloc, host)


def signed_headers(secret: str, message_id: str, body: str) -> dict[str, str]:
    now = datetime.now(timezone.utc)
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, now, body),
    }


def client(settings: Settings) -> httpx.AsyncClient:
    """The client of every attempt of one replica. No connection is kept for reuse: the pool would key it by the
    address alone, and a connection verified for one name must not carry another name's event."""
    return httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False,
                             limits=httpx.Limits(max_keepalive_connections=0))


async def attempt(client: httpx.AsyncClient, resolver: Resolver, url: str, message_id: str, payload: dict,
                  settings: Settings) -> tuple[str, str]:
    """POST `payload` to `url` once, signed, to the address that was checked; returns the outcome (`delivered`,
    `rejected`: a non-2xx answer, `refused`: the URL no longer passes the check, `unreachable`) and its detail."""
    if settings.webhook_secret is None:
        return "refused", "this replica has no DSD_WEBHOOK_SECRET to sign with"
    secret = settings.webhook_secret.get_secret_value()
    body = json.dumps(payload, separators=(",", ":"))
    try:
        destination = await check_url(url, resolver, settings)
        response = await client.post(destination.url, content=body,
                                     headers={**signed_headers(secret, message_id, body), "host": destination.host},
                                     extensions={"sni_hostname": destination.server_name})
    except InputError as exc:
        return "refused", exc.message
    except LookupTimeout as exc:
        return "unreachable", str(exc)
    except httpx.HTTPError as exc:
        return "unreachable", f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return "delivered", f"HTTP {response.status_code}"
    return "rejected", f"HTTP {response.status_code}"


def backoff(attempts: int, settings: Settings) -> float:
    """The wait after `attempts` failed attempts: DSD_WEBHOOK_BACKOFF_S, doubling, at most a minute."""
    return min(settings.webhook_backoff_s * 2 ** (attempts - 1), MAX_BACKOFF_S)
