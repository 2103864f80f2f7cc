"""Triton merge kernel: the merged tensor from base + 1..8 sources in one pass (twin of `merge.merge_reference`).

    merge_triton(base, sources, spec, aux=None, index=None, out=None) -> out (or a new float32 tensor)

Same contract as `kernels/merge.py`: every input element is read once, every output element written once, the
arithmetic is float32 whatever the storage dtype, and the output takes `out`'s dtype (float32 without `out`).

Bit-exactness. The kernel performs the reference's float32 operations in the reference's order, so on the CPU
interpreter and on a GPU it returns the reference's bits:
* divisions use `tl.div_rn` (IEEE round-to-nearest; Triton's `/` is approximate on NVIDIA GPUs);
* kernels are launched with `enable_fp_fusion=False`, so `a * b + c` is not contracted into an FMA;
* DARE/DELLA masks come from `rng.uniform_tl`, the bit-for-bit twin of `rng.uniform`;
* consensus sums are accumulated per sign in one sweep: adding the reference's `p * 0` terms only changes the sign
  of a zero, so the sums are the reference's.

Layout. Sources and per-source aux tensors (DELLA ranks) are passed as up to 8 pointer arguments each; a
constexpr `N_SOURCES` selects how many are used (unused slots receive a dummy). Per-source scalars live in two
small tables built once per (spec, device): float32 `(n, 8)` and int64 `(n, 4)`, see `spec_tables`.
`index` (flat element indices of gathered rows) is supported in-kernel: the RNG and the top-k tie rule use it in
place of the element's position. Inputs must share one shape; non-contiguous inputs are made contiguous.

`_merge_tile` is the shared device function; `merge_matmul.py` calls it on a (BLOCK_N, BLOCK_K) weight tile.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .merge import MergeSpec
from .rng import uniform_tl

MAX_SOURCES = 8
KEEP_CODES = {"all": 0, "topk": 1, "random": 2, "della": 3, "vartopk": 4, "ram": 5, "fusion": 6}
# A top-k cut with an outer cut (breadcrumbs: some t_out finite) compiles as its own variant; TIES' top-k alone
# skips the outer compares (~1/6 of its instructions per element on sm_90).
KEEP_BAND = 7
MODE_CODES = {"combine": 0, "delta": 1, "nearswap": 2}
ROW_CODES = {"": 0, "row": 1, "col": 2}

# float table columns: weight (or coefficient; nearswap: t), scale, t_in, t_out, density, density - eps, 2 * eps,
# ram's epsilon
F_COLS: tl.constexpr = tl.constexpr(8)
# int table columns: c_in, c_out, key1, key2
I_COLS: tl.constexpr = tl.constexpr(4)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Autotune on a real GPU unless LAZYMERGE_AUTOTUNE=0 (tests: one fixed config, fewer compilations)."""
    return not interpreting() and os.environ.get("LAZYMERGE_AUTOTUNE", "1") != "0"


# -- per-(spec, device) scalar tables ---------------------------------------------------------------------------
_TABLES: OrderedDict = OrderedDict()
_TABLES_MAX = 4096


