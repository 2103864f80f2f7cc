"""Host cost of one launch of the merge kernels, beside their GPU time: where an eager call's time goes.

    python -m lazymerge.kernels.bench_overhead [--json out.json] [--profile N] [--dry-run]

For q/o 4096x4096 (base + 3 bf16 sources) and linear, TIES and DARE-TIES, with and without autotuning, for the merge
kernel (`merge_triton` into a buffer), the fused merge-matmul at 1 token and `linear.merged_linear` at 2048 tokens:

* host us: wall-clock time per call of 200 calls enqueued back to back, before synchronizing (the CPU's cost);
* wall us: the same 200 calls including the final synchronization (what a caller waits, per call);
* event us: `triton.testing.do_bench` median (what bench_kernels reports; host gaps show up in it);
* graph us: median under CUDA-graph replay (the GPU's own time, no host cost).

Then a cProfile of `--profile` autotuned fused calls (top functions by own time). Without CUDA it prints why and
exits 0; `--dry-run` runs tiny shapes on the CPU under TRITON_INTERPRET=1 (wall clock only) to check the script.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--profile", type=int, default=100, help="fused calls to profile (0: none)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from .bench_kernels import backend_ready

    stop = backend_ready("bench_overhead", args.dry_run)
    if stop is not None:
        return stop
    import torch

    from . import linear
    from .bench_kernels import Bench
    from .merge_matmul import merge_matmul_triton
    from .merge_triton import merge_triton

    bench = Bench(argparse.Namespace(json=None, quick=True, budget=1e9, dry_run=args.dry_run))
    dev = bench.device
    n_calls = 3 if args.dry_run else 200
    N, K = (48, 80) if args.dry_run else (4096, 4096)
    base, xs = bench.inputs(N, K)
    buf = torch.empty(N, K, dtype=torch.bfloat16, device=dev)
    x1 = torch.randn(1, K, device=dev).to(torch.bfloat16)
    xl = torch.randn(64 if args.dry_run else 2048, K, device=dev).to(torch.bfloat16)

    def sync():
        if not args.dry_run:
            torch.cuda.synchronize()

    def graph_us(fn):
        if args.dry_run:
            return None
        from triton.testing import do_bench_cudagraph

        try:
            return 1e3 * float(do_bench_cudagraph(fn, rep=20, return_mode="median"))
        except Exception as e:  # noqa: BLE001  (capture is a bonus measurement)
            print(f"    (graph capture failed: {type(e).__name__}: {str(e)[:100]})")
            return None

    rows = []
    print(f"env: {bench.results['env']}")
    print(f"{'autotune':<9}{'method':<11}{'call':<12}{'host us':>10}{'wall us':>10}{'event us':>10}{'graph us':>10}")
    for autotune in ("1", "0"):
        os.environ["LAZYMERGE_AUTOTUNE"] = autotune
        for method in ("linear", "ties", "dare_ties"):
            spec = bench.spec(method, base, xs, f"q/o.{method}")
            calls = {"merge": lambda: merge_triton(base, xs, spec, out=buf),
                     "fused M=1": lambda: merge_matmul_triton(x1, base, xs, spec),
                     "layer M=2k": lambda: linear.merged_linear(xl, base, xs, spec, out_buffer=buf)}
            for name, fn in calls.items():
                try:
                    fn()
                    sync()
                    t = time.perf_counter()
                    for _ in range(n_calls):
                        fn()
                    host = (time.perf_counter() - t) / n_calls * 1e6
                    sync()
                    wall = (time.perf_counter() - t) / n_calls * 1e6
                    event = bench.time_ms(fn) * 1e3
                    graph = graph_us(fn)
                except Exception as e:  # noqa: BLE001  (report and go on)
                    print(f"{autotune:<9}{method:<11}{name:<12} ERROR {type(e).__name__}: {str(e)[:200]}")
                    continue
                r = dict(autotune=autotune, method=method, call=name, host_us=host, wall_us=wall, event_us=event,
                         graph_us=graph)
                rows.append(r)
                g = f"{graph:10.1f}" if graph is not None else f"{'n/a':>10}"
                print(f"{autotune:<9}{method:<11}{name:<12}{host:10.1f}{wall:10.1f}{event:10.1f}{g}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": bench.results["env"], "rows": rows}, f, indent=1)
    if args.profile:
        os.environ["LAZYMERGE_AUTOTUNE"] = "1"
        spec = bench.spec("linear", base, xs, "q/o.linear")
        merge_matmul_triton(x1, base, xs, spec)
        sync()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.profile):
            merge_matmul_triton(x1, base, xs, spec)
        prof.disable()
        sync()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
        print(f"\ncProfile of {args.profile} autotuned fused calls (linear, M=1), by own time:")
        print("\n".join(s.getvalue().splitlines()[:50]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
