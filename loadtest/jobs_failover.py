"""Kill one of two replicas under job load: no job may be lost, none stored twice.

Starts one redis-server and two service replicas (tiny profile) on loopback, and a webhook receiver. Submitter
threads send jobs (each with its own Idempotency-Key and the receiver as webhook) to the replicas in turn for
`--duration` seconds; `--kill-after` seconds in, one replica is killed with SIGKILL (its worker included). A
submission that fails on the dead replica is sent again to the live one with the same key. Then every job is
followed to its end (bounded by `--settle`), and a table reports jobs submitted, succeeded, failed and lost, jobs
that ran more than once (reclaimed from the dead replica), results delivered twice by webhook, and the webhook
latency from the job's end to its delivery. Exits non-zero when a job was lost or failed, or a webhook came twice.

    python loadtest/jobs_failover.py --duration 40 --kill-after 12
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from dsd_serve.local import ROOT, RedisServer, Server, start_service, wait_ready

SECRET = "whsec_" + base64.b64encode(b"failover-run-secret-of-32-bytes!").decode()
TERMINAL = {"succeeded", "failed", "canceled"}


class Receiver:
    """Loopback webhook receiver: records (arrival time, webhook-id, payload) of every delivery and answers 204."""

    def __init__(self):
        self.deliveries: list[tuple[float, str, dict]] = []
        deliveries = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers["content-length"]))
                deliveries.append((time.time(), self.headers["webhook-id"], json.loads(data)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def worker_pids(server: Server) -> list[int]:
    """The server's process and its descendants (BentoML's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [server.process.pid]
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier += children.get(pid, [])
    return found


def kill(server: Server) -> None:
    for pid in reversed(worker_pids(server)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.process.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of submissions (default 40)")
    parser.add_argument("--kill-after", type=float, default=12.0, help="seconds until a replica is killed")
    parser.add_argument("--submitters", type=int, default=4, help="threads submitting jobs (default 4)")
    parser.add_argument("--interval", type=float, default=0.5, help="pause of a submitter between jobs (s)")
    parser.add_argument("--settle", type=float, default=180.0, help="seconds to wait for every job to end")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "jobs_failover", help="logs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("redis", "a", "b"):
        (args.out / name).mkdir(exist_ok=True)

    redis = RedisServer(args.out / "redis")
    redis.start()
    settings = dict(redis_url=redis.url, jobs_visibility_timeout_s="5", max_batch_rows="6", webhook_secret=SECRET,
                    webhook_allow='["127.0.0.1"]')
    replicas = [start_service(args.out / name, **settings) for name in ("a", "b")]
    receiver = Receiver()
    reference = base64.b64encode((ROOT / "tests" / "assets" / "reference.png").read_bytes()).decode()
    jobs: dict[str, str] = {}
    lock = threading.Lock()
    alive = list(replicas)
    resubmitted = Counter()
    try:
        for replica in replicas:
            wait_ready(replica)
        started = time.monotonic()
        stop = threading.Event()

        def submitter(index: int) -> None:
            turn = index
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    key = uuid.uuid4().hex
                    body = dict(image=reference, prompt="the toy in a garden", size=64, steps=4 + 4 * (turn % 3),
                                seed=turn, webhook=receiver.url)
                    for attempt in range(len(replicas)):
                        replica = alive[(turn + attempt) % len(alive)]
                        try:
                            response = client.post(f"{replica.url}/v1/jobs", json=body,
                                                   headers={"Idempotency-Key": key})
                        except httpx.HTTPError:
                            resubmitted["connection"] += 1
                            continue
                        if response.status_code == 202:
                            with lock:
                                jobs[key] = response.json()["id"]
                            break
                        resubmitted[f"HTTP {response.status_code}"] += 1
                    turn += args.submitters
                    stop.wait(args.interval)

        threads = [threading.Thread(target=submitter, args=(i,), daemon=True) for i in range(args.submitters)]
        for thread in threads:
            thread.start()
        time.sleep(args.kill_after)
        victim = replicas[1]
        with lock:
            running = len(jobs)
        kill(victim)
        alive.remove(victim)
        print(f"killed replica b (SIGKILL) {time.monotonic() - started:.1f} s in, after {running} submissions")
        time.sleep(max(0.0, args.duration - args.kill_after))
        stop.set()
        for thread in threads:
            thread.join()
        survivor = alive[0]
        end = time.monotonic() + args.settle
        views: dict[str, dict] = {}
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < end:
                for job_id in set(jobs.values()) - {j for j, v in views.items() if v.get("status") in TERMINAL}:
                    response = client.get(f"{survivor.url}/v1/jobs/{job_id}")
                    views[job_id] = response.json() if response.status_code == 200 else {"status": "lost"}
                if all(view.get("status") in TERMINAL for view in views.values()) and len(views) == len(jobs):
                    break
                time.sleep(0.5)
        time.sleep(2.0)
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                replica.stop()
        redis.stop()
        receiver.server.shutdown()

    states = Counter(view.get("status", "lost") for view in views.values())
    ran_twice = sum(1 for view in views.values() if view.get("attempts", 0) > 1)
    hooks = Counter(message_id for _, message_id, _ in receiver.deliveries)
    twice = sum(1 for count in hooks.values() if count > 1)
    latencies = [arrived - payload["data"]["finished_at"] for arrived, _, payload in receiver.deliveries]
    rows = [
        ("jobs submitted", len(jobs)),
        ("succeeded", states["succeeded"]),
        ("failed", states["failed"]),
        ("lost (never ended)", len(jobs) - sum(states[s] for s in TERMINAL)),
        ("ran twice (reclaimed from the killed replica)", ran_twice),
        ("results stored or delivered twice", twice),
        ("webhooks delivered", len(receiver.deliveries)),
        ("submissions retried on the live replica", sum(resubmitted.values())),
        ("webhook latency p50 (ms)", f"{1000 * statistics.median(latencies):.1f}" if latencies else "-"),
        ("webhook latency p99 (ms)", f"{1000 * percentile(latencies, 0.99):.1f}" if latencies else "-"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |\n| {'-' * width} | ----- |")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    lost = len(jobs) - sum(states[s] for s in TERMINAL)
    ok = lost == 0 and states["failed"] == 0 and twice == 0 and len(receiver.deliveries) == states["succeeded"]
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
