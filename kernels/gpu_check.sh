#!/usr/bin/env bash
# One-shot GPU check of the merge kernels: the kernel tests on CUDA, then the benchmark. Results go to $OUT
# (default ./gpu_out): env.txt, tests.log, bench.log, bench.json.
#
#   bash kernels/gpu_check.sh [all|tests|bench|quick]      # from the repo root; no pip install needed
#
#   all   (default) tests (<= 230 s, 8 xdist workers) then the full bench with a 230 s budget: fits one 10-minute call
#   tests only the tests (<= 540 s);  bench  only the full bench (520 s budget);  quick  tests + bench --quick
#
# `lazymerge` is importable without installing: a shim folder holds a `lazymerge/` of symlinks that maps the repo's
# engine/, kernels/, ... the way pyproject's package-dir does. Commands run from that folder, not from the repo root,
# because `python -m` puts the working directory first on sys.path and the repo's own lazymerge/ has no kernels/.
set -uo pipefail
MODE=${1:-all}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

SHIM=$(mktemp -d)
mkdir -p "$SHIM/lazymerge"
for f in "$REPO"/lazymerge/*; do ln -s "$f" "$SHIM/lazymerge/$(basename "$f")"; done
for sub in engine kernels server search demo; do
  [ -d "$REPO/$sub" ] && ln -s "$REPO/$sub" "$SHIM/lazymerge/$sub"
done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
cd "$SHIM" || exit 1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch, triton, lazymerge.kernels.merge_triton as m
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')
print('kernels from', m.__file__)" 2>&1
} | tee "$OUT/env.txt"

run_tests() {  # $1: timeout in seconds
  local xd=()
  "$PY" -c "import xdist" 2>/dev/null && xd=(-n 8)
  # LAZYMERGE_AUTOTUNE=0: one fixed config per variant (fewer compilations); the autotuned paths have their own tests
  LAZYMERGE_AUTOTUNE=0 timeout "$1" "$PY" -m pytest -q -rs -p no:cacheprovider "${xd[@]}" \
    "$REPO/tests/test_kernels.py" 2>&1 | tee "$OUT/tests.log"
  echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
}

run_bench() {  # $1: budget (no new block after it), $2: hard timeout, $3...: extra flags
  local budget=$1 limit=$2
  shift 2
  LAZYMERGE_AUTOTUNE=1 timeout "$limit" "$PY" -m lazymerge.kernels.bench_kernels --budget "$budget" \
    --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
  echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
}

case "$MODE" in
  all) run_tests 230; run_bench 230 300 ;;
  tests) run_tests 540 ;;
  bench) run_bench 520 580 ;;
  quick) run_tests 230; run_bench 200 300 --quick ;;
  *) echo "usage: $0 [all|tests|bench|quick]"; exit 2 ;;
esac
