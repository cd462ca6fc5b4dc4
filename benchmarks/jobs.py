"""The job queue's overhead per job against a direct `POST /generate`, and webhook latency, in one run.

One replica on the tiny profile with a real redis-server on loopback. Direct requests and jobs alternate, first one
then the other, so both see the same background load and neither always follows the other's tail (a job's webhook
is sent after its result is stored), one at a time: a direct request is `POST /generate` until its answer; a job is
`POST /v1/jobs`, its event stream to the final status, and `GET` of its image (what a product backend does), with a
webhook to a loopback receiver. Prints p50 of both, their ratio, the median of the paired differences (each job
against the direct request beside it: the figure least moved by other load on the machine), and the webhook latency
(job end to delivery).

    python benchmarks/jobs.py [--runs 20] [--steps 4] [--size 64]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from dsd_serve.local import ROOT, RedisServer, start_service, wait_ready

REFERENCE = ROOT / "tests" / "assets" / "reference.png"
SECRET = "whsec_" + base64.b64encode(b"benchmark-secret-of-32-bytes....").decode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def receiver(arrivals: list[tuple[float, dict]]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            arrivals.append((time.time(), json.loads(self.rfile.read(int(self.headers["content-length"])))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_job(client: httpx.Client, url: str, payload: dict) -> None:
    job = client.post(f"{url}/v1/jobs", json=payload)
    job.raise_for_status()
    final = None
    with client.stream("GET", f"{url}{job.json()['links']['events']}") as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                final = json.loads(line[len("data: "):])
    assert final["status"] == "succeeded", final
    client.get(f"{url}{final['result']['images'][0]}").raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    arrivals: list[tuple[float, dict]] = []
    hooks = receiver(arrivals)
    base = dict(image=base64.b64encode(REFERENCE.read_bytes()).decode(), prompt="the same toy on a beach",
                steps=args.steps, size=args.size)
    direct, queued = [], []
    with tempfile.TemporaryDirectory() as workdir:
        redis = RedisServer(Path(workdir))
        redis.start()
        server = start_service(Path(workdir), redis_url=redis.url, webhook_secret=SECRET,
                               webhook_allow='["127.0.0.1"]')
        try:
            wait_ready(server)
            with httpx.Client(timeout=600) as client:
                hook = f"http://127.0.0.1:{hooks.server_port}/hook"
                for seed in range(-1, args.runs):
                    payload = base | {"seed": max(seed, 0)}
                    order = ("direct", "job") if seed % 2 else ("job", "direct")
                    took = {}
                    for kind in order:
                        start = time.perf_counter()
                        if kind == "direct":
                            client.post(f"{server.url}/generate", json=payload).raise_for_status()
                        else:
                            run_job(client, server.url, payload | {"webhook": hook})
                        took[kind] = time.perf_counter() - start
                    if seed >= 0:
                        direct.append(took["direct"])
                        queued.append(took["job"])
            end = time.monotonic() + 30
            while len(arrivals) < args.runs + 1 and time.monotonic() < end:
                time.sleep(0.1)
        finally:
            server.stop()
            redis.stop()
            hooks.shutdown()
    latency = [arrived - payload["data"]["finished_at"] for arrived, payload in arrivals]
    p50_direct, p50_job = statistics.median(direct), statistics.median(queued)
    print(f"{args.runs} runs each, {args.steps} steps at {args.size} px, tiny profile, one replica, Redis on loopback\n")
    print("| measure | value |\n| --- | --- |")
    print(f"| direct POST /generate p50 | {1000 * p50_direct:.0f} ms |")
    print(f"| job (submit, SSE to the end, GET image) p50 | {1000 * p50_job:.0f} ms |")
    paired = statistics.median(job - plain for job, plain in zip(queued, direct))
    print(f"| overhead per job (p50 difference) | {1000 * (p50_job - p50_direct):.0f} ms |")
    print(f"| overhead per job (median of paired differences) | {1000 * paired:.0f} ms |")
    print(f"| ratio job / direct (p50) | {p50_job / p50_direct:.2f} |")
    print(f"| webhook latency p50 / p99 | {1000 * statistics.median(latency):.1f} / "
          f"{1000 * percentile(latency, 0.99):.1f} ms ({len(latency)} deliveries) |")


if __name__ == "__main__":
    main()
