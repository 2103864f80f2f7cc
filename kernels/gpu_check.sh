#!/usr/bin/env bash
# GPU check of the kernels and the engine's CUDA path, in stages that each fit one device call (README "GPU").
# Results go to $OUT (default ./gpu_out), at most 4 files per stage (the device tool brings back 8).
#
#   bash kernels/gpu_check.sh STAGE        # from the repo root; no pip install of lazymerge needed
#
#   correct    stage 1 (~1-2 min): kernel tests vs the PyTorch reference (fixed configs, LAZYMERGE_AUTOTUNE=0),
#              the engine on CUDA vs CPU (tests/test_cuda_engine.py): correct.log
#   crossover  stage 2 (~3-4 min): fused merge-matmul vs merge + cuBLAS at 1..64 tokens on 7B layer shapes, which
#              decides linear.FUSED_MAX_TOKENS: crossover.log, crossover.json
#   autotune   stage 3, optional (~3-4 min): the autotuned launch tests (binaries compiled in parallel first) and
#              the sm_90 compile check with this machine's Triton: autotune.log, compile.log, compile.json
#   bench      stage 4, optional (<= 4.5 min): bench_kernels --quick (merge GB/s vs copy, fused vs floor): bench.*;
#              BENCH_ARGS="--budget 200" runs every shape and method until 200 s
#   overhead   stage 5, optional (~1 min): host cost per launch beside GPU time (bench_overhead): overhead.*
#   scale      stage 6, optional (not yet run; estimated 4-7 min): the scale benchmark's forward and decode parts on
#              CUDA with two layers of 7B shapes (search/bench_scale.py --shape 7b-layers): scale.log, scale.json;
#              SCALE_METHODS="ties" to run fewer methods; SCALE_ROOT=DIR builds the family there and keeps it
#
# The engine's tests need pydantic (the recipe schema), which the GPU image lacks: carry `.whl` (made here by
# `bash kernels/gpu_wheels.sh`); it is installed into /tmp/site when pydantic is missing.
# `lazymerge` is importable without installing: a shim folder holds a `lazymerge/` of symlinks that maps the repo's
# engine/, kernels/, ... the way pyproject's package-dir does. Commands run from that folder, not from the repo root,
# because `python -m` puts the working directory first on sys.path and the repo's own lazymerge/ has no kernels/.
# pytest gets no -q: pyproject's addopts has one, and a second hides the summary line.
set -uo pipefail
STAGE=${1:-correct}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/gpu_out}
PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 8)
mkdir -p "$OUT"
START=$(date +%s)

if ! "$PY" -c "import pydantic" 2>/dev/null && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$REPO"/.whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/lazymerge"
for f in "$REPO"/lazymerge/*; do ln -s "$f" "$SHIM/lazymerge/$(basename "$f")"; done
for sub in engine kernels server search demo; do
  [ -d "$REPO/$sub" ] && ln -s "$REPO/$sub" "$SHIM/lazymerge/$sub"
done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
cd "$SHIM" || exit 1

env_report() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch, triton, lazymerge.kernels.merge_triton as m
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')
try:
    import pydantic; print('pydantic', pydantic.__version__)
except ImportError:
    print('pydantic MISSING: the engine tests will skip (carry .whl: kernels/gpu_wheels.sh)')
print('kernels from', m.__file__)" 2>&1
}

xdist() {  # pytest-xdist flags when installed
  "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"
}

finish() {  # $1: log file
  echo "stage $STAGE: $(( $(date +%s) - START )) s" | tee -a "$1"
}

case "$STAGE" in
  correct)
    LOG=$OUT/correct.log
    env_report > "$LOG"
    # fixed configs (one binary per variant); the autotuned launches are stage 3
    LAZYMERGE_AUTOTUNE=0 timeout 220 "$PY" -m pytest -rs -p no:cacheprovider $(xdist $(( NPROC > 16 ? 16 : NPROC ))) --durations=15 \
      -k "${PYTEST_K:-not autotune}" "$REPO/tests/test_kernels.py" "$REPO/tests/test_cuda_engine.py" 2>&1 | tee -a "$LOG"
    echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$LOG"
    finish "$LOG" ;;
  crossover)
    LOG=$OUT/crossover.log
    env_report > "$LOG"
    timeout 230 "$PY" -m lazymerge.kernels.bench_crossover --budget 170 --json "$OUT/crossover.json" 2>&1 \
      | tee -a "$LOG"
    echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$LOG"
    finish "$LOG" ;;
  autotune)
    LOG=$OUT/autotune.log
    env_report > "$LOG"
    timeout 150 "$PY" -m lazymerge.kernels.aot --tier quick --arch 90 --jobs "$NPROC" --json "$OUT/compile.json" \
      > "$OUT/compile.log" 2>&1
    echo "aot exit: $?" | tee -a "$LOG"
    # no xdist: each test compiles its configs in a process pool of its own (aot.warm)
    LAZYMERGE_AUTOTUNE=1 timeout 150 "$PY" -m pytest -rs -p no:cacheprovider \
      -k "autotune" "$REPO/tests/test_kernels.py" 2>&1 | tee -a "$LOG"
    echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$LOG"
    finish "$LOG" ;;
  bench)
    LOG=$OUT/bench.log
    env_report > "$LOG"
    LAZYMERGE_AUTOTUNE=1 timeout 260 "$PY" -m lazymerge.kernels.bench_kernels ${BENCH_ARGS:---quick --budget 200} \
      --json "$OUT/bench.json" 2>&1 | tee -a "$LOG"
    echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$LOG"
    finish "$LOG" ;;
  overhead)
    LOG=$OUT/overhead.log
    env_report > "$LOG"
    timeout 200 "$PY" -m lazymerge.kernels.bench_overhead --json "$OUT/overhead.json" 2>&1 | tee -a "$LOG"
    echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$LOG"
    finish "$LOG" ;;
  scale)
    LOG=$OUT/scale.log
    env_report > "$LOG"
    timeout 480 "$PY" -m lazymerge.search.bench_scale --device cuda --shape 7b-layers \
      ${SCALE_ROOT:+--root "$SCALE_ROOT" --keep} --methods ${SCALE_METHODS:-ties dare_ties} --parts forward decode --repeats 3 --timeout 220 \
      --json "$OUT/scale.json" 2>&1 | tee -a "$LOG"
    echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$LOG"
    finish "$LOG" ;;
  *) echo "usage: $0 [correct|crossover|autotune|bench|overhead|scale]"; exit 2 ;;
esac
