"""Per-tensor cost of every merge method: the statistics pass and the elementwise pass, timed separately.

    python -m lazymerge.engine.bench_methods [--rows 2048] [--cols 2048] [--sources 3] [--reps 3] [--json out.json]

One synthetic tensor of (rows, cols) in bfloat16, a base and `--sources` models (a fine-tune-like delta of 2% of
the base's scale), held in memory (as the memory-mapped pages are once read). For every method:

* stats ms: `Merger.spec(plan)` on a fresh Merger (nothing cached): the per-tensor statistics and scalars
  (TIES/breadcrumbs: the sorted magnitude order; DARE: nothing; slerp/nuslerp/multislerp/karcher/model_stock: the
  Gram matrix; sce: the variance cut and mean squares; arcee_fusion: row KL and the quantile threshold; ramplus_tl:
  the overlap counts). Done once per (recipe, tensor); a search that changes only weights re-uses the Gram matrix.
* merge ms: `kernels.merge.merge` with that spec: the elementwise pass that runs for every use of the merged tensor
  when nothing is cached (the reference on the CPU, the Triton kernel on CUDA with `--device cuda`).
* merge GB/s: bytes of the inputs read once + the float32 output written once, over the merge time.

Medians of `--reps` runs after one untimed warm-up run. Prints a fixed table; `--json` writes the rows and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lazymerge.kernels.merge import merge as merge_kernel

from .merger import Merger
from .methods import Family, Sparsify
from .plan import TensorPlan, TensorRef

NAME = "model.layers.0.mlp.up_proj.weight"


class _MemSource:
    """The two things the Merger asks of a source: `get(name)` and a `fingerprint`."""

    def __init__(self, name: str, t: torch.Tensor):
        self.fingerprint = name
        self._t = t

    def get(self, name: str) -> torch.Tensor:
        return self._t


def _plans(n: int, shape: tuple[int, int]) -> dict[str, TensorPlan]:
    base = TensorRef("base", NAME)
    xs = tuple(TensorRef(f"m{i}", NAME) for i in range(n))
    w = tuple(1.0 / n for _ in range(n))
    dens = (0.5,) * n

    def gta(method, sparsify, consensus, normalize, rescale):
        return TensorPlan(NAME, Family.task_arithmetic, method, shape, base, xs, weights=w, densities=dens,
                          gammas=(0.01,) * n, epsilons=(0.15,) * n, sparsify=sparsify, consensus=consensus,
                          normalize=normalize, rescale=rescale)

    def stat(fam, method, ins=xs, b=base, weights=(), **opts):
        return TensorPlan(NAME, fam, method, shape, b, ins, weights=weights, options=tuple(opts.items()))

    return {
        "linear": TensorPlan(NAME, Family.linear, "linear", shape, None, xs, weights=w, normalize=True),
        "slerp": TensorPlan(NAME, Family.slerp, "slerp", shape, None, (base, xs[0]), t=0.4),
        "task_arithmetic": gta("task_arithmetic", Sparsify.none, False, False, False),
        "ties": gta("ties", Sparsify.magnitude, True, True, False),
        "dare_ties": gta("dare_ties", Sparsify.random, True, False, True),
        "della": gta("della", Sparsify.della, True, True, True),
        "nuslerp": stat(Family.nuslerp, "nuslerp", xs[:2], weights=(0.4, 0.6), nuslerp_row_wise=False,
                        nuslerp_flatten=True),
        "nuslerp (rows)": stat(Family.nuslerp, "nuslerp", xs[:2], weights=(0.4, 0.6), nuslerp_row_wise=False,
                               nuslerp_flatten=False),
        "nuslerp (cols)": stat(Family.nuslerp, "nuslerp", xs[:2], weights=(0.4, 0.6), nuslerp_row_wise=True,
                               nuslerp_flatten=False),
        "multislerp": stat(Family.multislerp, "multislerp", weights=w, normalize_weights=True, eps=1e-8),
        "karcher": stat(Family.karcher, "karcher", (base,) + xs, None, max_iter=10, tol=1e-5),
        "model_stock": stat(Family.model_stock, "model_stock", filter_wise=False),
        "model_stock (filter_wise)": stat(Family.model_stock, "model_stock", filter_wise=True),
        "sce": stat(Family.sce, "sce", int8_mask=False, select_topk=0.5),
        "arcee_fusion": stat(Family.arcee_fusion, "arcee_fusion", xs[:1]),
        "nearswap": stat(Family.nearswap, "nearswap", xs[:1], t=1e-3),
        "ram": stat(Family.ram, "ram", epsilon=1e-5),
        "ramplus_tl": stat(Family.ram, "ramplus_tl", r=0.1, alpha=0.2, epsilon=1e-5),
    }


def _inputs(n, rows, cols, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * 0.02
    srcs = {"base": base.to(torch.bfloat16)}
    for i in range(n):
        d = torch.randn(rows, cols, generator=g) * 0.0004
        d[torch.rand(rows, cols, generator=g) < 0.3] = 0.0  # untouched entries (ram's unique / shared split)
        srcs[f"m{i}"] = (base + d).to(torch.bfloat16)
    return {k: _MemSource(k, v.to(device)) for k, v in srcs.items()}


def _median_ms(fn, reps: int, sync) -> float:
    fn()  # warm-up (allocator, lazy initialization), not timed
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(rows: int, cols: int, n: int, reps: int, device: str, only: list[str] | None = None) -> dict:
    sources = _inputs(n, rows, cols, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = []
    for name, plan in _plans(n, (rows, cols)).items():
        if only and name not in only:
            continue
        stats_ms = _median_ms(lambda: Merger(sources, device=device).spec(plan), reps, sync)  # noqa: B023
        m = Merger(sources, device=device)
        spec, aux = m.spec(plan)
        base = m.store.get(plan.base) if plan.base is not None else None
        xs = [m.store.get(r) for r in plan.inputs]
        merge_ms = _median_ms(lambda: merge_kernel(base, xs, spec, aux=aux, cpu_fused=False), reps, sync)  # noqa: B023
        nbytes = sum(x.numel() * x.element_size() for x in xs) + rows * cols * 4
        nbytes += base.numel() * base.element_size() if base is not None and spec.mode != "combine" else 0
        out.append({"method": name, "inputs": len(xs) + (base is not None), "stats_ms": stats_ms,
                    "merge_ms": merge_ms, "merge_gbps": nbytes / merge_ms / 1e6})
    from . import host

    env = {"machine": platform.machine(), "processor": host.cpu_model(), "host": host.describe(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return {"shape": [rows, cols], "sources": n, "dtype": "bfloat16", "reps": reps, "env": env, "rows": out}


def print_table(res: dict) -> None:
    r, c = res["shape"]
    print(f"per-tensor cost, ({r}, {c}) bfloat16, base + {res['sources']} models, {res['env']['device']}, "
          f"{res['env']['threads']} threads, median of {res['reps']}")
    print(f"{'method':28s} {'inputs':>6s} {'stats ms':>10s} {'merge ms':>10s} {'merge GB/s':>11s}")
    for row in res["rows"]:
        print(f"{row['method']:28s} {row['inputs']:6d} {row['stats_ms']:10.1f} {row['merge_ms']:10.1f} "
              f"{row['merge_gbps']:11.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--sources", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="*", help="methods to run (names as printed)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    res = run(a.rows, a.cols, a.sources, a.reps, a.device, a.only)
    print_table(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
