"""Triton kernels vs their PyTorch references: merge, fused merge-matmul, merged_linear, the in-kernel RNG.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before triton is
imported; shapes are kept small because every interpreted op is a numpy call). With CUDA (and TRITON_INTERPRET
unset) the same tests run the compiled kernels on the GPU against the CPU reference, and the `gpu` tests add
large shapes and the autotuned launch paths.

If triton was already imported without the interpreter when this module is collected (a whole-suite run where an
earlier test module imported `lazymerge.kernels.rng`), the kernels cannot be re-decorated in this process: the
interpreter tests then run in one child pytest process (`test_interpreter_suite_in_child_process`).
"""

from __future__ import annotations

import os
import sys

_TRITON_PREIMPORTED = "triton" in sys.modules
if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
IN_CHILD = os.environ.get("LAZYMERGE_KERNEL_TESTS_CHILD") == "1"

import math  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lazymerge.kernels import (
    dispatch,  # noqa: E402
    rng,  # noqa: E402
)
from lazymerge.kernels import linear as kl  # noqa: E402
from lazymerge.kernels import merge_matmul as kmm  # noqa: E402
from lazymerge.kernels import merge_triton as kmt  # noqa: E402
from lazymerge.kernels.merge import MergeSpec, merge, merge_reference  # noqa: E402

CUDA = torch.cuda.is_available() and not INTERPRET
if INTERPRET:
    DEVICE = "cpu"
    RUNNABLE = not (_TRITON_PREIMPORTED and not IN_CHILD)
    WHY = "triton was imported before TRITON_INTERPRET: these run in test_interpreter_suite_in_child_process"
else:
    DEVICE = "cuda"
    RUNNABLE = CUDA
    WHY = "needs CUDA or TRITON_INTERPRET=1"
kernel_test = pytest.mark.skipif(not RUNNABLE, reason=WHY)
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (compiled Triton)")

# -- tolerances ---------------------------------------------------------------------------------------------------
# merge: (atol, rtol) per storage dtype of the inputs. All exact:
MERGE_TOL = {
    torch.float32: (0.0, 0.0),  # same fp32 ops in the same order, div_rn, no FMA contraction: identical bits
    torch.bfloat16: (0.0, 0.0),  # the upcast bf16 -> fp32 is exact, then as float32
    torch.float16: (0.0, 0.0),  # the upcast fp16 -> fp32 is exact, then as float32
}
# merge-matmul: y in x's dtype; the merged weight is bit-identical, only the K-summation order differs.
MATMUL_TOL = {
    torch.float32: (1e-5, 1e-5),  # fp32 products summed in another order (K <= 1023 terms of size ~1)
    torch.bfloat16: (1e-2, 2.0**-7),  # y rounded to bf16 once: a reordered fp32 sum may flip it by 1 ulp (2**-8 rel)
    torch.float16: (1e-3, 2.0**-9),  # same for fp16 (ulp 2**-10 relative), with one ulp of margin
}
# On the GPU with large K the fp32 sums differ more (K = 4096 terms; tl.dot vs cuBLAS blocking):
GPU_MATMUL_TOL = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (3e-2, 2.0**-7), torch.float16: (3e-3, 2.0**-9)}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["linear", "slerp", "passthrough", "task_arithmetic", "ties_all", "ties", "breadcrumbs", "dare_linear",
         "dare_ties", "della", "della_linear", "zero_weight_sum"]
# issue 13's modes: per-row coefficients (row-wise nuslerp / filter-wise model_stock, with and without a base),
# nearswap, sce's variance cut (and its consensus on unweighted deltas), arcee_fusion's row-KL cut, ram, ramplus_tl
NEW_MODES = ["rows_delta", "cols_combine", "nearswap", "sce", "sce_all", "arcee_fusion", "ram", "ramplus_tl"]
# odd shapes (no multiple of any block size) paired with source counts
SHAPES_N = [((7, 341), 2), ((1, 1023), 3), ((33, 65), 5)]

DENS = [0.3, 0.55, 0.8, 0.45, 0.65, 0.2, 0.9, 0.5]
WEIGHTS = [0.6, 1.0, 0.35, 0.8, 0.5, 1.2, 0.7, 0.9]


def assert_close(actual, expected, atol, rtol, what=""):
    """isclose over all elements; on failure, report the count and the first mismatching indices with values."""
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        rows = [f"  {tuple(i)}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}"
                for i in bad.nonzero()[:10].tolist()]
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol})\n"
                    + "\n".join(rows), pytrace=False)


