"""The merge's fused CPU path: `merge_reference`'s delta arithmetic compiled by `torch.compile` into one loop.

Same contract and same float32 operations, element by element, as `kernels.merge.merge_reference` (the oracle: tests
check equality); the eager reference makes ~30 passes over memory for a TIES merge, this makes one. Every number of
the spec enters as a tensor, so one compiled graph serves every recipe with the same structure (keep rule, consensus,
normalize, number of sources); compiling a structure costs tens of seconds once per process (Inductor's on-disk
cache makes later processes faster), which is why it is opt-in: `Engine(..., cpu_fused=True)` (per engine) or
`LAZYMERGE_CPU_FUSED=1` (the process default, `enabled()`).
"""

from __future__ import annotations

import os

import torch

from .rng import C1, C2, M32

_ENABLED = os.environ.get("LAZYMERGE_CPU_FUSED", "") == "1"
_COMPILED = {}


def enabled() -> bool:
    return _ENABLED


def _mix(x):
    x = x ^ (x >> 16)
    x = (x * C1) & M32
    x = x ^ (x >> 15)
    x = (x * C2) & M32
    return x ^ (x >> 15)


def _delta(b, xs, aux, n_all, w, sc, t_in, c_in, t_out, c_out, dens, eps, k1, k2, lam, div_all, row_width, div_min, *,
           keep: str, consensus: bool, normalize: bool, consensus_raw: bool = False, div_floor: bool = False):
    b = b.float()
    idx = torch.arange(b.numel(), dtype=torch.int64, device=b.device)
    parts, raw = [], []
    if keep == "vartopk":  # sce: the cut on the variance over the sources (float64 Welford, as merge.source_variance)
        mean = torch.zeros_like(b, dtype=torch.float64)
        m2 = torch.zeros_like(mean)
        for i, x in enumerate(xs):
            xd = (x.float() - b).double()
            delta = xd - mean
            mean = mean + delta / (i + 1)
            m2 = m2 + delta * (xd - mean)
        var = (m2 / len(xs)).float()
        shared = (var > t_in[0]) | ((var == t_in[0]) & (idx <= c_in[0]))
    if keep == "ram":
        count = torch.zeros_like(b)
        for i, x in enumerate(xs):
            count = count + ((x.float() - b).abs() > eps[i])
    for i, x in enumerate(xs):
        d = x.float() - b
        if keep == "ram":
            k = d.abs() > eps[i]
            parts.append(torch.where(k, torch.where(count == 1, d * sc[i], d / count), 0.0))
            continue
        if keep == "vartopk":
            d = d * shared
        elif keep == "fusion":
            d = d * ((d.abs() * aux[0][idx // row_width]) >= t_in[0])
        elif keep == "topk":
            a = d.abs()
            k = (a > t_in[i]) | ((a == t_in[i]) & (idx <= c_in[i]))
            k = k & ~((a > t_out[i]) | ((a == t_out[i]) & (idx <= c_out[i])))
            d = d * k
        elif keep in ("random", "della"):
            u = (_mix(_mix(idx ^ k1[i]) ^ k2[i]) >> 8).to(torch.float32) * (2.0**-24)
            p = dens[i] if keep == "random" else (dens[i] - eps[i]) + aux[i].float() * (2.0 * eps[i])
            d = d * (u < p)
        raw.append(d)
        d = d * sc[i]
        parts.append(d * w[i])
    if consensus:
        votes = raw if consensus_raw else parts
        total = votes[0]
        for p in votes[1:]:
            total = total + p
        pos = total >= 0
        mixed = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for i, p in enumerate(parts):
            c = torch.where(pos, votes[i] > 0, votes[i] < 0)
            mixed = mixed + p * c
            div = div + c * w[i]
        div = torch.clamp(div, min=div_min) if div_floor else torch.where(div == 0, 1.0, div)
    else:
        mixed = parts[0]
        for p in parts[1:]:
            mixed = mixed + p
        div = div_all
    if normalize:
        mixed = mixed / div
    return b + mixed * lam


def merge_delta_fused(base, sources, spec, aux=None) -> torch.Tensor:
    """Fused delta-mode merge of whole tensors (no row `index`); float32 of the inputs' shape."""
    div_floor = spec.consensus and spec.div_min > 0
    key = (spec.keep, spec.consensus, spec.normalize, len(sources), aux is not None, spec.consensus_raw, div_floor)
    fn = _COMPILED.get(key)
    if fn is None:
        import functools

        fn = _COMPILED[key] = torch.compile(
            functools.partial(_delta, keep=spec.keep, consensus=spec.consensus, normalize=spec.normalize,
                              consensus_raw=spec.consensus_raw, div_floor=div_floor),
            dynamic=True, fullgraph=True)
    n = len(sources)
    dev = base.device
    f32 = lambda v, default=0.0: torch.tensor((list(v) + [default] * n)[:n] if v else [default] * n,  # noqa: E731
                                              dtype=torch.float32, device=dev)
    i64 = lambda v: torch.tensor((list(v) + [-1] * n)[:n] if v else [-1] * n, dtype=torch.int64,  # noqa: E731
                                 device=dev)
    div_all = sum(spec.weights)
    div_all = 1.0 if abs(div_all) < 1e-8 else div_all
    keys = spec.keys or ((0, 0),) * n
    out = fn(base.reshape(-1), [s.reshape(-1) for s in sources], [a.reshape(-1) for a in aux] if aux else None, n,
             f32(spec.weights), f32(spec.scales, 1.0), f32(spec.t_in), i64(spec.c_in), f32(spec.t_out),
             i64(spec.c_out), f32(spec.densities), f32(spec.eps), i64(k[0] for k in keys), i64(k[1] for k in keys),
             torch.tensor(spec.lam, device=dev), torch.tensor(div_all, device=dev), spec.row_width,
             torch.tensor(spec.div_min, device=dev))
    return out.view(base.shape)


def _l1(b, x, aux, t_in, c_in, t_out, c_out, dens, eps, k1, k2, *, keep: str):
    """(sum |d|, sum |d * keep|) of one source's delta, the L1 rescale factor's two norms."""
    d = x.float() - b.float()
    idx = torch.arange(b.numel(), dtype=torch.int64, device=b.device)
    if keep == "topk":
        a = d.abs()
        k = (a > t_in) | ((a == t_in) & (idx <= c_in))
        k = k & ~((a > t_out) | ((a == t_out) & (idx <= c_out)))
    else:
        u = (_mix(_mix(idx ^ k1) ^ k2) >> 8).to(torch.float32) * (2.0**-24)
        k = u < (dens if keep == "random" else (dens - eps) + aux.float() * (2.0 * eps))
    return d.abs().sum(dtype=torch.float64), (d * k).abs().sum(dtype=torch.float64)


def l1_sums_fused(base, x, spec, i: int, aux_i=None) -> tuple[float, float]:
    """Fused `_l1` for source i of `spec` (one pass; the engine's L1 rescale on the CPU fused path)."""
    key = ("l1", spec.keep, aux_i is not None)
    fn = _COMPILED.get(key)
    if fn is None:
        import functools

        fn = _COMPILED[key] = torch.compile(functools.partial(_l1, keep=spec.keep), dynamic=True, fullgraph=True)
    g = lambda v, d=0.0: torch.tensor(v[i] if v else d)  # noqa: E731
    keys = spec.keys[i] if spec.keys else (0, 0)
    before, after = fn(base.reshape(-1), x.reshape(-1), None if aux_i is None else aux_i.reshape(-1), g(spec.t_in),
                       torch.tensor(spec.c_in[i] if spec.c_in else -1), g(spec.t_out),
                       torch.tensor(spec.c_out[i] if spec.c_out else -1), g(spec.densities), g(spec.eps),
                       torch.tensor(keys[0]), torch.tensor(keys[1]))
    return float(before), float(after)
