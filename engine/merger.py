"""Compute one merged tensor on demand: per-tensor scalars once, then one elementwise pass.

`Merger.merge(plan)` returns the float32 merged tensor of a `TensorPlan` (or only some rows of it, for embedding
lookups). It splits the work as the kernels want it:

1. `spec(plan)`: the `MergeSpec` scalars of the tensor (TIES / breadcrumbs cut thresholds, DARE/DELLA mask keys,
   L1 rescale factors, slerp coefficients), cached by the plan's content key. The cut of any density is an exact
   radix select (`cuts`, kernels/select.py): the kept set is exactly the first k = int(density * numel) of the stable
   descending |delta| order, i.e. mergekit's top-k with ties at the cut broken towards the lower flat index, found
   without sorting. Statistics kept per (source, tensor) are O(1) in the tensor's size (a 128 KiB first-digit
   histogram for large tensors; slerp's three norms); DELLA's per-row ranks are computed inside the merge pass.
2. `kernels.merge.merge(...)`: the elementwise pass (Triton on CUDA, the fused compiled loop on CPU, the PyTorch
   reference as the oracle).
   The other mergekit methods keep no per-element statistic either: the spherical ones and model_stock cache the
   inputs' Gram matrix (O(rows * n^2), engine/method_stats.py), sce cuts its variance with `select.topk_cuts` and
   drops the variance, arcee_fusion keeps a per-row KL, ramplus_tl a factor per model.

Source tensors are read through `TensorStore`: fresh copies read with pread on the CPU (engine/reader.py), one resident
copy per source tensor on a GPU.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from lazymerge.kernels import merge_cpu, merge_native, select
from lazymerge.kernels.merge import MergeSpec, della_step, l1_sums, rounded, row_rank_ints, row_ranks, row_view
from lazymerge.kernels.merge import merge as merge_kernel
from lazymerge.kernels.rng import MAX_INDEX, mask_keys

from . import method_specs
from . import method_stats as ms
from .methods import Family, Sparsify
from .plan import SourceSet, TensorPlan, TensorRef
from .rowmap import gather

KEEP_HISTOGRAM_FROM = 1 << 18  # elements: smaller tensors recompute their first histogram (cheaper than keeping it)
# DELLA on the CPU: a tensor's per-row ranks (int16, every source) computed for its L1 rescale pass are kept for its
# merge pass when they fit this many bytes, instead of being sorted again; larger tensors recompute them per row
# block. (Held as float32 and computed for the whole tensor at once, the 267M family's MLP ranks raised a search
# candidate's peak RSS by 0.3 GiB, over its limit: glibc kept the transients.)
SHARED_RANKS_BYTES = 64 << 20


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
            self.reserve(nb)
            self.data[key] = value
            self.bytes += nb
            return True

    def reserve(self, nb: int) -> None:
        """Evict least recently used entries until `nb` more bytes fit the budget: called before a value is
        computed, so that the new value and the entries it will replace are never in memory together."""
        with self.lock:
            while self.data and self.bytes + nb > self.budget:
                _, old = self.data.popitem(last=False)
                self.bytes -= self.size(old)

    def retain(self, keep) -> list:
        """Evict every entry for which `keep(key)` is false (whatever its recency); returns the evicted values."""
        with self.lock:
            gone = [self.data.pop(k) for k in [k for k in self.data if not keep(k)]]
            self.bytes -= sum(self.size(v) for v in gone)
            return gone

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
    """Source tensors on one device: one resident copy each on a GPU; on the CPU, resident pread copies while they
    fit in `resident_limit` bytes, fresh pread copies (engine/reader.py) past it.

    `resident_limit` (CPU only; a GPU keeps every source resident): None = no bound; 0 (the default) = nothing
    resident (every use reads the file).
    Resident tensors are shared by every merge: nothing may write into what `raw`/`get` return. A source's files are
    still checked at every forward pass (`Engine.check_sources`): a changed file is refused even though its old
    content is in memory, and `clear()` drops every resident copy."""

    def __init__(self, sources: SourceSet, device: torch.device | str = "cpu", resident_limit: int | None = 0):
        self.sources = sources
        self.device = torch.device(device)
        self.resident_limit = resident_limit
        self.resident_used = 0
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def reads_files(self) -> bool:
        """True when every use of a tensor reads it from its file (CPU, nothing resident)."""
        return self.device.type == "cpu" and self.resident_limit == 0

    def raw(self, source: str, name: str) -> torch.Tensor:
        """Tensor `name` of `source` as stored (the resident copy, or a fresh pread copy past the resident bound)."""
        if self.reads_files:
            return self.sources[source].get(name)
        key = (self.sources[source].fingerprint, name)
        with self._lock:
            t = self._resident.get(key)
            if t is None:
                t = self.sources[source].get(name)
                if self.device.type != "cpu":
                    t = t.to(self.device)
                elif self.resident_limit is not None and self.resident_used + t.nbytes > self.resident_limit:
                    return t  # past the bound: this copy serves this use only
                self._resident[key] = t
                self.resident_used += t.nbytes
        return t

    def get(self, ref: TensorRef) -> torch.Tensor:
        """The input tensor `ref` denotes: cropped, or re-indexed into a merged vocabulary (a new tensor)."""
        t = self.raw(ref.source, ref.name)
        if ref.vocab is not None:
            return gather(ref.vocab, t, self.raw)
        return t[: ref.rows] if ref.rows is not None else t

    def clear(self) -> None:
        with self._lock:
            self._resident.clear()
            self.resident_used = 0

    def rows(self, ref: TensorRef, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (1-D int64) of `get(ref)`, reading only those rows."""
        if ref.vocab is not None:
            return gather(ref.vocab, self.raw(ref.source, ref.name), self.raw, rows)
        if self.device.type == "cpu" and rows.numel() and not self._stays(ref.source, ref.name):
            # read only the block of rows the lookup spans, not the whole (vocab, hidden) tensor
            lo, hi = int(rows.min()), int(rows.max()) + 1
            return self.sources[ref.source].get_rows(ref.name, lo, hi)[rows - lo]
        return self.get(ref)[rows]

    def _stays(self, source: str, name: str) -> bool:
        """Whether tensor `name` of `source` is resident, or would become resident on its next read."""
        if self.resident_limit is None or (self.sources[source].fingerprint, name) in self._resident:
            return True
        info = self.sources[source].tensors.get(name)
        return info is not None and self.resident_used + (info.end - info.start) <= self.resident_limit

    def resident_bytes(self) -> int:
        return self.resident_used


