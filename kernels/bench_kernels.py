"""GPU benchmark of the merge kernels against measured ceilings; prints a fixed table, optionally writes JSON.

    python -m lazymerge.kernels.bench_kernels [--json out.json] [--quick] [--budget SECONDS] [--dry-run]
        [--methods ties ...] [--shapes gate/up ...]

Shapes: one 7B Mistral layer's weights (4096x4096 q/o, 14336x4096 gate/up, 4096x14336 down), base + 3 sources in
bf16; methods linear, task_arithmetic, ties, dare_ties. Measured on the spot (triton.testing.do_bench medians):

* ceilings: device-to-device copy bandwidth (bytes read + written) and a large bf16 matmul's TFLOP/s;
* merge: the elementwise kernel (bf16 out) in GB/s, counting each input read once + the output written once, and
  its fraction of the copy bandwidth (goal >= 80%); the PyTorch reference (`merge_reference` on the GPU) beside it;
* fused: `merge_matmul_triton` at M = 1, 16 against the bandwidth floor = the time to read every weight once at
  the copy bandwidth (goal >= 75%), eager and, where capture works, under a CUDA graph (decode runs graphed);
* layer: `linear.merged_linear` (whatever it dispatches to) against cuBLAS on an already merged weight at
  M = 1, 16, 128, 2048, 8192 (goals: within 1.25x at 2048, 1.1x at >= 8192); at M <= 128 both paths are timed,
  which is what `linear.FUSED_MAX_TOKENS` should be set from.

It imports only `lazymerge.kernels` (no engine, no pydantic). Without CUDA it prints why and exits 0, unless
`--dry-run`: tiny shapes on the CPU under TRITON_INTERPRET=1, wall-clock timings, to check the script's logic.
`--budget` stops starting new blocks after that many seconds (results so far are printed and written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

SHAPES = [("q/o 4096x4096", 4096, 4096), ("gate/up 14336x4096", 14336, 4096), ("down 4096x14336", 4096, 14336)]
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
M_FUSED = (1, 16)
M_LAYER = (1, 16, 128, 2048, 8192)
N_SOURCES = 3
GOALS = {"merge_frac_copy": 0.80, "fused_frac_floor": 0.75, "layer_ratio_2048": 1.25, "layer_ratio_8192": 1.10}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="one shape, two methods, fewer M")
    p.add_argument("--budget", type=float, default=540.0, help="seconds after which no new block starts")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="only these methods (default: all, or --quick's two)")
    p.add_argument("--shapes", nargs="+", choices=[s[0].split()[0] for s in SHAPES],
                   help="only these shapes, by name (default: all, or --quick's q/o)")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.dry = args.dry_run
        import torch
        import triton

        self.torch, self.triton = torch, triton
        self.device = "cpu" if self.dry else "cuda"
        self.results = {"args": vars(args), "env": self.env(), "goals": GOALS, "ceilings": {}, "merge": [],
                        "fused": [], "layer": [], "skipped": []}

    # -- helpers -------------------------------------------------------------------------------------------------
    def env(self):
        import torch
        import triton

        e = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
        if torch.cuda.is_available() and not self.dry:
            props = torch.cuda.get_device_properties(0)
            e.update(gpu=props.name, sms=props.multi_processor_count, mem_gib=round(props.total_memory / 2**30, 1))
        return e

    def elapsed(self):
        return time.time() - self.t0

    def time_ms(self, fn):
        """Median milliseconds of fn (do_bench on the GPU; a few wall-clock runs in a dry run)."""
        if self.dry:
            fn()
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            return sorted(ts)[1]
        from triton.testing import do_bench

        try:
            return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))
        except TypeError:  # older signature
            return float(do_bench(fn, warmup=10, rep=60, quantiles=[0.5])[0])

    def time_graph_ms(self, fn):
        """Median ms under CUDA-graph replay (None if capture fails or in a dry run)."""
        if self.dry:
            return None
        try:
            from triton.testing import do_bench_cudagraph

            fn()
            self.torch.cuda.synchronize()
            try:
                return float(do_bench_cudagraph(fn, rep=30, return_mode="median"))
            except TypeError:
                return float(do_bench_cudagraph(fn, rep=30, quantiles=[0.5])[0])
        except Exception as e:  # noqa: BLE001  (graph capture is a bonus measurement)
            print(f"    (graph capture failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
            return None

    def save(self):
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(self.results, f, indent=1)

    # -- ceilings ------------------------------------------------------------------------------------------------
    def ceilings(self):
        torch = self.torch
        nbytes = (64 << 20) if self.dry else (2 << 30)
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=self.device).fill_(1)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        copy_gbs = 2 * nbytes / (ms * 1e-3) / 1e9
        src = dst = None  # free before the next allocation
        n = 512 if self.dry else 8192
        a = torch.randn(n, n, device=self.device).to(torch.bfloat16)
        b = torch.randn(n, n, device=self.device).to(torch.bfloat16)
        ms_mm = self.time_ms(lambda: a @ b)
        tflops = 2 * n**3 / (ms_mm * 1e-3) / 1e12
        self.copy_gbs = copy_gbs
        self.results["ceilings"] = {"copy_GBps": copy_gbs, "copy_bytes": 2 * nbytes, "matmul_TFLOPs": tflops,
                                    "matmul_n": n}
        print(f"ceilings: copy {copy_gbs:8.1f} GB/s (read+write of {nbytes / 2**30:.2f} GiB), "
              f"bf16 matmul {n}^3 {tflops:7.1f} TFLOP/s", flush=True)

    # -- inputs --------------------------------------------------------------------------------------------------
    def inputs(self, N, K):
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(N * 7 + K)
        base = (torch.randn(N, K, device=self.device, generator=g) * 0.02).to(torch.bfloat16)
        xs = [(base.float() + torch.randn(N, K, device=self.device, generator=g) * 0.002).to(torch.bfloat16)
              for _ in range(N_SOURCES)]
        return base, xs

    def spec(self, method, base, xs, name):
        from lazymerge.kernels.merge import MergeSpec
        from lazymerge.kernels.rng import mask_keys

        torch = self.torch
        w = (0.4, 0.35, 0.25)
        n = len(xs)
        if method == "linear":
            return MergeSpec("combine", coeffs=w)
        if method == "task_arithmetic":
            return MergeSpec("delta", weights=w, scales=(1.0,) * n)
        if method == "ties":
            t_in, c_in = [], []
            for x in xs:  # the engine's cut: stable descending |delta| order, first k = density * numel
                a = (x.float() - base.float()).reshape(-1).abs_()
                k = int(0.5 * a.numel())
                vals, idx = torch.sort(a, descending=True, stable=True)
                t_in.append(float(vals[k - 1])), c_in.append(int(idx[k - 1]))
                del a, vals, idx
            return MergeSpec("delta", keep="topk", t_in=tuple(t_in), c_in=tuple(c_in), t_out=(math.inf,) * n,
                             c_out=(-1,) * n, scales=(1.0,) * n, weights=w, consensus=True, normalize=True)
        if method == "dare_ties":
            keys = tuple(mask_keys(0, name, i) for i in range(n))
            return MergeSpec("delta", keep="random", densities=(0.5,) * n, keys=keys, scales=(2.0,) * n,
                             weights=w, consensus=True, normalize=True)
        raise ValueError(method)

    # -- one (shape, method) block ----------------------------------------------------------------------------------
    def block(self, label, N, K, method, base, xs, ms_fused, ms_layer):
        torch = self.torch
        from lazymerge.kernels import linear
        from lazymerge.kernels.merge import merge_reference
        from lazymerge.kernels.merge_matmul import merge_matmul_triton
        from lazymerge.kernels.merge_triton import merge_triton

        spec = self.spec(method, base, xs, f"{label}.{method}")
        numel = N * K
        reads = len(xs) + (0 if spec.mode == "combine" else 1)  # tensors read (combine does not read base)
        w_bytes = reads * numel * 2
        buf = torch.empty(N, K, dtype=torch.bfloat16, device=self.device)

        # merge kernel alone, and the PyTorch reference
        ms = self.time_ms(lambda: merge_triton(base, xs, spec, out=buf))
        ms_ref = self.time_ms(lambda: merge_reference(base, xs, spec, out=buf))
        gbs = (w_bytes + numel * 2) / (ms * 1e-3) / 1e9
        gbs_ref = (w_bytes + numel * 2) / (ms_ref * 1e-3) / 1e9
        row = dict(shape=label, N=N, K=K, method=method, us=ms * 1e3, GBps=gbs, frac_copy=gbs / self.copy_gbs,
                   ref_us=ms_ref * 1e3, ref_GBps=gbs_ref, speedup_vs_ref=ms_ref / ms)
        self.results["merge"].append(row)
        print(f"  merge  {label:<20} {method:<16} {row['us']:9.1f} us {gbs:8.1f} GB/s {100 * row['frac_copy']:5.1f}% "
              f"of copy | torch ref {row['ref_us']:9.1f} us ({row['speedup_vs_ref']:.1f}x slower)", flush=True)
        w_merged = buf.clone()  # the materialized weight, for cuBLAS

        floor_ms = w_bytes / (self.copy_gbs * 1e9) * 1e3
        for M in ms_fused:
            x = (torch.randn(M, K, device=self.device) * 0.5).to(torch.bfloat16)
            t = self.time_ms(lambda: merge_matmul_triton(x, base, xs, spec))
            tg = self.time_graph_ms(lambda: merge_matmul_triton(x, base, xs, spec))
            best = min(t, tg) if tg is not None else t
            r = dict(shape=label, method=method, M=M, us=t * 1e3, graph_us=None if tg is None else tg * 1e3,
                     floor_us=floor_ms * 1e3, frac_floor=floor_ms / best)
            self.results["fused"].append(r)
            g = f"{r['graph_us']:9.1f}" if tg is not None else "      n/a"
            print(f"  fused  {label:<20} {method:<16} M={M:<5} {r['us']:9.1f} us, graph {g} us, floor "
                  f"{r['floor_us']:8.1f} us: {100 * r['frac_floor']:5.1f}% of floor", flush=True)

        for M in ms_layer:
            x = (torch.randn(M, K, device=self.device) * 0.5).to(torch.bfloat16)
            t_cublas = self.time_ms(lambda: torch.nn.functional.linear(x, w_merged))
            t_disp = self.time_ms(lambda: linear.merged_linear(x, base, xs, spec, out_buffer=buf))
            path = "fused" if linear.use_fused(x) else "buffer"
            r = dict(shape=label, method=method, M=M, path=path, us=t_disp * 1e3, cublas_us=t_cublas * 1e3,
                     ratio=t_disp / t_cublas, fused_us=None, buffer_us=None)
            if M <= 128:  # both paths, for the crossover (linear.FUSED_MAX_TOKENS)
                r["fused_us"] = self.time_ms(lambda: merge_matmul_triton(x, base, xs, spec)) * 1e3
                r["buffer_us"] = self.time_ms(lambda: torch.nn.functional.linear(
                    x, merge_triton(base, xs, spec, out=buf))) * 1e3
            self.results["layer"].append(r)
            both = (f" | fused {r['fused_us']:9.1f} buffer {r['buffer_us']:9.1f} us"
                    if r["fused_us"] is not None else "")
            print(f"  layer  {label:<20} {method:<16} M={M:<5} {path:<6} {r['us']:9.1f} us vs cuBLAS "
                  f"{r['cublas_us']:9.1f} us = {r['ratio']:5.2f}x{both}", flush=True)
        buf = w_merged = None  # free before the next shape

    def run(self):
        torch = self.torch
        self.ceilings()
        self.save()
        shapes = SHAPES[:1] if self.args.quick else SHAPES
        if self.args.shapes:
            shapes = [s for s in SHAPES if s[0].split()[0] in self.args.shapes]
        methods = self.args.methods or (["linear", "dare_ties"] if self.args.quick else METHODS)
        ms_fused, ms_layer = M_FUSED, ((1, 16, 2048) if self.args.quick else M_LAYER)
        if self.dry:
            shapes = [("tiny 48x80", 48, 80), ("tiny 33x65", 33, 65)][: 1 if self.args.quick else 2]
            ms_layer = (1, 16, 20)
        for label, N, K in shapes:
            base, xs = self.inputs(N, K)
            for method in methods:
                if self.elapsed() > self.args.budget:
                    self.results["skipped"].append(f"{label} {method}: over --budget {self.args.budget:.0f}s")
                    print(f"  skip   {label:<20} {method:<16} (over budget)", flush=True)
                    continue
                t = time.time()
                try:
                    self.block(label, N, K, method, base, xs, ms_fused, ms_layer)
                except Exception as e:  # noqa: BLE001  (report and go on: one broken variant must not hide the rest)
                    msg = f"{label} {method}: {type(e).__name__}: {e}"
                    self.results.setdefault("errors", []).append(msg[:2000])
                    print(f"  ERROR  {msg[:500]}", flush=True)
                print(f"         ({time.time() - t:.1f}s, total {self.elapsed():.0f}s)", flush=True)
                self.save()
            del base, xs
            if not self.dry:
                torch.cuda.empty_cache()
        self.summary()
        self.save()

    def summary(self):
        R = self.results
        print("\nsummary (goals: merge >= 80% of copy, fused >= 75% of floor, layer <= 1.25x @2048, <= 1.1x @8192)")
        print(f"{'table':<7}{'shape':<21}{'method':<17}{'M':>6}{'us':>11}{'metric':>12}  goal")
        for r in R["merge"]:
            ok = r["frac_copy"] >= GOALS["merge_frac_copy"]
            print(f"{'merge':<7}{r['shape']:<21}{r['method']:<17}{'-':>6}{r['us']:11.1f}"
                  f"{100 * r['frac_copy']:11.1f}%  {'met' if ok else 'MISSED'}")
        for r in R["fused"]:
            ok = r["frac_floor"] >= GOALS["fused_frac_floor"]
            print(f"{'fused':<7}{r['shape']:<21}{r['method']:<17}{r['M']:>6}{r['us']:11.1f}"
                  f"{100 * r['frac_floor']:11.1f}%  {'met' if ok else 'MISSED'}")
        for r in R["layer"]:
            goal = (GOALS["layer_ratio_2048"] if r["M"] == 2048
                    else GOALS["layer_ratio_8192"] if r["M"] >= 8192 else None)
            verdict = "" if goal is None else ("met" if r["ratio"] <= goal else "MISSED")
            print(f"{'layer':<7}{r['shape']:<21}{r['method']:<17}{r['M']:>6}{r['us']:11.1f}"
                  f"{r['ratio']:11.2f}x  {verdict} ({r['path']})")
        if R["skipped"] or R.get("errors"):
            print(f"skipped: {len(R['skipped'])}, errors: {len(R.get('errors', []))}")


def backend_ready(script: str, dry_run: bool) -> int | None:
    """The GPU benchmarks' common start: with `dry_run`, the Triton interpreter on CPU tensors (set before triton is
    imported); without, a CUDA device. None when the script can go on, else its exit code (0: no CUDA, nothing to
    measure; 2: a dry run asked for after triton was imported without the interpreter)."""
    if dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run needs TRITON_INTERPRET=1 before triton is imported")
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["LAZYMERGE_TRITON_ON_CPU"] = "1"
        return None
    import torch

    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device; nothing to measure (use --dry-run to check the script on the CPU)")
        return 0
    return None


def main(argv=None):
    args = parse_args(argv)
    stop = backend_ready("bench_kernels", args.dry_run)
    if stop is not None:
        return stop
    b = Bench(args)
    print(f"env: {b.results['env']}", flush=True)
    b.run()
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
