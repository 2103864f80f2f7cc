"""Merge one tensor from its base and source tensors, elementwise, given per-tensor scalars (`MergeSpec`).

Contract (the reference below is the CPU path and the oracle of the Triton kernel):

    merge(base, sources, spec, aux=None, index=None) -> float32 tensor of the inputs' shape

* `spec.mode == "combine"` (linear, slerp, passthrough, nuslerp and multislerp without a base, karcher,
  model_stock):                                           out = (sum_i coeffs[i] * X_i) / divisor
* `spec.mode == "nearswap"`:  w = clamp(t * (1 / max(|base - X_0|, 1e-6)), 0, 1);   out = w * X_0 + (1 - w) * base
* `spec.mode == "delta"` (the task-arithmetic family):
      d_i  = X_i - base                               (float32)
      k_i  = keep_i(d_i, j)                           spec.keep: "all" | "topk" | "random" | "della"
      x_i  = ((d_i * k_i) * scales[i]) * weights[i]
      consensus: c_i = x_i > 0 if sum_i x_i >= 0 else x_i < 0;  mixed = sum c_i x_i;  div = sum c_i w_i (0 -> 1)
      else:      c_i = 1;                                        mixed = sum x_i;     div = sum w_i (|.|<1e-8 -> 1)
      out  = base + lam * (mixed / div if normalize else mixed)
* Per-row coefficients (`row_layout` "row" | "col"; row-wise nuslerp, filter-wise model_stock): aux[i] is a float32
  vector, and coeffs[i] (combine) or weights[i] (delta, keep "all") is aux[i][r] with r = j // row_width ("row") or
  r = j % row_width ("col").
  keep rules, with a = |d_i| and j the element's flat index in the whole tensor:
      topk:   in(t, c) = a > t or (a == t and j <= c)     (c >= 2**32: no tie straddles the cut)
              keep = in(t_in[i], c_in[i]) and not in(t_out[i], c_out[i])
              (TIES: the top-k set; breadcrumbs: top-(k_in) minus top-(k_out); ties at the cut go to lower j)
      random: keep = u_i(j) < densities[i]                  (kernels.rng, keys[i])
      della:  keep = u_i(j) < (densities[i] - eps[i]) + aux[i][j] * (2 * eps[i])   (aux: per-row rank in [0,1])
              aux[i] = row_ranks(|d_i|) of the rows (dim 0; a 1-D tensor is one row): given by the caller, or,
              when `aux` is None on the CPU, computed here row block by row block (no O(numel) statistic)
      vartopk (sce): keep = in(t_in[0], c_in[0]) on v = the variance over i of d_i (float64 Welford, then float32),
              one mask for every source; with `consensus_raw` the sign election and the counts use d_i * k_i
              (unweighted), and the normalizing divisor is max(div, div_min)
      fusion (arcee_fusion): keep = a * aux[0][r(j)] >= t_in[0]       (aux: per-row KL, r: row layout "row")
      ram:    k_i = a > eps[i];  n = sum_i k_i;  x_i = k_i ? (n == 1 ? d_i * scales[i] : d_i / n) : 0   (no weights)
All scalars (thresholds, rescale factors, slerp coefficients) come from `engine.merger.prepare`, once per
(recipe, tensor); this pass reads each input once and writes the output once. Arithmetic is float32 whatever the
storage dtype. `index` (int64 flat indices, the inputs' shape) is given when the inputs are a gather of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rank_cpu
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
    consensus_raw: bool = False  # sce: elect the sign from the unweighted kept deltas
    div_min: float = 0.0  # > 0: the consensus divisor is max(div, div_min) (sce), else 0 -> 1
    row_layout: str = ""  # "" | "row" | "col": per-row coefficients in aux (see the module docstring)
    row_width: int = 1
    t: float = 0.0  # nearswap

    @property
    def n(self) -> int:
        if self.mode == "nearswap":
            return 1
        return len(self.coeffs) if self.mode == "combine" else len(self.weights)

    @property
    def aux_per_row(self) -> bool:
        """aux holds per-row vectors indexed through j (not tensors of the inputs' shape)."""
        return bool(self.row_layout) or self.keep == "fusion"

    @property
    def weight_sum(self) -> float:
        """The divisor of a normalized merge without consensus: sum of the weights, 1.0 where |sum| < 1e-8."""
        div = sum(self.weights)
        return 1.0 if abs(div) < 1e-8 else div

    @property
    def has_outer_cut(self) -> bool:
        """A top-k keep rule whose outer cut drops something on some source (breadcrumbs: a finite t_out; the
        reference skips an outer cut at t_out = inf). The kernels compile such a spec as its own variant ("band")
        and TIES' plain top-k without the outer compares."""
        return self.keep == "topk" and any(t != float("inf") for t in self.t_out)

    @property
    def needs_index(self) -> bool:
        """Whether the elementwise pass reads flat element indices j."""
        return bool(self.row_layout) or (self.mode == "delta" and self.keep != "all")


def row_of(spec: MergeSpec, idx: torch.Tensor) -> torch.Tensor:
    """Row index r(j) of flat element indices `idx` under the spec's row layout."""
    return idx // spec.row_width if spec.row_layout != "col" else idx % spec.row_width


def _gather(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """v[r] for a 1-D vector (index_select: ~100x faster than advanced indexing on the CPU here)."""
    return torch.index_select(v, 0, r.reshape(-1)).reshape(r.shape)


def source_variance(ds: list[torch.Tensor]) -> torch.Tensor:
    """float32 variance over sources (population, as torch.var(unbiased=False)) of float32 deltas `ds`: Welford
    in float64, rounded once to float32 (bit-identical to torch.var's CPU result for up to 8 sources)."""
    mean = torch.zeros(ds[0].shape, dtype=torch.float64, device=ds[0].device)
    m2 = torch.zeros_like(mean)
    for k, d in enumerate(ds):
        x = d.double()
        delta = x - mean
        mean = mean + delta / (k + 1)
        m2 = m2 + delta * (x - mean)
    return (m2 / len(ds)).float()


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
    if spec.keep == "fusion":
        return (d.abs() * _gather(aux_i, row_of(spec, idx))) >= spec.t_in[0]
    u = uniform(idx, spec.keys[i])
    if spec.keep == "random":
        return u < spec.densities[i]
    if spec.keep == "della":
        p = (spec.densities[i] - spec.eps[i]) + aux_i.float() * (2.0 * spec.eps[i])
        return u < p
    raise ValueError(f"unknown keep rule {spec.keep!r}")


def _in_cut(a: torch.Tensor, t: float, c: int, idx: torch.Tensor) -> torch.Tensor:
    if c >= MAX_INDEX:
        return a >= t
    return (a > t) | ((a == t) & (idx <= c))


def _ram_parts(b, xs, spec):
    ds = [x.float() - b for x in xs]
    ks = [d.abs() > e for d, e in zip(ds, spec.eps)]
    count = ks[0].to(torch.float32)
    for k in ks[1:]:
        count += k
    parts = []
    for i, (d, k) in enumerate(zip(ds, ks)):
        uniq = d * spec.scales[i] if spec.scales[i] != 1.0 else d
        parts.append(torch.where(k, torch.where(count == 1, uniq, d / count), 0.0))
    return parts


def row_view(shape) -> tuple[int, int]:
    """(rows, row width) of DELLA's rank rows: dim 0 of a tensor, a 1-D tensor being one row."""
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) < 2:
        return (1, numel)
    return (shape[0], numel // shape[0] if shape[0] else 0)


def _row_order(a2: torch.Tensor) -> torch.Tensor:
    """The stable ascending order of each row of magnitudes `a2` (R, W): float32 sorted by its bit patterns as int32
    (the same order for non-negative floats, and an integer sort is cheaper)."""
    keys = a2.view(torch.int32) if a2.dtype == torch.float32 else a2
    return torch.argsort(keys, dim=1, stable=True)


def row_ranks(a2: torch.Tensor) -> torch.Tensor:
    """float32 (R, W) rank of each element of `a2` (R, W) within its row, ascending, stable (ties by position),
    divided by W - 1 (0 if W == 1): DELLA's magnitude-rank probabilities (mergekit sparsify.py della_magprune).

    `a2` holds magnitudes (non-negative; every caller passes |delta|). In float32 their bit patterns, read as int32,
    order as the values do, and an integer sort is cheaper than a float one. On the CPU the ranks come from a radix
    sort in C (`kernels.rank_cpu`, ~3x faster than torch's sort of rows), elsewhere (and where that is unavailable)
    from `row_ranks_sorted`; both give the same floats (elements whose |delta| is NaN may order differently among
    themselves: their merged values are NaN either way).
    """
    w = a2.shape[1]
    if w <= 1:
        return torch.zeros(a2.shape, device=a2.device)
    got = rank_cpu.ranks(a2, _unit_table(w, a2.device))
    return got if got is not None else row_ranks_sorted(a2)


def row_ranks_sorted(a2: torch.Tensor) -> torch.Tensor:
    """`row_ranks` by torch's stable argsort of the rows' bit patterns (the oracle of `kernels.rank_cpu`, and the
    path on a GPU): the normalized ranks scattered as float32 directly (`rank / (W - 1)` computed once per column,
    the same float32 division as `ranks.float() / (W - 1)`); 1.7x faster than a float argsort + int64 scatter +
    division on a (512, 4096) block."""
    w = a2.shape[1]
    if w <= 1:
        return torch.zeros(a2.shape, device=a2.device)
    order = _row_order(a2)
    ranks = torch.empty(a2.shape, dtype=torch.float32, device=a2.device)
    ranks.scatter_(1, order, _unit_table(w, a2.device).expand_as(order))
    return ranks


def _unit_table(w: int, device) -> torch.Tensor:
    """float32 (W,): r / (W - 1) for r in 0..W-1, the normalized rank of each position (W >= 2)."""
    return torch.arange(w, dtype=torch.float32, device=device) / (w - 1)


def row_rank_ints(a2: torch.Tensor) -> torch.Tensor:
    """int16 (R, W) ranks of `row_ranks` before normalization (W <= 32768): 2 bytes an element instead of 4, for
    ranks kept between two passes; `unit_ranks` turns a block of them into exactly `row_ranks`' floats."""
    w = a2.shape[1]
    if w > 1 << 15:
        raise ValueError(f"rows of {w} elements: int16 ranks hold at most 32768")
    got = rank_cpu.rank_ints(a2)
    if got is not None:
        return got
    order = _row_order(a2)
    ranks = torch.empty(a2.shape, dtype=torch.int16, device=a2.device)
    ranks.scatter_(1, order, torch.arange(w, dtype=torch.int16, device=a2.device).expand_as(order))
    return ranks


def unit_ranks(r: torch.Tensor, width: int) -> torch.Tensor:
    """float32 ranks in [0, 1] of integer ranks `r` (any shape) in rows of `width`: the same float32 division as
    `row_ranks` (bit-identical); float32 `r` is returned as it is (already normalized)."""
    if r.dtype == torch.float32:
        return r
    if width <= 1:
        return torch.zeros(r.shape, device=r.device)
    return r.float() / (width - 1)


def della_step(shape, chunk: int) -> tuple[int, int]:
    """(step, width): chunk size in elements made of whole rank rows (>= one row), and the row width."""
    width = max(1, row_view(shape)[1])
    return max(1, chunk // width) * width, width


def l1_sums(base: torch.Tensor, x: torch.Tensor, spec: MergeSpec, i: int,
            aux_i: torch.Tensor | None = None, before: float | None = None) -> tuple[float, float]:
    """(sum |d|, sum |d * keep_i|) in float64 over one chunked pass, d = x - base (the L1 rescale's norms);
    DELLA ranks come from `aux_i` or are computed per row block. With `before` (the first norm, known from an earlier
    call on the same tensors) only the second is summed."""
    b, xx = base.reshape(-1), x.reshape(-1)
    a = aux_i.reshape(-1) if aux_i is not None else None
    step, width = della_step(x.shape, CHUNK) if spec.keep == "della" else (CHUNK, 0)
    total = after = 0.0
    for s in range(0, b.numel(), step):
        e = min(b.numel(), s + step)
        d = xx[s:e].float() - b[s:e].float()
        ai = unit_ranks(a[s:e], width) if a is not None else None
        if spec.keep == "della" and ai is None:
            ai = row_ranks(d.abs().view(-1, width)).view(-1)
        k = keep_mask(spec, i, d, torch.arange(s, e, device=d.device), ai)
        if before is None:
            total += float(d.abs().sum(dtype=torch.float64))
        after += float((d * k).abs().sum(dtype=torch.float64)) if k is not None else float(d.abs().sum())
    return (total if before is None else before), after


def _delta_chunk(base, xs, spec, idx, auxs):
    b = base.float()
    parts, raw = [], []
    if spec.keep == "ram":
        parts = _ram_parts(b, xs, spec)
    else:
        ds = [x.float() - b for x in xs]
        shared = _in_cut(source_variance(ds), spec.t_in[0], spec.c_in[0], idx) if spec.keep == "vartopk" else None
        for i, d in enumerate(ds):
            if shared is not None:
                d = d * shared
            elif spec.row_layout:
                w = _gather(auxs[i], row_of(spec, idx))
            else:
                k = keep_mask(spec, i, d, idx, None if auxs is None else auxs[i])
                if k is not None:
                    d = d * k
            raw.append(d)
            if spec.scales[i] != 1.0:
                d = d * spec.scales[i]
            parts.append(d * (w if spec.row_layout else spec.weights[i]))
    if spec.consensus:
        votes = raw if spec.consensus_raw else parts
        total = votes[0].clone()
        for p in votes[1:]:
            total += p
        pos = total >= 0
        mixed = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for p, v, w in zip(parts, votes, spec.weights):
            c = torch.where(pos, v > 0, v < 0)
            mixed += p * c
            div += c * w
        if spec.div_min > 0:
            div = div.clamp(min=spec.div_min)
        else:
            div[div == 0] = 1.0
    else:
        mixed = parts[0].clone()
        for p in parts[1:]:
            mixed += p
        div = spec.weight_sum
    if spec.normalize:
        mixed = mixed / div
    if spec.lam != 1.0:
        mixed = mixed * spec.lam
    return b + mixed


def _nearswap_chunk(base, x, t: float):
    a, b = base.float(), x.float()
    w = ((a - b).abs().clamp(min=1e-6).reciprocal() * t).clamp(0.0, 1.0)
    return w * b + (1.0 - w) * a


def _combine_chunk(xs, spec, idx=None, auxs=None):
    if spec.row_layout:
        r = row_of(spec, idx)
        acc = xs[0].float() * _gather(auxs[0], r)
        for a, x in zip(auxs[1:], xs[1:]):
            acc += x.float() * _gather(a, r)
    else:
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
    if out is None:  # the result is this tensor, not a view of a flat one: a cache can hand its memory on (weights.py)
        out = torch.empty(shape, dtype=torch.float32, device=sources[0].device)
    res = out.view(-1)
    ranks_here = spec.mode == "delta" and spec.keep == "della" and aux is None
    step, width = della_step(shape, CHUNK) if ranks_here else (CHUNK, 0)
    for s in range(0, numel, step):
        e = min(numel, s + step)
        xs = [f[s:e] for f in flat_src]
        idx = None
        if spec.needs_index:
            idx = flat_idx[s:e] if flat_idx is not None else torch.arange(s, e, device=res.device)
        auxs = None
        if flat_aux is not None:
            if spec.aux_per_row:
                auxs = [a.float() for a in flat_aux]
            else:  # DELLA ranks may come as integers (engine/merger.py's shared ranks)
                auxs = [unit_ranks(a[s:e], row_view(shape)[1]) for a in flat_aux]
        if spec.mode == "combine":
            r = _combine_chunk(xs, spec, idx, auxs)
        elif spec.mode == "nearswap":
            r = _nearswap_chunk(flat_base[s:e], xs[0], spec.t)
        else:
            if ranks_here:
                b = flat_base[s:e].float()
                auxs = [row_ranks((x.float() - b).abs_().view(-1, width)).view(-1) for x in xs]
            r = _delta_chunk(flat_base[s:e], xs, spec, idx, auxs)
        res[s:e] = r
    return out


ROUND_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def rounded(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """`t` (a float32 tensor) with every value rounded to `dtype` ("float16" or "bfloat16", round to nearest even;
    "" or "float32": unchanged), in place, still float32: what a checkpoint of that dtype stores and a model loaded
    from it computes with. A tensor of another dtype is returned as is."""
    want = ROUND_DTYPES.get(dtype)
    if want is None or t.dtype != torch.float32:
        return t
    return t.copy_(t.to(want))


def merge(base, sources, spec, aux=None, index=None, out=None, cpu_fused: bool | None = None, round_to: str = ""):
    """Dispatch: CUDA tensors -> Triton kernel (unless forced to the reference); CPU tensors -> the fused CPU merge
    (kernels/merge_native.py's C loop, else kernels/merge_cpu.py's Inductor loop; default on, `cpu_fused=False` or
    LAZYMERGE_CPU_FUSED=0: the reference) for whole tensors of the delta family, else the reference. `round_to` ("",
    "bfloat16", "float16"): a float32 result's values rounded to that dtype (`rounded`), inside the fused CPU loop
    where it runs, else by one more pass."""
    from . import dispatch, merge_cpu, merge_native

    fused = merge_cpu.enabled() if cpu_fused is None else cpu_fused
    if (fused and spec.mode == "delta" and not spec.row_layout and index is None and sources
            and sources[0].device.type == "cpu" and not dispatch.use_triton(sources[0])):
        # None: a spec (or an `out`) the loop does not take. The C loop first (task arithmetic, TIES, breadcrumbs,
        # DARE), then the Inductor one (also DELLA); the same bits as the reference
        r = merge_native.merge_delta_native(base, sources, spec, out=out, round_to=round_to) if aux is None else None
        if r is None:
            r = merge_cpu.merge_delta_fused(base, sources, spec, aux=aux, out=out, round_to=round_to)
        if r is not None:
            return r
    if dispatch.use_triton(sources[0]):
        from .merge_triton import merge_triton  # noqa: PLC0415  (GPU path, optional)

        return rounded(merge_triton(base, sources, spec, aux=aux, index=index, out=out), round_to)
    return rounded(merge_reference(base, sources, spec, aux=aux, index=index, out=out), round_to)
