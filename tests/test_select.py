"""Exact top-k cuts without sorting (kernels/select.py) equal the stable sort's cut, on adversarial inputs."""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from lazymerge.kernels import select


def _inputs(kind: str, n: int = 20_011):
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()) % 1000)  # not hash(): salted per process
    b = torch.randn(n, generator=g)
    if kind == "gaussian":
        return b, b + 0.01 * torch.randn(n, generator=g)
    if kind == "many_ties":  # |delta| takes 4 values: every cut straddles a tie
        return b, b + torch.randint(-3, 4, (n,), generator=g).float() * 0.5
    if kind == "bf16":  # bf16 storage: few distinct deltas, the engine's usual case
        return b.bfloat16(), (b + 0.01 * torch.randn(n, generator=g)).bfloat16()
    if kind == "zeros_denormals":  # exact zeros, denormals (incl. the smallest), one inf
        x = torch.zeros(n)
        x[::3] = 1e-40
        x[::7] = -1e-45
        x[::11] = 3e-39
        x[5] = float("inf")
        return None, x
    if kind == "bucket_edges":  # values one ulp apart around 1.0: same first digit, different last
        v = torch.tensor([1.0, 1.0000001, 0.99999994, 1.0000002], dtype=torch.float32)
        return None, v[torch.randint(0, 4, (n,), generator=g)]
    if kind == "nans_f16":  # float16 NaNs in the vectorized body and the scalar tail (PyTorch converts them to
        b = b.half()  # different float32 patterns there), an inf, NaN minus NaN
        x = (b.float() + torch.randn(n, generator=g)).half()
        x[[5, 100, 101, n - 3, n - 1]] = float("nan")
        b[[100, 7]] = float("nan")
        x[50] = float("inf")
        return b, x
    if kind == "nan_payloads":  # float32 NaNs of different payloads in base and x
        b = torch.zeros(n)
        x = torch.linspace(-1, 1, n)
        b[10:13] = torch.tensor([0x7FC00001] * 3, dtype=torch.int32).view(torch.float32)
        x[10:16] = torch.tensor([0x7FC10000] * 6, dtype=torch.int32).view(torch.float32)
        x[n - 2] = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)
        return b, x
    raise ValueError(kind)


KINDS = ["gaussian", "many_ties", "bf16", "zeros_denormals", "bucket_edges", "nans_f16", "nan_payloads"]


def _key(cut: tuple[float, int]) -> tuple[int, int]:
    """A cut compared by its threshold's bit pattern (a NaN threshold never equals itself as a float)."""
    return int(torch.tensor([cut[0]], dtype=torch.float32).view(torch.int32)[0]), cut[1]