# -- inputs and specs ---------------------------------------------------------------------------------------------
def make_inputs(shape, n, dtype, seed=0):
    """base and n sources of `shape` in `dtype`; deltas are half quantized (|d| ties, exact zeros), half generic."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-32, 33, shape, generator=g).float() / 16  # exact in bf16 / fp16
    xs = []
    for _ in range(n):
        quant = torch.randint(-16, 17, shape, generator=g).float() / 64
        generic = torch.randn(shape, generator=g) * 0.05
        d = torch.where(torch.rand(shape, generator=g) < 0.5, quant, generic)
        xs.append((base + d).to(dtype))
    return base.to(dtype), xs


def della_ranks(base, x):
    """Per-row rank of |x - base| (ascending, stable) in [0, 1] (what engine.merger caches for DELLA)."""
    d = (x.float() - base.float()).abs()
    d2 = d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], -1)
    order = torch.argsort(d2, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(d2.shape[1]).expand_as(order))
    m = d2.shape[1]
    return (ranks.float() / (m - 1) if m > 1 else torch.zeros_like(d2)).reshape(d.shape)


def cut(base, x, k):
    """(threshold, tie cutoff index) keeping exactly the first k of the stable descending |delta| order."""
    a = (x.float() - base.float()).abs().reshape(-1)
    if k <= 0:
        return math.inf, -1
    if k >= a.numel():
        return -1.0, -1
    vals, idx = torch.sort(a, descending=True, stable=True)
    return float(vals[k - 1]), int(idx[k - 1])


def build(mode, base, xs, seed=0):
    """(spec, sources, aux) of a merge `mode`, with scalars prepared as engine.merger does."""
    n = len(xs)
    numel = xs[0].numel()
    w = tuple(WEIGHTS[:n])
    keys = tuple(rng.mask_keys(seed, "t", i) for i in range(n))
    dens = tuple(DENS[:n])
    ones = (1.0,) * n
    if mode == "linear":
        return MergeSpec("combine", coeffs=w, divisor=sum(w)), xs, None
    if mode == "slerp":
        return MergeSpec("combine", coeffs=(0.8314, 0.2391)), xs[:2], None
    if mode == "passthrough":
        return MergeSpec("combine", coeffs=(1.0,)), xs[:1], None
    if mode == "task_arithmetic":
        return MergeSpec("delta", weights=w, scales=ones, lam=0.8), xs, None
    if mode == "ties_all":
        return MergeSpec("delta", weights=w, scales=ones, consensus=True, normalize=True), xs, None
    if mode == "zero_weight_sum":  # |sum w| < 1e-8: the divisor falls back to 1
        w0 = (1.0, -1.0) + (0.0,) * (n - 2)
        return MergeSpec("delta", weights=w0, scales=ones, normalize=True, lam=1.5), xs, None
    if mode in ("ties", "breadcrumbs"):
        t_in, c_in, t_out, c_out, scales = [], [], [], [], []
        for i, x in enumerate(xs):
            k_in, k_out = int(dens[i] * numel), 0
            if mode == "breadcrumbs":
                k_out = int(0.1 * numel)
                k_in = min(numel, k_in + k_out)
            ti, ci = cut(base, x, k_in)
            to, co = cut(base, x, k_out) if k_out > 0 else (math.inf, -1)
            t_in.append(ti), c_in.append(ci), t_out.append(to), c_out.append(co)
            scales.append(1.0 if mode == "ties" else 1.0 + 0.37 * i)
        return MergeSpec("delta", keep="topk", t_in=tuple(t_in), c_in=tuple(c_in), t_out=tuple(t_out),
                         c_out=tuple(c_out), scales=tuple(scales), weights=w, consensus=mode == "ties",
                         normalize=True), xs, None
    if mode in ("dare_linear", "dare_ties"):
        ties = mode == "dare_ties"
        return MergeSpec("delta", keep="random", densities=dens, keys=keys, scales=tuple(1 / d for d in dens),
                         weights=w, consensus=ties, normalize=ties), xs, None
    if mode in ("della", "della_linear"):
        eps = tuple(min(0.15, d / 2) for d in dens)
        aux = [della_ranks(base, x) for x in xs]
        cons = mode == "della"
        return MergeSpec("delta", keep="della", densities=dens, eps=eps, keys=keys,
                         scales=tuple(1.1 + 0.2 * i for i in range(n)), weights=w, consensus=cons,
                         normalize=cons, lam=1.0 if cons else 1.3), xs, aux
    if mode in ("rows_delta", "cols_combine"):
        g = torch.Generator().manual_seed(seed + 7)
        col = mode == "cols_combine"
        width = math.prod(xs[0].shape[1:]) if col else xs[0].shape[-1]
        rows = width if col else numel // width
        aux = [(torch.randn(rows, generator=g) * 0.7 + 0.5) for _ in range(n)]
        aux[0][::3] = 0.0  # exact zero coefficients
        if col:
            return MergeSpec("combine", coeffs=ones, row_layout="col", row_width=width), xs, aux
        return MergeSpec("delta", weights=ones, scales=ones, row_layout="row", row_width=width), xs, aux
    if mode == "nearswap":
        return MergeSpec("nearswap", t=0.02), xs[:1], None
    if mode in ("sce", "sce_all"):
        from lazymerge.kernels.merge import source_variance

        var = source_variance([x.float() - base.float() for x in xs]).reshape(-1)
        k = int(int(torch.count_nonzero(var)) * 0.45)
        sw = tuple(0.9 / (i + 1) for i in range(n))
        keep = dict(keep="all")
        if mode == "sce":
            t = float(torch.kthvalue(var, numel - k + 1).values)
            ties = (var == t).nonzero().reshape(-1)
            need = k - int((var > t).sum())
            keep = dict(keep="vartopk", t_in=(t,), c_in=(int(ties[need - 1]) if need < ties.numel() else 2**32,))
        return MergeSpec("delta", weights=sw, scales=ones, consensus=True, consensus_raw=True, normalize=True,
                         div_min=1e-6, **keep), xs, None
    if mode == "arcee_fusion":
        from lazymerge.engine.method_stats import kl_rows

        width = xs[0].shape[-1]
        kl = kl_rows(xs[0], base)
        imp = (xs[0].float() - base.float()).abs().reshape(-1, width) * kl[:, None]
        thr = float(imp.reshape(-1).kthvalue(int(0.6 * numel) + 1).values)  # a value of the tensor: ties at it
        return MergeSpec("delta", keep="fusion", weights=(1.0,), scales=(1.0,), t_in=(thr,), row_width=width), \
            xs[:1], [kl]
    if mode in ("ram", "ramplus_tl"):
        sc = ones if mode == "ram" else tuple(1.0 + 0.03 * (i + 1) for i in range(n))
        return MergeSpec("delta", keep="ram", weights=ones, eps=(0.02,) * n, scales=sc), xs, None
    raise ValueError(mode)


def to_dev(ts):
    if ts is None:
        return None
    if isinstance(ts, torch.Tensor):
        return ts.to(DEVICE)
    return [t.to(DEVICE) for t in ts]


# -- the in-kernel RNG ------------------------------------------------------------------------------------------------
if RUNNABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _uniform_probe(IDX, KEYS, OUT, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        j = tl.load(IDX + offs, mask=m, other=0)  # int64 flat indices < 2**32
        k1 = tl.load(KEYS).to(tl.uint32)
        k2 = tl.load(KEYS + 1).to(tl.uint32)
        tl.store(OUT + offs, rng.uniform_tl(j.to(tl.uint32), k1, k2), mask=m)


@kernel_test
@pytest.mark.parametrize("keys", [rng.mask_keys(0, "w", 0), rng.mask_keys(2**40 + 7, "model.x", 5), (1, 2**32 - 1),
                                  (2**31, 0)])
def test_uniform_tl_bits_equal_rng_uniform(keys):
    idx = torch.cat([torch.arange(0, 700), torch.arange(2**31 - 300, 2**31 + 300), torch.arange(2**32 - 300, 2**32)])
    out = torch.empty(idx.numel(), dtype=torch.float32, device=DEVICE)
    k = torch.tensor(keys, dtype=torch.int64, device=DEVICE)
    _uniform_probe[(triton.cdiv(idx.numel(), 512),)](idx.to(DEVICE), k, out, idx.numel(), BLOCK=512)
    want = rng.uniform(idx, keys)
    assert torch.equal(out.cpu(), want), "uniform_tl differs from rng.uniform"


# -- merge kernel ---------------------------------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,n", SHAPES_N, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"n{v}")
def test_merge_matches_reference(shape, n, mode, dtype):
    base, xs = make_inputs(shape, n, dtype, seed=n)
    spec, srcs, aux = build(mode, base, xs, seed=n)
    want = merge_reference(base, srcs, spec, aux=aux)
    got = kmt.merge_triton(to_dev(base), to_dev(srcs), spec, aux=to_dev(aux))
    assert got.dtype == torch.float32 and got.shape == shape
    assert_close(got, want, *MERGE_TOL[dtype], what=f"{mode} {shape} n={n} {dtype}")


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", NEW_MODES)
@pytest.mark.parametrize("shape,n", SHAPES_N, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"n{v}")
def test_new_modes_match_reference(shape, n, mode, dtype):
    """Issue 13's modes, bit for bit (float16 left out: its upcast is exact like bfloat16's, and the interpreter's
    time is better spent on shapes)."""
    test_merge_matches_reference(shape, n, mode, dtype)


@kernel_test
@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", ["linear", "ties", "dare_ties", "della"])
def test_merge_into_out_buffer(mode, out_dtype):
    """`out` of any float dtype: written in place (one rounding of the float32 result), and returned."""
    base, xs = make_inputs((9, 41), 3, torch.bfloat16, seed=3)
    spec, srcs, aux = build(mode, base, xs)
    want = torch.empty((9, 41), dtype=out_dtype)
    merge_reference(base, srcs, spec, aux=aux, out=want)
    out = torch.full((9, 41), float("nan"), dtype=out_dtype, device=DEVICE)
    got = kmt.merge_triton(to_dev(base), to_dev(srcs), spec, aux=to_dev(aux), out=out)
    assert got is out
    assert torch.equal(out.cpu(), want), "bits differ"


@kernel_test
@pytest.mark.parametrize("mode", ["ties", "dare_ties", "della", "breadcrumbs", "linear", "rows_delta", "cols_combine",
                                  "sce", "arcee_fusion"])
def test_merge_gathered_rows_with_index(mode):
    """Rows gathered (embedding lookups) with `index`: equal to the same rows of the whole merged tensor."""
    base, xs = make_inputs((37, 23), 3, torch.float32, seed=4)
    spec, srcs, aux = build(mode, base, xs)
    rows = torch.tensor([36, 0, 5, 5, 17])
    index = rows.reshape(-1, 1) * 23 + torch.arange(23)
    g_aux = [a[rows] for a in aux] if aux is not None and not spec.aux_per_row else aux
    got = kmt.merge_triton(to_dev(base[rows]), to_dev([x[rows] for x in srcs]), spec, aux=to_dev(g_aux),
                           index=to_dev(index))
    assert torch.equal(got.cpu(), merge_reference(base, srcs, spec, aux=aux)[rows])
    assert torch.equal(got.cpu(), merge_reference(base[rows], [x[rows] for x in srcs], spec, aux=g_aux, index=index))


@kernel_test
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("mode", ["linear", "ties", "dare_ties", "della"])
def test_merge_source_count_extremes(n, mode):
    base, xs = make_inputs((5, 77), n, torch.float16, seed=n)
    spec, srcs, aux = build(mode, base, xs)
    got = kmt.merge_triton(to_dev(base), to_dev(srcs), spec, aux=to_dev(aux))
    assert_close(got, merge_reference(base, srcs, spec, aux=aux), 0.0, 0.0, what=f"{mode} n={n}")


@kernel_test
@pytest.mark.parametrize("keep", ["random", "della"])
def test_dare_della_masks_are_bit_identical(keep):
    """Exact kept sets, from rng.uniform directly: base 0, sources 1, weights 2**i, so out = sum_i 2**i keep_i."""
    n, shape = 5, (3, 333)
    numel = 3 * 333
    base = torch.zeros(shape)
    xs = [torch.ones(shape) for _ in range(n)]
    keys = tuple(rng.mask_keys(11, "layer.w", i) for i in range(n))
    dens = tuple(DENS[:n])
    eps = tuple(min(0.15, d / 2) for d in dens)
    aux = [torch.rand(shape, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    spec = MergeSpec("delta", keep=keep, densities=dens, eps=eps, keys=keys, scales=(1.0,) * n,
                     weights=tuple(2.0**i for i in range(n)))
    got = kmt.merge_triton(to_dev(base), to_dev(xs), spec, aux=to_dev(aux)).cpu()
    j = torch.arange(numel)
    want = torch.zeros(numel)
    for i in range(n):
        p = dens[i] if keep == "random" else (dens[i] - eps[i]) + aux[i].reshape(-1) * (2.0 * eps[i])
        want += (rng.uniform(j, keys[i]) < p).float() * 2.0**i
    assert torch.equal(got.reshape(-1), want), f"kept sets differ at {(got.reshape(-1) != want).nonzero()[:10]}"
    for i in range(n):  # each source's kept count is near its density (the masks are not degenerate)
        kept = ((got.reshape(-1).long() >> i) & 1).sum().item()
        assert abs(kept / numel - dens[i]) < 0.08


@kernel_test
def test_topk_keeps_exactly_k_with_ties_at_the_cut():
    """Ties at the threshold go to the lowest flat indices: exactly k kept, and they are the stable top-k."""
    shape = (11, 97)
    numel = 11 * 97
    g = torch.Generator().manual_seed(5)
    d = (torch.randint(1, 9, shape, generator=g).float() / 8) * torch.where(torch.rand(shape, generator=g) < .5, -1, 1)
    base = torch.zeros(shape)
    for k in (1, 100, 500, numel - 1):
        ti, ci = cut(base, d, k)
        spec = MergeSpec("delta", keep="topk", t_in=(ti,), c_in=(ci,), t_out=(math.inf,), c_out=(-1,),
                         scales=(1.0,), weights=(1.0,))
        got = kmt.merge_triton(to_dev(base), to_dev([d]), spec).cpu().reshape(-1)
        assert int((got != 0).sum()) == k
        order = torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices
        assert set((got != 0).nonzero().reshape(-1).tolist()) == set(order[:k].tolist())
        assert torch.equal(got[got != 0], d.reshape(-1)[got != 0])


@kernel_test
def test_topk_tie_cutoff_at_2_pow_32_keeps_every_tie():
    """c = 2**32 (engine: no tie straddles the cut) keeps every element equal to t, in c_in and c_out alike."""
    base, xs = make_inputs((13, 77), 2, torch.float32, seed=9)
    t = [float((x - base).abs().reshape(-1).sort(descending=True).values[300]) for x in xs]
    spec = MergeSpec("delta", keep="topk", t_in=tuple(t), c_in=(2**32, 2**32), t_out=(math.inf, t[1] * 2),
                     c_out=(-1, 2**32), scales=(1.0, 1.0), weights=(1.0, 0.5))
    got = kmt.merge_triton(to_dev(base), to_dev(xs), spec)
    assert_close(got, merge_reference(base, xs, spec), 0.0, 0.0, what="c = 2**32")
    d0 = xs[0] - base
    solo = MergeSpec("delta", keep="topk", t_in=(t[0],), c_in=(2**32,), t_out=(math.inf,), c_out=(-1,),
                     scales=(1.0,), weights=(1.0,))
    kept = kmt.merge_triton(to_dev(base), to_dev(xs[:1]), solo).cpu() - base != 0
    assert torch.equal(kept, (d0.abs() >= t[0]) & (d0 != 0))


@kernel_test
def test_outer_cut_at_inf_drops_nothing_even_infinite_deltas():
    """t_out = inf: the reference skips the outer cut, whatever c_out says; the kernel (with or without the band
    variant, i.e. another source's outer cut finite) must not drop an infinite |delta| at j <= c_out either."""
    base, xs = make_inputs((5, 64), 2, torch.float32, seed=3)
    xs = [x.clone() for x in xs]
    xs[0].view(-1)[2] = math.inf  # |delta| = inf at flat index 2 <= c_out
    t = [float((x - base).abs().reshape(-1).sort(descending=True).values[100]) for x in xs]
    for t_out1 in (math.inf, t[1] * 2):  # TIES' top-k alone; breadcrumbs' band on source 1
        spec = MergeSpec("delta", keep="topk", t_in=tuple(t), c_in=(2**32, 2**32), t_out=(math.inf, t_out1),
                         c_out=(10, 2**32), scales=(1.0, 1.0), weights=(1.0, 0.5))
        got = kmt.merge_triton(to_dev(base), to_dev(xs), spec)
        want = merge_reference(base, xs, spec)
        assert math.isinf(float(want.view(-1)[2]))
        assert_close(got, want, 0.0, 0.0, what=f"t_out = (inf, {t_out1})")


@kernel_test
def test_merge_dispatch_uses_kernel(monkeypatch):
    """merge() takes the Triton path where dispatch says so (CUDA, or LAZYMERGE_TRITON_ON_CPU=1)."""
    monkeypatch.setenv("LAZYMERGE_TRITON_ON_CPU", "1")
    base, xs = make_inputs((7, 341), 3, torch.bfloat16)
    spec, srcs, aux = build("dare_ties", base, xs)
    assert dispatch.use_triton(to_dev(base))
    assert torch.equal(merge(to_dev(base), to_dev(srcs), spec).cpu(), merge_reference(base, srcs, spec))


# -- fused merge-matmul ---------------------------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", ["linear", "ties", "dare_ties", "della_linear"])
@pytest.mark.parametrize("M", [1, 3, 16, 17])
def test_merge_matmul_matches_reference(M, mode, dtype):
    N, K = 33, 65
    base, xs = make_inputs((N, K), 3, dtype, seed=M)
    spec, srcs, aux = build(mode, base, xs)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g) if M % 2 else None
    want = kmm.merge_matmul_reference(x, base, srcs, spec, aux=aux, bias=bias)
    got = kmm.merge_matmul_triton(to_dev(x), to_dev(base), to_dev(srcs), spec, aux=to_dev(aux), bias=to_dev(bias))
    assert got.dtype == dtype and got.shape == (M, N)
    assert_close(got, want, *MATMUL_TOL[dtype], what=f"M={M} {mode} {dtype}")


