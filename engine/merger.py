"""Compute one merged tensor on demand: per-tensor scalars once, then one elementwise pass.

`Merger.merge(plan)` returns the float32 merged tensor of a `TensorPlan` (or only some rows of it, for embedding
lookups). It splits the work as the kernels want it:

1. `spec(plan)`: the `MergeSpec` scalars of the tensor (TIES / breadcrumbs cut thresholds, DARE/DELLA mask keys,
   L1 rescale factors, slerp coefficients), cached by the plan's content key. The cut of any density comes from a
   per-(source, tensor) *magnitude order* (|delta| sorted once, stable, descending, with the flat indices), so a
   new density costs a lookup, not a sort: the kept set is exactly the first k = int(density * numel) of that order,
   i.e. mergekit's top-k with ties at the cut broken towards the lower flat index. DELLA's per-row ranks are cached
   the same way.
2. `kernels.merge.merge(...)`: the elementwise pass (Triton on CUDA, the PyTorch reference on CPU).

Source tensors are read through `TensorStore`: zero-copy views of the memory-mapped files on the CPU, one resident
copy per source tensor on a GPU.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from lazymerge.kernels import merge_cpu
from lazymerge.kernels.merge import MergeSpec, keep_mask
from lazymerge.kernels.merge import merge as merge_kernel
from lazymerge.kernels.rng import MAX_INDEX, mask_keys

from .methods import Family, Sparsify
from .plan import SourceSet, TensorPlan, TensorRef


class LRU:
    """A thread-safe LRU map bounded by a byte budget; `size(value)` gives a value's bytes."""

    def __init__(self, budget: int, size=None):
        self.budget = budget
        self.size = size or (lambda v: 0)
        self.data: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.RLock()

    def get(self, key):
        with self.lock:
            v = self.data.get(key)
            if v is None:
                self.misses += 1
                return None
            self.data.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key, value) -> bool:
        nb = self.size(value)
        with self.lock:
            if key in self.data:
                self.bytes -= self.size(self.data.pop(key))
            if nb > self.budget:
                return False
            while self.bytes + nb > self.budget and self.data:
                _, old = self.data.popitem(last=False)
                self.bytes -= self.size(old)
            self.data[key] = value
            self.bytes += nb
            return True

    def clear(self):
        with self.lock:
            self.data.clear()
            self.bytes = 0


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    return 64


class TensorStore:
    """Source tensors on one device: memory-mapped views on the CPU, one resident copy each on a GPU."""

    def __init__(self, sources: SourceSet, device: torch.device | str = "cpu"):
        self.sources = sources
        self.device = torch.device(device)
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    def get(self, ref: TensorRef) -> torch.Tensor:
        if self.device.type == "cpu":
            t = self.sources[ref.source].get(ref.name)
        else:
            key = (self.sources[ref.source].fingerprint, ref.name)
            with self._lock:
                t = self._resident.get(key)
                if t is None:
                    t = self._resident[key] = self.sources[ref.source].get(ref.name).to(self.device)
        return t[: ref.rows] if ref.rows is not None else t

    def clear(self) -> None:
        with self._lock:
            self._resident.clear()

    def resident_bytes(self) -> int:
        return sum(_nbytes(t) for t in self._resident.values())


