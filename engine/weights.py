"""Where a lazy model's weights come from: the two weight policies.

* `on_the_fly`: every weight is merged when the forward pass reaches it and used at once; the extra memory is one
  merge buffer per distinct weight shape (a linear layer's weight is merged into the buffer of its shape, reused by
  every layer and forward: on a Llama-shaped model five buffers, the LM head's the largest), plus the merge's
  temporaries.
* `cached`: merged weights are kept in an LRU cache under a byte budget shared by every recipe of the engine, keyed by
  the tensor plan's *content* (source fingerprints, method, every number), never by a recipe's name; a hot recipe
  runs at the speed of a plain model, a cold one costs no memory.

On a GPU with the on-the-fly policy, a linear layer does not even form its merged weight in memory when few tokens
pass: `linear` hands the sources to `kernels.linear.merged_linear`, which picks the fused merge-matmul (merged tile in
registers) or merge-into-a-reused-buffer + cuBLAS by token count.

An identity tensor (a layer taken as is from one source, in the compute dtype) is read from its source as is (no
merge); sources are read with `pread` (engine/reader.py), so under the cached policy on the CPU it is cached like a
merged tensor (on the fly: read at each use; with LAZYMERGE_UNSAFE_MMAP=1: the file's own mapped view, never cached).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict

import torch

from . import alloc
from .merger import LRU, Merger, _nbytes
from .plan import TensorPlan
from .reader import unsafe_mmap
from .safety import NonFiniteError, blame, finite

CHECKED_KEYS = 1 << 17  # tensor plans remembered as checked finite (engine/safety.py)

POLICIES = ("on_the_fly", "cached")


class WeightProvider:
    def __init__(self, merger: Merger, policy: str = "cached", cache_bytes: int = 1 << 30,
                 dtype: torch.dtype = torch.float32):
        if policy not in POLICIES:
            raise ValueError(f"unknown weight policy {policy!r}; known: {', '.join(POLICIES)}")
        self.merger = merger
        self.policy = policy
        self.dtype = dtype
        self.cache = LRU(cache_bytes if policy == "cached" else 0, _nbytes)
        self.merges = 0  # merged tensors computed (cache misses and on-the-fly merges)
        self._checked: OrderedDict[str, None] = OrderedDict()  # plan keys whose weight was found finite
        self._mmap = unsafe_mmap()  # sources are zero-copy mapped views (engine/reader.py)
        self._buffers: dict = {}  # on the fly: one reused merge buffer per (shape, dtype); forwards are serialized
        self._spares: dict[tuple, list[torch.Tensor]] = {}  # CPU cached: evicted merged weights to merge into (retain)

    @property
    def device(self) -> torch.device:
        return self.merger.store.device

    def _identity(self, plan: TensorPlan) -> torch.Tensor | None:
        if plan.is_identity() and plan.inputs[0].vocab is None:  # a re-indexed vocabulary is a new tensor
            t = self.merger.store.get(plan.inputs[0])
            # a float32 source in a narrower output (`round_to`) takes the merge path, which rounds it
            if t.dtype == self.dtype and not (plan.round_to and t.dtype == torch.float32):
                return t
        return None

    def weight(self, plan: TensorPlan, out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged tensor of `plan` in the compute dtype (cached or transient, per the policy). `out`: a float32
        buffer of the plan's shape that an on-the-fly merge may write into (the result is then valid until the next
        merge into it); ignored under the cached policy."""
        key = (plan.key, self.dtype)
        if self.policy == "cached":
            t = self.cache.get(key)
            if t is not None:
                return t
        t = self._identity(plan)
        if t is not None:
            self._check(plan, t)
            if self.policy == "cached" and self.device.type == "cpu" and not self._mmap:
                self.cache.put(key, t)  # a copy read from the file: keep it rather than read it again
            return t
        self.merges += 1
        if self.policy == "cached":  # make room first: the weight it replaces is freed before it is formed
            self.cache.reserve(math.prod(plan.shape) * self.dtype.itemsize)
            out = self._spare(tuple(plan.shape)) if self.dtype == torch.float32 else None
        t = self.merger.merge(plan, out=out)
        if t.dtype != self.dtype:
            t = t.to(self.dtype)
        self._check(plan, t)
        if self.policy == "cached":
            self.cache.put(key, t)
        return t

    def _spare(self, shape: tuple) -> torch.Tensor | None:
        """An evicted merged weight of `shape` to merge into (see `retain`), or None."""
        free = self._spares.get(shape)
        return free.pop() if free else None

    def _check(self, plan: TensorPlan, t: torch.Tensor) -> None:
        """NonFiniteError (naming the source or recipe tensor) the first time plan `plan` gives a NaN/Inf weight."""
        if plan.key in self._checked:
            return
        if not finite(t):
            raise NonFiniteError(blame(plan, self.merger.store))
        self._checked[plan.key] = None
        if len(self._checked) > CHECKED_KEYS:
            self._checked.popitem(last=False)

    def forget_checks(self) -> None:
        self._checked.clear()

    def linear(self, x: torch.Tensor, w: TensorPlan, b: TensorPlan | None) -> torch.Tensor:
        """x @ W.T (+ bias) with W the merged weight of plan `w` (x: (..., in) -> (..., out))."""
        bias = self.weight(b) if b is not None else None
        if self.policy == "on_the_fly" and self.device.type == "cpu" and self.dtype == torch.float32:
            # merged into one buffer per shape, reused by every layer of that shape at every forward (forwards are
            # serialized per engine): an LM head above glibc's 32 MiB mmap threshold (engine/alloc.py) is otherwise
            # a fresh mapping, faulted in page by page, at every forward
            key = (tuple(w.shape), torch.float32)
            buf = self._buffers.get(key)
            if buf is None:
                buf = self._buffers[key] = torch.empty(w.shape, dtype=torch.float32)
            return torch.nn.functional.linear(x, self.weight(w, out=buf), bias)
        if self.policy == "cached" or self.device.type == "cpu" or w.is_identity() or (w.base is not None
                                                                                      and not w.inputs):
            return torch.nn.functional.linear(x, self.weight(w), bias)
        from lazymerge.kernels.linear import merged_linear

        spec, _ = self.merger.spec(w)
        aux = self.merger.aux(w, spec)
        base = self.merger.store.get(w.base) if w.base is not None else None
        xs = [self.merger.store.get(r) for r in w.inputs]
        key = (tuple(w.shape), x.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(w.shape, dtype=x.dtype, device=x.device)
        self.merges += 1
        return merged_linear(x, base, xs, spec, aux=aux, bias=bias, out_buffer=buf)

    def full_rows(self, plan: TensorPlan) -> torch.Tensor | None:
        """The whole merged matrix when it costs no merge (an identity tensor, or cached); else None."""
        if self.policy == "cached":
            return self.weight(plan)  # identity tensors too: read with pread, checked, cached (see `weight`)
        t = self._identity(plan)
        if t is not None:
            self._check(plan, t)
        return t

    def some_rows(self, plan: TensorPlan, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (1-D, unique) of the merged tensor, merging only those rows: (len(rows), ...)."""
        self.merges += 1
        part = self.merger.merge(plan, rows=rows).to(self.dtype)
        if plan.key not in self._checked and not finite(part):  # rows only: checked each time until the whole is
            raise NonFiniteError(blame(plan, self.merger.store))
        return part

    def rows(self, plan: TensorPlan, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) of the merged tensor: embedding lookups merge only the rows they need."""
        t = self.full_rows(plan)
        if t is not None:
            return torch.nn.functional.embedding(ids, t)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return self.some_rows(plan, uniq)[inverse]

    def group(self, group, plans: tuple[TensorPlan, ...], config) -> dict[str, torch.Tensor]:
        """{parameter name: tensor} of an `arch.Group`: one merged tensor as is, or several merged checkpoint
        tensors turned into parameters by transformers' conversion ops (e.g. per-expert tensors stacked into one
        (E, out, in) parameter). Under the cached policy the built parameters are cached, not their parts."""
        if group.converter is None:
            return {group.params[0]: self.weight(plans[0])}
        key = ("group",) + tuple(p.key for p in plans) + (self.dtype,)
        if self.policy == "cached":
            hit = self.cache.get(key)
            if hit is not None:
                return dict(zip(group.params, hit))
        parts = []
        for p in plans:
            t = self._identity(p)
            if t is None:
                self.merges += 1
                t = self.merger.merge(p).to(self.dtype)
            self._check(p, t)
            parts.append(t)
        built = group.build(parts, config)
        out = {n: built[n].to(self.dtype) for n in group.params}
        if self.policy == "cached":
            self.cache.put(key, tuple(out[n] for n in group.params))
        return out

    def retain(self, plans) -> None:
        """Under the cached policy, evict every cached weight that no TensorPlan of `plans` gives (merged tensors and
        built groups alike), whatever its recency. A search calls it (`search.evaluate.prefetch`) before merging a
        candidate, so that the previous candidate's weights are gone before the new ones are formed. On the CPU the
        evicted float32 weights that nothing else holds (`_recyclable`) are kept as spares: the next merges of the
        same shape write into them (`merge(out=...)`), and `drop_spares` frees what no merge took; the pages of
        what is freed go back to the OS at once (`alloc.release`).

        Measured on the 267M family (BENCHMARKS.md, session 13): with the LRU alone a search's peak RSS grew with
        its candidates (task arithmetic: 3.5 -> 4.4 GiB over 6; the LRU held 1.3 candidates and glibc's heap kept
        freed blocks), with the eviction alone it still grew in some runs (3.5 -> 5.3 GiB over 7: freed blocks
        split by small allocations, never reused whole), with eviction and release it stayed at 3.5 GiB but faulted
        every candidate's 1 GiB of pages in afresh (280k faults, ~1 s of system time); with the spares, 3.5 GiB and
        ~20k faults."""
        plans = list(plans)
        keys = {p.key for p in plans}
        dtype = self.dtype

        def keep(key) -> bool:
            if key[0] == "group":  # ("group", *plan keys, dtype)
                return key[-1] == dtype and all(k in keys for k in key[1:-1])
            return key[1] == dtype and key[0] in keys

        gone = self.cache.retain(keep)
        if not gone or self.device.type != "cpu":
            return
        # evicted merged weights held by nothing else become the output buffers of the merges to come, as many per
        # shape as those merges need (the rest is freed now: the peak stays one candidate's weights)
        need = Counter(tuple(p.shape) for p in plans if not p.is_identity() and (p.key, dtype) not in self.cache.data)
        freed = False
        for t in gone:
            shape = tuple(t.shape)
            if need[shape] > 0 and _recyclable(t):
                need[shape] -= 1
                self._spares.setdefault(shape, []).append(t)
            else:
                freed = True
        del gone, t
        if freed:  # (when every evicted weight is reused, the heap keeps what the evaluation freed: no new faults)
            alloc.release()

    def drop_spares(self) -> None:
        """Free the evicted weights `retain` kept that no merge reused (handing their pages back to the OS)."""
        left = any(self._spares.values())
        self._spares.clear()
        if left:
            alloc.release()

    def stats(self) -> dict:
        c = self.cache
        return {"policy": self.policy, "cache_bytes": c.bytes, "cache_budget": c.budget, "cache_entries": len(c.data),
                "cache_hits": c.hits, "cache_misses": c.misses, "merges": self.merges}


def _recyclable(t) -> bool:
    """Whether evicted cache value `t` is a float32 CPU tensor whose memory nothing else can see: no other Python
    reference (the caller's loop variable and the list it came from aside), no C++ holder, no view, no other tensor on
    its storage. A source's resident copy is held by the store, so it never qualifies."""
    import sys

    return (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu" and t._base is None
            and not t.is_inference()  # made inside inference_mode (a forward): not writable outside it
            and t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes and sys.getrefcount(t) <= 4
            and t._use_count() == 1 and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2)