def _ks(n: int, x: torch.Tensor, base) -> list[int]:
    """Cut sizes at the ends, at fractions, and exactly at the boundaries of equal-value runs (bucket edges)."""
    a = select.abs_delta_bits(base, x).reshape(-1)
    vals = torch.sort(a, descending=True).values
    runs = (vals[1:] != vals[:-1]).nonzero().reshape(-1)[:4].tolist()
    edges = [r + d for r in runs for d in (0, 1, 2)]
    return sorted({0, 1, 2, n // 7, n // 3, n // 2, n - 1, n, n + 3, *edges})


PATHS = ["small_sort", "histograms", "kept_first_histogram_collect", "kept_first_histogram_refine"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_cuts_equal_the_sorted_reference(kind, path, monkeypatch):
    """Every route: one sort of a small tensor; two histogram levels + tie pass; a kept first histogram with the
    cut's bucket collected in one pass; a kept first histogram whose bucket is too large to collect (refined by
    histograms)."""
    base, x = _inputs(kind)
    n = x.numel()
    assert n <= select.SMALL_SORT
    ks = _ks(n, x, base)
    if path != "small_sort":
        monkeypatch.setattr(select, "SMALL_SORT", 0)
    top = None if path in ("small_sort", "histograms") else select.first_histogram(base, x)
    if path.endswith("refine"):
        monkeypatch.setattr(select, "COLLECT_MAX", 0)
    got = select.topk_cuts(base, x, ks, top=top)
    for k, cut in zip(ks, got):
        assert _key(cut) == _key(select.topk_cut_reference(base, x, k)), f"k={k}"


@pytest.mark.parametrize("kind", ["many_ties", "bf16", "zeros_denormals"])
def test_kept_set_has_exactly_k_elements(kind):
    """Applying the cut with the merge's topk rule keeps exactly the first k of the stable descending order."""
    from lazymerge.kernels.merge import MergeSpec, keep_mask

    base, x = _inputs(kind)
    d = x.float() - (base.float() if base is not None else 0.0)
    order = torch.sort(d.abs(), descending=True, stable=True).indices
    for k in (1, 17, d.numel() // 4, d.numel() - 5):
        (t, c), = select.topk_cuts(base, x, [k])
        spec = MergeSpec("delta", weights=(1.0,), keep="topk", t_in=(t,), c_in=(c,), t_out=(math.inf,), c_out=(-1,))
        kept = keep_mask(spec, 0, d, torch.arange(d.numel()), None)
        want = torch.zeros_like(kept)
        want[order[:k]] = True
        assert torch.equal(kept, want), f"k={k}: {int((kept != want).sum())} differ"


@pytest.mark.parametrize("keep_max", [1 << 18, 0])
@pytest.mark.parametrize("kind", ["bf16", "gaussian_bf16_large", "nans_f16"])
def test_compiled_bucket_collect_equals_the_reference(kind, keep_max, monkeypatch):
    """The engine's route on the CPU: a kept first histogram and the cut's bucket collected by the compiled loop
    (merge_cpu.bucket_blocks, bf16 and float16 storage) over several of its blocks; with keep_max 0 nothing is kept and the tie
    index comes from a second compiled pass over the elements equal to the cut value."""
    from lazymerge.kernels import merge_cpu

    monkeypatch.setattr(select, "SMALL_SORT", 0)
    monkeypatch.setattr(select, "COLLECT_MAX", keep_max)
    monkeypatch.setattr(merge_cpu, "BUCKET_BLOCK", 4099)  # several blocks and a short last one
    if kind != "gaussian_bf16_large":  # nans_f16: NaN buckets are left to the PyTorch pass, the rest compiled
        base, x = _inputs(kind)
    else:  # one bucket of ~1/8 of the elements at the median
        g = torch.Generator().manual_seed(3)
        base = torch.randn(65_537, generator=g).bfloat16()
        x = (base.float() + 0.01 * torch.randn(65_537, generator=g)).bfloat16()
    ks = _ks(x.numel(), x, base)
    top = select.first_histogram(base, x)
    calls = []

    def collect(b, xx, digit, shift):
        blocks = merge_cpu.bucket_blocks(b, xx, digit, shift)
        assert blocks is not None, "the bucket pass compiles on this machine"
        got = list(blocks)
        assert torch.equal(torch.cat(got), select.collect_bucket(b, xx, digit, shift)[1])
        calls.append(shift)
        return iter(got)

    got = select.topk_cuts(base, x, ks + [1, 2, 3], top=top, collect=collect)  # k <= 3: cuts among the NaNs
    assert 16 in calls and (keep_max or 0 in calls), calls
    for k, cut in zip(ks + [1, 2, 3], got):
        assert _key(cut) == _key(select.topk_cut_reference(base, x, k)), f"k={k}"


@pytest.mark.parametrize("nth", ["pytorch", "compiled"])
@pytest.mark.parametrize("kind", KINDS)
def test_table_cuts_equal_the_sorted_reference(kind, nth, monkeypatch):
    """The engine's route on the CPU when a tensor's |delta| has few distinct values: the exact value table (built in
    chunks whose partial tables are merged) gives t and m, and the tie index comes from the PyTorch count or the
    compiled mask counted block by block, from the front or from the back (merge_cpu.nth_equal)."""
    from lazymerge.kernels import merge_cpu

    monkeypatch.setattr(select, "TABLE_CHUNK", 4099)  # several chunks and partial-table merges
    monkeypatch.setattr(merge_cpu, "NTH_BLOCK", 1001)  # several blocks each way and a short last one
    base, x = _inputs(kind)
    table = select.value_table(base, x, cap=1 << 16)
    assert table is not None
    vals, counts = table
    bits = select.abs_delta_bits(base, x).reshape(-1)
    u, c = torch.unique(bits, return_counts=True)
    assert torch.equal(vals, u.flip(0)) and torch.equal(counts, c.flip(0))  # exact, descending
    tight = select.value_table(base, x, cap=vals.numel())  # partial tables over the cap, merged back under it
    assert tight is not None and torch.equal(tight[0], vals) and torch.equal(tight[1], counts)
    if vals.numel() > 1:
        assert select.value_table(base, x, cap=vals.numel() - 1) is None
    ks = _ks(x.numel(), x, base) + [1, 2, 3, 4, 5, 6]  # k <= 6: among the NaNs and infs
    calls = []

    def compiled(b, xx, tb, m, total):
        got = merge_cpu.nth_equal(b, xx, tb, m, total)
        calls.append(got)
        if got is not None:
            assert got == select.nth_equal_index(b, xx, tb, m)
        return got

    got = select.table_cuts(base, x, ks, table, nth=compiled if nth == "compiled" else None)
    for k, cut in zip(ks, got):
        assert _key(cut) == _key(select.topk_cut_reference(base, x, k)), f"k={k}"
    if nth == "compiled" and kind in ("many_ties", "bf16"):  # ties straddle their cuts
        assert any(c is not None for c in calls), "the compiled tie count ran"


def test_value_table_gives_up_past_its_cap():
    """float32 sources have about one distinct |delta| per element: no table (the histogram route takes over)."""
    base, x = _inputs("gaussian")
    assert select.value_table(base, x, cap=1000) is None
    assert select.value_table(None, torch.zeros(5000)) == (torch.tensor([0], dtype=torch.int32),
                                                           torch.tensor([5000]))


@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_nth_equal_counts_from_either_end(where, monkeypatch):
    from lazymerge.kernels import merge_cpu

    monkeypatch.setattr(merge_cpu, "NTH_BLOCK", 64)
    base = torch.zeros(1000, dtype=torch.bfloat16)
    x = torch.zeros(1000, dtype=torch.bfloat16)
    x[[3, 70, 71, 500, 998, 999]] = 0.5
    bits = int(select.abs_delta_bits(base, x)[3])
    m = {"first": 1, "last": 6, "middle": 4}[where]
    want = [3, 70, 71, 500, 998, 999][m - 1]
    assert merge_cpu.nth_equal(base, x, bits, m, 6) == want
    assert merge_cpu.nth_equal(base, x, bits, m) == want
    with pytest.raises(ValueError, match="fewer than"):
        merge_cpu.nth_equal(base, x, bits, 7)
    assert merge_cpu.nth_equal(None, x, bits, 1) is None
    assert merge_cpu.nth_equal(base, x, 0x7FC00000, 1) is None  # NaNs: left to the PyTorch count


def test_compiled_bucket_pass_reads_strided_tensors():
    from lazymerge.kernels import merge_cpu

    g = torch.Generator().manual_seed(4)
    base = torch.randn(64, 90, generator=g).bfloat16()
    x = (base.float() + 0.05 * torch.randn(64, 90, generator=g)).bfloat16()
    b2, x2 = base[:, ::2], x[:, ::2]  # strided views
    digit = int(select.abs_delta_bits(b2, x2).reshape(-1)[17]) >> 16
    blocks = merge_cpu.bucket_blocks(b2, x2, digit, 16)
    assert blocks is not None
    assert torch.equal(torch.cat(list(blocks)), select.collect_bucket(b2.contiguous(), x2.contiguous(), digit, 16)[1])


def test_first_histogram_reuse_and_digit_plans_agree(monkeypatch):
    monkeypatch.setattr(select, "SMALL_SORT", 0)
    base, x = _inputs("many_ties")
    ks = [3, 5000, 12345]
    top = select.first_histogram(base, x)
    assert top.numel() == 1 << 15  # the sign bit of |delta| is 0: half the first digit's range
    assert select.topk_cuts(base, x, ks, top=top) == select.topk_cuts(base, x, ks)
    assert select.topk_cuts(base, x, ks, digits=select.DIGITS_GPU) == select.topk_cuts(base, x, ks)
    with pytest.raises(ValueError, match="32 bits"):
        select.topk_cuts(base, x, ks, digits=(16, 8))


def _interpreted() -> bool:
    """Whether the histogram kernel was decorated by Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before
    triton is first imported in the process; in a whole-suite run another module usually imports it first)."""
    return type(getattr(select, "_histogram_kernel", None)).__name__ == "InterpretedFunction"


@pytest.mark.skipif(not _interpreted() and not torch.cuda.is_available(),
                    reason="Triton runs on CPU only under TRITON_INTERPRET=1 set before triton's import "
                           "(test_triton_histogram_in_child_process runs these then)")
@pytest.mark.parametrize("kind", ["many_ties", "bf16", "zeros_denormals", "nan_payloads"])
def test_triton_histogram_equals_torch(kind):
    base, x = _inputs(kind, n=3_001)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = base.to(dev) if base is not None else None
    x = x.to(dev)
    for prefix, pshift, shift, nbins in ((0, 32, 21, 2048), (0, 32, 16, 1 << 16)):
        assert torch.equal(select.histogram_triton(base, x, prefix, pshift, shift, nbins).cpu(),
                           select.histogram(base, x, prefix, pshift, shift, nbins).cpu())
    # a refinement level: only the elements sharing the first digit of the largest value
    top = int(select.abs_delta_bits(base, x).max()) >> 21
    assert torch.equal(select.histogram_triton(base, x, top, 21, 10, 2048).cpu(),
                       select.histogram(base, x, top, 21, 10, 2048).cpu())
    ks = [1, 100, 1500, 2999]
    assert ([_key(c) for c in select.topk_cuts(base, x, ks, digits=select.DIGITS_GPU, hist=select.histogram_triton)]
            == [_key(select.topk_cut_reference(base, x, k)) for k in ks])


@pytest.mark.skipif(_interpreted() or torch.cuda.is_available() or os.environ.get("LAZYMERGE_SELECT_CHILD") == "1",
                    reason="the Triton histogram tests already run in this process")
def test_triton_histogram_in_child_process():
    """A whole-suite run imports triton before TRITON_INTERPRET can take effect: run the Triton cases in a fresh
    interpreter-mode process instead of skipping them."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1", LAZYMERGE_SELECT_CHILD="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", __file__, "-k",
                        "test_triton_histogram_equals_torch"], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "4 passed" in r.stdout, r.stdout[-2000:]
