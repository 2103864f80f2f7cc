"""The C merge loop (kernels/merge_native.py) equals the eager reference bit for bit, and steps aside cleanly."""

from __future__ import annotations

import pytest
import torch

from lazymerge.kernels import merge_native
from lazymerge.kernels.merge import MergeSpec, merge, merge_reference, rounded
from lazymerge.kernels.rng import mask_keys, uniform

N = 33_331  # above PARALLEL_FROM (two parts on two threads) and not a multiple of any vector width
INF = float("inf")
KEYS = tuple(mask_keys(11, "model.layers.0.mlp.up_proj.weight", i) for i in range(4))
BF, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def _build_for_small_tensors(monkeypatch):
    """These tests run the C loop on tensors of 33,331 elements, which by default build nothing (`merge_cpu.
    COMPILE_FROM`; its own test is `test_small_tensors_build_nothing`)."""
    from lazymerge.kernels import merge_cpu

    monkeypatch.setattr(merge_cpu, "COMPILE_FROM", 0)


def spec_for(keep: str, n: int, consensus: bool, normalize: bool) -> MergeSpec:
    kw = dict(weights=(0.7, 0.5, -0.3, 0.2)[:n], consensus=consensus, normalize=normalize, lam=1.3,
              scales=(2.0, 1.0, 1.1, 0.9)[:n])
    if keep in ("topk", "band"):
        # a tie cutoff inside the tensor, one "no straddling tie" (2**32), breadcrumbs' outer cut on two sources
        kw.update(keep="topk", t_in=(0.01, 0.012, 0.005, 0.0)[:n], c_in=(2**32, 20_000, 5, 7)[:n],
                  t_out=((INF, 0.03, INF, 0.02) if keep == "band" else (INF,) * 4)[:n], c_out=(-1, 100, -1, 3)[:n])
    elif keep == "random":
        kw.update(keep="random", densities=(0.5, 0.3, 0.9, 1.0)[:n], keys=KEYS[:n])
    return MergeSpec("delta", **kw)


def tensors(n: int, dtypes: tuple, seed: int = 0):
    """base (dtypes[0]) and n sources (dtypes[1:], cycled) near it, with exact zeros in the first delta."""
    g = torch.Generator().manual_seed(seed)
    b32 = torch.randn(N, generator=g)
    b = b32.to(dtypes[0])
    xs = [(b32 + 0.01 * torch.randn(N, generator=g)).to(dtypes[1 + i % (len(dtypes) - 1)]) for i in range(n)]
    xs[0][:50] = b[:50].to(xs[0].dtype)
    return b, xs


CASES = [  # keep, sources, consensus, normalize, (base dtype, source dtypes...), round_to
    ("all", 3, False, False, (BF, BF), "bfloat16"),
    ("all", 2, False, True, (F32, F32), ""),
    ("all", 1, True, True, (F16, F16), "float16"),
    ("topk", 3, True, True, (BF, BF), "bfloat16"),
    ("topk", 2, False, False, (F32, BF, F16), ""),
    ("topk", 1, True, False, (F16, F16), "float16"),
    ("band", 3, True, True, (BF, BF), "bfloat16"),
    ("band", 4, False, True, (F32, F32), "float16"),
    ("random", 3, True, False, (BF, BF), "bfloat16"),
    ("random", 3, True, True, (F32, F32), ""),
    ("random", 4, False, False, (F16, F16), "float16"),
    ("random", 2, False, True, (BF, F32), "bfloat16"),
]


@pytest.mark.parametrize("keep,n,consensus,normalize,dtypes,round_to", CASES)
def test_c_loop_equals_the_reference(keep, n, consensus, normalize, dtypes, round_to):
    spec = spec_for(keep, n, consensus, normalize)
    b, xs = tensors(n, dtypes)
    want = rounded(merge_reference(b, xs, spec), round_to)
    got = merge_native.merge_delta_native(b, xs, spec, round_to=round_to)
    assert got is not None, "the C loop declined a structure it implements (is there a C compiler?)"
    assert got.dtype == torch.float32 and torch.equal(got, want), f"{int((got != want).sum())} elements differ"
    # the dispatcher's default CPU route takes it, into a given buffer: every element written
    out = torch.full((N,), float("nan"))
    into = merge(b, xs, spec, out=out, cpu_fused=True, round_to=round_to)
    assert into.data_ptr() == out.data_ptr() and torch.equal(out, want)


@pytest.mark.parametrize("keep", ["topk", "random"])
def test_a_part_of_a_tensor_uses_its_own_flat_indices(keep, monkeypatch):
    """`offset` places a slice in its whole tensor: the masks and the tie rule of a slice are the whole's."""
    spec = spec_for(keep, 3, True, True)
    b, xs = tensors(3, (BF, BF))
    want = merge_reference(b, xs, spec)
    lo, hi = 20_001, 29_999
    got = merge_native.merge_delta_native(b[lo:hi], [x[lo:hi] for x in xs], spec, offset=lo)
    assert torch.equal(got, want[lo:hi])