class Merger:
    def __init__(self, sources: SourceSet, device="cpu", stats_budget: int = 4 << 30, spec_entries: int = 200_000,
                 cpu_fused: bool | None = None, resident_limit: int | None = 0):
        self.store = TensorStore(sources, device, resident_limit)
        self.cpu_fused = merge_cpu.enabled() if cpu_fused is None else cpu_fused  # kernels/merge_cpu.py
        self.stats = LRU(stats_budget, _nbytes)
        self.specs = LRU(spec_entries, lambda v: 1)
        self._ranks: dict = {}  # DELLA ranks of the tensor being prepared, for its merge (SHARED_RANKS_BYTES)

    # -- statistics per (source, tensor), independent of the recipe's numbers --------------------------------
    def _stat_key(self, kind: str, base: TensorRef, x: TensorRef) -> tuple:
        S = self.store.sources
        return (kind, S[base.source].fingerprint, base.name, base.rows, base.vocab and base.vocab.key,
                S[x.source].fingerprint, x.name, x.rows, x.vocab and x.vocab.key)

    def cuts(self, base: TensorRef, x: TensorRef, ks) -> list[tuple[float, int]]:
        """Exact (threshold, tie cutoff) of the top-k cut of |x - base| for each k in `ks` (kernels/select.py).

        The one route of every magnitude cut (TIES, breadcrumbs, sce); no sort, O(1) extra memory per element.
        Per (source, tensor) of at least KEEP_HISTOGRAM_FROM elements one statistic is kept, built by the first cut:
        on the CPU the exact distribution of |delta| when it has at most `select.TABLE_MAX` distinct values (bf16 and
        fp16 fine-tunes: `select.value_table`, at most 768 KiB), from which a new density's cut is read with no pass
        but the tie index's (on average a quarter of a pass: `merge_cpu.nth_equal`); otherwise the first-digit histogram
        (2**15 counts, 128 KiB) of the radix select, a new density then costing one pass over base and source (plus
        a counting pass when a tie straddles the cut)."""
        b, xx = self.store.get(base), self.store.get(x)
        if xx.numel() <= select.SMALL_SORT and xx.device.type == "cpu":
            return select.topk_cuts(b, xx, ks)  # one sort of a small tensor, no histogram
        key = self._stat_key("top", base, x)
        kept = self.stats.get(key)
        if kept is None:
            if xx.device.type == "cpu" and xx.numel() >= KEEP_HISTOGRAM_FROM:
                kept = select.value_table(b, xx)
            if kept is None:
                kept = select.first_histogram(b, xx)
                kept = kept.to(torch.int32) if xx.numel() < 2**31 else kept
            if xx.numel() >= KEEP_HISTOGRAM_FROM:
                self.stats.put(key, kept)
        if isinstance(kept, tuple):
            return select.table_cuts(b, xx, ks, kept, nth=merge_cpu.nth_equal if self.cpu_fused else None)
        collect = merge_cpu.bucket_blocks if self.cpu_fused else None  # the compiled collecting pass
        return select.topk_cuts(b, xx, ks, top=kept.long(), collect=collect)

    def della_ranks(self, base: TensorRef, x: TensorRef, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row rank of |delta| (ascending, stable) normalized to [0, 1], float32 of the tensor's shape (or of
        its `rows`). Transient, never cached (O(elements)): the GPU kernels read it; the CPU paths compute the
        same ranks row block by row block inside the merge pass (kernels.merge.row_ranks)."""
        b, xx = self.store.get(base), self.store.get(x)
        if rows is not None:
            b, xx = b[rows], xx[rows]
        d = xx.float() - b.float()
        return row_ranks(d.abs().reshape(row_view(d.shape))).reshape(d.shape)

    def aux(self, plan: TensorPlan, spec: MergeSpec, rows: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """The kernel's per-source aux tensors (DELLA ranks) where the backend cannot form them in its pass
        (the Triton kernels); None on the CPU paths, which compute them per row block."""
        if spec.mode != "delta" or spec.keep != "della" or self.store.device.type == "cpu":
            return None
        return [self.della_ranks(plan.base, x, rows) for x in plan.inputs]

    @staticmethod
    def _rank_ints(b: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        """int16 per-row ranks of |xx - b| (`kernels.merge.row_rank_ints`), computed row block by row block so that
        the sort's temporaries stay small; the tensor's shape."""
        rows = row_view(xx.shape)
        out = torch.empty(rows, dtype=torch.int16, device=xx.device)
        fb, fx, fo = b.reshape(rows), xx.reshape(rows), out
        step = della_step(xx.shape, merge_cpu.DELLA_BLOCK)[0] // max(rows[1], 1)
        for r in range(0, rows[0], step):
            d = fx[r:r + step].float() - fb[r:r + step].float()
            fo[r:r + step] = row_rank_ints(d.abs_())
        return out.reshape(xx.shape)

    def _shared_ranks(self, plan: TensorPlan) -> list[torch.Tensor] | None:
        """The DELLA ranks of every input of `plan` that `_l1_scale` kept while preparing its spec (None unless all
        are there). Ranks depend only on (base, source), not on the recipe's numbers, so they are the ones the merge
        pass would compute; the L1 rescale pass and the merge pass then sort each row once instead of twice."""
        if not self._ranks or plan.base is None:
            return None
        got = [self._ranks.get(self._stat_key("ranks", plan.base, x)) for x in plan.inputs]
        return got if got and all(g is not None for g in got) else None

    # -- per-tensor scalars ------------------------------------------------------------------------------------
    def spec(self, plan: TensorPlan) -> tuple[MergeSpec, list[torch.Tensor] | None]:
        cached = self.specs.get(plan.key)
        if cached is None:
            cached = self._prepare(plan)
            self.specs.put(plan.key, cached)
        return cached

    def _prepare(self, p: TensorPlan):
        self._ranks.clear()  # at most one tensor's shared ranks are held
        if p.family is Family.passthrough:
            return MergeSpec("combine", coeffs=p.weights), None
        if p.family is Family.linear:
            return MergeSpec("combine", coeffs=p.weights, divisor=sum(p.weights) if p.normalize else 1.0), None
        if p.family is Family.slerp:
            return MergeSpec("combine", coeffs=self._slerp_coeffs(p)), None
        if p.family is not Family.task_arithmetic:
            return method_specs.prepare(self, p)
        n = len(p.inputs)
        numel = math.prod(p.shape)
        if numel >= MAX_INDEX:
            raise ValueError(f"{p.out_name}: tensors of 2**32 elements or more are not supported")
        common = dict(weights=p.weights, consensus=p.consensus, normalize=p.normalize, lam=p.lam)
        if p.sparsify is Sparsify.none or n == 0:
            return MergeSpec("delta", keep="all", scales=(1.0,) * n, **common), None
        if p.sparsify in (Sparsify.magnitude, Sparsify.breadcrumbs):
            t_in, c_in, t_out, c_out = [], [], [], []
            for i, x in enumerate(p.inputs):
                dens = p.densities[i]
                if dens >= 1:
                    k_in, k_out = numel, 0
                elif p.sparsify is Sparsify.magnitude:
                    k_in, k_out = max(1, int(dens * numel)), 0  # mergekit keeps at least one element
                else:
                    target, n_top = int(dens * numel), int(p.gammas[i] * numel)
                    n_bot = numel - target - n_top
                    if n_bot < 0:
                        n_top += n_bot
                    k_in, k_out = n_top + target, n_top
                if k_in >= numel and k_out == 0:
                    t_in.append(-1.0), c_in.append(-1), t_out.append(math.inf), c_out.append(-1)
                    continue
                (ti, ci), (to, co) = self.cuts(p.base, x, (k_in, k_out))
                t_in.append(ti), c_in.append(ci), t_out.append(to), c_out.append(co)
            spec = MergeSpec("delta", keep="topk", t_in=tuple(t_in), c_in=tuple(c_in), t_out=tuple(t_out),
                             c_out=tuple(c_out), scales=(1.0,) * n, **common)
            if p.rescale:  # L1 norms of the delta before/after the cut, one pass each source (mergekit sparsify.py)
                spec = _replace(spec, scales=tuple(
                    1.0 if t_in[i] < 0 and t_out[i] == math.inf else self._l1_scale(spec, i, p.base, x)
                    for i, x in enumerate(p.inputs)))
            return spec, None
        # random masks: DARE, DELLA
        mask_name = p.mask_name or p.out_name
        keys = tuple(mask_keys(p.seed, mask_name, i) for i in range(n))
        if p.sparsify is Sparsify.random:
            spec = MergeSpec("delta", keep="random", densities=tuple(min(d, 1.0) for d in p.densities),
                             keys=keys, scales=(1.0,) * n, **common)
        else:
            eps = tuple(0.0 if d >= 1 else e for d, e in zip(p.densities, p.epsilons))
            spec = MergeSpec("delta", keep="della", densities=tuple(min(d, 1.0) for d in p.densities), eps=eps,
                             keys=keys, scales=(1.0,) * n, **common)
        if p.rescale:
            spec = _replace(spec, scales=tuple(
                1.0 if p.densities[i] >= 1 else self._l1_scale(spec, i, p.base, x) for i, x in enumerate(p.inputs)))
        return spec, None

    def _l1_scale(self, spec: MergeSpec, i: int, base: TensorRef, x: TensorRef) -> float:
        """L1 rescale factor of source i: sum |delta| / sum |delta * keep| (1 if either is < 1e-7; mergekit
        sparsify.py `rescaled_masked_tensor`), both sums in float64 over one pass; sum |delta| is kept per (source,
        tensor) in `stats` (O(1)), so a later recipe's pass sums only the kept part."""
        b, xx = self.store.get(base), self.store.get(x)
        cpu = self.cpu_fused and self.store.device.type == "cpu"
        aux_i = None
        if (cpu and spec.keep == "della" and spec.n * xx.numel() * 2 <= SHARED_RANKS_BYTES
                and row_view(xx.shape)[1] <= 1 << 15):
            aux_i = self._ranks[self._stat_key("ranks", base, x)] = self._rank_ints(b, xx)
        # sum |delta| does not depend on the recipe's numbers: kept (one float per source and tensor, per route, since
        # the routes and compiled structures sum in their own orders) so that a later recipe's pass sums only the kept
        # part
        how = merge_cpu.structure_keep(spec)
        route = lambda name: self._stat_key(f"l1:{name}:{how}", base, x)  # noqa: E731
        sums = None  # the routes in order: the C loop (kernels/merge_native.py), the Inductor loop, the reference
        if cpu and aux_i is None:
            key = route("native")
            known = self.stats.get(key)
            sums = merge_native.l1_sums_native(b, xx, spec, i, before=known)
        if cpu and sums is None:
            key = route("fused")
            known = self.stats.get(key)
            sums = merge_cpu.l1_sums_fused(b, xx, spec, i, aux_i=aux_i, before=known)
        if sums is None:
            key = route("reference")
            known = self.stats.get(key)
            if spec.keep == "della" and aux_i is None:
                aux_i = self.della_ranks(base, x)
            sums = l1_sums(b, xx, spec, i, aux_i, before=known)
        before, after = sums
        if known is None:
            self.stats.put(key, before)
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

    # -- nuslerp, multislerp, karcher, model_stock, sce, arcee_fusion, nearswap, ram ---------------------------------
    def _gram(self, refs: tuple[TensorRef, ...], base: TensorRef | None, layout: str) -> torch.Tensor:
        """Gram matrix of the inputs (or of their deltas to `base`), cached: O(rows * n^2), independent of the
        recipe's numbers (a new weight costs no pass over the tensors)."""
        S = self.store.sources
        key = ("gram", layout, None if base is None else (S[base.source].fingerprint, base.name, base.rows)) + tuple(
            (S[r.source].fingerprint, r.name, r.rows) for r in refs)
        G = self.stats.get(key)
        if G is None:
            b = self.store.get(base) if base is not None else None
            G = ms.gram([self.store.get(r) for r in refs], b, layout)
            self.stats.put(key, G)
        return G

    # -- the merge ---------------------------------------------------------------------------------------------
    def merge(self, plan: TensorPlan, rows: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 merged tensor of `plan` (only `rows` of it, if given: embedding lookups)."""
        spec, aux = self.spec(plan)  # aux from the statistics: per-row data of the newer methods (method_specs.py)
        della = self._shared_ranks(plan) if rows is None else None  # DELLA: those its L1 pass just computed
        self._ranks.clear()
        if della is None:
            della = self.aux(plan, spec, rows)  # DELLA ranks for the GPU kernels, already of `rows` only
        get = self.store.get if rows is None else (lambda r: self.store.rows(r, rows))  # noqa: E731
        base = get(plan.base) if plan.base is not None else None
        xs = [get(r) for r in plan.inputs]
        index = None
        if rows is not None:
            width = math.prod(plan.shape[1:])
            aux = [a[rows] for a in aux] if aux is not None and not spec.aux_per_row else aux
            if spec.needs_index:
                index = rows.reshape(-1, 1) * width + torch.arange(width, device=rows.device)
                index = index.reshape(xs[0].shape)
        if della is not None:
            aux = della
        if spec.mode == "delta" and not xs:
            return rounded(base.float() if out is None else out.copy_(base), plan.round_to)
        # rounded to the output's dtype (`plan.round_to`): inside the fused CPU loop, else one more pass
        return merge_kernel(base, xs, spec, aux=aux, index=index, out=out, cpu_fused=self.cpu_fused,
                            round_to=plan.round_to)


def _replace(spec: MergeSpec, **kw) -> MergeSpec:
    import dataclasses

    return dataclasses.replace(spec, **kw)