@kernel_test
@pytest.mark.parametrize("N,K,n,mode", [(7, 341, 5, "breadcrumbs"), (1, 1023, 2, "della"), (70, 33, 1, "passthrough"),
                                        (65, 130, 8, "dare_linear"), (9, 77, 3, "rows_delta"), (33, 65, 2, "cols_combine"),
                                        (13, 40, 1, "nearswap"), (17, 33, 3, "sce"), (11, 50, 1, "arcee_fusion"),
                                        (5, 129, 3, "ramplus_tl")])
def test_merge_matmul_odd_shapes(N, K, n, mode):
    base, xs = make_inputs((N, K), n, torch.bfloat16, seed=N)
    spec, srcs, aux = build(mode, base, xs)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(K)).to(torch.bfloat16)  # (..., K)
    want = kmm.merge_matmul_reference(x, base, srcs, spec, aux=aux)
    got = kmm.merge_matmul_triton(to_dev(x), to_dev(base), to_dev(srcs), spec, aux=to_dev(aux))
    assert got.shape == (2, 3, N)
    assert_close(got, want, *MATMUL_TOL[torch.bfloat16], what=f"{N}x{K} n={n} {mode}")


@kernel_test
@pytest.mark.parametrize("M", [3, 40])
@pytest.mark.parametrize("fused_max", [None, 16], ids=["measured", "16"])
def test_merged_linear_both_paths(M, fused_max, monkeypatch):
    """M <= FUSED_MAX_TOKENS: fused; above: merge into the (reused) buffer + matmul. Same result either way (with
    the measured crossover, 0 today, every M takes the buffer path; at 16, M = 3 takes the fused one)."""
    monkeypatch.setenv("LAZYMERGE_TRITON_ON_CPU", "1")
    if fused_max is not None:
        monkeypatch.setattr(kl, "FUSED_MAX_TOKENS", fused_max)
    N, K = 24, 80
    base, xs = make_inputs((N, K), 3, torch.bfloat16, seed=M)
    spec, srcs, aux = build("dare_ties", base, xs)
    x = torch.randn(1, M, K, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(1))
    buf = torch.empty((N, K), dtype=torch.bfloat16, device=DEVICE)
    assert kl.use_fused(to_dev(x)) == (M <= kl.FUSED_MAX_TOKENS)
    got = kl.merged_linear(to_dev(x), to_dev(base), to_dev(srcs), spec, bias=to_dev(bias), out_buffer=buf)
    want = kmm.merge_matmul_reference(x, base, srcs, spec, bias=bias)
    assert_close(got, want, 2e-2, 2.0**-6, what=f"M={M}")  # buffer path: bf16 bias and cuBLAS/CPU bf16 GEMM
    if M > kl.FUSED_MAX_TOKENS:
        assert torch.equal(buf.cpu(), merge_reference(base, srcs, spec).to(torch.bfloat16))


