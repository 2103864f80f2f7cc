"""Benchmark of the lazy runtime (a script that prints a table, never a timed test).

    python -m lazymerge.engine.bench_runtime [--json out.json] [--hidden 1024 --layers 8] [--quick]

1. Peak memory for K = 1, 10, 100 distinct recipes served over the same three sources (each K in a fresh process,
   cached policy with a fixed budget): it must stay flat (the sources plus the cache budget), never K models.
2. Forward time per batch at 1, 64 and 2048 tokens: on the fly / cached / a plain transformers model holding the
   materialized weights. Medians of interleaved repeats in one run, reported as ratios to the plain model. The
   on-the-fly engine runs three ways: as by default (source tensors resident after their first read,
   engine/resident.py), reading every source tensor with pread at every use (`resident_bytes=0`, issue 17's reads),
   and reading mapped views (LAZYMERGE_UNSAFE_MMAP=1, engine/reader.py). Issue 15's 1-token goal: at most 2x the
   bandwidth floor, which is reading base + n sources instead of one model: 2 (n + 1) = 6x plain here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

FUSED = True  # the compiled CPU merge (kernels/merge_cpu.py); --eager turns it off

RECIPE = {"merge_method": "ties", "base_model": "base", "models": [
    {"model": "e1", "parameters": {"weight": 0.7, "density": 0.5}},
    {"model": "e2", "parameters": {"weight": 0.5, "density": 0.4}}]}


def build(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    from lazymerge.engine.toy import make_family

    marker = root / f"h{hidden}_l{layers}" / "done"
    paths = {k: root / f"h{hidden}_l{layers}" / k for k in ("base", "e1", "e2")}
    if not marker.exists():
        make_family(marker.parent, "mistral", 2, seed=0, hidden=hidden, layers=layers, heads=16, kv_heads=4,
                    intermediate=hidden * 11 // 4)
        marker.write_text("ok")
    return paths


def recipe_k(i: int) -> dict:
    r = json.loads(json.dumps(RECIPE))
    r["models"][0]["parameters"]["weight"] = 0.5 + i * 0.01
    return r


def memory_child(paths: dict, k: int, cache_mb: int) -> dict:
    from lazymerge.engine import Engine

    torch.set_num_threads(2)
    eng = Engine(paths, policy="cached", cache_bytes=cache_mb << 20, cpu_fused=FUSED)
    ids = torch.tensor([[5, 6, 7, 8]])
    t0 = time.perf_counter()
    for i in range(k):
        eng.compile(recipe_k(i)).logits(ids)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"k": k, "peak_rss_mb": peak_kb / 1024, "seconds": time.perf_counter() - t0,
            "cache_mb": eng.stats()["cache_bytes"] / 2**20, "stats_mb": eng.stats()["stats_bytes"] / 2**20}


def timing(paths: dict, sizes: list[int], repeats: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from lazymerge.engine import Engine
    from lazymerge.engine.export import export

    torch.set_num_threads(2)
    fly = Engine(paths, policy="on_the_fly", cpu_fused=FUSED).compile(RECIPE)
    fly_pread = Engine(paths, policy="on_the_fly", cpu_fused=FUSED, resident_bytes=0).compile(RECIPE)
    os.environ["LAZYMERGE_UNSAFE_MMAP"] = "1"  # the same, reading sources as mapped views (engine/reader.py)
    try:
        fly_mmap = Engine(paths, policy="on_the_fly", cpu_fused=FUSED).compile(RECIPE)
    finally:
        del os.environ["LAZYMERGE_UNSAFE_MMAP"]
    cached_eng = Engine(paths, policy="cached", cache_bytes=8 << 30)
    cached = cached_eng.compile(RECIPE)
    out = Path(paths["base"]).parent / "materialized"
    if not (out / "config.json").exists():
        export(fly.plan, out)
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    vocab = plain.config.vocab_size
    rows = []
    for n in sizes:
        B, T = (1, 1) if n == 1 else (1, n) if n <= 64 else (n // 512, 512)
        ids = torch.randint(4, vocab, (B, T))
        mask = torch.ones_like(ids)
        fns = {
            "plain": lambda: plain(input_ids=ids, attention_mask=mask, logits_to_keep=1),
            "cached": lambda: cached._forward(ids, mask, (mask.cumsum(-1) - 1), last_only=True),
            "on_the_fly": lambda: fly._forward(ids, mask, (mask.cumsum(-1) - 1), last_only=True),
            "on_the_fly_pread": lambda: fly_pread._forward(ids, mask, (mask.cumsum(-1) - 1), last_only=True),
            "on_the_fly_mmap": lambda: fly_mmap._forward(ids, mask, (mask.cumsum(-1) - 1), last_only=True),
        }
        times = {k: [] for k in fns}
        with torch.inference_mode():
            for f in fns.values():  # warm-up (fills the cache of the cached engine)
                f()
            for _ in range(repeats):
                for k, f in fns.items():  # interleaved: machine noise hits all three alike
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"tokens": n, "batch": [B, T], **{f"{k}_ms": med[k] * 1e3 for k in med},
                     "cached_ratio": med["cached"] / med["plain"],
                     "on_the_fly_ratio": med["on_the_fly"] / med["plain"],
                     "on_the_fly_pread_ratio": med["on_the_fly_pread"] / med["plain"],
                     "on_the_fly_mmap_ratio": med["on_the_fly_mmap"] / med["plain"],
                     "pread_over_mmap": med["on_the_fly_pread"] / med["on_the_fly_mmap"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--root", default="/tmp/lazymerge-bench")
    ap.add_argument("--cache-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small model, K up to 10 (a smoke run)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--eager", action="store_true", help="use the eager PyTorch reference merge, not the fused one")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory part (timing only)")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    global FUSED
    FUSED = not a.eager
    if a.quick:
        a.hidden, a.layers, a.repeats = 256, 2, 2
    paths = build(Path(a.root), a.hidden, a.layers)
    if a.memory_child is not None:
        print(json.dumps(memory_child(paths, a.memory_child, a.cache_mb)))
        return 0
    src_mb = sum(f.stat().st_size for p in paths.values() for f in Path(p).glob("*.safetensors")) / 2**20
    model_mb = src_mb / 3
    mem = []
    for k in () if a.no_memory else ((1, 10) if a.quick else (1, 10, 100)):
        r = subprocess.run([sys.executable, "-m", "lazymerge.engine.bench_runtime", "--memory-child", str(k),
                            "--hidden", str(a.hidden), "--layers", str(a.layers), "--root", a.root,
                            "--cache-mb", str(a.cache_mb)] + (["--eager"] if a.eager else []),
                           capture_output=True, text=True, check=True)
        mem.append(json.loads(r.stdout.strip().splitlines()[-1]))
    rows = timing(paths, [1, 64, 2048] if not a.quick else [1, 64], a.repeats)
    from . import host

    machine = host.line()
    print(f"lazy runtime benchmark — {machine}")
    print(f"model: hidden {a.hidden}, {a.layers} layers, {model_mb:.0f} MB per source (fp32), "
          f"3 sources = {src_mb:.0f} MB;"
          f" cache budget {a.cache_mb} MB; recipe: ties over 2 experts; CPU merge: {'eager' if a.eager else 'fused'}")
    print("\n| recipes K | peak RSS (MB) | sources + cache budget (MB) | K x model (MB) | seconds |")
    print("|---:|---:|---:|---:|---:|")
    for m in mem:
        print(f"| {m['k']} | {m['peak_rss_mb']:.0f} | {src_mb + a.cache_mb:.0f} | {m['k'] * model_mb:.0f} | "
              f"{m['seconds']:.1f} |")
    print("\n| tokens/batch | plain (ms) | cached (ms) | on the fly (ms) | cached / plain | on the fly / plain | "
          "pread every use / plain | mmap reads / plain | pread / mmap |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['plain_ms']:.1f} | {r['cached_ms']:.1f} | {r['on_the_fly_ms']:.1f} | "
              f"{r['cached_ratio']:.3f} | {r['on_the_fly_ratio']:.3f} | {r['on_the_fly_pread_ratio']:.3f} | "
              f"{r['on_the_fly_mmap_ratio']:.3f} | {r['pread_over_mmap']:.3f} |")
    res = {"machine": machine, "cpu_merge": "eager" if a.eager else "fused", "hidden": a.hidden, "layers": a.layers,
           "source_mb": src_mb, "cache_mb": a.cache_mb, "memory": mem, "timing": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
