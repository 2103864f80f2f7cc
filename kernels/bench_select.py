"""Benchmark of the exact top-k cut: radix select (kernels/select.py) vs the sorted magnitude order it replaced.

    python -m lazymerge.kernels.bench_select [--rows 4096 --cols 1024] [--sources 3] [--json out.json]

For one tensor shape and n bf16 sources over a bf16 base (a TIES merge's inputs), per source:
* old: a stable descending sort of |delta| once (8 bytes per element kept: float32 values + int32 indices), then a
  new density is a lookup;
* new: the first-digit histogram once (128 KiB kept, whatever the size), then a new density is one refining pass
  (plus a counting pass when a tie straddles the cut).
Prints the seconds of a first candidate and of a candidate whose densities all changed, and the bytes kept, as a
table (and --json). Interleaved repeats, medians. A benchmark is a script, never a timed test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from . import select


def _old_first(b, x):
    d = (x.float() - b.float()).reshape(-1).abs_()
    vals, idx = torch.sort(d, descending=True, stable=True)
    return vals, idx.to(torch.int32)


def _old_cut(order, k):
    vals, idx = order
    t = float(vals[k - 1])
    return (t, 2**32) if float(vals[k]) != t else (t, int(idx[k - 1]))


def run(rows: int, cols: int, n: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(rows, cols, generator=g).bfloat16()
    xs = [(b.float() + 0.01 * torch.randn(rows, cols, generator=g)).bfloat16() for _ in range(n)]
    numel = rows * cols
    dens_a = [0.5, 0.4, 0.6, 0.3][:n] + [0.5] * max(0, n - 4)
    dens_b = [0.45, 0.55, 0.35, 0.25][:n] + [0.45] * max(0, n - 4)
    t = {"old_first": [], "old_new_density": [], "new_first": [], "new_new_density": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        orders = [_old_first(b, x) for x in xs]
        cuts_old = [_old_cut(o, int(d * numel)) for o, d in zip(orders, dens_a)]
        t1 = time.perf_counter()
        cuts_old_b = [_old_cut(o, int(d * numel)) for o, d in zip(orders, dens_b)]
        t2 = time.perf_counter()
        old_bytes = sum(v.numel() * 4 + i.numel() * 4 for v, i in orders)
        del orders
        tops = [select.first_histogram(b, x) for x in xs]
        cuts_new = [select.topk_cuts(b, x, [int(d * numel)], top=tp)[0] for x, tp, d in zip(xs, tops, dens_a)]
        t3 = time.perf_counter()
        cuts_new_b = [select.topk_cuts(b, x, [int(d * numel)], top=tp)[0] for x, tp, d in zip(xs, tops, dens_b)]
        t4 = time.perf_counter()
        new_bytes = sum(tp.numel() * 4 for tp in tops)  # kept as int32
        assert cuts_old == cuts_new and cuts_old_b == cuts_new_b, "the two selections disagree"
        for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            t[k].append(v)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"rows": rows, "cols": cols, "sources": n, "numel": numel, **{f"{k}_s": v for k, v in med.items()},
            "old_kept_bytes": old_bytes, "new_kept_bytes": new_bytes, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from lazymerge.engine import host
    from lazymerge.engine.threads import configure

    configure()
    r = run(args.rows, args.cols, args.sources, args.repeats)
    per = lambda s: s / (r["numel"] * r["sources"]) * 1e9  # noqa: E731
    print(f"exact top-k cut, {args.rows}x{args.cols} bf16, {args.sources} sources, torch threads {r['threads']}, "
          f"{host.line()}")
    print("| selection | first candidate s | new densities s | ns/element (new densities) | kept bytes |")
    print("|---|---:|---:|---:|---:|")
    print(f"| sorted order (old) | {r['old_first_s']:.3f} | {r['old_new_density_s']:.4f} | "
          f"{per(r['old_new_density_s']):.2f} | {r['old_kept_bytes']} |")
    print(f"| radix select (new) | {r['new_first_s']:.3f} | {r['new_new_density_s']:.4f} | "
          f"{per(r['new_new_density_s']):.2f} | {r['new_kept_bytes']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "host": host.describe()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
