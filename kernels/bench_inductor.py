"""Benchmark of the fused CPU merge's Inductor settings: `merge_cpu.INDUCTOR_CONFIGS` vs Inductor's defaults.

    python -m lazymerge.kernels.bench_inductor [--rows 3072 --cols 1024] [--sources 3] [--dtypes bfloat16 float32]
                                               [--methods ties dare_ties ...] [--json out.json]

For one tensor shape and n sources over a base of the same dtype, each merge structure (the compiled programs of
kernels/merge_cpu.py: the merge pass, and the L1 rescale pass where the method has one) is compiled twice into a
temporary cache, once with Inductor's default settings and once with the project's, and the two programs are timed
on the same inputs (medians of interleaved repeats) and checked bit for bit equal. Prints a table (and --json).
Compiling costs about a minute per structure and setting on a 2-core machine. A benchmark is a script, never a timed
test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import merge_cpu
from .merge import MergeSpec

INF = float("inf")


def specs(n: int) -> dict[str, MergeSpec]:
    """One spec per method family the fused loop compiles (n sources; the numbers are arbitrary but fixed)."""
    w = tuple(0.3 + 0.1 * i for i in range(n))
    dens = tuple(0.4 + 0.1 * (i % 3) for i in range(n))
    keys = tuple((2 * i + 1, 2 * i + 2) for i in range(n))
    cut = dict(t_in=tuple(0.005 + 0.001 * i for i in range(n)), c_in=(10**9,) * n, densities=dens)
    return {
        "ties": MergeSpec("delta", weights=w, keep="topk", t_out=(INF,) * n, c_out=(-1,) * n, consensus=True,
                          normalize=True, **cut),
        "breadcrumbs": MergeSpec("delta", weights=w, keep="topk", t_out=(0.02,) * n, c_out=(5,) * n, **cut),
        "dare_ties": MergeSpec("delta", weights=w, keep="random", densities=dens, keys=keys,
                               scales=tuple(1 / d for d in dens), consensus=True, normalize=True),
        "dare_linear": MergeSpec("delta", weights=w, keep="random", densities=dens, keys=keys,
                                 scales=tuple(1 / d for d in dens)),
        "task_arithmetic": MergeSpec("delta", weights=w),
    }


def _median_ms(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _programs(setting: dict, b, xs, spec):
    """The merge and L1 callables compiled with Inductor `setting` (a fresh compile: the package name carries the
    setting's hash; the in-process table of loaded programs is cleared first)."""
    merge_cpu.INDUCTOR_CONFIGS.clear()
    merge_cpu.INDUCTOR_CONFIGS.update(setting)
    merge_cpu._LOADED.clear()
    out = merge_cpu.merge_delta_fused(b, xs, spec)
    if out is None:
        raise RuntimeError(f"the fused merge could not be compiled with {setting} (see the warning above)")
    l1 = [merge_cpu.l1_sums_fused(b, x, spec, i) for i, x in enumerate(xs)] if spec.keep != "all" else None
    loaded = dict(merge_cpu._LOADED)

    def run_merge():
        merge_cpu._LOADED.update(loaded)
        return merge_cpu.merge_delta_fused(b, xs, spec)

    def run_l1():
        merge_cpu._LOADED.update(loaded)
        return [merge_cpu.l1_sums_fused(b, x, spec, i) for i, x in enumerate(xs)]

    return out, l1, run_merge, run_l1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--methods", nargs="+", default=["ties", "dare_ties", "task_arithmetic"])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cache = os.environ["LAZYMERGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="lazymerge-bench-inductor-")
    ours = dict(merge_cpu.INDUCTOR_CONFIGS)
    try:
        rows = _measure(args, ours)
    finally:
        merge_cpu.INDUCTOR_CONFIGS.clear()
        merge_cpu.INDUCTOR_CONFIGS.update(ours)
        shutil.rmtree(cache, ignore_errors=True)
    from lazymerge.engine import host

    info = {"machine": host.cpu_model(), "host": host.describe(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
            "shape": [args.rows, args.cols], "sources": args.sources, "settings": ours}
    print(f"\nFused CPU merge, Inductor defaults vs `merge_cpu.INDUCTOR_CONFIGS` ({ours}); one {args.rows}x{args.cols} "
          f"tensor, {args.sources} sources, {info['threads']} threads, torch {info['torch']}, {info['date']}\n")
    print("| dtype | method | pass | defaults ms | ours ms | speed-up | bit-equal |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        for part in ("merge", "l1"):
            if f"{part}_default" in r:
                d, o = r[f"{part}_default"], r[f"{part}_ours"]
                print(f"| {r['dtype']} | {r['method']} | {part} | {d:.2f} | {o:.2f} | {d / o:.2f}x "
                      f"| {r['bit_equal']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")


def _measure(args, ours: dict) -> list[dict]:
    """One row per (dtype, method): both settings' medians (ms) and whether their outputs are bit-identical."""
    torch.manual_seed(0)
    rows = []
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        b = torch.randn(args.rows, args.cols).to(dtype)
        xs = [(b.float() + 0.01 * torch.randn(args.rows, args.cols)).to(dtype) for _ in range(args.sources)]
        for method in args.methods:
            spec = specs(args.sources)[method]
            d_out, d_l1, d_merge, d_l1_run = _programs({}, b, xs, spec)
            o_out, o_l1, o_merge, o_l1_run = _programs(ours, b, xs, spec)
            same = torch.equal(d_out.view(torch.int32), o_out.view(torch.int32)) and d_l1 == o_l1
            fns = {"merge_default": d_merge, "merge_ours": o_merge}
            if d_l1 is not None:
                fns |= {"l1_default": d_l1_run, "l1_ours": o_l1_run}
            ms = _median_ms(fns, args.repeats)
            rows.append({"dtype": dt, "method": method, **{k: round(v, 3) for k, v in ms.items()}, "bit_equal": same})
            print(f"[bench_inductor] {dt} {method}: {ms} equal={same}", flush=True)
    return rows


if __name__ == "__main__":
    main()
