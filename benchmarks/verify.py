"""What verifying a large image costs (`provenance.verify`, the work of `POST /verify` and `dsd verify`): seconds
and peak resident memory, for a small PNG of 40 MP (a flat colour compresses to about 128 KB), square and not.

`bounded` is the service: an image larger than any output (`MAX_MARKED_PIXELS`) is read only at the output sides when
it is square, and not at all otherwise. `unbounded` raises that bound above the image, so the mark is also read at
the image's own size, as before the bound. Each case runs in a fresh process, so its peak memory is its own.

    python benchmarks/verify.py [--side 6320]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time

CASES = {"bounded": None, "unbounded": 10**12}


def measure(width: int, height: int, bound: int | None) -> dict:
    """One verification in this process: seconds, peak memory added (MiB), and what the watermark report says."""
    from PIL import Image

    from dsd_model.serving import provenance

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    data = buffer.getvalue()
    if bound is not None:
        provenance.MAX_MARKED_PIXELS = bound
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    report = provenance.verify(data, "dsd-serve")
    seconds = time.perf_counter() - started
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    watermark = report["watermark"]
    return {"png_kib": len(data) // 1024, "seconds": seconds, "peak_mib": peak,
            "read_at": watermark.get("read_at", "own size" if watermark["present"] is not None else "not read")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=6320, help="side of the square image (6320: 40 MP)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        width, height, bound = json.loads(args.case)
        print(json.dumps(measure(width, height, bound)))
        return
    shapes = {"square": (args.side, args.side), "wide": (args.side * 2, args.side // 2)}
    print("| image | path | PNG KiB | seconds | peak memory added (MiB) | mark read at |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape, (width, height) in shapes.items():
        for path, bound in CASES.items():
            case = json.dumps([width, height, bound])
            out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {shape} {width}x{height} | {path} | {row['png_kib']} | {row['seconds']:.1f} | "
                  f"{row['peak_mib']:.0f} | {row['read_at']} |")


if __name__ == "__main__":
    main()
