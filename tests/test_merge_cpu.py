"""The fused CPU merge (AOT-compiled, kernels/merge_cpu.py) equals the eager reference bit for bit."""

from __future__ import annotations

import pytest
import torch

from lazymerge.kernels import merge_cpu
from lazymerge.kernels.merge import MergeSpec, merge_reference
from lazymerge.kernels.rng import mask_keys

N = 33_331  # not a multiple of any vector width


@pytest.fixture(autouse=True)
def _compile_small_tensors(monkeypatch):
    """These tests run the compiled loop on small tensors, which by default never start a compilation
    (`merge_cpu.COMPILE_FROM`; its own test is `test_small_tensors_never_compile`)."""
    monkeypatch.setattr(merge_cpu, "COMPILE_FROM", 0)
KEYS = tuple(mask_keys(11, "model.layers.0.mlp.up_proj.weight", i) for i in range(3))
SPECS = {
    # thresholds with a tie cutoff inside the tensor, one "no straddling tie" (2**32), one breadcrumbs exclusion
    "ties_breadcrumbs": MergeSpec("delta", weights=(0.7, 0.5, -0.2), keep="topk", t_in=(0.01, 0.012, 0.005),
                                  c_in=(2**32, 20_000, 5), t_out=(float("inf"), 0.03, float("inf")),
                                  c_out=(-1, 100, -1), scales=(1.0, 1.2, 1.0), consensus=True, normalize=True),
    # TIES: no outer cut (t_out = inf everywhere), the structure compiled without the outer compares
    "ties": MergeSpec("delta", weights=(0.7, 0.5, 0.3), keep="topk", t_in=(0.01, 0.012, 0.005),
                      c_in=(2**32, 20_000, 5), t_out=(float("inf"),) * 3, c_out=(-1,) * 3, scales=(1.0,) * 3,
                      consensus=True, normalize=True),
    "dare_ties": MergeSpec("delta", weights=(0.7, 0.5, 0.3), keep="random", densities=(0.5, 0.3, 0.9), keys=KEYS,
                           scales=(2.0, 1.0, 1.1), consensus=True, normalize=True),
    "della_linear": MergeSpec("delta", weights=(0.7, 0.5, 0.3), keep="della", densities=(0.5, 0.3, 1.0),
                              eps=(0.1, 0.2, 0.0), keys=KEYS, scales=(2.0, 1.0, 1.1), lam=1.3),
    # issue 13: sce (variance cut, consensus on unweighted deltas, divisor floor), ram(plus), arcee_fusion
    "sce": MergeSpec("delta", weights=(0.5, 0.3, 0.2), keep="vartopk", t_in=(4e-5,), c_in=(20_000,),
                     scales=(1.0,) * 3, consensus=True, consensus_raw=True, normalize=True, div_min=1e-6),
    "ramplus_tl": MergeSpec("delta", weights=(1.0,) * 3, keep="ram", eps=(0.005,) * 3, scales=(1.1, 1.0, 0.9)),
    "arcee_fusion": MergeSpec("delta", weights=(1.0,), keep="fusion", t_in=(0.004,), scales=(1.0,), row_width=N),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_fused_cpu_merge_equals_reference(name):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(N, generator=g)
    xs = [(b + 0.01 * torch.randn(N, generator=g)).to(torch.bfloat16) for _ in range(3)]
    xs[0][:50] = b[:50].to(torch.bfloat16)  # exact zeros in a delta
    aux = [torch.rand(N, generator=g) for _ in range(3)] if name.startswith("della") else None
    if name == "arcee_fusion":
        xs, aux = xs[:1], [torch.tensor([1.3])]  # one row: its KL
    want = merge_reference(b, xs, SPECS[name], aux=aux)
    got = merge_cpu.merge_delta_fused(b, xs, SPECS[name], aux=aux)
    if not merge_cpu.fusable(SPECS[name]):
        # the newer methods' keep rules are not in the fused loop: it declines, and the dispatcher runs the reference
        from lazymerge.kernels.merge import merge

        assert got is None
        got = merge(b, xs, SPECS[name], aux=aux, cpu_fused=True)
    assert torch.equal(got, want), f"{int((got != want).sum())} elements differ"
    # into a given buffer (a search's evicted weight, engine/weights.py): every element written, nothing allocated
    out = torch.full((N,), float("nan"))
    from lazymerge.kernels.merge import merge

    into = merge(b, xs, SPECS[name], aux=aux, out=out, cpu_fused=True)
    assert into.data_ptr() == out.data_ptr() and torch.equal(out, want)


def test_fused_l1_sums_equal_eager():
    g = torch.Generator().manual_seed(1)
    b = torch.randn(N, generator=g)
    x = b + 0.01 * torch.randn(N, generator=g)
    spec = MergeSpec("delta", weights=(1.0,), keep="random", densities=(0.3,), keys=KEYS[:1], scales=(1.0,))
    d = x - b
    from lazymerge.kernels.merge import keep_mask

    k = keep_mask(spec, 0, d, torch.arange(N), None)
    before, after = merge_cpu.l1_sums_fused(b, x, spec, 0)
    assert abs(before - float(d.abs().double().sum())) < 1e-9 * before + 1e-6
    assert abs(after - float((d * k).abs().double().sum())) < 1e-9 * after + 1e-6


@pytest.mark.parametrize("name", ["dare_ties", "della_linear"])
def test_l1_kept_sum_alone_equals_both_sums(name):
    """Given the first norm (sum |d|, kept by the merger across recipes), the fused and the reference pass return it
    with the second norm bit for bit what the pass summing both gives."""
    from lazymerge.kernels.merge import l1_sums

    g = torch.Generator().manual_seed(4)
    b = torch.randn(37, 1_111, generator=g)
    x = (b + 0.01 * torch.randn(37, 1_111, generator=g)).to(torch.bfloat16)
    spec = SPECS[name]
    both = merge_cpu.l1_sums_fused(b, x, spec, 1)
    assert both is not None
    assert merge_cpu.l1_sums_fused(b, x, spec, 1, before=both[0]) == both
    assert merge_cpu.l1_sums_fused(b, x, spec, 1, before=123.5) == (123.5, both[1])
    ref = l1_sums(b, x, spec, 1)
    assert l1_sums(b, x, spec, 1, before=ref[0]) == ref


def test_della_ranks_in_the_pass_equal_given_ranks():
    """Without `aux`, the reference and the fused merge form DELLA's per-row ranks per block of rows: the same merge
    as with the whole tensor's ranks given (what the GPU kernel reads)."""
    from lazymerge.kernels.merge import row_ranks

    g = torch.Generator().manual_seed(2)
    rows, width = 37, 1_111  # blocks of whole rows that do not divide the tensor
    b = torch.randn(rows, width, generator=g)
    xs = [(b + 0.01 * torch.randn(rows, width, generator=g)).to(torch.bfloat16) for _ in range(3)]
    aux = [row_ranks((x.float() - b).abs()) for x in xs]
    spec = SPECS["della_linear"]
    want = merge_reference(b, xs, spec, aux=aux)
    assert torch.equal(merge_reference(b, xs, spec), want)
    got = merge_cpu.merge_delta_fused(b, xs, spec)
    assert got is not None and torch.equal(got, want)
    out = torch.full((rows, width), float("nan"))  # block by block into a given buffer
    assert merge_cpu.merge_delta_fused(b, xs, spec, out=out) is out and torch.equal(out, want)
    # int16 ranks (engine/merger.py keeps them between the L1 pass and the merge): normalized per block, the same
    from lazymerge.kernels.merge import row_rank_ints, unit_ranks

    ints = [row_rank_ints((x.float() - b).abs()) for x in xs]
    assert all(torch.equal(unit_ranks(r, width), a) for r, a in zip(ints, aux))
    got = merge_cpu.merge_delta_fused(b, xs, spec, aux=ints)
    assert got is not None and torch.equal(got, want)
    assert torch.equal(merge_reference(b, xs, spec, aux=ints), want)
    for i in range(3):
        assert merge_cpu.l1_sums_fused(b, xs[i], spec, i, aux_i=ints[i]) == merge_cpu.l1_sums_fused(b, xs[i], spec, i)


def test_compiled_programs_are_cached_on_disk():
    """A structure is compiled once per machine: its package is on disk, named by the structure."""
    files = [p.name for p in merge_cpu.cache_dir().glob("*.pt2")]
    assert any(f.startswith("delta-topk-1-1-3-") for f in files), files
    assert any(f.startswith("delta-band-1-1-3-") for f in files), files


@pytest.mark.parametrize("start", [0, 2**31 - 5, 2**32 - 33_331])
def test_int32_mask_hash_equals_the_uint32_reference(start):
    """The fused loop hashes int32 lanes holding uint32 bit patterns (wrap-around products, masked shifts); the masks
    equal `kernels.rng.uniform`'s int64 arithmetic bit for bit, across 2**31 and up to the last index 2**32 - 1."""
    from lazymerge.kernels.rng import uniform

    n = 33_331
    idx = merge_cpu._index(n, torch.tensor(start), "random", "cpu")
    assert idx.dtype == torch.int32
    for k1, k2 in KEYS:
        want = uniform(torch.arange(start, start + n, dtype=torch.int64), (k1, k2)) < 0.37
        got = merge_cpu._keep(None, idx, None, None, None, None, None, torch.tensor(0.37), None,
                              torch.tensor(k1), torch.tensor(k2), "random")
        assert torch.equal(got, want)


def _fake_package(tmp_path, monkeypatch, probe: str):
    """A package file in a fresh cache where `_program` finds it (so nothing compiles), and a probe process that runs
    `probe` instead of loading it; `_load`'s own loading is recorded, not done."""
    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    key = ("probe-test", str(tmp_path.name))
    path = merge_cpu.package_path(key, None)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a package")
    monkeypatch.setattr(merge_cpu, "_PROBE", probe + "\n# {src}")
    opened = []
    monkeypatch.setattr(merge_cpu, "_open", lambda p: opened.append(p) or (lambda *a: "ran"))
    return key, path, opened


def test_a_package_that_crashes_its_probe_is_never_loaded(tmp_path, monkeypatch):
    # On the GPU image (torch 2.11.0+cu130) loading a package segfaulted: the probe process dies, this one warns,
    # runs the reference (None), and later processes read the marker instead of probing again.
    key, path, opened = _fake_package(tmp_path, monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.warns(UserWarning, match=r"could not be compiled or loaded .*exit -11"):
        assert merge_cpu._program(key, None, (), 0, "probe test", 0) is None
    assert opened == [] and path.with_suffix(".bad").exists() and not path.with_suffix(".ok").exists()
    with pytest.raises(RuntimeError, match="exit -11"):  # a new process: the marker, no second probe
        merge_cpu._probe(path)
    merge_cpu._FAILED.discard(key)


def test_a_package_whose_probe_loads_is_loaded_once_marked(tmp_path, monkeypatch):
    key, path, opened = _fake_package(tmp_path, monkeypatch, "import sys; assert sys.argv[1].endswith('.pt2')")
    fn = merge_cpu._program(key, None, (), 0, "probe test", 0)
    assert fn is not None and opened == [str(path)] and path.with_suffix(".ok").exists()
    monkeypatch.setattr(merge_cpu, "_PROBE", "raise SystemExit(3)\n# {src}")  # marked: not probed again
    merge_cpu._LOADED.pop(key)
    assert merge_cpu._program(key, None, (), 0, "probe test", 0) is not None


def test_the_probe_process_loads_with_torch_alone(tmp_path):
    # the probe's code is this module's `_open` and nothing of lazymerge: a real package loads in it (compiled by
    # the tests above into the suite's cache), a corrupt file fails it with the loader's message
    bad = tmp_path / "x.pt2"
    bad.write_bytes(b"not a package")
    with pytest.raises(RuntimeError, match=r"exit 1: .*"):
        merge_cpu._probe(bad)
    real = sorted(p for p in merge_cpu.cache_dir().glob("*.pt2") if ".tmp." not in p.name)
    assert real, "the fused-merge tests above compile at least one package"
    ok = real[0].with_suffix(".ok")
    ok.unlink(missing_ok=True)
    merge_cpu._probe(real[0])
    assert ok.exists()


def test_a_probe_that_fails_without_crashing_is_retried_by_the_next_process(tmp_path, monkeypatch):
    # an error exit (or a timeout, an out-of-memory kill) is not this machine's verdict: no marker, the next
    # process probes again; this process runs the reference
    key, path, opened = _fake_package(tmp_path, monkeypatch, "raise SystemExit(3)")
    with pytest.warns(UserWarning, match=r"exit 3.*the next process tries again"):
        assert merge_cpu._program(key, None, (), 0, "probe test", 0) is None
    assert opened == [] and not path.with_suffix(".bad").exists() and not path.with_suffix(".ok").exists()
    merge_cpu._FAILED.discard(key)
    monkeypatch.setattr(merge_cpu, "_PROBE", "import sys\n# {src}")
    assert merge_cpu._program(key, None, (), 0, "probe test", 0) is not None  # the next try probes and loads
    merge_cpu._LOADED.pop(key)


def test_a_read_only_cache_still_loads_a_package_whose_probe_passed(tmp_path, monkeypatch):
    import pathlib

    key, path, opened = _fake_package(tmp_path, monkeypatch, "import sys")
    real = pathlib.Path.write_text

    def refuse(self, *a, **k):
        if self.suffix in (".ok", ".bad"):
            raise PermissionError(13, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", refuse)
    assert merge_cpu._program(key, None, (), 0, "probe test", 0) is not None
    assert opened == [str(path)] and not path.with_suffix(".ok").exists()
    merge_cpu._LOADED.pop(key)


def test_a_package_is_named_by_the_source_it_compiles(monkeypatch):
    """Each program's package name carries the hash of its own source (class, the functions it calls, the Inductor
    settings): changing one program recompiles that one alone, not every package on the machine."""
    delta, l1, bucket = merge_cpu._DeltaModule(3, False, keep="topk"), merge_cpu._L1Module(False, "topk"), \
        merge_cpu._BucketModule()
    before = {m: merge_cpu._code_hash(m) for m in (delta, l1, bucket)}
    assert len(set(before.values())) == 3
    monkeypatch.setattr(merge_cpu._L1Module, "USES", (*merge_cpu._L1Module.USES, merge_cpu._scalars))
    assert merge_cpu._code_hash(l1) != before[l1]
    assert merge_cpu._code_hash(delta) == before[delta] and merge_cpu._code_hash(bucket) == before[bucket]
    monkeypatch.setitem(merge_cpu.INDUCTOR_CONFIGS, "realize_reads_threshold", 4)  # settings count for all
    assert all(merge_cpu._code_hash(m) != before[m] for m in (delta, bucket))
    assert merge_cpu.package_path(("delta", "topk"), delta).name == f"delta-topk-{merge_cpu._code_hash(delta)}.pt2"


def test_every_program_is_compiled_with_the_project_inductor_settings(tmp_path, monkeypatch):
    """The 16-lane settings (`INDUCTOR_CONFIGS`) reach AOTInductor: without them a TIES/DARE-TIES merge of bf16
    sources runs ~1.8x slower (same bits, so no equality test would notice). And what torch adds to the settings it
    is given stays out of them: the code hash covers them, so a changed dict would name every later package of the
    process differently from a fresh process's (which then compiles it again)."""
    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    seen = {}

    def refuse(ep, package_path=None, inductor_configs=None):
        seen["configs"] = dict(inductor_configs)
        inductor_configs["aot_inductor.package"] = True  # as torch's own does: it must not reach the code hash
        raise RuntimeError("not compiled in this test")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    b = torch.randn(64).bfloat16()
    key = ("settings-test", tmp_path.name)
    with pytest.warns(UserWarning, match="could not be compiled"):
        assert merge_cpu._program(key, merge_cpu._BucketModule(), (b, b, torch.tensor(0, dtype=torch.int32),
                                  torch.tensor(16, dtype=torch.int32)), 2, "settings test", 2) is None
    merge_cpu._FAILED.discard(key)
    assert seen["configs"] == merge_cpu.INDUCTOR_CONFIGS and "aot_inductor.package" not in merge_cpu.INDUCTOR_CONFIGS
    assert merge_cpu.INDUCTOR_CONFIGS["realize_reads_threshold"] > 4  # Inductor's default, which splits the loop


def test_small_tensors_never_compile(monkeypatch, tmp_path):
    """A tensor of at most COMPILE_FROM elements never starts a compilation: with no package on disk its merge and
    its L1 sums run the reference (same bits); once the structure is compiled (by a larger tensor) its merge runs
    the package, its L1 sums still the reference."""
    from lazymerge.kernels.merge import merge

    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(merge_cpu, "_LOADED", {})
    monkeypatch.setattr(merge_cpu, "_FAILED", set())
    monkeypatch.setattr(merge_cpu, "_ABSENT", set())
    monkeypatch.setattr(merge_cpu, "COMPILE_FROM", N)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(N, generator=g)
    xs = [b + 0.01 * torch.randn(N, generator=g)]
    spec = MergeSpec("delta", weights=(0.7,), keep="random", densities=(0.4,), keys=KEYS[:1], scales=(1.0,))
    want = merge_reference(b, xs, spec)
    assert merge_cpu.merge_delta_fused(b, xs, spec) is None
    assert torch.equal(merge(b, xs, spec, cpu_fused=True), want)
    assert merge_cpu.l1_sums_fused(b, xs[0], spec, 0) is None
    assert not list(tmp_path.rglob("*.pt2")), "a small tensor compiled a package"
    big_b = torch.randn(N + 1, generator=g)  # one element more: compiles
    big = [big_b + 0.01 * torch.randn(N + 1, generator=g)]
    assert torch.equal(merge_cpu.merge_delta_fused(big_b, big, spec), merge_reference(big_b, big, spec))
    assert list(tmp_path.rglob("*.pt2"))
    assert merge_cpu.merge_delta_fused(b, xs, spec) is not None  # loaded in this process: a small tensor uses it
    monkeypatch.setattr(merge_cpu, "_LOADED", {})  # a new process: the package is on disk
    monkeypatch.setattr(merge_cpu, "_ABSENT", set())
    got = merge_cpu.merge_delta_fused(b, xs, spec)
    assert got is not None and torch.equal(got, want)
    assert merge_cpu.l1_sums_fused(b, xs[0], spec, 0) is None


def test_compilation_runs_on_a_fresh_stack_with_the_callers_threads():
    """`on_fresh_stack` (where packages compile) runs its function in another thread with this thread's torch thread
    count (the package's `t` key), returns its value and re-raises its error here."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        where, threads = merge_cpu.on_fresh_stack(lambda: (threading.current_thread(), torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert where is not threading.current_thread() and threads == 1

    def fail():
        raise ValueError("no compiler")

    with pytest.raises(ValueError, match="no compiler"):
        merge_cpu.on_fresh_stack(fail)


def test_a_structure_compiles_under_inference_mode(monkeypatch, tmp_path):
    """score, generate and serve merge under `torch.inference_mode`: a missing package compiles there (on the
    compile thread, in the caller's mode) and is cached, instead of falling back to the reference with a warning."""
    import warnings

    monkeypatch.setenv("LAZYMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(merge_cpu, "_LOADED", {})  # nothing this process loaded before counts
    monkeypatch.setattr(merge_cpu, "_FAILED", set())
    spec = MergeSpec("delta", weights=(0.5, 0.25), scales=(1.0, 1.0))  # task arithmetic: the cheapest structure
    g = torch.Generator().manual_seed(5)
    b = torch.randn(4096, generator=g)
    xs = [b + 0.01 * torch.randn(4096, generator=g) for _ in range(2)]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback's warning fails the test
        b, xs = b.clone(), [x.clone() for x in xs]  # inference tensors, as in a scored forward
        got = merge_cpu.merge_delta_fused(b, xs, spec)
    assert got is not None and torch.equal(got, merge_reference(b, xs, spec))
    assert list(merge_cpu.cache_dir().glob("delta-all-*.pt2")), list(tmp_path.rglob("*"))


def test_rounding_to_the_output_dtype_in_the_fused_loop_equals_the_reference():
    """`merge(..., round_to=...)` (an output checkpoint of bfloat16/float16, engine/plan.py `round_to`): the fused
    loop rounds in the same pass, bit for bit the reference followed by `rounded`, into a given buffer too."""
    from lazymerge.kernels.merge import merge, rounded

    g = torch.Generator().manual_seed(6)
    b = torch.randn(N, generator=g)
    xs = [(b + 0.01 * torch.randn(N, generator=g)).to(torch.bfloat16) for _ in range(3)]
    spec = SPECS["ties"]
    plain = merge_reference(b, xs, spec)
    for dtype in ("bfloat16", "float16"):
        want = rounded(plain.clone(), dtype)
        assert not torch.equal(want, plain) and torch.equal(want, want.to(getattr(torch, dtype)).float())
        assert torch.equal(merge(b, xs, spec, cpu_fused=False, round_to=dtype), want)
        if dtype == "float16":
            continue  # the same compiled cast; one dtype's package is enough for the suite's time
        got = merge_cpu.merge_delta_fused(b, xs, spec, round_to=dtype)
        assert got is not None and torch.equal(got, want), dtype
        out = torch.full((N,), float("nan"))
        assert merge(b, xs, spec, out=out, cpu_fused=True, round_to=dtype) is out and torch.equal(out, want)
