#!/usr/bin/env bash
# Download, here, the wheels the GPU check needs beyond what the GPU machine has (Python 3.12, torch 2.11,
# transformers 5.17, no network; its peft is replaced by our pinned one) into .whl/ (ignored by git; WHEELS_DIR
# names another folder). benchmarks/gpu_check.sh installs them there, and the rehearsal here
# (benchmarks/rehearsal/run.sh) for its own Python.
#
#   benchmarks/gpu_prepare.sh [python-version]   (default 3.12, the GPU machine's; run by $PYTHON, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.12}
PY=${PYTHON:-python3}
WHEELS_DIR=${WHEELS_DIR:-.whl}
WHEELS=(
  diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0
  peft==0.21.2
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 python-dotenv==1.2.4
  redis==8.1.0
  torchao==0.18.0
)
mkdir -p "$WHEELS_DIR"
for wheel in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS_DIR" "$wheel"
done
"$PY" - "$WHEELS_DIR" <<'PYTHON'
import pathlib, sys, zipfile
wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
names = [w.name.split("-")[0].lower() for w in wheels]
duplicates = {n for n in names if names.count(n) > 1}
if duplicates:
    sys.exit(f"more than one version of {sorted(duplicates)} in {sys.argv[1]}/: remove the old ones")
total = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
print(f"{total / 2**20:7.2f} MiB  total ({len(wheels)} wheels)")
if total > 64 * 2**20:
    sys.exit("the wheels exceed the 64 MiB that travels to the GPU machine")
PYTHON
