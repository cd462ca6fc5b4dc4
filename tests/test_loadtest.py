"""`loadtest/run`: a short, bounded locust run over REST and gRPC against a loopback service, with Redis stopped
halfway through. The cache fails open, so every request succeeds."""

import csv
import re
import subprocess

from servers import ROOT


def test_short_run_with_redis_stopped_midway_has_no_failures(tmp_path):
    run = subprocess.run([str(ROOT / "loadtest" / "run"), "--users", "4", "--spawn-rate", "4", "--duration", "12s",
                          "--steps", "2,4", "--stop-redis-after", "4", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    with (tmp_path / "dsd_stats.csv").open() as handle:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert {kind for kind, _ in rows} >= {"POST", "gRPC"}, "both transports carry load"
    assert (tmp_path / "report.html").stat().st_size > 0
    cache = dict(re.findall(r"(\w+)_total (\d+)", run.stdout.split("cache: ")[1].splitlines()[0]))
    assert int(cache["hits"]) > 0, "repeated references hit the cache while Redis runs"
    assert int(cache["errors"]) > 0, "calls after Redis stopped are served without it"