def test_merged_linear_reference_on_cpu_without_triton(monkeypatch):
    monkeypatch.delenv("LAZYMERGE_TRITON_ON_CPU", raising=False)
    base, xs = make_inputs((6, 10), 2, torch.float32)
    spec, srcs, _ = build("ties", base, xs)
    x = torch.randn(4, 10)
    assert not kl.use_fused(x)
    assert torch.equal(kl.merged_linear(x, base, srcs, spec), kmm.merge_matmul_reference(x, base, srcs, spec))


# -- GPU only: large shapes, autotuned launches -------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("mode", ["linear", "task_arithmetic", "ties", "breadcrumbs", "dare_ties", "della"] + NEW_MODES)
def test_cuda_merge_large(mode):
    base, xs = make_inputs((1024, 4096), 3, torch.bfloat16, seed=7)
    spec, srcs, aux = build(mode, base, xs)
    want = merge_reference(base, srcs, spec, aux=aux)
    got = kmt.merge_triton(to_dev(base), to_dev(srcs), spec, aux=to_dev(aux))
    assert_close(got, want, 0.0, 0.0, what=mode)
    # The reference run on the GPU agrees up to rounding only: CUDA's elementwise kernels contract a * w + b into
    # one FMA (seen on an H200, torch 2.11: linear and breadcrumbs differ in last bits); the Triton kernel, compiled
    # with enable_fp_fusion=False, is the bit-exact twin of the CPU reference.
    on_gpu = merge_reference(to_dev(base), to_dev(srcs), spec, aux=to_dev(aux)).cpu()
    assert_close(on_gpu, want, 1e-5, 1e-5, what=f"{mode} reference on the GPU")


