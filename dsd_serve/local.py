"""Start the real service on a free loopback port, as operators do, and stop it again (tests, benchmarks,
load tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

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

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


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
