"""GPU readiness without a GPU: the kernels compiled ahead of time for sm_90 (Hopper: H100 / H200) fit the chip.

`lazymerge.kernels.aot` records the variants the launchers would compile (their own flags, tile and autotune
configs, argument types) and compiles them with Triton's bundled CUDA tools. Asserted per binary:
* shared memory <= 232,448 bytes (the H200's opt-in limit per block);
* local memory (stack: register spills) <= SPILL_BOUND bytes per thread;
* for the fused merge-matmul, shared memory <= `merge_matmul.shared_bytes`' estimate (the estimate the autotuner's
  pruning and the fixed-config choice rely on).

Tiers: the default suite compiles `quick` (the fixed configs, i.e. what LAZYMERGE_AUTOTUNE=0 launches, at the
heaviest spec: DELLA + consensus with 8 sources; a few minutes on one core without a warm Triton cache, seconds
with one). LAZYMERGE_AOT_TIER=worst (every autotune and fixed config, every compute x storage dtype pair) or
=full (also every merge spec) runs the whole set: `LAZYMERGE_AOT_TIER=worst pytest tests/test_kernel_compile.py`,
or `python -m lazymerge.kernels.aot --tier worst` for the table (~1 h on this 2-core machine).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from lazymerge.kernels import aot
from lazymerge.kernels import merge_matmul as kmm
from lazymerge.kernels.merge import MergeSpec
from lazymerge.kernels.merge_triton import KEEP_BAND, KEEP_CODES, MAX_SOURCES, spec_flags

TIER = os.environ.get("LAZYMERGE_AOT_TIER", "quick")
# Spill bound: 64 bytes of local memory per thread (a few spilled registers). Measured for the shipped configs
# (triton 3.9 and 3.6, sm_90; BENCHMARKS.md "Kernel resources"): 0 bytes for every binary but one 1-stage autotune
# config of the 8-source bf16 DELLA merge (8 bytes, 128 registers). The old 64 x 128 tiles on 4 warps spilled
# 5-8 KB per thread.
SPILL_BOUND = int(os.environ.get("LAZYMERGE_AOT_MAX_STACK", "64"))


# Recording variants needs the kernels as compiled JITFunctions; under an exported TRITON_INTERPRET=1 they were
# decorated for the interpreter (the compile test itself runs in a child process without it).
jit_kernels = pytest.mark.skipif(not isinstance(kmm._merge_matmul_kernel, triton.runtime.JITFunction),
                                 reason="kernels decorated under TRITON_INTERPRET=1 in this process")


def _tiny_limit(monkeypatch, limit):
    monkeypatch.setattr(kmm, "device_shared_limit", lambda device: limit)


# -- pure-Python checks of the pruning (no compiler) ------------------------------------------------------------------
def test_flag_specs_cover_every_keep_rule_and_switch():
    flags = {tuple(sorted(spec_flags(s).items())) for s in aot.flag_specs(3)}
    keeps = {dict(f)["KEEP"] for f in flags if dict(f)["MODE"] == 1}
    assert keeps == set(KEEP_CODES.values()) | {KEEP_BAND}  # top-k with (breadcrumbs) and without (TIES) an outer cut
    assert {(dict(f)["CONSENSUS"], dict(f)["NORMALIZE"]) for f in flags if dict(f)["MODE"] == 1} == {
        (False, False), (False, True), (True, False), (True, True)}
    assert {dict(f)["DIVIDE"] for f in flags if dict(f)["MODE"] == 0} == {False, True}
    worst = spec_flags(aot.heaviest_spec(MAX_SOURCES))
    assert worst["N_SOURCES"] == MAX_SOURCES and worst["KEEP"] == KEEP_CODES["della"] and worst["CONSENSUS"]


def test_shared_estimate_counts_pipelined_tiles():
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_stages=3)
    della8 = spec_flags(aot.heaviest_spec(8))
    # 2 pipelined copies of x (16x64 bf16) + base and 8 sources (32x64 bf16) + 8 float32 rank tiles, + dot scratch
    assert kmm.shared_bytes(cfg, della8, 2, 2) == 2 * (16 * 64 * 2 + 9 * 32 * 64 * 2 + 8 * 32 * 64 * 4) + 48 * 64 * 4
    assert kmm.shared_bytes(dict(cfg, num_stages=1), della8, 4, 4) == 48 * 64 * 4  # no pipeline buffers


def _launch_named(x_dtype, w_dtype, spec, m=1):
    N, K = 4096, 4096
    x = torch.empty((m, K), dtype=x_dtype, device="meta")
    b = torch.empty((N, K), dtype=w_dtype, device="meta")
    a = torch.empty((N, K), dtype=torch.float32, device="meta")
    named = {"Xin": x, "B": b, "M": m, **{f"X{i}": b for i in range(8)}, **{f"A{i}": a for i in range(8)}}
    return named, spec_flags(spec)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_prune_keeps_only_configs_that_fit(x_dtype):
    named, flags = _launch_named(x_dtype, x_dtype, aot.heaviest_spec(MAX_SOURCES))
    kept = kmm._prune(kmm._matmul_configs(), named, **flags)
    assert kept, "the one-stage configs fit any GPU"
    for c in kept:
        assert kmm.shared_bytes(kmm._config_dict(c), flags, x_dtype.itemsize, x_dtype.itemsize) <= kmm.H200_SHARED_LIMIT
    if x_dtype == torch.float32:  # float32 at 8 DELLA sources: the 3-stage pipelines do not fit
        assert len(kept) < len([c for c in kmm._matmul_configs() if c.kwargs["BLOCK_M"] == 16])


def test_no_fitting_config_falls_back_to_buffer_path(monkeypatch):
    """A GPU whose shared memory holds no tile: the fixed config raises NoFittingConfig (nothing is launched), the
    autotuned launcher checks the pruned list before launching, and merged_linear takes merge + matmul."""
    spec = aot.heaviest_spec(MAX_SOURCES)
    named, flags = _launch_named(torch.float32, torch.float32, spec)
    _tiny_limit(monkeypatch, 1024)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kmm._prune(kmm._matmul_configs(), named, **flags) == []
    with pytest.raises(kmm.NoFittingConfig):
        kmm._fixed_config(1, named, flags)

    from triton.runtime.errors import OutOfResources

    from lazymerge.kernels import linear as kl

    calls = []

    def no_fit(*a, **k):
        calls.append("fused")
        raise kmm.NoFittingConfig("test")

    def refused(*a, **k):  # what triton raises at launch when a binary exceeds the device (nothing ran)
        calls.append("fused")
        raise OutOfResources(300000, 232448, "shared memory")

    def merge_into(base, sources, spec, aux=None, out=None):
        calls.append("buffer")
        return out.copy_(torch.ones_like(out))

    monkeypatch.setattr(kl, "use_fused", lambda x: True)
    monkeypatch.setattr(kl.dispatch, "use_triton", lambda t: True)
    monkeypatch.setattr(kl, "merge_matmul_triton", no_fit)
    monkeypatch.setattr(kl, "merge", merge_into)
    x = torch.ones(1, 4)
    y = kl.merged_linear(x, torch.zeros(3, 4), [torch.zeros(3, 4)], MergeSpec("combine", coeffs=(1.0,)))
    assert calls == ["fused", "buffer"] and torch.equal(y, torch.full((1, 3), 4.0))
    monkeypatch.setattr(kl, "merge_matmul_triton", refused)
    with pytest.warns(UserWarning, match="merging into a buffer"):
        y = kl.merged_linear(x, torch.zeros(3, 4), [torch.zeros(3, 4)], MergeSpec("combine", coeffs=(1.0,)))
    assert calls[2:] == ["fused", "buffer"] and torch.equal(y, torch.full((1, 3), 4.0))


@jit_kernels
def test_variants_come_from_the_launchers():
    """The worst tier holds every autotune config the pruning keeps on an H200, for each dtype pair and path."""
    vs = aot.variants("worst")
    fused = [v for v in vs if v.kernel.endswith("_merge_matmul_kernel")]
    tiles = {(v.meta["x_bytes"], v.meta["w_bytes"], tuple(sorted(v.meta["tile"].items()))) for v in fused}
    worst = aot.heaviest_spec(MAX_SOURCES)
    for xd in aot.DTYPES.values():
        named, flags = _launch_named(xd, xd, worst)
        for m in (1, 64):
            named["M"] = m
            for c in kmm._prune(kmm._matmul_configs(), named, **flags):
                assert (xd.itemsize, xd.itemsize, tuple(sorted(kmm._config_dict(c).items()))) in tiles
    assert any(v.kernel.endswith("_merge_kernel") for v in vs)


# -- compiling ------------------------------------------------------------------------------------------------------
def test_every_variant_compiles_and_fits_sm90(tmp_path):
    miss = aot.missing_tools(90)
    if miss:
        pytest.skip(f"Triton's bundled CUDA tools are missing, cannot compile for sm_90: {miss}")
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LAZYMERGE_TRITON_ON_CPU")}
    jobs = str(max(1, min(2, len(os.sched_getaffinity(0)))))
    r = subprocess.run([sys.executable, "-m", "lazymerge.kernels.aot", "--tier", TIER, "--jobs", jobs,
                        "--max-stack", str(SPILL_BOUND), "--json", str(out)],
                       cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), r.stdout[-4000:] + r.stderr[-4000:]
    rep = json.loads(out.read_text())
    assert rep["rows"], "no variant was compiled"
    assert not rep["problems"], "\n".join(rep["problems"])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    kernels = {row["kernel"].split(":")[1] for row in rep["rows"]}
    assert kernels == {"_merge_kernel", "_merge_matmul_kernel"}


@jit_kernels
def test_warm_compiles_the_launch_binaries_into_the_cache():
    """`aot.warm` (used on the GPU before autotuned launches) records a launcher call and compiles its binary; the
    elementwise merge of the quick tier, so a warm Triton cache answers at once."""
    if aot.missing_tools(90):
        pytest.skip(f"Triton's bundled CUDA tools are missing: {aot.missing_tools(90)}")
    from lazymerge.kernels.merge_triton import merge_triton

    spec = aot.heaviest_spec(MAX_SOURCES)
    t = [torch.empty((4096, 4096), dtype=torch.bfloat16, device="meta") for _ in range(MAX_SOURCES + 1)]
    aux = [torch.empty((4096, 4096), dtype=torch.float32, device="meta") for _ in range(MAX_SOURCES)]
    out = torch.empty((4096, 4096), dtype=torch.float32, device="meta")
    rows = aot.warm([lambda: merge_triton(t[0], t[1:], spec, aux=aux, out=out)], autotune=False, arch=90, jobs=1)
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["kernel"].endswith(":_merge_kernel") and rows[0]["shared"] <= aot.H200_SHARED_LIMIT


@jit_kernels
def test_ties_compiles_without_the_outer_cut():
    """TIES (t_out = inf everywhere) compiles to its own variant without breadcrumbs' outer-cut compares: fewer
    sm_90 instructions than the same spec with one finite outer cut (KEEP_BAND)."""
    if aot.missing_tools(90):
        pytest.skip(f"Triton's bundled CUDA tools are missing: {aot.missing_tools(90)}")
    from lazymerge.kernels import bench_sass

    ties = bench_sass.spec_of("ties")
    band = dataclasses.replace(ties, t_out=(0.9,) + ties.t_out[1:])
    assert spec_flags(ties)["KEEP"] == KEEP_CODES["topk"] and spec_flags(band)["KEEP"] == KEEP_BAND
    assert bench_sass.count_spec(ties)["total"] < bench_sass.count_spec(band)["total"]
