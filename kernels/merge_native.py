"""The delta merge's loop in C: task arithmetic, TIES, breadcrumbs and DARE, one pass, compiled in a second per machine.

    merge_delta_native(base, sources, spec, out=None, round_to="") -> float32 tensor of base's shape, or None
    l1_sums_native(base, x, spec, i, before=None)  -> (sum |d|, sum |d * keep_i|) in float64, or None

Same contract and the same float32 operations, element by element and in the same order, as
`kernels.merge.merge_reference` (the oracle; tests check the two equal bit for bit) for whole tensors of the delta
mode with the keep rules "all" (task arithmetic), "topk" (TIES; "band" with breadcrumbs' outer cut) and "random"
(DARE: `kernels.rng`'s counter-based mask, compared as an integer: u = m * 2**-24 < p exactly when m < ceil(p * 2**24)),
with or without sign consensus and normalization, over bf16 / fp16 / fp32 storage, rounded to the output dtype
(`round_to`) in the same loop.

Why a C loop beside the Inductor one (kernels/merge_cpu.py, which keeps DELLA and the cut's counting passes): on a
3072 x 1024 merge of 3 bf16 sources rounded to bf16, the Inductor loop took 1.6-3.6 ns an element on one thread of
the AVX-512 EPYC and this loop 0.5-1.9, 1.9-3.2x less (float32 sources: 1.1-1.6x; task arithmetic on 2 threads
0.84x, both near the memory's speed; BENCHMARKS.md, session 18, `python -m lazymerge.kernels.bench_native`).
Inductor's loop reloads and broadcasts every recipe number at every vector and converts every mask through float
vectors. And a structure compiles in well under a second instead of 25-60 s.

Each structure (keep rule, consensus, normalize, number of sources, their storage dtypes, the rounding) is a C
function generated below, compiled by the system's C compiler (kernels/native.py) with `-O3 -ffp-contract=off` (no
fused multiply-adds: the reference rounds every product) and the vector flags of ATen's CPU capability, and cached
per machine (with its SHA-1 beside it: a truncated file is rebuilt, never loaded). The element range is cut into one
part per torch thread. A tensor of at most `merge_cpu.COMPILE_FROM` elements builds nothing: it runs a library already
built, else the next route, so a toy model compiles nothing. No compiler, a failed build or LAZYMERGE_NATIVE_MERGE=0:
None, and the caller runs the Inductor loop or the reference (the same bits).
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
import threading

import torch

from . import merge_cpu, native
from .merge import ROUND_DTYPES

FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11")
KEEPS = ("all", "topk", "band", "random")
PARALLEL_FROM = 1 << 15  # elements: a smaller tensor runs on the calling thread alone
ALIGN = 64  # elements: part boundaries (whole vectors and cache lines)
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

_LOCK = threading.Lock()
_LIBS: dict = {}  # structure key -> the loaded C function, or None (could not be built: not tried again)
_ABSENT: set = set()  # structures a small tensor found no library for (not looked for again until one is built)
_ARGS: dict = {}  # id(spec) -> (spec, its numbers as C arrays)
ARGS_MAX = 8192

_PRELUDE = r"""
#include <stdint.h>
#include <string.h>
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x21F0AAADu; x ^= x >> 15; x *= 0x735A2D97u; x ^= x >> 15; return x;
}
static inline float ld_f32(const void *p, int64_t j) { return ((const float *)p)[j]; }
static inline float ld_bf16(const void *p, int64_t j) {
    uint32_t u = (uint32_t)((const uint16_t *)p)[j] << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline float ld_f16(const void *p, int64_t j) { return (float)((const _Float16 *)p)[j]; }
static inline float rnd_none(float f) { return f; }
/* c10::BFloat16's round to nearest even (NaN -> a quiet NaN) */
static inline float rnd_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u = (f != f) ? 0x7FC00000u : ((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
    float r; memcpy(&r, &u, 4); return r;
}
static inline float rnd_f16(float f) { return (float)(_Float16)f; }
"""


def enabled() -> bool:
    """Off with LAZYMERGE_NATIVE_MERGE=0 (read at each call)."""
    return os.environ.get("LAZYMERGE_NATIVE_MERGE", "1") != "0"


def structure(spec, base, sources, round_to: str) -> tuple | None:
    """The key of the C function `spec` needs over these storage dtypes, or None if this loop does not take it."""
    if (spec.mode != "delta" or spec.row_layout or spec.consensus_raw or spec.div_min or not sources
            or len(sources) != len(spec.weights)):
        return None
    keep = merge_cpu.structure_keep(spec)
    dts = [_DTYPES.get(t.dtype) for t in (base, *sources)]
    if keep not in KEEPS or None in dts:
        return None
    return (keep, int(spec.consensus), int(spec.normalize), dts[0], tuple(dts[1:]),
            round_to if round_to in ROUND_DTYPES else "")


def source(key: tuple) -> str:
    """The C text of structure `key`: one function `merge(out, b, xs, w, sc, t_in, c_in, t_out, c_out, thr, k1, k2,
    lam, div_all, offset, lo, hi)` writing out[j] for lo <= j < hi (flat element j has index offset + j)."""
    keep, consensus, normalize, bdt, xdts, round_to = key
    n = len(xdts)
    rnd = {"": "rnd_none", "bfloat16": "rnd_bf16", "float16": "rnd_f16"}[round_to]
    L = [_PRELUDE,
         "void merge(float *restrict out, const void *restrict b, const void *const *xs, const float *w,\n"
         "           const float *sc, const float *t_in, const int64_t *c_in, const float *t_out,\n"
         "           const int64_t *c_out, const uint32_t *thr, const uint32_t *k1, const uint32_t *k2,\n"
         "           float lam, float div_all, int64_t offset, int64_t lo, int64_t hi) {"]
    for i in range(n):
        L.append(f"    const void *restrict x{i} = xs[{i}]; const float w{i} = w[{i}], sc{i} = sc[{i}];")
        if keep in ("topk", "band"):
            L.append(f"    const float ti{i} = t_in[{i}]; const int64_t ci{i} = c_in[{i}];")
        if keep == "band":
            L.append(f"    const float to{i} = t_out[{i}]; const int64_t co{i} = c_out[{i}];")
        if keep == "random":
            L.append(f"    const uint32_t th{i} = thr[{i}], ka{i} = k1[{i}], kb{i} = k2[{i}];")
    L.append("    for (int64_t j = lo; j < hi; j++) {")
    L.append(f"        const float bb = ld_{bdt}(b, j);")
    if keep in ("topk", "band"):
        L.append("        const int64_t idx = offset + j;")
    if keep == "random":
        L.append("        const uint32_t u32 = (uint32_t)(offset + j);")
    for i, dt in enumerate(xdts):
        L.append(f"        float d{i} = ld_{dt}(x{i}, j) - bb;")
        if keep in ("topk", "band"):
            L.append(f"        const float a{i} = __builtin_fabsf(d{i});")
            L.append(f"        int k{i} = (a{i} > ti{i}) | ((a{i} == ti{i}) & (idx <= ci{i}));")
            if keep == "band":
                L.append(f"        k{i} = k{i} & !((a{i} > to{i}) | ((a{i} == to{i}) & (idx <= co{i})));")
            L.append(f"        d{i} = d{i} * (float)k{i};")
        elif keep == "random":
            L.append(f"        d{i} = d{i} * (float)((mix32(mix32(u32 ^ ka{i}) ^ kb{i}) >> 8) < th{i});")
        L.append(f"        const float p{i} = (d{i} * sc{i}) * w{i};")
    total = " + ".join(f"p{i}" for i in range(n))
    if consensus:
        L.append(f"        const int pos = ({total}) >= 0.0f;")
        L.append("        float mixed = 0.0f, div = 0.0f;")
        for i in range(n):
            L.append(f"        {{ const float c = pos ? (float)(p{i} > 0.0f) : (float)(p{i} < 0.0f);"
                     f" mixed = mixed + p{i} * c; div = div + c * w{i}; }}")
        L.append("        div = div == 0.0f ? 1.0f : div;")
    else:
        L.append(f"        float mixed = {total};")
        L.append("        const float div = div_all;")
    if normalize:
        L.append("        mixed = mixed / div;")
    L.append(f"        out[j] = {rnd}(bb + mixed * lam);")
    L.append("    }")
    L.append("}")
    return "\n".join(L) + "\n"


L1_BLOCK = 1 << 16  # elements: the L1 sums add fixed blocks in order, so they do not depend on the thread count


def l1_source(key: tuple) -> str:
    """The C text of the L1 sums of structure `key` = (keep, base dtype, source dtype): one function `l1(res, b, x,
    t_in, c_in, t_out, c_out, thr, k1, k2, offset, lo, hi)` writing, for each block of L1_BLOCK elements from lo (a
    multiple of it) to hi, res[2 * block] = sum |d| and res[2 * block + 1] = sum |d * keep| in float64, each summed in
    16 lanes (the block's element j into lane j % 16, in order) and then lanes 0..15 in order."""
    keep, bdt, xdt = key

    def body(j: str, lane: str, pad: str) -> list[str]:
        out = [f"const float d = ld_{xdt}(x, {j}) - ld_{bdt}(b, {j});", "const float a = __builtin_fabsf(d);"]
        if keep in ("topk", "band"):
            out += [f"const int64_t idx = offset + {j};", "int k = (a > ti) | ((a == ti) & (idx <= ci));"]
            if keep == "band":
                out.append("k = k & !((a > to) | ((a == to) & (idx <= co)));")
        else:  # random
            out.append(f"const int k = (mix32(mix32((uint32_t)(offset + {j}) ^ ka) ^ kb) >> 8) < th;")
        out += [f"all[{lane}] += (double)a;", f"kept[{lane}] += (double)__builtin_fabsf(d * (float)k);"]
        return [pad + line for line in out]

    L = [_PRELUDE,
         "void l1(double *restrict res, const void *restrict b, const void *restrict x, float ti, int64_t ci,",
         "        float to, int64_t co, uint32_t th, uint32_t ka, uint32_t kb, int64_t offset, int64_t lo,",
         "        int64_t hi) {",
         f"    for (int64_t s = lo; s < hi; s += {L1_BLOCK}) {{",
         f"        const int64_t e = s + {L1_BLOCK} < hi ? s + {L1_BLOCK} : hi;",
         "        double all[16] = {0}, kept[16] = {0};",
         "        int64_t j = s;",
         "        for (; j + 16 <= e; j += 16) {",
         "            for (int q = 0; q < 16; q++) {",
         *body("j + q", "q", " " * 16),
         "            }",
         "        }",
         "        for (; j < e; j++) {",
         "            const int64_t q = (j - s) & 15;",
         *body("j", "q", " " * 12),
         "        }",
         "        double sa = 0.0, sk = 0.0;",
         "        for (int q = 0; q < 16; q++) { sa += all[q]; sk += kept[q]; }",
         f"        res[2 * ((s - lo) / {L1_BLOCK})] = sa;",
         f"        res[2 * ((s - lo) / {L1_BLOCK}) + 1] = sk;",
         "    }",
         "}"]
    return "\n".join(L) + "\n"


_ARGTYPES = [ctypes.c_void_p] * 12 + [ctypes.c_float, ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]


def _load(memo: tuple, name: str, text, symbol: str, argtypes: list, may_build: bool = True):
    """C function `symbol` of the library `name` built from `text()` (memoized under `memo`); None where it cannot be
    built (after one message), or is not built yet and `may_build` is False (a small tensor: `merge_delta_native`)."""
    fn = _LIBS.get(memo, False)
    if fn is not False:
        return fn
    if not may_build and memo in _ABSENT:
        return None
    with _LOCK:
        fn = _LIBS.get(memo, False)
        if fn is not False:
            return fn
        try:
            lib = native.load(name, text(), FLAGS + native.isa_flags(), may_build=may_build)
            if lib is None:
                _ABSENT.add(memo)
                return None
            fn = getattr(lib, symbol)
            fn.argtypes, fn.restype = argtypes, None
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            print(f"lazymerge: the C loop {name} is unavailable ({detail.strip()[:300]}); using the compiled "
                  "Inductor loop or the reference instead (the same result)", file=sys.stderr)
            fn = None
        _LIBS[memo] = fn
        return fn


def _function(key: tuple, may_build: bool = True):
    name = "merge-" + "-".join([key[0], f"c{key[1]}", f"n{key[2]}", key[3], "_".join(key[4]), key[5] or "f32"])
    return _load(key, name, lambda: source(key), "merge", _ARGTYPES, may_build)


def _f32(v: float) -> float:
    """v rounded to float32 (as torch rounds a Python number that meets a float32 tensor)."""
    return float(torch.tensor(v, dtype=torch.float32))


def _thresholds(spec) -> list[int]:
    """DARE's integer thresholds: u = m * 2**-24 < p (p the float32 density) exactly when m < ceil(p * 2**24)."""
    out = []
    for d in spec.densities:
        p = _f32(d)
        out.append(0 if not p > 0 else min(1 << 24, math.ceil(p * (1 << 24))))
    return out


def _args(spec, n: int) -> tuple:
    """The spec's numbers as C arrays (memoized per spec object, as merge_cpu's `_tail`)."""
    hit = _ARGS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    f32 = lambda v, default=0.0: (ctypes.c_float * n)(*(list(v) if v else [default] * n))  # noqa: E731
    i64 = lambda v: (ctypes.c_int64 * n)(*(list(v) if v else [-1] * n))  # noqa: E731
    u32 = lambda v: (ctypes.c_uint32 * n)(*v)  # noqa: E731
    keys = spec.keys or ((0, 0),) * n
    thr = _thresholds(spec) if spec.keep == "random" else [0] * n
    arrays = (f32(spec.weights), f32(spec.scales, 1.0), f32(spec.t_in), i64(spec.c_in), f32(spec.t_out),
              i64(spec.c_out), u32(thr), u32(k[0] & 0xFFFFFFFF for k in keys), u32(k[1] & 0xFFFFFFFF for k in keys))
    got = (arrays, _f32(spec.lam), _f32(spec.weight_sum))  # as the reference has them: float32 scalars
    if len(_ARGS) >= ARGS_MAX:
        _ARGS.clear()
    _ARGS[id(spec)] = (spec, got)
    return got


def merge_delta_native(base, sources, spec, out=None, round_to: str = "", offset: int = 0) -> torch.Tensor | None:
    """The merged float32 tensor of base's shape (written into `out`, a contiguous float32 CPU tensor of as many
    elements, when given), or None when this loop does not take the spec, the tensors or `out`, or cannot be built.
    `offset`: the flat index of base's first element in its whole tensor (the masks' and tie rule's index)."""
    if not enabled() or base is None or base.device.type != "cpu":
        return None
    key = structure(spec, base, sources, round_to)
    if key is None or any(s.shape != base.shape or s.device != base.device for s in sources):
        return None
    if out is not None and (out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != base.numel()
                            or out.device.type != "cpu"):
        return None
    # a tensor of at most COMPILE_FROM elements builds nothing (a toy model compiles nothing, as on the Inductor
    # route): it runs a library already built, else the caller's next route, with the same bits
    fn = _function(key, may_build=base.numel() > merge_cpu.COMPILE_FROM)
    if fn is None:
        return None
    n = len(sources)
    b = base.contiguous()
    xs = [s.contiguous() for s in sources]
    res = out if out is not None else torch.empty(base.shape, dtype=torch.float32)
    numel = b.numel()
    if numel == 0:
        return res
    arrays, lam, div_all = _args(spec, n)
    ptrs = (ctypes.c_void_p * n)(*(x.data_ptr() for x in xs))
    head = (res.data_ptr(), b.data_ptr(), ptrs, *arrays)

    def part(lo: int, hi: int) -> None:
        fn(*head, lam, div_all, offset, lo, hi)

    threads = torch.get_num_threads() if numel >= PARALLEL_FROM else 1
    native.run_parts(part, numel, threads, ALIGN)
    return res


_L1_ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_float, ctypes.c_int64, ctypes.c_float, ctypes.c_int64] + [
    ctypes.c_uint32] * 3 + [ctypes.c_int64] * 3


def _l1_function(key: tuple):
    return _load(("l1",) + key, "l1-" + "-".join(key), lambda: l1_source(key), "l1", _L1_ARGTYPES)


def l1_sums_native(base, x, spec, i: int, before: float | None = None) -> tuple[float, float] | None:
    """(sum |d|, sum |d * keep_i|) in float64 of source i of `spec` (d = x - base; `kernels.merge.l1_sums`' norms,
    mergekit sparsify.py's rescale), or None where this loop does not take it (DELLA, other keep rules, a tensor of
    at most `merge_cpu.COMPILE_FROM` elements: its sums take the reference route on every machine, as before).
    `before`: sum |d| from an earlier call of this route, returned as is. The sums are added in a fixed order (blocks
    of L1_BLOCK elements, 16 lanes each), so they do not depend on the thread count; they differ from the other
    routes' in the last bits (each route's sums are kept under their own key: engine/merger.py)."""
    keep = merge_cpu.structure_keep(spec)
    if (not enabled() or keep not in ("topk", "band", "random") or base.device.type != "cpu"
            or base.numel() <= merge_cpu.COMPILE_FROM or x.shape != base.shape):
        return None
    dts = (_DTYPES.get(base.dtype), _DTYPES.get(x.dtype))
    if None in dts:
        return None
    fn = _l1_function((keep, *dts))
    if fn is None:
        return None
    b, xx = base.contiguous(), x.contiguous()
    numel = b.numel()
    blocks = -(-numel // L1_BLOCK)
    res = torch.empty(2 * blocks, dtype=torch.float64)
    t_in = _f32(spec.t_in[i]) if keep != "random" else 0.0
    t_out = _f32(spec.t_out[i]) if keep == "band" else 0.0
    c_in = int(spec.c_in[i]) if keep != "random" else -1
    c_out = int(spec.c_out[i]) if keep == "band" else -1
    thr = _thresholds(spec)[i] if keep == "random" else 0
    k1, k2 = (k & 0xFFFFFFFF for k in spec.keys[i]) if keep == "random" else (0, 0)

    def part(lo: int, hi: int) -> None:  # lo, hi: block numbers
        fn(res.data_ptr() + 16 * lo, b.data_ptr(), xx.data_ptr(), t_in, c_in, t_out, c_out, thr, k1, k2, 0,
           lo * L1_BLOCK, min(numel, hi * L1_BLOCK))

    native.run_parts(part, blocks, torch.get_num_threads() if numel >= PARALLEL_FROM else 1)
    sums = res.view(-1, 2).tolist()
    total = after = 0.0
    for a, k in sums:  # in block order: the same sums on any number of threads
        total += a
        after += k
    return (total if before is None else before), after


__all__ = ["enabled", "l1_sums_native", "merge_delta_native", "source", "structure"]