@gpu
@pytest.mark.parametrize("autotune", ["0", "1"], ids=["fixed", "autotune"])
@pytest.mark.parametrize("M", [1, 16, 17, 300])
def test_cuda_merge_matmul_large(M, autotune, monkeypatch):
    monkeypatch.setenv("LAZYMERGE_AUTOTUNE", autotune)
    N, K = 1536, 4096
    base, xs = make_inputs((N, K), 3, torch.bfloat16, seed=M)
    spec, srcs, aux = build("dare_ties", base, xs)
    if autotune == "1":  # compile the autotuner's configs in parallel first (it compiles them one by one)
        from lazymerge.kernels import aot

        meta = [torch.empty((N, K), dtype=torch.bfloat16, device="meta") for _ in range(4)]
        mx = torch.empty((M, K), dtype=torch.bfloat16, device="meta")
        aot.warm([lambda: kmm.merge_matmul_triton(mx, meta[0], meta[1:], spec),
                  lambda: kmt.merge_triton(meta[0], meta[1:], spec)])
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(M)) / 8).to(torch.bfloat16)
    bias = torch.randn(N)
    want = kmm.merge_matmul_reference(x, base, srcs, spec, bias=bias)
    got = kmm.merge_matmul_triton(to_dev(x), to_dev(base), to_dev(srcs), spec, bias=to_dev(bias))
    assert_close(got, want, *GPU_MATMUL_TOL[torch.bfloat16], what=f"M={M} autotune={autotune}")
    if autotune == "1":  # the autotuned elementwise kernel too
        got_w = kmt.merge_triton(to_dev(base), to_dev(srcs), spec)
        assert torch.equal(got_w.cpu(), merge_reference(base, srcs, spec))


@gpu
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_cuda_merged_linear(M):
    N, K = 2048, 1024
    base, xs = make_inputs((N, K), 3, torch.bfloat16, seed=M)
    spec, srcs, aux = build("ties", base, xs)
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(M)) / 8).to(torch.bfloat16)
    got = kl.merged_linear(to_dev(x), to_dev(base), to_dev(srcs), spec)
    assert_close(got, kmm.merge_matmul_reference(x, base, srcs, spec), *GPU_MATMUL_TOL[torch.bfloat16],
                 what=f"M={M}")


# -- whole-suite runs: the interpreter tests in a fresh process --------------------------------------------------------
@pytest.mark.skipif(not (INTERPRET and _TRITON_PREIMPORTED and not IN_CHILD),
                    reason="only when triton was imported before TRITON_INTERPRET in this process")
def test_interpreter_suite_in_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1", LAZYMERGE_KERNEL_TESTS_CHILD="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