def test_parts_on_threads_equal_one_part(monkeypatch):
    spec = spec_for("random", 3, True, False)
    b, xs = tensors(3, (BF, BF))
    monkeypatch.setattr(merge_native, "PARALLEL_FROM", 0)
    one, many = [], []
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge_native.merge_delta_native(b, xs, spec)
        torch.set_num_threads(4)
        many = merge_native.merge_delta_native(b, xs, spec)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many) and torch.equal(one, merge_reference(b, xs, spec))


@pytest.mark.parametrize("p", [0.0, 2.0**-24, 0.3, 0.5, 0.7, 1 - 2.0**-24, 1.0, -0.5, float("nan")])
def test_integer_threshold_keeps_what_the_float_compare_keeps(p):
    """m < ceil(p * 2**24) for every 24-bit m exactly when m * 2**-24 < p in float32 (rng.uniform's compare)."""
    spec = MergeSpec("delta", weights=(1.0,), keep="random", densities=(p,), keys=((7, 9),))
    (t,) = merge_native._thresholds(spec)
    m = torch.arange(1 << 24, dtype=torch.int64)
    want = (m.to(torch.float32) * 2.0**-24) < torch.tensor(p, dtype=torch.float32)
    assert torch.equal(m < t, want)
    # and the masks themselves: a tensor of 2**16 elements against kernels.rng's uniforms
    idx = torch.arange(1 << 16, dtype=torch.int64)
    b = torch.zeros(1 << 16)
    x = torch.ones(1 << 16)
    got = merge_native.merge_delta_native(b, [x], spec)
    assert torch.equal(got != 0, uniform(idx, (7, 9)) < torch.tensor(p, dtype=torch.float32))


def test_declines_what_it_does_not_implement():
    b, xs = tensors(2, (BF, BF))
    della = MergeSpec("delta", weights=(0.5, 0.5), keep="della", densities=(0.5, 0.5), eps=(0.1, 0.1),
                      keys=KEYS[:2])
    sce = MergeSpec("delta", weights=(0.5, 0.5), keep="topk", t_in=(0.01, 0.01), c_in=(5, 5), consensus=True,
                    consensus_raw=True, div_min=1e-6)
    assert merge_native.merge_delta_native(b, xs, della) is None
    assert merge_native.merge_delta_native(b, xs, sce) is None
    assert merge_native.merge_delta_native(b.to(torch.float64), xs, spec_for("all", 2, False, False)) is None
    bad_out = torch.empty(N, dtype=torch.float64)
    assert merge_native.merge_delta_native(b, xs, spec_for("all", 2, False, False), out=bad_out) is None


def test_switched_off_or_without_a_compiler_the_result_is_the_same(monkeypatch, tmp_path, capfd):
    spec = spec_for("topk", 3, True, True)
    b, xs = tensors(3, (BF, BF))
    want = merge_reference(b, xs, spec)
    monkeypatch.setenv("LAZYMERGE_NATIVE_MERGE", "0")
    assert merge_native.merge_delta_native(b, xs, spec) is None
    assert torch.equal(merge(b, xs, spec, cpu_fused=True), want)
    monkeypatch.delenv("LAZYMERGE_NATIVE_MERGE")
    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(merge_native, "_LIBS", {})
    assert merge_native.merge_delta_native(b, xs, spec) is None
    assert merge_native.merge_delta_native(b, xs, spec) is None  # remembered: one message, not one per call
    err = capfd.readouterr().err
    assert err.count("lazymerge: the C loop merge-") == 1 and "no C compiler found" in err


def test_each_structure_is_built_once_into_the_cache(monkeypatch, tmp_path):
    import subprocess

    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(merge_native, "_LIBS", {})
    calls = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    spec = spec_for("all", 2, False, False)
    b, xs = tensors(2, (F32, F32))
    assert merge_native.merge_delta_native(b, xs, spec) is not None
    merge_native.merge_delta_native(b, xs, spec)
    assert len(calls) == 1 and len(list((tmp_path / "native").glob("merge-*.so"))) == 1
    monkeypatch.setattr(merge_native, "_LIBS", {})  # a new process: loads the cached library, no compile
    assert merge_native.merge_delta_native(b, xs, spec) is not None and len(calls) == 1


