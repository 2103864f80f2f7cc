"""Benchmark of the delta merge's C loop (kernels/merge_native.py) against the Inductor loop (kernels/merge_cpu.py).

    python -m lazymerge.kernels.bench_native [--rows 3072 --cols 1024] [--sources 3] [--dtypes bfloat16 float32]
                                             [--methods task_arithmetic ties breadcrumbs dare_ties dare_linear]
                                             [--round bfloat16] [--threads 1 2] [--json out.json]

For one tensor shape and n sources over a base of the same dtype, each method's merge pass is run by both loops on
the same inputs, rounded to `--round` in the loop (a 16-bit recipe's default), with each thread count; prints the
medians of interleaved repeats (ms and ns per element), their ratio, and whether the two outputs are bit-identical.
The Inductor structures compile into the usual cache on first use (about a minute each on a 2-core machine). A
benchmark is a script, never a timed test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import merge_cpu, merge_native
from .bench_inductor import _median_ms, specs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--methods", nargs="+",
                    default=["task_arithmetic", "ties", "breadcrumbs", "dare_ties", "dare_linear"])
    ap.add_argument("--round", default="bfloat16", choices=["", "bfloat16", "float16"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, torch.get_num_threads()])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    from lazymerge.engine import host

    torch.manual_seed(0)
    rows, threads0 = [], torch.get_num_threads()
    numel = args.rows * args.cols
    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        b = torch.randn(args.rows, args.cols).to(dtype)
        xs = [(b.float() + 0.01 * torch.randn(args.rows, args.cols)).to(dtype) for _ in range(args.sources)]
        out = torch.empty(args.rows, args.cols)
        for t in sorted(set(args.threads)):
            torch.set_num_threads(t)
            for method in args.methods:
                spec = specs(args.sources)[method]
                fns = {"inductor": lambda: merge_cpu.merge_delta_fused(b, xs, spec, out=out, round_to=args.round),
                       "c": lambda: merge_native.merge_delta_native(b, xs, spec, out=out, round_to=args.round)}
                got = {}
                for k, f in fns.items():
                    r = f()
                    if r is None:
                        raise SystemExit(f"the {k} loop is unavailable for {method} (see the message above)")
                    got[k] = r.clone()
                ms = _median_ms(fns, args.repeats)
                rows.append({"dtype": dt, "threads": t, "method": method, "inductor_ms": ms["inductor"],
                             "c_ms": ms["c"], "c_ns_per_element": 1e6 * ms["c"] / numel,
                             "inductor_ns_per_element": 1e6 * ms["inductor"] / numel,
                             "speedup": ms["inductor"] / ms["c"],
                             "bit_equal": torch.equal(got["inductor"].view(torch.int32), got["c"].view(torch.int32))})
    torch.set_num_threads(threads0)
    info = {"host": host.describe(), "line": host.line(), "shape": [args.rows, args.cols], "sources": args.sources,
            "round_to": args.round or "float32"}
    print(f"\nDelta merge loop, Inductor (kernels/merge_cpu.py) vs C (kernels/merge_native.py); one {args.rows}x"
          f"{args.cols} tensor, {args.sources} sources, rounded to {info['round_to']}; {info['line']}\n")
    print("| dtype | threads | method | Inductor ms | C ms | Inductor ns/elem | C ns/elem | speed-up | bit-equal |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['threads']} | {r['method']} | {r['inductor_ms']:.2f} | {r['c_ms']:.2f} | "
              f"{r['inductor_ns_per_element']:.2f} | {r['c_ns_per_element']:.2f} | {r['speedup']:.2f}x | "
              f"{r['bit_equal']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    return 0 if all(r["bit_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
