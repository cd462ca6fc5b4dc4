"""Load-test a local DSD Serve: Redis (when `redis-server` is installed) and the service on the tiny profile, then
locust headless with a bounded number of users for a bounded time over REST and gRPC.

Writes `<out>/dsd_stats.csv` (with locust's other CSVs) and `<out>/report.html`, prints locust's summary (requests
per second, latency percentiles and failures per request kind) and the cache counters of the service, and exits
non-zero when any request failed.
`--stop-redis-after S` stops Redis S seconds after the first request finished: the cache fails open, so no request
may fail.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from dsd_serve.local import ROOT, RedisServer, Server, start_service, wait_ready

LOCUST = Path(sys.executable).parent / "locust"
API_KEY = "loadtest-key"
CACHE_METRICS = ("dsd_cache_hits_total", "dsd_cache_misses_total", "dsd_cache_errors_total")
FINISHED = "dsd_request_duration_seconds_count"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtest/run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8, help="concurrent users (default 8)")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second (default 4)")
    parser.add_argument("--duration", default="60s", help="run time, e.g. 30s, 5m (default 60s)")
    parser.add_argument("--image-size", type=int, default=64, help="output side in pixels (default 64)")
    parser.add_argument("--steps", default="4,8,12,28", help="step counts the requests draw from (default 4,8,12,28)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "loadtest", help="reports and server logs")
    parser.add_argument("--stop-redis-after", type=float,
                        help="stop Redis this many seconds after the first request finished")
    parser.add_argument("--max-queue", default="64", help="DSD_MAX_QUEUE of the service")
    parser.add_argument("--jobs", action="store_true",
                        help="add the job user (POST /v1/jobs, then its event stream) to the REST and gRPC users")
    return parser.parse_args(argv)


def stop_redis_midway(service: Server, redis: RedisServer, delay: float, done: threading.Event) -> None:
    while not done.is_set() and service.metric(FINISHED) == 0:
        done.wait(0.2)
    if not done.wait(delay):
        redis.stop()
        print(f"redis-server stopped {delay:g} s after the first finished request")


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(args.out) if shutil.which("redis-server") else None
    if redis is None and args.stop_redis_after is not None:
        raise SystemExit("--stop-redis-after needs redis-server (`make redis-server`)")
    settings = dict(api_key=API_KEY, max_queue=args.max_queue)
    if redis is None:
        print("redis-server is not installed: running without the condition-latent cache")
    else:
        redis.start()
        settings["redis_url"] = redis.url
    service = start_service(args.out, **settings)
    try:
        wait_ready(service)
        command = [str(LOCUST), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "--only-summary",
                   "--host", service.url, "--grpc-target", f"127.0.0.1:{service.env['DSD_GRPC_PORT']}",
                   "--api-key", API_KEY, "--image-size", str(args.image_size), "--steps", args.steps,
                   "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.duration,
                   "--stop-timeout", "60", "--csv", str(args.out / "dsd"), "--html", str(args.out / "report.html"),
                   "--loglevel", "WARNING", "RestUser", "GrpcUser"] + (["JobUser"] if args.jobs else [])
        done = threading.Event()
        fault = None
        if args.stop_redis_after is not None:
            fault = threading.Thread(target=stop_redis_midway, args=(service, redis, args.stop_redis_after, done),
                                     daemon=True)
            fault.start()
        locust = subprocess.run(command, cwd=ROOT)
        done.set()
        if fault is not None:
            fault.join()
        cache = {name: service.metric(name) for name in CACHE_METRICS}
        print("cache: " + ", ".join(f"{name.removeprefix('dsd_cache_')} {value:g}" for name, value in cache.items()))
    finally:
        code = service.stop()
        if redis is not None:
            redis.stop()
    print(f"reports: {args.out / 'dsd_stats.csv'}, {args.out / 'report.html'}; server log: {service.log}")
    if locust.returncode or code:
        print(f"FAILED: locust exit {locust.returncode} (1: some requests failed), server exit {code}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
