"""Merge one tensor from its base and source tensors, elementwise, given per-tensor scalars (`MergeSpec`).

Contract (the reference below is the CPU path and the oracle of the Triton kernel):

    merge(base, sources, spec, aux=None, index=None) -> float32 tensor of the inputs' shape

* `spec.mode == "combine"` (linear, slerp, passthrough):   out = (sum_i coeffs[i] * X_i) / divisor
* `spec.mode == "delta"` (the task-arithmetic family):
      d_i  = X_i - base                               (float32)
      k_i  = keep_i(d_i, j)                           spec.keep: "all" | "topk" | "random" | "della"
      x_i  = ((d_i * k_i) * scales[i]) * weights[i]
      consensus: c_i = x_i > 0 if sum_i x_i >= 0 else x_i < 0;  mixed = sum c_i x_i;  div = sum c_i w_i (0 -> 1)
      else:      c_i = 1;                                        mixed = sum x_i;     div = sum w_i (|.|<1e-8 -> 1)
      out  = base + lam * (mixed / div if normalize else mixed)
  keep rules, with a = |d_i| and j the element's flat index in the whole tensor:
      topk:   in(t, c) = a > t or (a == t and j <= c)     (c >= 2**32: no tie straddles the cut)
              keep = in(t_in[i], c_in[i]) and not in(t_out[i], c_out[i])
              (TIES: the top-k set; breadcrumbs: top-(k_in) minus top-(k_out); ties at the cut go to lower j)
      random: keep = u_i(j) < densities[i]                  (kernels.rng, keys[i])
      della:  keep = u_i(j) < (densities[i] - eps[i]) + aux[i][j] * (2 * eps[i])   (aux: per-row rank in [0,1])
              aux[i] = row_ranks(|d_i|) of the rows (dim 0; a 1-D tensor is one row): given by the caller, or,
              when `aux` is None on the CPU, computed here row block by row block (no O(numel) statistic)
All scalars (thresholds, rescale factors, slerp coefficients) come from `engine.merger.prepare`, once per
(recipe, tensor); this pass reads each input once and writes the output once. Arithmetic is float32 whatever the
storage dtype. `index` (int64 flat indices, the inputs' shape) is given when the inputs are a gather of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rng import MAX_INDEX, uniform

CHUNK = 1 << 15  # elements per step of the reference: its temporaries stay in cache (4x faster than 1M here)


@dataclass(frozen=True)
class MergeSpec:
    mode: str  # "combine" | "delta"
    coeffs: tuple[float, ...] = ()
    divisor: float = 1.0
    weights: tuple[float, ...] = ()
    keep: str = "all"  # all | topk | random | della
    t_in: tuple[float, ...] = ()
    c_in: tuple[int, ...] = ()
    t_out: tuple[float, ...] = ()
    c_out: tuple[int, ...] = ()
    densities: tuple[float, ...] = ()
    eps: tuple[float, ...] = ()
    keys: tuple[tuple[int, int], ...] = ()
    scales: tuple[float, ...] = ()
    consensus: bool = False
    normalize: bool = False
    lam: float = 1.0

    @property
    def n(self) -> int:
        return len(self.coeffs) if self.mode == "combine" else len(self.weights)


def keep_mask(spec: MergeSpec, i: int, d: torch.Tensor, idx: torch.Tensor | None,
              aux_i: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean keep-mask of source i on the float32 delta chunk `d` (None: keep everything)."""
    if spec.keep == "all":
        return None
    if spec.keep == "topk":
        a = d.abs()
        if spec.c_in[i] >= MAX_INDEX:  # no tie straddles the cut: every element equal to t is kept
            keep = a >= spec.t_in[i]
        else:
            keep = (a > spec.t_in[i]) | ((a == spec.t_in[i]) & (idx <= spec.c_in[i]))
        if spec.t_out[i] != float("inf"):
            keep &= ~((a > spec.t_out[i]) | ((a == spec.t_out[i]) & (idx <= spec.c_out[i])))
        return keep
    u = uniform(idx, spec.keys[i])
    if spec.keep == "random":
        return u < spec.densities[i]
    if spec.keep == "della":
        p = (spec.densities[i] - spec.eps[i]) + aux_i.float() * (2.0 * spec.eps[i])
        return u < p
    raise ValueError(f"unknown keep rule {spec.keep!r}")


