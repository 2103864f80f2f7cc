"""DELLA's per-row magnitude ranks on the CPU by a radix sort in C, compiled once per machine.

    ranks(a2, table)      a2: float32 (R, W) magnitudes, contiguous, on the CPU; table: float32 (W,)
                          -> float32 (R, W) with out[r, j] = table[rank of a2[r, j] in row r]
    rank_ints(a2)         -> int16 (R, W) ranks themselves (W <= 32768)

The rank is the element's position in its row sorted ascending by the float32 bit pattern (the sign bit cleared),
ties by position: exactly `kernels.merge`'s argsort route (a stable integer argsort of the same bits), which stays
the oracle (`tests/test_rank_cpu.py`) and the path wherever this one is unavailable. Why: DELLA on the fly ranks
every row of every weight at every forward (mergekit sparsify.py `della_magprune`: an argsort of an argsort), and
torch's CPU sort of rows is a comparison sort (~35-50 ns an element here); a least-significant-digit radix sort of
31-bit keys, four 8-bit digits (a digit every key of the row shares is skipped), runs at ~12 ns with one thread
(`python -m lazymerge.kernels.bench_rank`).

The C source below is compiled by the system's C compiler into the cache directory (kernels/native.py: named by
the hash of the source and flags), loaded with ctypes (whose calls release
the GIL, so row blocks run on this process's torch threads in parallel). No compiler, a failed build or
LAZYMERGE_NATIVE_RANKS=0: both functions return None (once a warning) and the caller sorts with torch.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

from . import native

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The columns of one row's keys (bits with the sign bit cleared) in ascending order, stable: a pointer to p0 or p1.
   k0, k1, p0, p1: scratch of w uint32 each. */
static uint32_t *row_order(const uint32_t *src, int64_t w, uint32_t *k0, uint32_t *k1, uint32_t *p0, uint32_t *p1) {
    uint32_t hist[4][256];
    memset(hist, 0, sizeof hist);
    for (int64_t j = 0; j < w; j++) {
        uint32_t k = src[j] & 0x7FFFFFFFu;
        k0[j] = k;
        p0[j] = (uint32_t)j;
        hist[0][k & 255]++;
        hist[1][(k >> 8) & 255]++;
        hist[2][(k >> 16) & 255]++;
        hist[3][k >> 24]++;
    }
    uint32_t *ka = k0, *kb = k1, *pa = p0, *pb = p1;
    for (int d = 0; d < 4; d++) {
        uint32_t *h = hist[d];
        int shift = 8 * d;
        if (h[(ka[0] >> shift) & 255] == (uint32_t)w) continue; /* one bucket holds the whole row */
        uint32_t sum = 0;
        for (int b = 0; b < 256; b++) {
            uint32_t c = h[b];
            h[b] = sum;
            sum += c;
        }
        for (int64_t j = 0; j < w; j++) {
            uint32_t k = ka[j];
            uint32_t at = h[(k >> shift) & 255]++;
            kb[at] = k;
            pb[at] = pa[j];
        }
        uint32_t *t = ka; ka = kb; kb = t;
        t = pa; pa = pb; pb = t;
    }
    return pa;
}

/* out[r * w + col] = table[rank] (mode 0, float out) or rank (mode 1, int16 out), rows [r0, r1).
   Returns 0, or -1 when the scratch cannot be allocated. */
int row_ranks(const uint32_t *bits, int64_t r0, int64_t r1, int64_t w, const float *table, void *out, int mode) {
    uint32_t *s = (uint32_t *)malloc(4 * (size_t)w * sizeof(uint32_t));
    if (!s) return -1;
    for (int64_t r = r0; r < r1; r++) {
        uint32_t *pos = row_order(bits + r * w, w, s, s + w, s + 2 * w, s + 3 * w);
        if (mode == 0) {
            float *o = (float *)out + r * w;
            for (int64_t p = 0; p < w; p++) o[pos[p]] = table[p];
        } else {
            int16_t *o = (int16_t *)out + r * w;
            for (int64_t p = 0; p < w; p++) o[pos[p]] = (int16_t)p;
        }
    }
    free(s);
    return 0;
}
"""
FLAGS = ("-O3",)  # portable: the sort is scalar code
PARALLEL_FROM = 1 << 16  # elements: a smaller block is ranked on this thread alone

_LOCK = threading.Lock()
_STATE: dict = {}  # "lib": the loaded library or None (unavailable)


def enabled() -> bool:
    """Off with LAZYMERGE_NATIVE_RANKS=0 (read at each call, so tests and users can switch it)."""
    return os.environ.get("LAZYMERGE_NATIVE_RANKS", "1") != "0"


def library_path() -> Path:
    """Where the compiled library lives: named by the hash of the source, the flags and the machine type."""
    return native.library_path("rank", SOURCE, FLAGS)


def _library():
    """The loaded library, building it on first use; None where it cannot be built or loaded (one warning)."""
    if "lib" in _STATE:
        return _STATE["lib"]
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]
        lib = None
        try:
            lib = native.load("rank", SOURCE, FLAGS)
            lib.row_ranks.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.row_ranks.restype = ctypes.c_int
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            print(f"lazymerge: DELLA's native row ranks unavailable ({detail.strip()[:300]}); sorting with torch "
                  "instead (slower, the same ranks)", file=sys.stderr)
            lib = None
        _STATE["lib"] = lib
        return lib


def _run(a2: torch.Tensor, table: torch.Tensor | None, mode: int) -> torch.Tensor | None:
    if not enabled() or a2.device.type != "cpu" or a2.dtype != torch.float32 or a2.dim() != 2:
        return None
    lib = _library()
    if lib is None:
        return None
    a2 = a2.contiguous()
    out = torch.empty(a2.shape, dtype=torch.float32 if mode == 0 else torch.int16)
    table = table.contiguous() if table is not None else None
    if a2.numel() == 0:
        return out
    rows, w = a2.shape
    tp = table.data_ptr() if table is not None else None
    n = min(torch.get_num_threads(), rows) if a2.numel() >= PARALLEL_FROM else 1

    def part(lo: int, hi: int) -> int:
        return lib.row_ranks(a2.data_ptr(), lo, hi, w, tp, out.data_ptr(), mode)

    codes = native.run_parts(part, rows, n)
    if any(codes):
        raise MemoryError(f"DELLA's native row ranks: no memory for the scratch of a row of {w} elements")
    return out


def ranks(a2: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """float32 (R, W): table[rank] of each element of the float32 (R, W) magnitudes `a2` in its row (see the module
    docstring); None where this route does not apply (not a CPU float32 matrix, disabled, no compiler)."""
    return _run(a2, table, 0)


def rank_ints(a2: torch.Tensor) -> torch.Tensor | None:
    """int16 (R, W) ranks of `a2`'s elements in their rows (W <= 32768, checked by the caller); None as `ranks`."""
    return _run(a2, None, 1)
