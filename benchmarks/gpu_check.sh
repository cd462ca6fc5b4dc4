#!/usr/bin/env bash
# The GPU check, in one command on a machine with a CUDA GPU (about 8 minutes on an H200, at most 9): installs the wheels
# that benchmarks/gpu_prepare.sh downloaded into .whl/, imports everything the check uses (seconds, so that a
# missing module costs no device time), runs the GPU tests, then benchmarks/gpu_bench.py (extra arguments go to it),
# whose last section times the cold start. Logs, the table and gpu_bench.json land in $OUT (default ./out).
#
# --rehearsal runs the same on a CPU, before a GPU is lent (benchmarks/rehearsal/run.sh, `make gpu-rehearsal`): the
# GPU tests' CPU-runnable halves (GPU_TEST_DEVICE=cpu) and every benchmark section at tiny size
# (gpu_bench.py --rehearsal); a section that fails for any reason but the missing GPU fails the rehearsal.
#
#   benchmarks/gpu_check.sh [--rehearsal] [gpu_bench.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSAL=
if [ "${1:-}" = --rehearsal ]; then
  REHEARSAL=1
  shift
fi
export OUT=${OUT:-$PWD/out}
WHEELS_DIR=${WHEELS_DIR:-.whl}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS_DIR"/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
if [ -n "$REHEARSAL" ]; then
  echo "rehearsal on the CPU: no GPU" | tee "$OUT/gpu.txt"
  export GPU_TEST_DEVICE=cpu
  tests_limit=1200 bench_limit=1800
  set -- --rehearsal "$@"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
  tests_limit=180 bench_limit=300
  set -- --budget-s 200 "$@"
fi
python3 -c "import sys, torch, diffusers, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/gpu_imports.py "$WHEELS_DIR" 2>&1 | tee "$OUT/imports.log"
if [ "${PIPESTATUS[0]}" != 0 ]; then
  echo "imports failed: see $OUT/imports.log"
  exit 1
fi
timeout $tests_limit python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log"
tests=${PIPESTATUS[0]}
timeout $bench_limit python3 benchmarks/gpu_bench.py "$@" 2>&1 | tee "$OUT/gpu_bench.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
