"""Faults under a mixed load: no accepted job may be lost, and no event may reach the application twice.

Starts, on loopback: a job Redis (append-only file, noeviction), a cache Redis, two service replicas (tiny profile)
on both, and a webhook receiver whose application handles each `webhook-id` once. Load threads send synchronous
`POST /generate` requests and jobs (`POST /v1/jobs` with an `Idempotency-Key` and a webhook) to the replicas in
turn; a job submission that fails on one replica is sent again to the other with the same key. The faults come in
turn, `--phase-s` seconds each:

    kill       SIGKILL of replica b (every process of it), which is started again afterwards
    redis      a restart of the job Redis (its append-only file keeps the data)
    memory     the job Redis at its memory limit (maxmemory set just above its use, filled by cache-like keys)
    receiver   the webhook receiver answers 500 to half of the attempts
    dns        the webhook host's lookups take 0.5 to 2.5 s (the replicas time out after 1 s)

The slow resolver is injected without touching the machine's DNS: the replicas run with a `sitecustomize` that
answers the webhook host name (`hooks.chaos.test`, 127.0.0.1) after the delay written in a control file, through
`socket.getaddrinfo`, which the service's webhook resolver calls. After the last phase every accepted job is followed
to its end and the outbox to empty (at most `--settle-s`), and a table reports per fault: jobs accepted, succeeded,
failed (with the reasons), lost (never ended), run more than once, and jobs whose end reached the application twice
after deduplication; beside it the synchronous requests and their failures, and the attempts the receiver refused
or received more than once. Exits non-zero when a job was lost, an ended job's event never arrived, or an event
reached the application twice.

    .venv/bin/python loadtest/chaos.py [--phase-s 30] [--settle-s 180]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from dsd_serve.local import ROOT, RedisServer, Server, start_service, wait_ready

SECRET = "whsec_" + base64.b64encode(b"chaos-run-secret-of-32-bytes....").decode()
HOOK_HOST = "hooks.chaos.test"
FAULTS = ("kill", "redis", "memory", "receiver", "dns")
TERMINAL = {"succeeded", "failed", "canceled"}
SITECUSTOMIZE = '''"""Chaos run: resolve {host} to 127.0.0.1 after the delay in {control} (seconds; the run changes it)."""
import socket
import time

_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, port, *args, **kwargs):
    if host == "{host}":
        try:
            delays = [float(value) for value in open("{control}").read().split()]
        except (OSError, ValueError):
            delays = [0.0]
        time.sleep(delays[int(time.monotonic() * 10) % len(delays)])
        host = "127.0.0.1"
    return _getaddrinfo(host, port, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
'''


class Receiver:
    """The webhook receiver and its application: `flaky` makes half of the attempts answer 500; an accepted attempt
    whose `webhook-id` was handled before is acknowledged and not handled again."""

    def __init__(self, seed: int = 0):
        self.flaky = False
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.refused = 0
        self.handled: dict[str, dict] = {}
        """webhook-id → the event, handled once."""
        self.repeats: Counter = Counter()
        """webhook-id → accepted attempts after the first (deduplicated)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    if receiver.flaky and receiver.random.random() < 0.5:
                        receiver.refused += 1
                        status = 500
                    else:
                        message = self.headers["webhook-id"]
                        if message in receiver.handled:
                            receiver.repeats[message] += 1
                        else:
                            receiver.handled[message] = json.loads(data)
                        status = 204
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://{HOOK_HOST}:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Load:
    """Synchronous requests and job submissions to the live replicas, each recorded with the phase it began in."""

    def __init__(self, replicas: dict[str, Server], hook: str, reference: str):
        self.replicas, self.hook, self.reference = replicas, hook, reference
        self.phase = FAULTS[0]
        self.down: set[str] = set()
        """Replicas killed and not ready again: no traffic goes to them, as a Service would route none."""
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.jobs: dict[str, str] = {}
        """job id → phase of its submission."""
        self.sync: dict[str, Counter] = defaultdict(Counter)
        self.refused: dict[str, Counter] = defaultdict(Counter)
        """Submissions refused by every replica, by phase and answer."""

    def live(self) -> list[Server]:
        return [server for name, server in self.replicas.items() if name not in self.down]

    def body(self, turn: int) -> dict:
        return dict(image=self.reference, prompt="the toy in a garden", size=64, steps=2 + 2 * (turn % 3), seed=turn)

    def submitter(self, index: int) -> None:
        turn = index
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                phase, key = self.phase, uuid.uuid4().hex
                body = {**self.body(turn), "webhook": self.hook}
                answers = []
                for attempt in range(4):
                    replicas = self.live()
                    replica = replicas[(turn + attempt) % len(replicas)]
                    try:
                        response = client.post(f"{replica.url}/v1/jobs", json=body, headers={"Idempotency-Key": key})
                    except httpx.HTTPError as exc:
                        answers.append(type(exc).__name__)
                        continue
                    if response.status_code == 202:
                        with self.lock:
                            self.jobs[response.json()["id"]] = phase
                        break
                    answers.append(f"HTTP {response.status_code}")
                    self.stop.wait(0.5)
                else:
                    with self.lock:
                        self.refused[phase][answers[-1]] += 1
                turn += 4
                self.stop.wait(0.4)

    def requester(self, index: int) -> None:
        turn = index
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                phase = self.phase
                replicas = self.live()
                replica = replicas[turn % len(replicas)]
                try:
                    response = client.post(f"{replica.url}/generate", json=self.body(turn))
                    outcome = "ok" if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with self.lock:
                    self.sync[phase][outcome] += 1
                turn += 2
                self.stop.wait(0.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds of each fault (default 30)")
    parser.add_argument("--settle-s", type=float, default=180.0, help="longest wait for every job and webhook")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "chaos", help="logs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    control = args.out / "dns-delay"
    control.write_text("0")
    (args.out / "site").mkdir(exist_ok=True)
    (args.out / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE.format(host=HOOK_HOST, control=control))

    jobs_redis = RedisServer(directory(args.out / "jobs-redis"), appendonly=True)
    cache_redis = RedisServer(directory(args.out / "cache-redis"),
                              arguments=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
    jobs_redis.start()
    cache_redis.start()
    receiver = Receiver()
    settings = dict(jobs_redis_url=jobs_redis.url, redis_url=cache_redis.url, jobs_visibility_timeout_s="5",
                    max_batch_rows="6", webhook_secret=SECRET, webhook_allow='["127.0.0.1/32"]',
                    webhook_backoff_s="0.5", webhook_timeout_s="3", webhook_dns_timeout_s="1")
    environment = {"PYTHONPATH": str(args.out / "site")}
    replicas = {name: start(args.out, name, environment, settings) for name in ("a", "b")}
    reference = base64.b64encode((ROOT / "tests" / "assets" / "reference.png").read_bytes()).decode()
    load = Load(replicas, receiver.url, reference)
    views: dict[str, dict] = {}
    try:
        for replica in replicas.values():
            wait_ready(replica)
        threads = [threading.Thread(target=load.submitter, args=(i,), daemon=True) for i in range(4)]
        threads += [threading.Thread(target=load.requester, args=(i,), daemon=True) for i in range(2)]
        for thread in threads:
            thread.start()
        for fault in FAULTS:
            load.phase = fault
            print(f"{time.strftime('%H:%M:%S')} fault: {fault}", flush=True)
            inject(fault, args.phase_s, load, jobs_redis, receiver, control, args.out, environment, settings)
        load.stop.set()
        for thread in threads:
            thread.join()
        views = settle(load, jobs_redis, args.settle_s)
    finally:
        load.stop.set()
        for replica in replicas.values():
            if replica.process.poll() is None:
                replica.stop()
        jobs_redis.stop()
        cache_redis.stop()
        receiver.server.shutdown()
    return report(load, views, receiver)


def directory(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def start(out: Path, name: str, environment: dict, settings: dict) -> Server:
    os.environ.update(environment)
    return start_service(directory(out / f"{name}-{time.monotonic_ns()}"), **settings)


def inject(fault: str, seconds: float, load: Load, jobs_redis: RedisServer, receiver: Receiver, control: Path,
           out: Path, environment: dict, settings: dict) -> None:
    """Run `fault` for about `seconds` and undo it."""
    end = time.monotonic() + seconds
    if fault == "kill":
        time.sleep(seconds / 4)
        load.down.add("b")
        load.replicas["b"].kill()
        time.sleep(seconds / 4)
        load.replicas["b"] = start(out, "b", environment, settings)
        wait_ready(load.replicas["b"])
        load.down.discard("b")
    elif fault == "redis":
        time.sleep(seconds / 3)
        jobs_redis.restart()
    elif fault == "memory":
        client = jobs_redis.client()
        client.set("chaos:filler:0", b"x" * 2**20)
        client.config_set("maxmemory", str(client.info("memory")["used_memory"] + 2**19))
        index = 1
        while time.monotonic() < end:
            try:
                client.set(f"chaos:filler:{index}", b"x" * 2**16)
                index += 1
            except Exception:
                time.sleep(0.2)
        client.config_set("maxmemory", "0")
        client.delete(*[f"chaos:filler:{i}" for i in range(index)])
    elif fault == "receiver":
        receiver.flaky = True
        time.sleep(seconds)
        receiver.flaky = False
    elif fault == "dns":
        control.write_text("0.5 2.5 0.8 1.5 0.3")
        time.sleep(seconds)
        control.write_text("0")
    time.sleep(max(0.0, end - time.monotonic()))


def settle(load: Load, jobs_redis: RedisServer, seconds: float) -> dict[str, dict]:
    """Every accepted job's final document (or its last one when it never ended), once the outbox is empty."""
    views: dict[str, dict] = {}
    end = time.monotonic() + seconds
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < end:
            for job_id in [job for job in load.jobs if views.get(job, {}).get("status") not in TERMINAL]:
                replica = load.live()[0]
                try:
                    response = client.get(f"{replica.url}/v1/jobs/{job_id}")
                except httpx.HTTPError:
                    continue
                views[job_id] = response.json() if response.status_code == 200 else {"status": "lost"}
            ended = all(views.get(job, {}).get("status") in TERMINAL for job in load.jobs)
            if ended and jobs_redis.client().zcard("dsd:webhooks:due") == 0:
                break
            time.sleep(0.5)
    return views


def report(load: Load, views: dict[str, dict], receiver: Receiver) -> int:
    """Print the table; 0 when nothing was lost, missing or seen twice."""
    events: dict[str, list[str]] = defaultdict(list)
    for event in receiver.handled.values():
        events[event["data"]["id"]].append(event["type"])
    header = ("fault", "accepted", "succeeded", "failed (reason)", "lost", "ran twice", "event missing",
              "seen twice", "sync ok", "sync failed (reason)", "submission refused")
    rows, bad = [], 0
    for fault in FAULTS:
        jobs = [job for job, phase in load.jobs.items() if phase == fault]
        states = Counter(views.get(job, {}).get("status", "lost") for job in jobs)
        reasons = Counter(views[job]["error"]["code"] for job in jobs if views.get(job, {}).get("status") == "failed")
        lost = sum(1 for job in jobs if views.get(job, {}).get("status") not in TERMINAL)
        twice = sum(1 for job in jobs if views.get(job, {}).get("attempts", 0) > 1)
        missing = sum(1 for job in jobs if views.get(job, {}).get("status") in TERMINAL and not events.get(job))
        seen_twice = sum(1 for job in jobs if len(events.get(job, [])) > 1)
        sync = load.sync[fault]
        failures = {reason: count for reason, count in sync.items() if reason != "ok"}
        rows.append((fault, len(jobs), states["succeeded"], describe(states["failed"], reasons), lost, twice,
                     missing, seen_twice, sync["ok"], describe(sum(failures.values()), failures),
                     describe(sum(load.refused[fault].values()), load.refused[fault])))
        bad += lost + missing + seen_twice
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(name.ljust(width) for name, width in zip(header, widths)) + " |")
    print("| " + " | ".join("-" * width for width in widths) + " |")
    for row in rows:
        print("| " + " | ".join(str(value).ljust(width) for value, width in zip(row, widths)) + " |")
    print(f"webhook attempts refused by the receiver (500): {receiver.refused}; accepted again after the first "
          f"(deduplicated by webhook-id): {sum(receiver.repeats.values())}")
    print("OK" if bad == 0 else "FAILED")
    return 0 if bad == 0 else 1


def describe(total: int, reasons: dict) -> str:
    return f"{total} ({', '.join(f'{reason}: {count}' for reason, count in sorted(reasons.items()))})" if total \
        else "0"


if __name__ == "__main__":
    sys.exit(main())