def spec_tables(spec: MergeSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(float32 (n, 8) table, int64 (n, 4) table, divisor, lam) of `spec`, cached by (spec, device).

    Python doubles become float32 exactly where the reference casts them (a float32 tensor op with a Python
    scalar): `density - eps` and `2 * eps` are formed in double first, as in `keep_mask`.
    """
    key = (spec, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    n = spec.n
    f = [[0.0] * 8 for _ in range(n)]
    ints = [[-1, -1, 0, 0] for _ in range(n)]
    for i in range(n):
        row = f[i]
        if spec.mode == "combine":
            row[0] = spec.coeffs[i]
            continue
        if spec.mode == "nearswap":
            row[0] = spec.t
            continue
        row[0] = spec.weights[i]
        row[1] = spec.scales[i] if spec.scales else 1.0
        if spec.keep == "topk":
            row[2], row[3] = spec.t_in[i], spec.t_out[i]
            # an outer cut at inf drops nothing, as the reference skips it (also an infinite |delta| at c_out)
            ints[i][0] = int(spec.c_in[i])
            ints[i][1] = int(spec.c_out[i]) if spec.t_out[i] != float("inf") else -1
        elif spec.keep in ("vartopk", "fusion"):  # one cut for every source, stored in source 0's row
            row[2] = spec.t_in[0]
            ints[i][0] = int(spec.c_in[0]) if spec.c_in else -1
        elif spec.keep == "ram":
            row[7] = spec.eps[i]
        elif spec.keep in ("random", "della"):
            row[4] = spec.densities[i]
            if spec.keep == "della":
                row[5] = spec.densities[i] - spec.eps[i]
                row[6] = 2.0 * spec.eps[i]
            ints[i][2], ints[i][3] = int(spec.keys[i][0]), int(spec.keys[i][1])
    if spec.mode == "combine":
        div = float(spec.divisor)
    elif spec.mode == "nearswap":
        div = 1.0
    elif spec.consensus:
        div = 1.0  # per element, in-kernel
    else:
        div = float(spec.weight_sum)
    ftab = torch.tensor(f, dtype=torch.float32).reshape(n, 8).to(device)
    itab = torch.tensor(ints, dtype=torch.int64).reshape(n, 4).to(device)
    hit = (ftab, itab, div, float(spec.lam))
    _TABLES[key] = hit
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return hit


_PREPARED: OrderedDict = OrderedDict()


def prepared(spec: MergeSpec, device: torch.device) -> tuple[dict, tuple[torch.Tensor, torch.Tensor, float, float]]:
    """(a fresh copy of `spec_flags(spec)`, `spec_tables(spec, device)`), memoized by the spec object's identity:
    a launcher called per layer and token with the same spec skips hashing and comparing the spec's tuples (a few
    microseconds of the host's launch cost each; an equal spec that is another object takes the slower path)."""
    key = (id(spec), device)
    hit = _PREPARED.get(key)
    if hit is None or hit[0] is not spec:
        hit = (spec, spec_flags(spec), spec_tables(spec, device))
        _PREPARED[key] = hit
        if len(_PREPARED) > _TABLES_MAX:
            _PREPARED.popitem(last=False)
    return dict(hit[1]), hit[2]


def spec_flags(spec: MergeSpec) -> dict:
    """The constexpr switches of a spec (one compiled variant per distinct value)."""
    if spec.mode not in MODE_CODES:
        raise ValueError(f"unknown merge mode {spec.mode!r}")
    if spec.keep not in KEEP_CODES:
        raise ValueError(f"unknown keep rule {spec.keep!r}")
    if spec.row_layout not in ROW_CODES:
        raise ValueError(f"unknown row layout {spec.row_layout!r}")
    delta = spec.mode == "delta"
    combine = spec.mode == "combine"
    return dict(
        N_SOURCES=spec.n,
        MODE=MODE_CODES[spec.mode],
        KEEP=(KEEP_BAND if spec.has_outer_cut else KEEP_CODES[spec.keep]) if delta else 0,
        CONSENSUS=delta and bool(spec.consensus),
        NORMALIZE=delta and bool(spec.normalize),
        DIVIDE=bool(combine and spec.divisor != 1.0),
        ROWS=ROW_CODES[spec.row_layout] if spec.mode != "nearswap" else 0,
        CONSENSUS_RAW=delta and bool(spec.consensus) and bool(spec.consensus_raw),
        DIV_FLOOR=delta and bool(spec.consensus) and spec.div_min > 0,
    )


def uses_aux(flags: dict) -> bool:
    """Whether the kernel reads the aux pointers (DELLA ranks, per-row coefficients, arcee_fusion's row KL)."""
    return flags["KEEP"] in (3, 6) or flags["ROWS"] != 0


def pointer_args(base, sources, aux):
    """(B, (X0..X7), (A0..A7)): flat contiguous tensors, unused slots filled with a dummy."""
    xs = [s.contiguous() for s in sources]
    b = base.contiguous() if base is not None else xs[0]
    a = [t.contiguous() for t in aux] if aux is not None else []
    xs_p = xs + [xs[0]] * (MAX_SOURCES - len(xs))
    a_p = a + [a[0] if a else xs[0]] * (MAX_SOURCES - len(a))
    return b, xs_p, a_p


# -- device functions -------------------------------------------------------------------------------------------
@triton.jit
def _pick(i: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """The i-th of eight arguments (i: constexpr, resolved at compile time)."""
    r = p0
    if i == 1:
        r = p1
    if i == 2:
        r = p2
    if i == 3:
        r = p3
    if i == 4:
        r = p4
    if i == 5:
        r = p5
    if i == 6:
        r = p6
    if i == 7:
        r = p7
    return r


@triton.jit
def _round_bf16(x):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32. Only for the interpreter, whose
    float32 -> bfloat16 cast truncates (Triton 3.9); compiled kernels cast with round-to-nearest-even."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _coeff(i: tl.constexpr, F, A0, A1, A2, A3, A4, A5, A6, A7, r, mask, ROWS: tl.constexpr):
    """Source i's coefficient (combine) or weight (delta): per row from aux[i][r] when ROWS, else the table's."""
    if ROWS != 0:
        c = tl.load(_pick(i, A0, A1, A2, A3, A4, A5, A6, A7) + r, mask=mask, other=0.0).to(tl.float32)
    else:
        c = tl.load(F + i * F_COLS)
    return c


@triton.jit
def _merge_tile(B, X0, X1, X2, X3, X4, X5, X6, X7, A0, A1, A2, A3, A4, A5, A6, A7,
                F, I, offs, j, mask, div, lam, row_width, div_min,
                N_SOURCES: tl.constexpr, MODE: tl.constexpr, KEEP: tl.constexpr,
                CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, DIVIDE: tl.constexpr,
                ROWS: tl.constexpr, CONSENSUS_RAW: tl.constexpr, DIV_FLOOR: tl.constexpr):
    """float32 merged values at `offs` (any block shape; `j`: int64 flat indices of the same shape)."""
    if ROWS == 2:
        r = j % row_width
    else:
        r = j // row_width  # row of j (per-row coefficients, arcee_fusion's KL)
    if MODE == 0:
        # combine: (sum_i coeff_i * X_i) / divisor
        res = tl.load(X0 + offs, mask=mask, other=0.0).to(tl.float32) * _coeff(0, F, A0, A1, A2, A3, A4, A5, A6,
                                                                              A7, r, mask, ROWS)
        for i in tl.static_range(1, N_SOURCES):
            x = tl.load(_pick(i, X0, X1, X2, X3, X4, X5, X6, X7) + offs, mask=mask, other=0.0).to(tl.float32)
            res += x * _coeff(i, F, A0, A1, A2, A3, A4, A5, A6, A7, r, mask, ROWS)
        if DIVIDE:
            res = tl.div_rn(res, tl.zeros_like(res) + div)
    elif MODE == 2:
        # nearswap: w = clamp(t * (1 / max(|a - b|, 1e-6)), 0, 1); w * b + (1 - w) * a
        a = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        bx = tl.load(X0 + offs, mask=mask, other=0.0).to(tl.float32)
        ad = tl.maximum(tl.abs(a - bx), 1e-6)
        w = tl.div_rn(tl.zeros_like(ad) + 1.0, ad) * tl.load(F)
        w = tl.minimum(tl.maximum(w, 0.0), 1.0)
        res = w * bx + (1.0 - w) * a
    else:
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        zero = tl.zeros_like(b)
        total = zero  # sum_i p_i                       (consensus sign, or the plain mix)
        pos_sum = zero  # sum_i p_i [p_i > 0]
        neg_sum = zero  # sum_i p_i [p_i < 0]
        pos_w = zero  # sum_i w_i [p_i > 0]
        neg_w = zero  # sum_i w_i [p_i < 0]
        vote = zero  # CONSENSUS_RAW: sum_i d_i k_i (the sign election on unweighted deltas)
        if KEEP == 4:
            # sce: variance over the sources of d_i (float64 Welford, rounded once), one top-k cut for all
            mean = tl.zeros_like(b).to(tl.float64)
            m2 = tl.zeros_like(b).to(tl.float64)
            for i in tl.static_range(N_SOURCES):
                x = tl.load(_pick(i, X0, X1, X2, X3, X4, X5, X6, X7) + offs, mask=mask, other=0.0).to(tl.float32)
                xd = (x - b).to(tl.float64)
                delta = xd - mean
                mean = mean + delta / (i + 1.0)
                m2 = m2 + delta * (xd - mean)
            var = (m2 / N_SOURCES).to(tl.float32)
            t_v = tl.load(F + 2)
            c_v = tl.load(I)
            shared_keep = ((var > t_v) | ((var == t_v) & (j <= c_v))).to(tl.float32)
        if KEEP == 5:
            # ram: how many sources move this element by more than epsilon
            count = zero
            for i in tl.static_range(N_SOURCES):
                x = tl.load(_pick(i, X0, X1, X2, X3, X4, X5, X6, X7) + offs, mask=mask, other=0.0).to(tl.float32)
                count += (tl.abs(x - b) > tl.load(F + i * F_COLS + 7)).to(tl.float32)
        for i in tl.static_range(N_SOURCES):
            x = tl.load(_pick(i, X0, X1, X2, X3, X4, X5, X6, X7) + offs, mask=mask, other=0.0).to(tl.float32)
            d = x - b
            if KEEP == 4:
                d = d * shared_keep
            if KEEP == 6:
                # arcee_fusion: |d| * KL(row) >= threshold
                kl = tl.load(A0 + r, mask=mask, other=0.0).to(tl.float32)
                d = d * ((tl.abs(d) * kl) >= tl.load(F + 2)).to(tl.float32)
            if KEEP == 1 or KEEP == 7:
                # top-k (TIES) / breadcrumbs (7: with the outer cut): in(t, c) = a > t or (a == t and j <= c)
                a = tl.abs(d)
                t_in = tl.load(F + i * F_COLS + 2)
                c_in = tl.load(I + i * I_COLS)
                keep = (a > t_in) | ((a == t_in) & (j <= c_in))
                if KEEP == 7:
                    t_out = tl.load(F + i * F_COLS + 3)
                    c_out = tl.load(I + i * I_COLS + 1)
                    drop = (a > t_out) | ((a == t_out) & (j <= c_out))
                    keep = keep & (drop == 0)
                d = d * tl.where(keep, 1.0, 0.0)
            if KEEP == 2 or KEEP == 3:
                k1 = tl.load(I + i * I_COLS + 2).to(tl.uint32)
                k2 = tl.load(I + i * I_COLS + 3).to(tl.uint32)
                u = uniform_tl(j.to(tl.uint32), k1, k2)
                if KEEP == 2:
                    p = tl.load(F + i * F_COLS + 4)  # DARE: density
                else:
                    aux = tl.load(_pick(i, A0, A1, A2, A3, A4, A5, A6, A7) + offs, mask=mask, other=0.0)
                    p = tl.load(F + i * F_COLS + 5) + aux.to(tl.float32) * tl.load(F + i * F_COLS + 6)
                d = d * (u < p).to(tl.float32)
            if KEEP == 5:
                # ram: kept if |d| > eps; unique: d * scale (ramplus_tl's lambda), shared: d / count
                k5 = tl.abs(d) > tl.load(F + i * F_COLS + 7)
                shared_part = tl.div_rn(d, tl.maximum(count, 1.0))
                part = tl.where(k5, tl.where(count == 1.0, d * tl.load(F + i * F_COLS + 1), shared_part), 0.0)
            else:
                dk = d
                d = d * tl.load(F + i * F_COLS + 1)  # rescale (1.0: exact no-op)
                part = d * _coeff(i, F, A0, A1, A2, A3, A4, A5, A6, A7, r, mask, ROWS)  # weight
            total += part
            if CONSENSUS:
                if CONSENSUS_RAW:
                    vote += dk
                    gt = (dk > 0).to(tl.float32)
                    lt = (dk < 0).to(tl.float32)
                else:
                    gt = (part > 0).to(tl.float32)
                    lt = (part < 0).to(tl.float32)
                w = tl.load(F + i * F_COLS)
                pos_sum += part * gt
                neg_sum += part * lt
                pos_w += gt * w
                neg_w += lt * w
        if CONSENSUS:
            if CONSENSUS_RAW:
                pos = vote >= 0
            else:
                pos = total >= 0
            mixed = tl.where(pos, pos_sum, neg_sum)
            den = tl.where(pos, pos_w, neg_w)
            if DIV_FLOOR:
                den = tl.maximum(den, div_min)
            else:
                den = tl.where(den == 0, 1.0, den)
            if NORMALIZE:
                mixed = tl.div_rn(mixed, den)
        else:
            mixed = total
            if NORMALIZE:
                mixed = tl.div_rn(mixed, tl.zeros_like(mixed) + div)
        res = b + mixed * lam
    return res


@triton.jit
def _merge_kernel(
    # pointers: base, sources, aux (DELLA ranks), flat indices, output, scalar tables
    B, X0, X1, X2, X3, X4, X5, X6, X7, A0, A1, A2, A3, A4, A5, A6, A7, IDX, OUT, F, I,
    # sizes and scalars
    numel, div, lam, row_width, div_min, size_class,
    # meta-parameters: the spec's switches, then the block
    N_SOURCES: tl.constexpr, MODE: tl.constexpr, KEEP: tl.constexpr, CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr, DIVIDE: tl.constexpr, ROWS: tl.constexpr, CONSENSUS_RAW: tl.constexpr,
    DIV_FLOOR: tl.constexpr, HAS_INDEX: tl.constexpr, FIX_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # int64: tensors up to 2**32 elements
    mask = offs < numel
    if HAS_INDEX:
        j = tl.load(IDX + offs, mask=mask, other=0).to(tl.int64)
    else:
        j = offs
    res = _merge_tile(B, X0, X1, X2, X3, X4, X5, X6, X7, A0, A1, A2, A3, A4, A5, A6, A7,
                      F, I, offs, j, mask, div, lam, row_width, div_min,
                      N_SOURCES, MODE, KEEP, CONSENSUS, NORMALIZE, DIVIDE, ROWS, CONSENSUS_RAW, DIV_FLOOR)
    if FIX_BF16:
        res = _round_bf16(res)
    tl.store(OUT + offs, res.to(OUT.dtype.element_ty), mask=mask)


def _merge_configs():
    """Autotune space of the elementwise kernel: block size x warps (memory-bound: enough bytes in flight), at most
    8 elements per thread: at 16 (4096 on 8 warps, 8192 on 16) the 8-source DELLA merge spills ~1 KB per thread
    (ptxas, sm_90: `kernels/aot.py`, tests/test_kernel_compile.py)."""
    return [triton.Config({"BLOCK": blk}, num_warps=w) for blk, w in
            ((1024, 4), (2048, 8), (4096, 16))]


_merge_kernel_tuned = triton.autotune(
    configs=_merge_configs(),
    key=["size_class", "N_SOURCES", "MODE", "KEEP", "CONSENSUS", "NORMALIZE", "DIVIDE", "ROWS", "CONSENSUS_RAW",
         "DIV_FLOOR", "HAS_INDEX", "FIX_BF16"],
)(_merge_kernel)

INTERPRET_BLOCK = 4096  # interpreter: few, large programs (each op costs a numpy call, not a lane)


def merge_triton(base: torch.Tensor | None, sources: list[torch.Tensor], spec: MergeSpec,
                 aux: list[torch.Tensor] | None = None, index: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `merge_reference`: same arguments, same result; see the module docstring."""
    n = len(sources)
    if not 1 <= n <= MAX_SOURCES:
        raise ValueError(f"merge_triton takes 1..{MAX_SOURCES} sources, got {n}")
    if spec.n != n:
        raise ValueError(f"spec describes {spec.n} sources, got {n}")
    shape = sources[0].shape
    numel = sources[0].numel()
    if any(s.shape != shape for s in sources) or (base is not None and base.shape != shape):
        raise ValueError("base and sources must share one shape")
    if spec.mode == "delta" and base is None:
        raise ValueError("delta merges need a base")
    if spec.keep == "della" and spec.mode == "delta" and (aux is None or len(aux) != n):
        raise ValueError("DELLA needs one aux (rank) tensor per source")
    if spec.row_layout and (aux is None or len(aux) != n):
        raise ValueError("per-row coefficients need one aux vector per source")
    if spec.mode == "nearswap" and base is None:
        raise ValueError("nearswap needs a base")
    device = sources[0].device
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    elif out.numel() != numel or not out.is_contiguous():
        raise ValueError("out must be contiguous with the inputs' number of elements")
    if numel == 0:
        return out
    if numel >= 2**32:
        raise ValueError("tensors of 2**32 elements or more are not supported")
    flags, (ftab, itab, div, lam) = prepared(spec, device)
    interp = interpreting()
    b, xs, a = pointer_args(base, sources, aux if uses_aux(flags) else None)
    has_index = index is not None and spec.needs_index
    idx = index.reshape(-1).contiguous() if has_index else ftab
    args = (b, *xs, *a, idx, out, ftab, itab, numel, div, lam, spec.row_width, float(spec.div_min),
            max(numel.bit_length() - 16, 0))
    flags["HAS_INDEX"] = has_index
    flags["FIX_BF16"] = interp and out.dtype == torch.bfloat16
    if not interp and autotuning():
        grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
        _merge_kernel_tuned[grid](*args, **flags, enable_fp_fusion=False)
    else:
        block = INTERPRET_BLOCK if interp else 2048
        _merge_kernel[(triton.cdiv(numel, block),)](*args, **flags, BLOCK=block,
                                                    num_warps=8, enable_fp_fusion=False)
    return out
