"""Every import the GPU check makes, before it spends device time: each package of the wheels carried in WHEELS
(benchmarks/gpu_prepare.sh), the GPU tests with their conftest (collected, not run) and the benchmark's modules.
Prints each failure and exits 1 if there was one.

    python benchmarks/gpu_imports.py .whl
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wheel_packages(wheel: Path) -> list[str]:
    """The importable top-level names in a wheel (packages and modules; not its metadata, data or bundled libs)."""
    names = {name.split("/")[0].removesuffix(".py") for name in zipfile.ZipFile(wheel).namelist()}
    return sorted(name for name in names if name.isidentifier())


def main() -> int:
    failures = []
    for wheel in sorted(Path(sys.argv[1]).glob("*.whl")) if len(sys.argv) > 1 else []:
        for name in wheel_packages(wheel):
            try:
                importlib.import_module(name)
                print(f"import {name} ({wheel.name}): ok")
            except Exception as exc:  # report every broken import, not only the first
                failures.append(f"import {name} ({wheel.name}): {type(exc).__name__}: {exc}")
    commands = {
        "the GPU tests": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                          "tests/test_gpu.py"],
        "benchmarks/gpu_bench.py": [sys.executable, "benchmarks/gpu_bench.py", "--help"],
    }
    for what, command in commands.items():
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode == 0:
            print(f"imports of {what}: ok")
        else:
            failures.append(f"imports of {what}: exit {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
