"""Start the real service (and a Redis beside it) on free loopback ports, as operators do, and stop them again
(tests, benchmarks, load tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
"""The project root, where service.py lives."""
BENTOML = Path(sys.executable).parent / "bentoml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    env: dict

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            metric_name, _, label_text = series.partition("{")
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def wait_for_metric(self, name: str, minimum: float, timeout: float = 60, **labels) -> float:
        """Poll `/metrics` until the sum of `name` (filtered by `labels`) reaches `minimum`."""
        end = time.monotonic() + timeout
        while (value := self.metric(name, **labels)) < minimum:
            if time.monotonic() > end:
                raise AssertionError(f"{name} stayed at {value}, below {minimum}, for {timeout} s")
            time.sleep(0.05)
        return value

    def kill(self) -> None:
        """SIGKILL the server and every process under it (BentoML's workers run in sessions of their own), as a
        node failure would."""
        for pid in reversed(descendants(self.process.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def descendants(root: int) -> list[int]:
    """`root` and every process below it, parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop(0)
        found.append(pid)
        frontier += children.get(pid, [])
    return found


def start_service(workdir: Path, **settings: str) -> Server:
    """`bentoml serve service:DSDService` on the tiny profile; DSD_* settings from keyword arguments."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        BENTOML_HOME=str(workdir / "bentoml"),
        BENTOML_DO_NOT_TRACK="True",
        DSD_PROFILE="tiny",
        DSD_GRPC_PORT=str(free_port()),
        DSD_GRPC_HOST="127.0.0.1",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"DSD_{key.upper()}": value for key, value in settings.items()})
    log = workdir / "server.log"
    process = subprocess.Popen(
        [str(BENTOML), "serve", "service:DSDService", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    return Server(url=f"http://127.0.0.1:{port}", process=process, log=log, env=env)


def wait_ready(server: Server, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not ready within {timeout} s:\n{server.log_tail()}")


class RedisServer:
    """`redis-server` on 127.0.0.1:`port` (chosen free at creation, kept across restarts), empty on every start
    unless `appendonly`: then every write goes to an append-only file in `workdir`, and a restart keeps the data.
    `arguments` are further server options, e.g. `["--maxmemory", "64mb"]`."""

    def __init__(self, workdir: Path, appendonly: bool = False, arguments: list[str] = ()):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; `make redis-server` installs it (Debian, as root)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.appendonly = appendonly
        self.arguments = list(arguments)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self, timeout: float = 10.0) -> None:
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                 "--appendonly", "yes" if self.appendonly else "no",
                 "--dir", str(self.workdir), *self.arguments],
                stdout=log, stderr=subprocess.STDOUT,
            )
        end = time.monotonic() + timeout
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"redis-server did not start:\n{(self.workdir / 'redis.log').read_text()}")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server: connections stay open and calls hang (a slow Redis)."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)
