"""GPU benchmark that decides `linear.FUSED_MAX_TOKENS`: fused merge-matmul vs merge-into-buffer + cuBLAS by tokens.

    python -m lazymerge.kernels.bench_crossover [--json out.json] [--budget SECONDS] [--jobs N] [--dry-run]

7B layer shapes (Mistral: q/o 4096x4096, gate/up 14336x4096, down 4096x14336), base + 3 bf16 sources, TIES and
DARE-TIES, M = 1 .. 64 tokens. For each (shape, method, M): `merge_matmul_triton` (autotuned) and the buffer path
`F.linear(x, merge_triton(..., out=buf))`, medians of `triton.testing.do_bench`. The table's last line is the
largest M up to which the fused path is no slower for every shape and method: the value FUSED_MAX_TOKENS must be
set to (a measurement, not a guess).

Before timing, every binary the timed launches need is compiled in parallel into Triton's cache (`aot.warm`):
serially, the autotuner's ~27 compilations per method would take most of a 10-minute device call.
Without CUDA it prints why and exits 0; `--dry-run` runs tiny shapes on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SHAPES = [("q/o 4096x4096", 4096, 4096), ("gate/up 14336x4096", 14336, 4096), ("down 4096x14336", 4096, 14336)]
METHODS = ["ties", "dare_ties"]
MS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--budget", type=float, default=200.0, help="seconds after which no new block starts")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="parallel compilations")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    return p.parse_args(argv)


def recommend(rows: list[dict], ms=MS) -> int:
    """Largest M such that fused <= buffer at every M' <= M, for every (shape, method) measured (0: never)."""
    best = 0
    for m in sorted(ms):
        at = [r for r in rows if r["M"] == m]
        if not at or any(r["fused_us"] > r["buffer_us"] for r in at):
            break
        best = m
    return best


def main(argv=None):
    args = parse_args(argv)
    from .bench_kernels import backend_ready

    stop = backend_ready("bench_crossover", args.dry_run)
    if stop is not None:
        return stop
    import torch

    from .bench_kernels import Bench
    from .merge_matmul import merge_matmul_triton
    from .merge_triton import merge_triton

    bench = Bench(argparse.Namespace(json=None, quick=True, budget=args.budget, dry_run=args.dry_run))
    t0 = time.time()
    shapes = [("tiny 48x80", 48, 80)] if args.dry_run else SHAPES
    ms = (1, 2, 16, 20) if args.dry_run else MS
    res = {"env": bench.results["env"], "shapes": shapes, "methods": METHODS, "M": list(ms), "rows": [],
           "skipped": []}
    print(f"env: {res['env']}", flush=True)
    dev = bench.device
    for label, N, K in shapes:
        base, xs = bench.inputs(N, K)
        specs = {m: bench.spec(m, base, xs, f"{label}.{m}") for m in METHODS}
        if not args.dry_run:  # compile everything this block launches, in parallel
            from . import aot

            meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731
            mb, mxs = meta(base), [meta(x) for x in xs]
            calls = []
            for spec in specs.values():
                calls.append(lambda spec=spec: merge_triton(mb, mxs, spec, out=torch.empty_like(mb)))
                for m in ms:
                    mx = torch.empty((m, K), dtype=torch.bfloat16, device="meta")
                    calls.append(lambda spec=spec, mx=mx: merge_matmul_triton(mx, mb, mxs, spec))
            t = time.time()
            rows = aot.warm(calls, jobs=args.jobs)
            errs = [r for r in rows if "error" in r]
            print(f"  warm   {label:<20} {len(rows)} binaries compiled in {time.time() - t:.0f}s "
                  f"({len(errs)} errors)", flush=True)
            for r in errs[:3]:
                print(f"         {r['error'][:300]}", flush=True)
        buf = torch.empty(N, K, dtype=torch.bfloat16, device=dev)
        for method, spec in specs.items():
            if time.time() - t0 > args.budget:
                res["skipped"].append(f"{label} {method}")
                print(f"  skip   {label:<20} {method:<10} (over --budget {args.budget:.0f}s)", flush=True)
                continue
            for m in ms:
                x = (torch.randn(m, K, device=dev) * 0.5).to(torch.bfloat16)
                fused = bench.time_ms(lambda: merge_matmul_triton(x, base, xs, spec)) * 1e3
                buffer = bench.time_ms(
                    lambda: torch.nn.functional.linear(x, merge_triton(base, xs, spec, out=buf))) * 1e3
                r = dict(shape=label, method=method, M=m, fused_us=fused, buffer_us=buffer, ratio=fused / buffer)
                res["rows"].append(r)
                print(f"  {label:<20} {method:<10} M={m:<4} fused {fused:9.1f} us  buffer {buffer:9.1f} us  "
                      f"fused/buffer {r['ratio']:5.2f}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=1)
        base = xs = buf = specs = None  # free before the next shape
        if not args.dry_run:
            torch.cuda.empty_cache()
    res["recommended_FUSED_MAX_TOKENS"] = rec = recommend(res["rows"], ms)
    res["complete"] = not res["skipped"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{'M':>4} {'worst fused/buffer':>19} {'best fused/buffer':>18}")
    for m in ms:
        at = [r["ratio"] for r in res["rows"] if r["M"] == m]
        if at:
            print(f"{m:>4} {max(at):19.2f} {min(at):18.2f}")
    print(f"FUSED_MAX_TOKENS = {rec}  (largest M with fused <= buffer for every shape and method measured"
          f"{'' if res['complete'] else '; INCOMPLETE: some blocks skipped'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
