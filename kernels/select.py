"""Exact top-k cuts of |X - base| without sorting: a radix select over float32 bit patterns.

    topk_cuts(base, x, ks, top=None) -> [(threshold, cutoff), ...]      one pair per k in `ks`

The cut of k is the pair (t, c) with which `kernels.merge.keep_mask`'s topk rule

    in(t, c) = a > t or (a == t and j <= c)          a = |x[j] - base[j]| (float32), j the flat index

keeps exactly the first k elements of the *stable descending order* of a (ties by increasing j): mergekit's TIES /
breadcrumbs kept set with ties at the cut broken towards the lower flat index. Conventions (those of the merge
spec): k <= 0 -> (inf, -1) (nothing), k >= numel -> (-1.0, -1) (everything); c = MAX_INDEX (2**32) when no element
equal to t lies past the cut.

How. For non-negative float32 values the int32 bit pattern orders like the value (denormals, zeros, inf and NaN
included: NaN sorts above inf, as in `torch.sort`). So the k-th largest value is found digit by digit from the top
of its bit pattern: a histogram of the first digit over the whole tensor gives the digit of the k-th largest value
and how many elements lie strictly above it; the next histogram counts only the elements sharing the digits found so
far, and so on (`DIGITS_CPU` = 16 + 16 bits: two passes; `DIGITS_GPU` = 11 + 11 + 10: three). The last histogram gives
t and m, the number of elements equal to t that belong to the top k; a last counting pass finds c, the flat index of
the m-th element equal to t, only when some element equal to t falls outside the cut. Every pass recomputes the
delta from the inputs chunk by chunk (`CHUNK` elements: the temporaries stay in cache), so the extra memory is the
histograms (O(2**16) counts), never O(numel). The first histogram depends only on the (source, tensor) pair and can be
kept by the caller (`top`) so that a new density costs one pass (plus the tie pass when needed).

When |delta| takes few distinct values (at most TABLE_MAX: deltas of bf16 or fp16 checkpoints, a few thousand per
tensor), `value_table` counts them exactly in one pass, and `table_cuts` reads t and m for any k from that table;
only c needs a counting pass, which stops at the block holding it.

Backends: `histogram` runs vectorized PyTorch on any device; `histogram_triton` is the Triton kernel (atomic adds
into a global histogram), used for CUDA tensors and tested under TRITON_INTERPRET=1. `topk_cut_reference` is the
sort-based oracle (O(numel) extra memory).
"""

from __future__ import annotations

import math

import torch

from .rng import MAX_INDEX

CHUNK = 1 << 16  # elements per step of the PyTorch passes (~10 temporaries of 256 KB: they stay in L2)
COLLECT_MAX = 1 << 18  # a cut's first-digit bucket up to this many elements is finished in one collecting pass
SMALL_SORT = 1 << 16  # CPU tensors up to this many elements: one sort (256 KiB of bits) instead of the passes
TABLE_MAX = 1 << 16  # distinct |delta| values a kept `value_table` may hold (at most 768 KiB)
TABLE_CHUNK = 1 << 20  # elements per step of `value_table`'s pass
INF_BITS = 0x7F800000  # +inf; every larger non-negative pattern is a NaN
NAN_BITS = 0x7FC00000  # the one pattern every NaN |delta| is given: NaNs tie, ordered by index, as in a float sort
DIGITS_CPU = (16, 16)
DIGITS_GPU = (11, 11, 10)