@pytest.mark.parametrize("keep", ["topk", "band", "random"])
def test_l1_sums_equal_the_reference_and_not_the_thread_count(keep, monkeypatch):
    """The L1 rescale's two norms (mergekit sparsify.py) in float64, in a fixed order: the reference's sums to
    float64 rounding, the same bits on 1 and 4 threads, and the first norm passed through when known."""
    from lazymerge.kernels import merge_cpu
    from lazymerge.kernels.merge import l1_sums

    spec = spec_for(keep, 3, True, True)
    monkeypatch.setattr(merge_cpu, "COMPILE_FROM", 1024)
    monkeypatch.setattr(merge_native, "L1_BLOCK", 4096)  # 9 blocks: split over the threads
    monkeypatch.setattr(merge_native, "_LIBS", {})
    b, xs = tensors(3, (BF, BF))
    threads = torch.get_num_threads()
    try:
        for i, x in enumerate(xs):
            want = l1_sums(b, x, spec, i)
            torch.set_num_threads(1)
            one = merge_native.l1_sums_native(b, x, spec, i)
            torch.set_num_threads(4)
            many = merge_native.l1_sums_native(b, x, spec, i)
            assert one == many
            assert one[0] == pytest.approx(want[0], rel=1e-12) and one[1] == pytest.approx(want[1], rel=1e-12)
            assert one[1] < one[0]  # the mask dropped something
            assert merge_native.l1_sums_native(b, x, spec, i, before=123.0) == (123.0, one[1])
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(merge_cpu, "COMPILE_FROM", N)  # a small tensor: the reference route, on every machine
    assert merge_native.l1_sums_native(b, xs[0], spec, 0) is None


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha1(t.numpy().tobytes()).hexdigest()  # no torch op: none may run OpenMP in a forked child


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork: POSIX only")
def test_a_forked_child_gets_threads_of_its_own(monkeypatch):
    """A search with `runtime.start_method: fork` forks workers from a parent that already merged on its thread
    pool: the child's merge must not hand its parts to the parent's threads (they do not exist there; it hung)."""
    import multiprocessing as mp

    monkeypatch.setattr(merge_native, "PARALLEL_FROM", 0)
    spec = spec_for("random", 3, True, False)
    b, xs = tensors(3, (BF, BF))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    ctx = mp.get_context("fork")
    done = ctx.Queue()
    try:
        want = merge_native.merge_delta_native(b, xs, spec)  # the parent's pool now has a worker thread
        child = ctx.Process(target=lambda: done.put(_digest(merge_native.merge_delta_native(b, xs, spec))))
        child.start()
        child.join(60)
        alive = child.is_alive()
        if alive:
            child.kill()
    finally:
        torch.set_num_threads(threads)
    assert not alive, "the forked child's merge hung"
    assert done.get(timeout=5) == _digest(want)


def test_small_tensors_build_nothing(monkeypatch, tmp_path):
    """A tensor of at most COMPILE_FROM elements never starts a build (a toy model compiles nothing); once a larger
    tensor built its structure, it runs that library."""
    from lazymerge.kernels import merge_cpu

    monkeypatch.setattr(merge_cpu, "COMPILE_FROM", 1 << 16)
    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(merge_native, "_LIBS", {})
    monkeypatch.setattr(merge_native, "_ABSENT", set())
    spec = spec_for("random", 2, True, False)
    b, xs = tensors(2, (BF, BF))
    assert merge_native.merge_delta_native(b, xs, spec) is None
    assert not list(tmp_path.rglob("*.so"))
    big = torch.zeros(1 << 17, dtype=BF)
    assert merge_native.merge_delta_native(big, [big, big], spec) is not None
    assert torch.equal(merge_native.merge_delta_native(b, xs, spec), merge_reference(b, xs, spec))


def test_a_truncated_library_in_the_cache_is_rebuilt_not_loaded(tmp_path):
    """A half-written .so (a full disk, a killed copy) under the wanted name killed a new process with SIGBUS when
    loaded. Its SHA-1 no longer matches the one recorded at build time, so it is rebuilt. Each step runs in a child
    process: a regression kills that child, not the test session."""
    import subprocess
    import sys

    code = f"""
import os, sys, torch
os.environ["LAZYMERGE_CACHE_DIR"] = {str(tmp_path)!r}
from lazymerge.kernels import merge_cpu, merge_native
from lazymerge.kernels.merge import MergeSpec, merge_reference
merge_cpu.COMPILE_FROM = 0
spec = MergeSpec("delta", weights=(0.5, 0.3), scales=(1.0, 1.0))
g = torch.Generator().manual_seed(0)
b = torch.randn(50_000, generator=g); xs = [b + 0.1 * torch.randn(50_000, generator=g) for _ in range(2)]
got = merge_native.merge_delta_native(b, xs, spec)
assert got is not None and torch.equal(got, merge_reference(b, xs, spec))
print("merged")
"""
    run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)  # noqa: E731
    first = run()
    assert first.returncode == 0 and "merged" in first.stdout, first.stderr[-2000:]
    (lib,) = tmp_path.rglob("merge-*.so")
    data = lib.read_bytes()
    lib.write_bytes(data[:3000])
    again = run()
    assert again.returncode == 0 and "merged" in again.stdout, (again.returncode, again.stderr[-2000:])
    from lazymerge.kernels import native

    assert native.intact(lib) and len(lib.read_bytes()) > 3000  # rebuilt whole (its bytes name the build's temp file)
