"""MergeSpecs of the statistics-driven mergekit methods: nuslerp, multislerp, karcher, model_stock, sce,
arcee_fusion, nearswap, ram, ramplus_tl (issue 13). `engine.merger.Merger._prepare` hands these tensors here.

Each returns the `kernels.merge.MergeSpec` scalars (and, where needed, small per-row aux vectors) of one tensor, from
one statistics pass over its inputs; the formulas are in engine/method_stats.py, the elementwise contract in
kernels/merge.py. No per-element statistic outlives the call (sce's variance, arcee_fusion's importance are
transient); what is cached (the Gram matrices) is cached by the Merger.
"""

from __future__ import annotations

import math

import torch

from lazymerge.kernels import select
from lazymerge.kernels.merge import MergeSpec, source_variance
from lazymerge.kernels.rng import MAX_INDEX, mask_keys, sample_indices

from . import method_stats as ms
from .methods import Family
from .plan import TensorPlan


def prepare(m, p: TensorPlan) -> tuple[MergeSpec, list[torch.Tensor] | None]:
    """(MergeSpec, aux) of a tensor of nuslerp, multislerp, karcher, model_stock, sce, arcee_fusion, nearswap, ram
    or ramplus_tl; `m` is the `engine.merger.Merger` (its store, its cached Gram matrices, its top-k cut)."""
    fam, shape, n = p.family, p.shape, len(p.inputs)
    numel = math.prod(shape)
    if numel >= MAX_INDEX:
        raise ValueError(f"{p.out_name}: tensors of 2**32 elements or more are not supported")
    width = shape[-1] if shape else 1
    plain = dict(scales=(1.0,) * n, consensus=False, normalize=False, lam=1.0)
    if fam is Family.nearswap:
        return MergeSpec("nearswap", t=float(p.option("t"))), None
    if fam in (Family.nuslerp, Family.multislerp, Family.karcher, Family.model_stock):
        layout = ""
        if fam is Family.nuslerp and not p.option("nuslerp_flatten"):
            layout = "col" if p.option("nuslerp_row_wise") and len(shape) >= 2 else "row"
        if fam is Family.model_stock and p.option("filter_wise"):
            layout = "row"
        G = m._gram(p.inputs, p.base, layout)
        if fam is Family.nuslerp:
            c = ms.nuslerp_coeffs(G, ms.nuslerp_t(p.weights))
        elif fam is Family.multislerp:
            c = ms.multislerp_coeffs(G, list(p.weights), bool(p.option("normalize_weights")),
                                     float(p.option("eps")))
        elif fam is Family.karcher:
            c = ms.karcher_coeffs(G, int(p.option("max_iter")), float(p.option("tol")))
        else:
            t = ms.model_stock_t(G)
            c = [t / n] * n  # base + sum_i (t / n) (W_i - base) = t * mean + (1 - t) * base
        if layout:
            aux = [x.float().reshape(-1) for x in c]
            rw = math.prod(shape[1:]) if layout == "col" else width
            if p.base is None:
                return MergeSpec("combine", coeffs=(1.0,) * n, row_layout=layout, row_width=rw), aux
            return MergeSpec("delta", weights=(1.0,) * n, row_layout=layout, row_width=rw, **plain), aux
        c = tuple(float(x) for x in c)
        if p.base is None:
            return MergeSpec("combine", coeffs=c), None
        return MergeSpec("delta", weights=c, **plain), None
    base = m.store.get(p.base)
    xs = [m.store.get(r) for r in p.inputs]
    if fam is Family.arcee_fusion:
        return _prepare_arcee(m, p, base, xs[0], width, numel)
    if fam is Family.ram:
        eps = float(p.option("epsilon"))
        scales = (1.0,) * n
        if p.method == "ramplus_tl":
            shared, unique = _ram_counts(base, xs, eps)
            scales = tuple(ms.ramplus_lambdas(shared, unique, float(p.option("r")), float(p.option("alpha")), eps))
        return MergeSpec("delta", keep="ram", weights=(1.0,) * n, eps=(eps,) * n, scales=scales,
                         consensus=False, normalize=False), None
    if fam is Family.sce:
        return _prepare_sce(m, p, base, xs, numel), None
    raise ValueError(f"{p.out_name}: no statistics for merge method {p.method!r}")

