"""Webhook address checks and delivery attempts, in-process against loopback receivers: the address table, DNS
rebinding (a resolver that answers differently the second time), TLS to the checked address with the name as SNI,
lookups on their own pool with a timeout, and DNS name limits."""

import asyncio
import base64
import datetime
import ipaddress
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from standardwebhooks import Webhook

from dsd_model.errors import InputError
from dsd_model.settings import Settings
from dsd_serve import webhooks

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
NAME = "hooks.test"


@pytest.mark.parametrize("address", [
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "2002:7f00:1::", "2002:a9fe:a9fe::", "::127.0.0.1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:0:a00:1", "64:ff9b:1::808:808", "2001::1", "2001:0:4136:e378::1",
    "224.0.0.1", "239.255.255.250", "ff02::1", "ff0e::1", "fec0::1", "fd00::1", "fe80::1", "::1", "::",
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "0.1.2.3",
    "255.255.255.255", "192.0.0.8", "192.0.2.1", "198.18.0.1", "198.51.100.1", "203.0.113.1", "240.0.0.1",
    "192.88.99.1", "2001:db8::1", "3fff::1", "5f00::1",
])
def test_private_and_translated_addresses_are_refused(address):
    assert not webhooks.public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "64:ff9b::808:808", "2002:808:808::",
    "::ffff:8.8.8.8",
])
def test_public_addresses_and_their_translations_pass(address):
    assert webhooks.public(ipaddress.ip_address(address))


def settings(**overrides) -> Settings:
    values = dict(webhook_secret=SECRET, webhook_allow=["127.0.0.1/32"], webhook_dns_timeout_s=1.0,
                  webhook_dns_threads=2, webhook_timeout_s=5)
    values.update(overrides)
    return Settings(**values)


class Receiver:
    """An HTTP(S) server on `host`: records the Host header, the TLS server name and the body of every request."""

    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None):
        self.requests: list[dict] = []
        self.server_names: list[str | None] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append({"host": self.headers["host"], "headers": dict(self.headers), "body": body})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        if tls is not None:
            tls.sni_callback = lambda connection, name, context: self.server_names.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def stub_resolver(monkeypatch, answers: list[str]) -> list[str]:
    """Make `socket.getaddrinfo` answer NAME with the next of `answers` (the last one from then on); returns the
    names looked up."""
    original, asked = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != NAME:
            return original(host, port, *args, **kwargs)
        asked.append(host)
        address = answers[min(len(asked), len(answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def attempt(url: str, config: Settings, client: httpx.AsyncClient | None = None) -> tuple[str, str]:
    async def run():
        resolver = webhooks.Resolver(config)
        async with client or webhooks.client(config) as http:
            try:
                return await webhooks.attempt(http, resolver, url, "job.succeeded", {"type": "job.succeeded"},
                                              config)
            finally:
                resolver.close()

    return asyncio.run(run())


def test_an_attempt_connects_to_the_checked_address_not_to_a_second_answer(monkeypatch):
    internal = Receiver("127.0.0.2")
    try:
        allowed = Receiver("127.0.0.1", internal.port)
    except OSError:
        internal.close()
        pytest.skip("the port of 127.0.0.2 is taken on 127.0.0.1")
    try:
        asked = stub_resolver(monkeypatch, ["127.0.0.1", "127.0.0.2"])
        url = f"http://{NAME}:{allowed.port}/hook?x=1"
        assert attempt(url, settings()) == ("delivered", "HTTP 204")
        assert len(asked) == 1, "one lookup per attempt"
        (request,) = allowed.requests
        assert request["host"] == f"{NAME}:{allowed.port}"
        assert Webhook(SECRET).verify(request["body"], request["headers"]) == {"type": "job.succeeded"}
        outcome, detail = attempt(url, settings())
        assert outcome == "refused" and "127.0.0.2" in detail
        assert internal.requests == [], "the rebound address was never contacted"
    finally:
        internal.close()
        allowed.close()


def self_signed(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_https_goes_to_the_checked_address_with_the_name_as_server_name(monkeypatch, tmp_path):
    certificate, key = self_signed(NAME)
    (tmp_path / "cert.pem").write_bytes(certificate)
    (tmp_path / "key.pem").write_bytes(key)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    receiver = Receiver("127.0.0.1", tls=server_side)
    try:
        stub_resolver(monkeypatch, ["127.0.0.1"])
        trusting = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        config = settings()
        client = httpx.AsyncClient(verify=trusting, limits=httpx.Limits(max_keepalive_connections=0))
        assert attempt(f"https://{NAME}:{receiver.port}/hook", config, client) == ("delivered", "HTTP 204")
        assert receiver.server_names == [NAME] and receiver.requests[0]["host"] == f"{NAME}:{receiver.port}"
    finally:
        receiver.close()


def test_a_stuck_resolver_times_out_on_its_own_pool(monkeypatch):
    release = threading.Event()
    original = socket.getaddrinfo

    def stuck(host, *args, **kwargs):
        if host == NAME:
            release.wait(30)
        return original(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    config = settings(webhook_dns_timeout_s=0.3, webhook_dns_threads=2)

    async def run():
        resolver = webhooks.Resolver(config)
        checks = [webhooks.check_url(f"http://{NAME}/hook", resolver, config) for _ in range(12)]
        outcomes = await asyncio.gather(*checks, return_exceptions=True)
        default_pool = await asyncio.wait_for(asyncio.to_thread(lambda: "free"), timeout=5)
        release.set()
        resolver.close()
        return outcomes, default_pool

    try:
        outcomes, default_pool = asyncio.run(run())
    finally:
        release.set()
    assert all(isinstance(outcome, webhooks.LookupTimeout) for outcome in outcomes), outcomes
    assert "DSD_WEBHOOK_DNS_TIMEOUT_S" in str(outcomes[0]) and default_pool == "free"


@pytest.mark.parametrize("url, message", [
    (f"http://{'a' * 64}.example.com/hook", "label of 64 characters"),
    (f"http://{'a.' * 127}example/hook", "exceeds the limit of 253"),
    ("http://a..example.com/hook", "label of 0 characters"),
    ("http://example.com:99999/hook", "not a valid URL"),
    ("http://[::1/hook", "not a valid URL"),
    ("gopher://example.com/", r"not an http\(s\) URL"),
    ("http://user:pw@example.com/", "credentials"),
])
def test_malformed_hosts_are_refused_naming_the_field(url, message):
    config = settings()

    async def run():
        resolver = webhooks.Resolver(config)
        try:
            await webhooks.check_url(url, resolver, config)
        finally:
            resolver.close()

    with pytest.raises(InputError, match=message) as refused:
        asyncio.run(run())
    assert refused.value.field == "webhook"
