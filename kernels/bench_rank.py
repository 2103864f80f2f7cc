"""Benchmark of DELLA's per-row ranks: the C radix sort (kernels/rank_cpu.py) vs torch's stable argsort of rows.

    python -m lazymerge.kernels.bench_rank [--shapes 256x1024 64x4096 8x32000] [--merge 3072x1024] [--json out.json]

For each shape (|delta| of a bf16 tensor and a bf16 base, the engine's case) and each torch thread count from 1 to
this process's: ns per element of `row_ranks_sorted` (torch) and of `rank_cpu.ranks` (radix), checked equal. Then
one fused CPU DELLA merge (3 bf16 sources, compiled by `kernels.merge_cpu`, ranks per row block inside) with either
route, checked bit-identical. Interleaved repeats, medians. A benchmark is a script, never a timed test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from . import merge, merge_cpu, rank_cpu
from .merge import MergeSpec


def _bf16_delta(rows: int, cols: int, g: torch.Generator, n: int = 1):
    b = torch.randn(rows, cols, generator=g).bfloat16()
    xs = [(b.float() + 0.01 * torch.randn(rows, cols, generator=g)).bfloat16() for _ in range(n)]
    return b, xs


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rank_rows(shapes, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    threads = torch.get_num_threads()
    for rows, cols in shapes:
        b, (x,) = _bf16_delta(rows, cols, g)
        a = (x.float() - b.float()).abs()
        table = torch.arange(cols, dtype=torch.float32) / (cols - 1)
        got = rank_cpu.ranks(a, table)
        if got is None:
            raise SystemExit("the native ranks are unavailable on this machine (see the warning above)")
        assert torch.equal(got, merge.row_ranks_sorted(a)), "the two routes disagree"
        for th in range(1, threads + 1):
            torch.set_num_threads(th)
            t_torch, t_radix = [], []
            for _ in range(repeats):  # interleaved
                t_torch.append(_seconds(lambda: merge.row_ranks_sorted(a)))
                t_radix.append(_seconds(lambda: rank_cpu.ranks(a, table)))
            ns = lambda ts: statistics.median(ts) * 1e9 / a.numel()  # noqa: E731
            out.append({"rows": rows, "cols": cols, "threads": th, "torch_ns": ns(t_torch), "radix_ns": ns(t_radix)})
        torch.set_num_threads(threads)
    return out


def della_merge(rows: int, cols: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(1)
    b, xs = _bf16_delta(rows, cols, g, 3)
    spec = MergeSpec(mode="delta", weights=(0.5, 0.3, 0.4), keep="della", densities=(0.5, 0.6, 0.4),
                     eps=(0.1, 0.1, 0.1), keys=((1, 2), (3, 4), (5, 6)), scales=(1.0, 1.0, 1.0), consensus=True,
                     normalize=True)
    first = merge_cpu.merge_delta_fused(b, xs, spec)  # compiles the structure once per machine
    if first is None:
        raise SystemExit("the fused CPU merge is unavailable on this machine")
    times = {"0": [], "1": []}
    old = os.environ.get("LAZYMERGE_NATIVE_RANKS")
    try:
        for _ in range(repeats):
            for flag in ("0", "1"):
                os.environ["LAZYMERGE_NATIVE_RANKS"] = flag
                t = time.perf_counter()
                got = merge_cpu.merge_delta_fused(b, xs, spec)
                times[flag].append(time.perf_counter() - t)
                assert torch.equal(got, first), "the merge differs between the two rank routes"
    finally:
        if old is None:
            os.environ.pop("LAZYMERGE_NATIVE_RANKS", None)
        else:
            os.environ["LAZYMERGE_NATIVE_RANKS"] = old
    return {"rows": rows, "cols": cols, "sources": 3, "torch_ms": statistics.median(times["0"]) * 1e3,
            "radix_ms": statistics.median(times["1"]) * 1e3, "threads": torch.get_num_threads()}


def _shape(s: str) -> tuple[int, int]:
    r, c = s.lower().split("x")
    return int(r), int(c)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", type=_shape, default=[(256, 1024), (64, 4096), (8, 32000)])
    ap.add_argument("--merge", type=_shape, default=(3072, 1024), help="the DELLA merge's tensor shape")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from lazymerge.engine.threads import configure

    configure()
    rows = rank_rows(args.shapes, args.repeats)
    m = della_merge(*args.merge, args.repeats)
    from lazymerge.engine import host

    print(f"DELLA row ranks, |delta| of bf16 tensors, {host.line()}, "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}")
    print("| shape | threads | torch argsort ns/element | radix ns/element | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rows']}x{r['cols']} | {r['threads']} | {r['torch_ns']:.1f} | {r['radix_ns']:.1f} | "
              f"{r['torch_ns'] / r['radix_ns']:.2f}x |")
    print(f"\nfused DELLA merge, {m['rows']}x{m['cols']}, 3 bf16 sources, {m['threads']} threads: torch ranks "
          f"{m['torch_ms']:.1f} ms, radix ranks {m['radix_ms']:.1f} ms ({m['torch_ms'] / m['radix_ms']:.2f}x), "
          "bit-identical")
    if args.json:
        Path(args.json).write_text(json.dumps({"ranks": rows, "della_merge": m, "host": host.describe()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