def _prepare_sce(m, p: TensorPlan, base, xs, numel: int) -> MergeSpec:
    """sce: the top-k cut of the cross-model variance (k = int(count_nonzero(var) * select_topk)) and each
    model's weight, the mean square of its kept delta, normalized (mergekit/merge_methods/sce.py)."""
    n = len(xs)
    topk = float(p.option("select_topk"))
    cut = None
    if topk < 1:
        var = torch.empty(numel, dtype=torch.float32, device=base.device)
        for s, e, b, chunk in _chunks(base, xs):
            var[s:e] = source_variance([x.float() - b for x in chunk])
        k = int(int(torch.count_nonzero(var)) * topk) if topk > 0 else 0
        cut = select.topk_cuts(None, var, (k,))[0]  # exact radix select, ties to the lower flat index
    sq = [0.0] * n
    for s, e, b, chunk in _chunks(base, xs):
        keep = None
        if cut is not None:
            keep = _in_cut_flat(var[s:e], cut, s)
        for i, x in enumerate(chunk):
            d = x.float() - b
            if keep is not None:
                d = d * keep
            sq[i] += float(d.double().square().sum())
    w = torch.tensor([v / numel for v in sq], dtype=torch.float32)
    wsum = float(torch.sum(w))
    w = torch.ones(n, dtype=torch.float32) / n if abs(wsum) < 1e-6 else w / wsum
    keep_kw = dict(keep="all") if cut is None else dict(keep="vartopk", t_in=(cut[0],), c_in=(cut[1],))
    return MergeSpec("delta", weights=tuple(float(v) for v in w), scales=(1.0,) * n, consensus=True,
                     consensus_raw=True, normalize=True, div_min=1e-6, lam=1.0, **keep_kw)

def _prepare_arcee(m, p: TensorPlan, base, x, width: int, numel: int):
    """arcee_fusion: per-row KL of the softmaxes (aux, O(rows)) and the importance threshold. mergekit sorts
    the importance of every element up to 1,000,000 elements and an unseeded random sample of 1,000,000
    (with replacement) above; here the sample is drawn from `random_seed` and the tensor name (kernels.rng)."""
    kl = ms.kl_rows(x, base)
    if numel > ARCEE_SAMPLE:
        j = sample_indices(mask_keys(p.seed, p.mask_name or p.out_name, 0), ARCEE_SAMPLE, numel)
        j = j.to(base.device)
        d = x.reshape(-1)[j].float() - base.reshape(-1)[j].float()
        imp = d.abs() * torch.index_select(kl, 0, j // width)
    else:
        imp = torch.empty(numel, dtype=torch.float32, device=base.device)
        for s, e, b, (xc,) in _chunks(base, [x]):
            r = torch.arange(s, e, device=b.device) // width
            imp[s:e] = (xc.float() - b).abs() * torch.index_select(kl, 0, r)
    thr = ms.arcee_threshold(imp)
    spec = MergeSpec("delta", keep="fusion", weights=(1.0,), scales=(1.0,), t_in=(thr,), row_width=width,
                     consensus=False, normalize=False)
    return spec, [kl]


ARCEE_SAMPLE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE


def _chunks(base: torch.Tensor, xs: list[torch.Tensor], step: int = 1 << 20):
    """(start, end, float32 base chunk, [source chunks]) over the flattened tensors."""
    b = base.reshape(-1)
    fx = [x.reshape(-1) for x in xs]
    for s in range(0, b.numel(), step):
        e = min(b.numel(), s + step)
        yield s, e, b[s:e].float(), [x[s:e] for x in fx]


def _in_cut_flat(v: torch.Tensor, cut: tuple[float, int], start: int) -> torch.Tensor:
    t, c = cut
    if c >= MAX_INDEX:
        return v >= t
    idx = torch.arange(start, start + v.numel(), device=v.device)
    return (v > t) | ((v == t) & (idx <= c))


def _ram_counts(base: torch.Tensor, xs: list[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model: how many of its entries above `eps` are shared with another model, and how many are unique."""
    n = len(xs)
    shared = torch.zeros(n, dtype=torch.int64)
    unique = torch.zeros(n, dtype=torch.int64)
    for _, _, b, chunk in _chunks(base, xs):
        nz = torch.stack([(x.float() - b).abs() > eps for x in chunk])  # (n, chunk)
        count = nz.sum(dim=0)
        shared += (nz & (count > 1)).sum(dim=1).cpu()
        unique += (nz & (count == 1)).sum(dim=1).cpu()
    return shared, unique