class Merger:
    def __init__(self, sources: SourceSet, device="cpu", stats_budget: int = 4 << 30, spec_entries: int = 200_000,
                 cpu_fused: bool | None = None):
        self.store = TensorStore(sources, device)
        self.cpu_fused = merge_cpu.enabled() if cpu_fused is None else cpu_fused  # kernels/merge_cpu.py
        self.stats = LRU(stats_budget, _nbytes)
        self.specs = LRU(spec_entries, lambda v: 1)

    # -- statistics per (source, tensor), independent of the recipe's numbers --------------------------------
    def _delta(self, base: TensorRef, x: TensorRef) -> torch.Tensor:
        return self.store.get(x).float() - self.store.get(base).float()

    def _stat_key(self, kind: str, base: TensorRef, x: TensorRef) -> tuple:
        S = self.store.sources
        return (kind, S[base.source].fingerprint, base.name, base.rows, S[x.source].fingerprint, x.name, x.rows)

    def magnitude_order(self, base: TensorRef, x: TensorRef) -> tuple[torch.Tensor, torch.Tensor]:
        """|delta| sorted descending (stable: ties by increasing flat index), and the flat indices (int32)."""
        key = self._stat_key("order", base, x)
        v = self.stats.get(key)
        if v is None:
            d = self._delta(base, x).reshape(-1).abs_()
            vals, idx = torch.sort(d, descending=True, stable=True)
            v = (vals, idx.to(torch.int32))
            self.stats.put(key, v)
        return v

    def della_ranks(self, base: TensorRef, x: TensorRef) -> torch.Tensor:
        """Per-row rank of |delta| (ascending, stable) normalized to [0, 1], as float32 of the tensor's shape."""
        key = self._stat_key("della", base, x)
        v = self.stats.get(key)
        if v is None:
            d = self._delta(base, x)
            d2 = d.abs().reshape(1, -1) if d.dim() < 2 else d.abs().reshape(d.shape[0], -1)
            order = torch.argsort(d2, dim=1, stable=True)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(d2.shape[1], device=d2.device).expand_as(order))
            n = d2.shape[1]
            v = (ranks.float() / (n - 1) if n > 1 else torch.zeros_like(d2)).reshape(d.shape)
            self.stats.put(key, v)
        return v

    # -- per-tensor scalars ------------------------------------------------------------------------------------
    def spec(self, plan: TensorPlan) -> tuple[MergeSpec, list[torch.Tensor] | None]:
        cached = self.specs.get(plan.key)
        if cached is None:
            cached = self._prepare(plan)
            self.specs.put(plan.key, cached)
        return cached

    def _prepare(self, p: TensorPlan):
        if p.family is Family.passthrough:
            return MergeSpec("combine", coeffs=p.weights), None
        if p.family is Family.linear:
            return MergeSpec("combine", coeffs=p.weights, divisor=sum(p.weights) if p.normalize else 1.0), None
        if p.family is Family.slerp:
            return MergeSpec("combine", coeffs=self._slerp_coeffs(p)), None
        n = len(p.inputs)
        numel = math.prod(p.shape)
        if numel >= MAX_INDEX:
            raise ValueError(f"{p.out_name}: tensors of 2**32 elements or more are not supported")
        common = dict(weights=p.weights, consensus=p.consensus, normalize=p.normalize, lam=p.lam)
        if p.sparsify is Sparsify.none or n == 0:
            return MergeSpec("delta", keep="all", scales=(1.0,) * n, **common), None
        if p.sparsify in (Sparsify.magnitude, Sparsify.breadcrumbs):
            t_in, c_in, t_out, c_out, scales = [], [], [], [], []
            for i, x in enumerate(p.inputs):
                dens = p.densities[i]
                if dens >= 1:
                    k_in, k_out = numel, 0
                elif p.sparsify is Sparsify.magnitude:
                    k_in, k_out = int(dens * numel), 0
                else:
                    target, n_top = int(dens * numel), int(p.gammas[i] * numel)
                    n_bot = numel - target - n_top
                    if n_bot < 0:
                        n_top += n_bot
                    k_in, k_out = n_top + target, n_top
                if k_in >= numel and k_out == 0:
                    t_in.append(-1.0), c_in.append(-1), t_out.append(math.inf), c_out.append(-1), scales.append(1.0)
                    continue
                vals, idx = self.magnitude_order(p.base, x)
                ti, ci = _cut(vals, idx, k_in)
                to, co = _cut(vals, idx, k_out) if k_out > 0 else (math.inf, -1)
                t_in.append(ti), c_in.append(ci), t_out.append(to), c_out.append(co)
                scale = 1.0
                if p.rescale:
                    before = float(vals.sum())
                    after = float(vals[k_out:k_in].sum())
                    scale = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
                scales.append(scale)
            return MergeSpec("delta", keep="topk", t_in=tuple(t_in), c_in=tuple(c_in), t_out=tuple(t_out),
                             c_out=tuple(c_out), scales=tuple(scales), **common), None
        # random masks: DARE, DELLA
        mask_name = p.mask_name or p.out_name
        keys = tuple(mask_keys(p.seed, mask_name, i) for i in range(n))
        if p.sparsify is Sparsify.random:
            spec = MergeSpec("delta", keep="random", densities=tuple(min(d, 1.0) for d in p.densities),
                             keys=keys, scales=(1.0,) * n, **common)
            aux = None
        else:
            eps = tuple(0.0 if d >= 1 else e for d, e in zip(p.densities, p.epsilons))
            spec = MergeSpec("delta", keep="della", densities=tuple(min(d, 1.0) for d in p.densities), eps=eps,
                             keys=keys, scales=(1.0,) * n, **common)
            aux = [self.della_ranks(p.base, x) for x in p.inputs]
        if p.rescale:
            spec = _replace(spec, scales=tuple(
                1.0 if p.densities[i] >= 1 else self._l1_scale(spec, i, p.base, x, None if aux is None else aux[i])
                for i, x in enumerate(p.inputs)))
        return spec, aux

    def _l1_scale(self, spec: MergeSpec, i: int, base: TensorRef, x: TensorRef, aux_i) -> float:
        if self.cpu_fused and self.store.device.type == "cpu":
            before, after = merge_cpu.l1_sums_fused(self.store.get(base), self.store.get(x), spec, i, aux_i)
            return before / after if before >= 1e-7 and after >= 1e-7 else 1.0
        b = self.store.get(base).reshape(-1)
        xx = self.store.get(x).reshape(-1)
        a = aux_i.reshape(-1) if aux_i is not None else None
        before = after = 0.0
        step = 1 << 20
        for s in range(0, b.numel(), step):
            e = min(b.numel(), s + step)
            d = xx[s:e].float() - b[s:e].float()
            idx = torch.arange(s, e, device=d.device)
            k = keep_mask(spec, i, d, idx, None if a is None else a[s:e])
            before += float(d.abs().sum())
            after += float((d * k).abs().sum())
        return before / after if before >= 1e-7 and after >= 1e-7 else 1.0

    def _slerp_coeffs(self, p: TensorPlan) -> tuple[float, float]:
        key = ("slerp",) + tuple(self._stat_key("", p.inputs[0], p.inputs[1])[1:])
        st = self.stats.get(key)
        if st is None:
            v0 = self.store.get(p.inputs[0]).double()
            v1 = self.store.get(p.inputs[1]).double()
            st = (float(v0.norm()), float(v1.norm()), float((v0 * v1).sum()))
            self.stats.put(key, st)
        n0, n1, dot_raw = st
        eps = 1e-8
        dot = dot_raw / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
        t = p.t
        if abs(dot) > 0.9995:
            return (1.0 - t, t)
        theta0 = math.acos(max(-1.0, min(1.0, dot)))
        s_t0 = math.sin(theta0)
        theta_t = theta0 * t
        return (math.sin(theta0 - theta_t) / s_t0, math.sin(theta_t) / s_t0)

    # -- the merge ---------------------------------------------------------------------------------------------
    def merge(self, plan: TensorPlan, rows: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 merged tensor of `plan` (only `rows` of it, if given: embedding lookups)."""
        spec, aux = self.spec(plan)
        base = self.store.get(plan.base) if plan.base is not None else None
        xs = [self.store.get(r) for r in plan.inputs]
        index = None
        if rows is not None:
            width = math.prod(plan.shape[1:])
            xs = [x[rows] for x in xs]
            base = base[rows] if base is not None else None
            aux = [a[rows] for a in aux] if aux is not None else None
            if spec.mode == "delta" and spec.keep != "all":
                index = rows.reshape(-1, 1) * width + torch.arange(width, device=rows.device)
                index = index.reshape(xs[0].shape)
        if spec.mode == "delta" and not xs:
            return base.float() if out is None else out.copy_(base)
        return merge_kernel(base, xs, spec, aux=aux, index=index, out=out, cpu_fused=self.cpu_fused)


def _cut(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[float, int]:
    """(threshold, tie cutoff index) selecting exactly the first k elements of a magnitude order."""
    if k <= 0:
        return math.inf, -1
    if k >= vals.numel():
        return -1.0, -1
    t = float(vals[k - 1])
    if float(vals[k]) != t:  # no element equal to t lies past the cut: keep all of them (a fast path)
        return t, MAX_INDEX
    return t, int(idx[k - 1])


def _replace(spec: MergeSpec, **kw) -> MergeSpec:
    import dataclasses

    return dataclasses.replace(spec, **kw)