def row_view(shape) -> tuple[int, int]:
    """(rows, row width) of DELLA's rank rows: dim 0 of a tensor, a 1-D tensor being one row."""
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) < 2:
        return (1, numel)
    return (shape[0], numel // shape[0] if shape[0] else 0)


def row_ranks(a2: torch.Tensor) -> torch.Tensor:
    """float32 (R, W) rank of each element of `a2` (R, W) within its row, ascending, stable (ties by position),
    divided by W - 1 (0 if W == 1): DELLA's magnitude-rank probabilities (mergekit sparsify.py della_magprune)."""
    order = torch.argsort(a2, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(a2.shape[1], device=a2.device).expand_as(order))
    w = a2.shape[1]
    return ranks.float() / (w - 1) if w > 1 else torch.zeros(a2.shape, device=a2.device)


def della_step(shape, chunk: int) -> tuple[int, int]:
    """(step, width): chunk size in elements made of whole rank rows (>= one row), and the row width."""
    width = max(1, row_view(shape)[1])
    return max(1, chunk // width) * width, width


def l1_sums(base: torch.Tensor, x: torch.Tensor, spec: MergeSpec, i: int,
            aux_i: torch.Tensor | None = None) -> tuple[float, float]:
    """(sum |d|, sum |d * keep_i|) in float64 over one chunked pass, d = x - base (the L1 rescale's norms);
    DELLA ranks come from `aux_i` or are computed per row block."""
    b, xx = base.reshape(-1), x.reshape(-1)
    a = aux_i.reshape(-1) if aux_i is not None else None
    step, width = della_step(x.shape, CHUNK) if spec.keep == "della" else (CHUNK, 0)
    before = after = 0.0
    for s in range(0, b.numel(), step):
        e = min(b.numel(), s + step)
        d = xx[s:e].float() - b[s:e].float()
        ai = a[s:e] if a is not None else None
        if spec.keep == "della" and ai is None:
            ai = row_ranks(d.abs().view(-1, width)).view(-1)
        k = keep_mask(spec, i, d, torch.arange(s, e, device=d.device), ai)
        before += float(d.abs().sum(dtype=torch.float64))
        after += float((d * k).abs().sum(dtype=torch.float64)) if k is not None else float(d.abs().sum())
    return before, after


def _delta_chunk(base, xs, spec, idx, auxs):
    b = base.float()
    parts = []
    for i, x in enumerate(xs):
        d = x.float() - b
        k = keep_mask(spec, i, d, idx, None if auxs is None else auxs[i])
        if k is not None:
            d = d * k
        if spec.scales[i] != 1.0:
            d = d * spec.scales[i]
        parts.append(d * spec.weights[i])
    if spec.consensus:
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        pos = total >= 0
        mixed = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for p, w in zip(parts, spec.weights):
            c = torch.where(pos, p > 0, p < 0)
            mixed += p * c
            div += c * w
        div[div == 0] = 1.0
    else:
        mixed = parts[0].clone()
        for p in parts[1:]:
            mixed += p
        div = sum(spec.weights)
        if abs(div) < 1e-8:
            div = 1.0
    if spec.normalize:
        mixed = mixed / div
    if spec.lam != 1.0:
        mixed = mixed * spec.lam
    return b + mixed


def _combine_chunk(xs, spec):
    acc = xs[0].float() * spec.coeffs[0]
    for c, x in zip(spec.coeffs[1:], xs[1:]):
        acc += x.float() * c
    if spec.divisor != 1.0:
        acc = acc / spec.divisor
    return acc


def merge_reference(base: torch.Tensor | None, sources: list[torch.Tensor], spec: MergeSpec,
                    aux: list[torch.Tensor] | None = None, index: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of the merge kernel; see the module docstring. Returns float32 (or writes `out`)."""
    shape = sources[0].shape
    numel = sources[0].numel()
    flat_src = [s.reshape(-1) for s in sources]
    flat_base = base.reshape(-1) if base is not None else None
    flat_aux = [a.reshape(-1) for a in aux] if aux is not None else None
    flat_idx = index.reshape(-1) if index is not None else None
    res = out.view(-1) if out is not None else torch.empty(numel, dtype=torch.float32, device=sources[0].device)
    needs_idx = spec.mode == "delta" and spec.keep != "all"
    ranks_here = spec.mode == "delta" and spec.keep == "della" and aux is None
    step, width = della_step(shape, CHUNK) if ranks_here else (CHUNK, 0)
    for s in range(0, numel, step):
        e = min(numel, s + step)
        xs = [f[s:e] for f in flat_src]
        if spec.mode == "combine":
            r = _combine_chunk(xs, spec)
        else:
            idx = None
            if needs_idx:
                idx = flat_idx[s:e] if flat_idx is not None else torch.arange(s, e, device=res.device)
            auxs = [a[s:e] for a in flat_aux] if flat_aux is not None else None
            if ranks_here:
                b = flat_base[s:e].float()
                auxs = [row_ranks((x.float() - b).abs_().view(-1, width)).view(-1) for x in xs]
            r = _delta_chunk(flat_base[s:e], xs, spec, idx, auxs)
        res[s:e] = r
    return res.view(shape) if out is None else out


def merge(base, sources, spec, aux=None, index=None, out=None, cpu_fused: bool | None = None):
    """Dispatch: CUDA tensors -> Triton kernel (unless forced to the reference); CPU tensors -> the fused CPU merge
    (kernels/merge_cpu.py; default on, `cpu_fused=False` or LAZYMERGE_CPU_FUSED=0: the reference) for whole tensors
    of the delta family, else the reference."""
    from . import dispatch, merge_cpu

    fused = merge_cpu.enabled() if cpu_fused is None else cpu_fused
    if (fused and spec.mode == "delta" and index is None and out is None and sources
            and sources[0].device.type == "cpu" and not dispatch.use_triton(sources[0])):
        r = merge_cpu.merge_delta_fused(base, sources, spec, aux=aux)
        if r is not None:
            return r
    if dispatch.use_triton(sources[0]):
        from .merge_triton import merge_triton  # noqa: PLC0415  (GPU path, optional)

        return merge_triton(base, sources, spec, aux=aux, index=index, out=out)
    return merge_reference(base, sources, spec, aux=aux, index=index, out=out)