def abs_delta_bits(base: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x - base| (float32 arithmetic); any shape -> the same shape. Every NaN becomes
    NAN_BITS: the payload a NaN gets from a subtraction or a float16 conversion depends on where PyTorch's CPU code
    computes it (vectorized body or scalar tail), which would give one element two patterns in two passes."""
    d = x.float() - base.float() if base is not None else x.float()
    bits = d.abs_().view(torch.int32)
    return bits.masked_fill_(bits > INF_BITS, NAN_BITS)


def bits_to_float(bits: int) -> float:
    """The float32 value of a bit pattern, as a Python float (exact)."""
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


# -- histograms ---------------------------------------------------------------------------------------------------
def histogram(base: torch.Tensor | None, x: torch.Tensor, prefix: int, prefix_shift: int, shift: int,
              nbins: int) -> torch.Tensor:
    """int64 (nbins,) histogram of digit = (bits >> shift) & (nbins - 1) over the elements whose
    bits >> prefix_shift == prefix (prefix_shift >= 32: every element); bits = abs_delta_bits(base, x)."""
    fx = x.reshape(-1)
    fb = base.reshape(-1) if base is not None else None
    out = torch.zeros(nbins, dtype=torch.int64, device=x.device)
    for s in range(0, fx.numel(), CHUNK):
        e = min(fx.numel(), s + CHUNK)
        bits = abs_delta_bits(None if fb is None else fb[s:e], fx[s:e])
        if prefix_shift < 32:
            bits = bits[(bits >> prefix_shift) == prefix]
            if bits.numel() == 0:
                continue
        out += torch.bincount((bits >> shift) & (nbins - 1), minlength=nbins)
    return out


def collect_bucket(base: torch.Tensor | None, x: torch.Tensor, digit: int, shift: int) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """(bit patterns, flat indices) of the elements whose bits >> shift == digit, in index order (one pass; the
    result has the bucket's size, which the caller bounds by COLLECT_MAX from the first histogram)."""
    fx = x.reshape(-1)
    fb = base.reshape(-1) if base is not None else None
    vals, idx = [], []
    for s in range(0, fx.numel(), CHUNK):
        e = min(fx.numel(), s + CHUNK)
        bits = abs_delta_bits(None if fb is None else fb[s:e], fx[s:e])
        sel = (bits >> shift) == digit
        pos = sel.nonzero().reshape(-1)
        if pos.numel():
            vals.append(bits[pos])
            idx.append(pos + s)
    if not vals:
        return torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int64)
    return torch.cat(vals), torch.cat(idx)


def _bucket_blocks(base, x, digit: int, shift: int):
    """`collect_bucket`'s indices as a one-block iterator (the PyTorch route of `_cut_in_bucket`)."""
    return iter([collect_bucket(base, x, digit, shift)[1]])


def nth_equal_index(base: torch.Tensor | None, x: torch.Tensor, bits_value: int, m: int) -> int:
    """Flat index of the m-th (1-based, in index order) element whose |delta| bit pattern is `bits_value`."""
    fx = x.reshape(-1)
    fb = base.reshape(-1) if base is not None else None
    seen = 0
    for s in range(0, fx.numel(), CHUNK):
        e = min(fx.numel(), s + CHUNK)
        eq = abs_delta_bits(None if fb is None else fb[s:e], fx[s:e]) == bits_value
        n = int(eq.sum())
        if seen + n >= m:
            return s + int(eq.nonzero()[m - seen - 1, 0])
        seen += n
    raise ValueError(f"fewer than {m} elements equal the cut value")  # unreachable for a consistent histogram


def _each_cut(ks, numel: int, one) -> list[tuple[float, int]]:
    """[one(k) for k in ks], with the conventions of k <= 0 (nothing: (inf, -1)) and k >= numel (everything:
    (-1.0, -1)) applied first: `one` sees 0 < k < numel only."""
    return [(math.inf, -1) if int(k) <= 0 else (-1.0, -1) if int(k) >= numel else one(int(k)) for k in ks]


# -- the exact distribution, when it is small ---------------------------------------------------------------------
def value_table(base: torch.Tensor | None, x: torch.Tensor, cap: int | None = None) -> tuple[torch.Tensor,
                                                                                             torch.Tensor] | None:
    """The exact distribution of |x - base|: (values, counts), its distinct bit patterns (int32, descending) and how
    many elements have each (int64); None when it has more than `cap` (default TABLE_MAX) distinct values (float32
    sources: about one per element). O(cap) memory, whatever the tensor's size: what a caller keeps per (source,
    tensor) so that a cut of any density is read from the table, with no pass over the tensor but the tie index's
    (`table_cuts`).

    Why it is small: a delta of two bfloat16 (or float16) checkpoints is a small multiple of the base weight's ulp,
    so its float32 pattern has few significant bits (on a 267M bf16 family 98% of |delta| patterns have zero low 16
    bits; 5K-38K distinct values per tensor). One chunked pass: the top 16 bits of every pattern are counted
    (bincount), and the patterns whose low 16 bits are not zero are collected and counted exactly (`torch.unique`)."""
    cap = TABLE_MAX if cap is None else cap
    if cap <= 0:
        return None
    fx = x.reshape(-1)
    fb = base.reshape(-1) if base is not None else None
    top = torch.zeros(1 << 15, dtype=torch.int64, device=x.device)  # patterns with zero low bits, by their top bits
    vals: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    held = 0
    for s in range(0, fx.numel(), TABLE_CHUNK):
        e = min(fx.numel(), s + TABLE_CHUNK)
        bits = abs_delta_bits(None if fb is None else fb[s:e], fx[s:e])
        top += torch.bincount(bits >> 16, minlength=1 << 15)
        rest = bits[(bits & 0xFFFF) != 0]
        if rest.numel() == 0:
            continue
        top -= torch.bincount(rest >> 16, minlength=1 << 15)
        u, c = torch.unique(rest, return_counts=True)
        vals.append(u)
        counts.append(c)
        held += u.numel()
        if held > cap:  # merge what was collected; give up once the merged table is over the cap
            vals, counts = _merged(vals, counts)
            held = vals[0].numel()
            if held > cap:
                return None
    vals, counts = _merged(vals, counts)
    zero_low = top.nonzero().reshape(-1)
    v = torch.cat([(zero_low << 16).to(torch.int32)] + vals)  # disjoint: zero and non-zero low bits
    c = torch.cat([top[zero_low]] + counts)
    if v.numel() > cap:
        return None
    order = v.argsort(descending=True)
    return v[order], c[order]


def _merged(vals: list[torch.Tensor], counts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Partial (distinct values, counts) tables merged into one ([values], [counts]); as they are if 0 or 1."""
    if len(vals) <= 1:
        return vals, counts
    u, inv = torch.unique(torch.cat(vals), return_inverse=True)
    return [u], [torch.zeros(u.numel(), dtype=torch.int64, device=u.device).index_add_(0, inv, torch.cat(counts))]


def table_cuts(base: torch.Tensor | None, x: torch.Tensor, ks, table: tuple[torch.Tensor, torch.Tensor],
               nth=None) -> list[tuple[float, int]]:
    """Exact (threshold, cutoff) of each k in `ks` from `value_table(base, x)`: t and how many of the elements equal
    to t are in come from the table's cumulative counts; the tie index c (when some element equal to t falls outside
    the cut) is the flat index of the m-th element equal to t, found by `nth(base, x, bits, m, n_eq)` (default:
    `nth_equal_index`; kernels/merge_cpu.py `nth_equal` is its compiled twin, or None where it cannot run), which
    stops at the block holding it. The same cuts as `topk_cut_reference`."""
    vals, counts = table
    cum = counts.cumsum(0)

    def one(k: int) -> tuple[float, int]:
        i = int(torch.searchsorted(cum, k))  # the first value whose cumulative count reaches k
        tb, n_eq = int(vals[i]), int(counts[i])
        m = k - (int(cum[i]) - n_eq)  # the m-th (in index order) of the elements equal to t is the last one in
        if m == n_eq:
            return bits_to_float(tb), MAX_INDEX
        c = nth(base, x, tb, m, n_eq) if nth is not None else None
        return bits_to_float(tb), c if c is not None else nth_equal_index(base, x, tb, m)

    return _each_cut(ks, x.numel(), one)


# -- the selection ------------------------------------------------------------------------------------------------
def _digits_for(x: torch.Tensor) -> tuple[int, ...]:
    return DIGITS_GPU if x.device.type == "cuda" else DIGITS_CPU


def first_histogram(base: torch.Tensor | None, x: torch.Tensor, digits: tuple[int, ...] | None = None,
                    hist=None) -> torch.Tensor:
    """The first-digit histogram of |x - base| (what a caller may keep per (source, tensor)): 2**(digits[0] - 1)
    int64 counts, the sign bit of |delta| being 0."""
    digits = digits or _digits_for(x)
    hist = hist or _hist_fn(x)
    return hist(base, x, 0, 32, 32 - digits[0], 1 << digits[0])[: 1 << (digits[0] - 1)]


def _hist_fn(x: torch.Tensor):
    from . import dispatch

    if dispatch.use_triton(x):
        return histogram_triton
    return histogram


def topk_cuts(base: torch.Tensor | None, x: torch.Tensor, ks, top: torch.Tensor | None = None,
              digits: tuple[int, ...] | None = None, hist=None, collect=None) -> list[tuple[float, int]]:
    """Exact (threshold, cutoff) of each k in `ks` (see the module docstring); `top` = `first_histogram(base, x)`
    if the caller has it. `collect(base, x, digit, shift)`: an iterator of the flat indices (ascending) of a bucket's
    elements, block by block, a faster `collect_bucket` (kernels/merge_cpu.py `bucket_blocks`; None from it: this
    module's own passes); with it, every cut finishes in its first-digit bucket whatever that bucket's size.
    Tensors of at most SMALL_SORT elements on the CPU are cut from one sort of their bit patterns (a 65536-bin
    histogram pass costs more than that). Raises ValueError if the digits do not cover 32 bits."""
    digits = tuple(digits or _digits_for(x))
    if sum(digits) != 32:
        raise ValueError(f"digits {digits} must cover the 32 bits of a float32")
    numel = x.numel()
    if numel <= SMALL_SORT and x.device.type == "cpu":
        return _small_cuts(base, x, ks)
    hist = hist or _hist_fn(x)

    def one(k: int) -> tuple[float, int]:
        prefix, done, r = 0, 0, k  # digits fixed so far (as an int, `done` bits), elements still to take
        counts = None
        if top is not None and x.device.type == "cpu":  # finish in the cut's first-digit bucket
            t0 = top.long()
            at_or_above = t0.flip(0).cumsum(0).flip(0)
            digit = int((at_or_above >= r).nonzero()[-1, 0])
            # the compiled pass for finite buckets only: its NaN payloads are its own (abs_delta_bits' docstring)
            fast = collect is not None and base is not None and (digit << (32 - digits[0])) < INF_BITS
            first = collect(base, x, digit, 32 - digits[0]) if fast else None  # None: not compiled, this module's
            if first is not None or int(t0[digit]) <= COLLECT_MAX:
                r -= int(at_or_above[digit]) - int(t0[digit])
                blocks = collect if first is not None else _bucket_blocks
                return _cut_in_bucket(base, x, digit, 32 - digits[0], r, blocks, first)
        for level, nd in enumerate(digits):
            shift = 32 - done - nd
            if level == 0:
                counts = top if top is not None else first_histogram(base, x, digits, hist)
            else:
                counts = hist(base, x, prefix, 32 - done, shift, 1 << nd)
            at_or_above = counts.flip(0).cumsum(0).flip(0)  # [D] = elements with this digit >= D
            digit = int((at_or_above >= r).nonzero()[-1, 0])
            r -= int(at_or_above[digit]) - int(counts[digit])
            prefix = (prefix << nd) | digit
            done += nd
        n_eq = int(counts[prefix & ((1 << digits[-1]) - 1)])
        return bits_to_float(prefix), MAX_INDEX if r == n_eq else nth_equal_index(base, x, prefix, r)

    return _each_cut(ks, numel, one)


def _cut_in_bucket(base, x, digit: int, shift: int, r: int, blocks, first=None) -> tuple[float, int]:
    """The cut that takes the r-th largest element (r >= 1) of one first-digit bucket. `blocks(base, x, digit,
    shift)` iterates the flat indices (ascending) of a bucket's elements (kernels/merge_cpu.py `bucket_blocks`): one
    pass counts the bucket's low `shift` bits, which gives t; its elements are kept up to COLLECT_MAX, so that the
    tie index is read from them, else a second pass over the elements equal to t finds it. O(2**shift + COLLECT_MAX)
    extra memory. `first`: `blocks(base, x, digit, shift)` if the caller already made it."""
    fb, fx = (base.reshape(-1) if base is not None else None), x.reshape(-1)
    counts = torch.zeros(1 << shift, dtype=torch.int64)
    kept, total = [], 0
    for pos in first if first is not None else blocks(base, x, digit, shift):
        vals = abs_delta_bits(None if fb is None else fb.index_select(0, pos), fx.index_select(0, pos))
        counts += torch.bincount(vals & ((1 << shift) - 1), minlength=1 << shift)
        total += pos.numel()
        if kept is not None:
            kept = kept + [(pos, vals)] if total <= COLLECT_MAX else None
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    d2 = int((at_or_above >= r).nonzero()[-1, 0])
    m = r - (int(at_or_above[d2]) - int(counts[d2]))  # the m-th (in index order) of the elements equal to t
    tb = (digit << shift) | d2
    if m == int(counts[d2]):
        return bits_to_float(tb), MAX_INDEX
    if kept is not None:
        idx = torch.cat([p for p, _ in kept]) if kept else torch.empty(0, dtype=torch.int64)
        vals = torch.cat([v for _, v in kept]) if kept else torch.empty(0, dtype=torch.int32)
        return bits_to_float(tb), int(idx[vals == tb][m - 1])
    seen = 0
    for pos in blocks(base, x, tb, 0):  # the elements equal to t, block by block, until the m-th
        if seen + pos.numel() >= m:
            return bits_to_float(tb), int(pos[m - seen - 1])
        seen += pos.numel()
    raise ValueError(f"fewer than {m} elements equal the cut value")  # unreachable for a consistent histogram


def _small_cuts(base, x, ks) -> list[tuple[float, int]]:
    """Every cut of a small tensor from one stable descending sort of its |delta| bit patterns (O(numel) transient,
    numel <= SMALL_SORT)."""
    bits = abs_delta_bits(base, x).reshape(-1)
    vals, idx = torch.sort(bits, descending=True, stable=True)  # ties: lower index first

    def one(k: int) -> tuple[float, int]:
        tb = int(vals[k - 1])
        return bits_to_float(tb), int(idx[k - 1]) if int(vals[k]) == tb else MAX_INDEX

    return _each_cut(ks, bits.numel(), one)


def topk_cut_reference(base: torch.Tensor | None, x: torch.Tensor, k: int) -> tuple[float, int]:
    """Sort-based oracle of one cut: the stable descending order of |x - base|, cut after k elements."""
    a = abs_delta_bits(base, x).view(torch.float32).reshape(-1)
    n = a.numel()
    if k <= 0:
        return math.inf, -1
    if k >= n:
        return -1.0, -1
    vals, idx = torch.sort(a, descending=True, stable=True)
    t = float(vals[k - 1])
    if bool(torch.isnan(vals[k - 1])):
        t = bits_to_float(int(vals[k - 1:k].view(torch.int32)[0]))
    if int(vals[k:k + 1].view(torch.int32)[0]) != int(vals[k - 1:k].view(torch.int32)[0]):
        return t, MAX_INDEX
    return t, int(idx[k - 1])


# -- Triton -----------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency, but keep the CPU path importable without it
    triton = None

if triton is not None:
    @triton.jit
    def _histogram_kernel(B, X, N, HIST, prefix,
                          HAS_BASE: tl.constexpr, HAS_PREFIX: tl.constexpr, PREFIX_SHIFT: tl.constexpr,
                          SHIFT: tl.constexpr, NBINS: tl.constexpr, BLOCK: tl.constexpr):
        # pointers: base (or a dummy), source, int32 histogram of NBINS; N: elements; prefix: int32 digits so far
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        d = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_BASE:
            d = d - tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
        bits = tl.abs(d).to(tl.int32, bitcast=True)
        bits = tl.where(bits > 0x7F800000, 0x7FC00000, bits)  # one pattern for every NaN, as abs_delta_bits
        sel = m
        if HAS_PREFIX:
            sel = sel & ((bits >> PREFIX_SHIFT) == prefix)
        digit = (bits >> SHIFT) & (NBINS - 1)
        tl.atomic_add(HIST + digit, tl.full([BLOCK], 1, tl.int32), mask=sel)


def histogram_triton(base: torch.Tensor | None, x: torch.Tensor, prefix: int, prefix_shift: int, shift: int,
                     nbins: int, block: int = 1024) -> torch.Tensor:
    """Triton twin of `histogram` (same arguments and result, int64 counts)."""
    fx = x.reshape(-1).contiguous()
    fb = base.reshape(-1).contiguous() if base is not None else fx
    h = torch.zeros(nbins, dtype=torch.int32, device=x.device)
    n = fx.numel()
    _histogram_kernel[(triton.cdiv(n, block),)](fb, fx, n, h, prefix, HAS_BASE=base is not None,
                                                HAS_PREFIX=prefix_shift < 32, PREFIX_SHIFT=min(prefix_shift, 31),
                                                SHIFT=shift, NBINS=nbins, BLOCK=block)
    return h.to(torch.int64)
