"""DELLA's per-row ranks by the C radix sort (kernels/rank_cpu.py) against torch's stable argsort of the same bits
(kernels.merge.row_ranks_sorted, the oracle), and the fall-back where no library can be built."""

import subprocess

import pytest
import torch

from lazymerge.kernels import merge, rank_cpu
from lazymerge.kernels.merge import MergeSpec


def _magnitudes(rows: int, cols: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "bf16-delta":  # the engine's case: |x - base| of bf16 tensors (few mantissa bits: skipped digits)
        b = torch.randn(rows, cols, generator=g).bfloat16()
        x = (b.float() + 0.01 * torch.randn(rows, cols, generator=g)).bfloat16()
        return (x.float() - b.float()).abs()
    if kind == "ties":  # few distinct values: long runs of equal keys (ties by position)
        return torch.randint(0, 4, (rows, cols), generator=g).float() * 0.25
    a = torch.randn(rows, cols, generator=g).abs()
    a.view(-1)[:: 7] = 0.0
    a.view(-1)[3:: 11] = float("inf")
    a.view(-1)[5:: 13] = 3.4e38
    a.view(-1)[6:: 17] = 1e-45  # denormal
    return a


@pytest.mark.parametrize("rows,cols", [(1, 2), (3, 3), (5, 33), (2, 1023), (9, 4097), (1, 40000)])
@pytest.mark.parametrize("kind", ["bf16-delta", "ties", "wide"])
def test_native_ranks_equal_the_argsort(rows, cols, kind):
    a = _magnitudes(rows, cols, kind)
    got = rank_cpu.ranks(a, torch.arange(cols, dtype=torch.float32) / (cols - 1))
    assert got is not None, "the native ranks did not run on this machine (is there a C compiler?)"
    want = merge.row_ranks_sorted(a)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} ranks differ, first at {bad[:5].tolist()}"
    assert torch.equal(merge.row_ranks(a), want)
    if cols <= 1 << 15:
        ints = rank_cpu.rank_ints(a)
        assert ints.dtype == torch.int16
        assert torch.equal(merge.unit_ranks(ints, cols), want)


def test_rows_split_over_threads(monkeypatch):
    """Row blocks on several threads (rows not a multiple of the thread count) give the same ranks."""
    monkeypatch.setattr(rank_cpu, "PARALLEL_FROM", 0)
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        a = _magnitudes(7, 129, "bf16-delta", seed=3)
        got = rank_cpu.ranks(a, torch.arange(129, dtype=torch.float32) / 128)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got, merge.row_ranks_sorted(a))


def test_della_merge_identical_with_and_without_native_ranks(monkeypatch):
    g = torch.Generator().manual_seed(1)
    b = torch.randn(64, 96, generator=g).bfloat16()
    xs = [(b.float() + 0.02 * torch.randn(64, 96, generator=g)).bfloat16() for _ in range(3)]
    spec = MergeSpec(mode="delta", weights=(0.5, 0.3, 0.4), keep="della", densities=(0.5, 0.6, 0.4),
                     eps=(0.1, 0.2, 0.05), keys=((1, 2), (3, 4), (5, 6)), scales=(1.0, 1.0, 1.0), consensus=True,
                     normalize=True)
    native = merge.merge(b, xs, spec)
    monkeypatch.setenv("LAZYMERGE_NATIVE_RANKS", "0")
    assert rank_cpu.ranks(torch.ones(2, 3), torch.zeros(3)) is None
    assert torch.equal(merge.merge(b, xs, spec), native)


def test_empty_matrices():
    for shape in ((0, 5), (3, 0)):
        a = torch.rand(shape)
        assert rank_cpu.ranks(a, torch.zeros(shape[1])).shape == shape
        assert rank_cpu.rank_ints(a).shape == shape
        assert merge.row_rank_ints(a).shape == shape


def test_inputs_it_does_not_take_fall_back():
    a = torch.rand(4, 8, dtype=torch.float64)
    assert rank_cpu.ranks(a, torch.zeros(8)) is None
    assert torch.equal(merge.row_ranks(a.float()), merge.row_ranks_sorted(a.float()))
    assert rank_cpu.ranks(torch.rand(8), torch.zeros(8)) is None  # not a matrix


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(rank_cpu, "_STATE", {})
    a = _magnitudes(4, 50, "ties")
    assert rank_cpu.ranks(a, torch.arange(50, dtype=torch.float32) / 49) is None
    assert torch.equal(merge.row_ranks(a), merge.row_ranks_sorted(a))
    err = capfd.readouterr().err
    assert err.count("native row ranks unavailable") == 1 and "no C compiler" in err


def test_a_failing_build_falls_back_and_names_the_compiler_error(monkeypatch, tmp_path, capfd):
    cc = tmp_path / "badcc"
    cc.write_text("#!/bin/sh\necho 'badcc: simulated failure' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(rank_cpu, "_STATE", {})
    assert rank_cpu.rank_ints(torch.rand(3, 5)) is None
    assert "badcc: simulated failure" in capfd.readouterr().err
    assert not list((tmp_path / "native").glob("*.so")) and not list((tmp_path / "native").glob("*.tmp*"))


def test_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(rank_cpu, "_STATE", {})
    calls = []
    real = subprocess.run
    monkeypatch.setattr(rank_cpu.subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    a = _magnitudes(3, 17, "wide")
    assert rank_cpu.ranks(a, torch.arange(17, dtype=torch.float32) / 16) is not None
    assert rank_cpu.library_path().exists() and len(calls) == 1
    monkeypatch.setattr(rank_cpu, "_STATE", {})  # a new process: loads the cached library, no compile
    assert torch.equal(rank_cpu.ranks(a, torch.arange(17, dtype=torch.float32) / 16), merge.row_ranks_sorted(a))
    assert len(calls) == 1
