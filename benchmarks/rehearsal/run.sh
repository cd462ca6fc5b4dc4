#!/usr/bin/env bash
# The GPU check rehearsed on this machine's CPU before a GPU is lent (`make gpu-rehearsal`, run by CI after the
# tests). It builds an environment like the GPU machine's from the package registry into .rehearsal/venv (ignored;
# kept between runs, rebuilt when benchmarks/rehearsal/*.txt change): Python 3.12, the GPU machine's versions of
# torch, transformers and the rest (requirements.txt), and then nothing that the GPU machine lacks
# (gpu_machine_packages.txt; anything else pip brought along is removed). The wheels of benchmarks/gpu_prepare.sh
# are fetched for that Python and installed as gpu_check.sh installs them there (--no-index, into a target folder
# first on PYTHONPATH); then gpu_check.sh --rehearsal runs. Outputs in .rehearsal/out.
#
# torch is PyPI's 2.11.0, the build for CUDA 13.0 that the GPU machine runs (2.11.0+cu130), here on the CPU: the
# package registry has no CPU build of 2.11, and this one imports without a GPU.
#
#   benchmarks/rehearsal/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${REHEARSAL_DIR:-.rehearsal}
VENV=$DIR/venv

find_python() {
  local candidate
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "no Python 3.12 (the GPU machine's) on PATH or in pyenv; install one (pyenv install 3.12)" >&2
  return 1
}

started=$(date +%s)
if [ ! -f "$VENV/.installed" ] || [ -n "$(find benchmarks/rehearsal -name '*.txt' -newer "$VENV/.installed")" ]; then
  python=$(find_python)
  rm -rf "$VENV"
  "$python" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -r benchmarks/rehearsal/requirements.txt
  "$VENV/bin/python" -I - benchmarks/rehearsal/gpu_machine_packages.txt <<'PYTHON'
import importlib.metadata, re, subprocess, sys

def normal(name):
    return re.sub(r"[-_.]+", "-", name).lower()

there = {normal(line.strip()) for line in open(sys.argv[1]) if line.strip() and not line.startswith("#")}
installed = {normal(dist.metadata["Name"]) for dist in importlib.metadata.distributions()}
extra = sorted(installed - there - {"pip", "setuptools", "wheel"})
if extra:
    print("not on the GPU machine, removed:", ", ".join(extra))
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
PYTHON
  touch "$VENV/.installed"
fi
built=$(date +%s)
version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
benchmarks/gpu_prepare.sh "$version"
rm -rf "$DIR/site" "$DIR/out"
status=0
PATH="$PWD/$VENV/bin:$PATH" SITE="$PWD/$DIR/site" OUT="$PWD/$DIR/out" benchmarks/gpu_check.sh --rehearsal || status=$?
ended=$(date +%s)
echo "rehearsal: environment $((built - started)) s, check $((ended - built)) s, exit $status"
exit $status
