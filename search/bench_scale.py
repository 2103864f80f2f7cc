"""Benchmark at real scale: a ~280M-parameter Llama-shaped bf16 family, the default configuration, every number a ratio.

    python -m lazymerge.search.bench_scale [--root /tmp/x] [--json out.json] [--methods ties dare_ties ...]

Builds OUTSIDE the repository (a temporary folder, deleted afterwards unless --keep) a Llama family: hidden 1024,
16 layers, 16 heads (8 KV), MLP 3072, vocab 32000, bf16, base + 3 fine-tunes (random perturbations), ~284M
parameters and ~2.1 GiB of safetensors in all. Then, for each merge method, each part in a fresh child process
(so that its peak RSS is its own):

1. `score`: `lazymerge score RECIPE TEXT` (the CLI, default configuration): peak RSS.
2. `candidate`: search candidates with the default runtime config (`search.evaluate.Evaluator`, tasks: greedy
   generation + exact match and answer log-likelihood on 16 prompts, or one of them: `--tasks generate|loglik`):
   seconds of a first candidate, of a second whose densities and weights all changed (the cut statistics reused,
   the cuts recomputed) and the median of `STEADY` later ones, each with new weights and densities (a search's
   steady state: the first candidates after start-up also pay for fresh memory pages); peak RSS over all of them;
   vs `mergekit`: `run_merge` of the second candidate + transformers load + the same evaluation.
3. `forward`: on-the-fly and cached forward vs a plain transformers model of the exported merge at 1, 64 and 2048
   tokens (medians of interleaved repeats).
4. `decode`: decode tokens/s of the cached recipe vs transformers' `generate` on the export (greedy, 32 new tokens,
   batch 1 and 8; medians of interleaved repeats).

Goals (issue 15): on the fly <= 1.25x plain at 2048 tokens and <= 2x the bandwidth floor ((n + 1) x plain) at 1
token; peak RSS <= sources + merged-cache budget + 1 GiB; one candidate >= 10x faster than mergekit + load + eval;
cached decode >= 0.9x transformers' generate. A benchmark is a script, never a timed test. `--methods` takes any
method of the engine's table (task_arithmetic too: the search goal names it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "280m": dict(hidden=1024, layers=16, heads=16, kv_heads=8, intermediate=3072, vocab=32000),
    # a 7B Llama/Mistral's layer shapes (q/o 4096x4096, k/v 1024x4096, gate/up/down 14336x4096), two layers: ~0.7B
    # parameters, for the GPU (--device cuda), where a layer's merge cost must be measured at its real size
    "7b-layers": dict(hidden=4096, layers=2, heads=32, kv_heads=8, intermediate=14336, vocab=32000),
}
SHAPE = dict(SHAPES[os.environ.get("LAZYMERGE_BENCH_SHAPE", "280m")])
if os.environ.get("LAZYMERGE_BENCH_SMOKE") == "1":  # --smoke: a tiny family, to check the script end to end
    SHAPE = dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=1000)
DEVICE = os.environ.get("LAZYMERGE_BENCH_DEVICE", "cpu")  # forward and decode: the engine's and the plain model's
# the candidate's evaluation (--tasks): greedy generation + exact match, answer log-likelihood, or both (the default)
TASKS = os.environ.get("LAZYMERGE_BENCH_TASKS", "both")
STEADY = 5  # later candidates a `candidate` child evaluates after the second (their median: a search's steady state)
TEXT = " ".join(["the cat sees the dog and the dog sees the cat"] * 6)


def recipe(method: str, variant: int = 0) -> dict:
    """The recipe of `method` over e1..e3 (variant 1: every weight and density changed; variant k >= 2: weights in
    [0.3, 0.7] and densities in [0.35, 0.65] drawn with seed k, a later candidate of a search)."""
    if variant < 2:
        w = [(0.5, 0.4, 0.3), (0.6, 0.35, 0.45)][variant]
        d = [(0.5, 0.4, 0.6), (0.45, 0.55, 0.35)][variant]
    else:
        import random

        rng = random.Random(variant)
        w = [round(rng.uniform(0.3, 0.7), 4) for _ in range(3)]
        d = [round(rng.uniform(0.35, 0.65), 4) for _ in range(3)]
    models = []
    for i in range(3):
        p = {"weight": w[i]}
        if method != "task_arithmetic" and method != "model_stock":
            p["density"] = d[i]
        models.append({"model": f"e{i + 1}", "parameters": p})
    r = {"merge_method": method, "base_model": "base", "models": models, "dtype": "bfloat16"}
    if method.startswith("della"):
        r["parameters"] = {"epsilon": 0.1}
    if method == "model_stock":
        for m in models:
            m.pop("parameters")
    return r


# -- children (each prints one JSON line: its result and its own peak RSS) ---------------------------------------
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_build(root: Path) -> dict:
    import copy

    from lazymerge.engine import toy

    tok = toy.make_tokenizer()
    cfg = toy.tiny_config("llama", vocab_size=SHAPE["vocab"], hidden=SHAPE["hidden"], layers=SHAPE["layers"],
                          heads=SHAPE["heads"], kv_heads=SHAPE["kv_heads"], intermediate=SHAPE["intermediate"])
    cfg.max_position_embeddings = 4096
    base = toy.make_model(cfg, 0)
    params = sum(p.numel() for p in base.parameters())
    toy.save(copy.deepcopy(base), tok, root / "base", "bfloat16")
    for i in range(1, 4):
        m = toy.perturb(copy.deepcopy(base), 1000 + i)
        toy.save(m, tok, root / f"e{i}", "bfloat16")
        del m
    size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
    return {"params": params, "source_bytes": size}


def child_score(root: Path, method: str) -> dict:
    import yaml

    from lazymerge.cli import main

    r = recipe(method)
    for m in r["models"]:
        m["model"] = str(root / m["model"])
    r["base_model"] = str(root / "base")
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(r))
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:
        old, sys.stdout = sys.stdout, null
        try:
            rc = main(["score", str(path), TEXT])
        finally:
            sys.stdout = old
    return {"rc": rc, "seconds": time.perf_counter() - t0, "cache_budget_bytes": 1 << 30}


def _search_cfg(root: Path, method: str) -> dict:
    import random

    from lazymerge.engine.toy import WORDS

    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(8)), "answer": rng.choice(WORDS)} for _ in range(16)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return {"sources": {k: str(root / k) for k in ("base", "e1", "e2", "e3")}, "base_model": "base",
            "space": {"kind": "ps", "method": method, "models": ["e1", "e2", "e3"]},
            "tasks": [t for t in ({"name": "gen", "type": "generate_exact_match", "data": str(data), "extract": "exact",
                                   "max_tokens": 8},
                                  {"name": "ll", "type": "answer_loglik", "data": str(data)})
                      if TASKS == "both" or t["name"] == {"generate": "gen", "loglik": "ll"}[TASKS]],
            "budget": {"evaluations": 1}}


def child_candidate(root: Path, method: str) -> dict:
    from lazymerge.search.config import load_config
    from lazymerge.search.evaluate import Evaluator, make_engine, model_bytes
    from lazymerge.search.tasks import load_tasks

    cfg = load_config(_search_cfg(root, method))
    ev = Evaluator(make_engine(cfg), load_tasks(cfg), cfg.runtime.batch_size)
    budget = ev.engine.provider.cache.budget
    t0 = time.perf_counter()
    r1 = ev.evaluate(recipe(method, 0))
    t1 = time.perf_counter()
    r2 = ev.evaluate(recipe(method, 1))  # every density and weight changed
    t2 = time.perf_counter()
    later = []  # a search's later candidates: each with new weights and densities
    for k in range(2, 2 + STEADY):
        t = time.perf_counter()
        r = ev.evaluate(recipe(method, k))
        later.append((time.perf_counter() - t, r.merge_s, r.eval_s))
    steady = sorted(later)[len(later) // 2] if later else (t2 - t1, r2.merge_s, r2.eval_s)  # the median candidate
    return {"first_s": t1 - t0, "candidate_s": t2 - t1, "merge_s": r2.merge_s, "eval_s": r2.eval_s,
            "steady_s": steady[0], "steady_merge_s": steady[1], "steady_eval_s": steady[2],
            "later_s": [x[0] for x in later],
            "fitness": r2.fitness, "first_fitness": r1.fitness, "cache_budget_bytes": budget,
            "model_bytes": model_bytes(ev.engine), "stats_bytes": ev.engine.merger.stats.bytes}


def child_mergekit(root: Path, method: str) -> dict:
    import threading

    from lazymerge.search.bench_search import LoadedModel, mergekit_merge
    from lazymerge.search.config import load_config
    from lazymerge.search.tasks import fitness, load_tasks, score_task

    cfg = load_config(_search_cfg(root, method))
    tasks = load_tasks(cfg)
    out = root / f"mergekit_{method}"
    r = recipe(method, 1)
    r.pop("dtype")
    t0 = time.perf_counter()
    mergekit_merge(r, cfg.source_paths(), out)
    t1 = time.perf_counter()
    from transformers import AutoTokenizer

    model = LoadedModel(out, AutoTokenizer.from_pretrained(str(root / "base")), threading.RLock())
    t2 = time.perf_counter()
    scores = {t.name: score_task(model, t, cfg.runtime.batch_size) for t in tasks}
    t3 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    return {"merge_write_s": t1 - t0, "load_s": t2 - t1, "eval_s": t3 - t2, "fitness": fitness(scores, tasks),
            "total_s": t3 - t0}


def _sync():
    """Wait for the GPU's queued work (timings on CUDA end when the work is done, not when it is queued)."""
    if DEVICE != "cpu":
        import torch

        torch.cuda.synchronize()


def _time(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    _sync()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            _sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _exported(model, out: Path):
    """The merge of `model`'s recipe (a compiled engine model) exported to `out`, merged by the engine's own merger
    (on a GPU, the Triton kernels), and loaded by transformers: the plain reference model, in the engine's compute
    dtype on DEVICE (float32 on the CPU, bfloat16 on a GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lazymerge.engine.export import export

    export(model.plan, out, merger=model.engine.merger)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).to(DEVICE).eval()


def child_forward(root: Path, method: str, repeats: int) -> dict:
    import torch

    from lazymerge.engine import Engine

    rec = recipe(method)
    paths = {k: str(root / k) for k in ("base", "e1", "e2", "e3")}
    fly = Engine(paths, policy="on_the_fly", device=DEVICE).compile(rec)
    cached = Engine(paths, policy="cached", cache_bytes=8 << 30, device=DEVICE).compile(rec)
    out = root / f"export_{method}"
    plain = _exported(fly, out)
    rows = []
    with torch.inference_mode():
        for n in (1, 64, 2048):
            B, T = (1, n) if n <= 64 else (n // 512, 512)
            ids = torch.randint(4, SHAPE["vocab"], (B, T), device=DEVICE)
            mask = torch.ones_like(ids)
            pos = mask.cumsum(-1) - 1
            med = _time({"plain": lambda: plain(input_ids=ids, attention_mask=mask, logits_to_keep=1),
                         "cached": lambda: cached._forward(ids, mask, pos, last_only=True),
                         "on_the_fly": lambda: fly._forward(ids, mask, pos, last_only=True)}, repeats)
            rows.append({"tokens": n, **{f"{k}_s": v for k, v in med.items()},
                         "cached_ratio": med["cached"] / med["plain"],
                         "on_the_fly_ratio": med["on_the_fly"] / med["plain"]})
    shutil.rmtree(out, ignore_errors=True)
    return {"forward": rows}


def child_decode(root: Path, method: str, repeats: int) -> dict:
    """Greedy decode tokens/s of the cached recipe vs transformers' `generate` on the export: 32 new tokens from
    16-token prompts, batch 1 and 8; the median of `repeats` + 1 interleaved runs each (single runs of a 267M model on a
    shared CPU differ by 15% from one run to the next, whichever path runs)."""
    import torch

    from lazymerge.engine import Engine

    cached = Engine({k: str(root / k) for k in ("base", "e1", "e2", "e3")}, policy="cached",
                    cache_bytes=8 << 30, device=DEVICE).compile(recipe(method))
    out = root / f"export_{method}"
    plain = _exported(cached, out)
    decode = []
    for batch in (1, 8):
        prompts = [torch.randint(4, SHAPE["vocab"], (16,)).tolist() for _ in range(batch)]
        new = 32

        def lazy():
            outs = cached.generate(prompts, max_tokens=new)  # may stop at EOS: tokens/s counts what it made
            _sync()
            return sum(len(o.token_ids) for o in outs)

        ids = torch.tensor(prompts, device=DEVICE)

        def hf():
            g = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)
            _sync()
            return (g.shape[1] - ids.shape[1]) * batch

        lazy(), hf()
        rates: dict = {"lazy": [], "hf": []}
        for _ in range(repeats + 1):
            for name, f in (("lazy", lazy), ("hf", hf)):
                t = time.perf_counter()
                ntok = f()
                rates[name].append(ntok / (time.perf_counter() - t))
        lz, h = statistics.median(rates["lazy"]), statistics.median(rates["hf"])
        decode.append({"batch": batch, "lazy_tok_s": lz, "hf_tok_s": h, "ratio": lz / h, "runs": rates})
    shutil.rmtree(out, ignore_errors=True)
    return {"decode": decode}


CHILDREN = {"build": child_build, "score": child_score, "candidate": child_candidate, "mergekit": child_mergekit,
            "forward": child_forward, "decode": child_decode}


def run_child(part: str, root: Path, method: str = "", repeats: int = 3, timeout: float = 1800) -> dict:
    """Run one part in a fresh process; its result dict with `peak_rss_mb` (or `error`)."""
    cmd = [sys.executable, "-X", "faulthandler", "-m", "lazymerge.search.bench_scale", "--child", part,
           "--root", str(root), "--method", method, "--repeats", str(repeats)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        # the last lines of stderr: a crash's faulthandler traceback (-X faulthandler) or an exception's message
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-12:] + [f"exit {p.returncode}"]}
    res = json.loads(lines[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def table(info: dict, results: dict) -> str:
    src = info["source_bytes"]
    from lazymerge.engine import host

    # results of runs before the "host" field name the platform alone
    where = host.line(info["host"]) if "host" in info else f"{info['machine']}, {info['cpus']} CPUs, {info['date']}"
    out = [f"lazymerge scale benchmark: Llama {info['params'] / 1e6:.0f}M params (hidden {SHAPE['hidden']}, "
           f"{SHAPE['layers']} layers, vocab {SHAPE['vocab']}), bf16, base + 3 fine-tunes = {src / 2**30:.2f} GiB; "
           f"{where}, torch threads {info['threads']}"
           + (f"; forward and decode on {info['gpu']} (torch {info['torch']})" if "gpu" in info else ""), ""]
    out.append("| method | part | peak RSS GiB | limit GiB (sources + cache + 1) | within | seconds |")
    out.append("|---|---|---:|---:|---|---:|")
    for m, r in results.items():
        for part in ("score", "candidate", "mergekit"):
            x = r.get(part, {})
            if "error" in x or not x:
                err = x.get("error", "not run")
                err = "; ".join(err[-2:]) if isinstance(err, list) else err  # the message and the exit status
                out.append(f"| {m} | {part} | - | - | - | {err.replace('|', '/')} |")
                continue
            budget = x.get("cache_budget_bytes")
            lim = (src + budget + 2**30) / 2**30 if budget is not None else None
            rss = x["peak_rss_mb"] / 1024
            secs = x.get("candidate_s", x.get("total_s", x.get("seconds", 0.0)))
            out.append(f"| {m} | {part} | {rss:.2f} | {'-' if lim is None else f'{lim:.2f}'} | "
                       f"{'-' if lim is None else ('yes' if rss <= lim else 'NO')} | {secs:.1f} |")
    out += ["", f"Search candidate, evaluated on: {info.get('tasks', 'both')} (16 prompts)",
            "", f"| method | first candidate s | second candidate s (merge + eval) | later candidates s, median of "
            f"{STEADY} (merge + eval) | mergekit merge+write s | load s | eval s | mergekit total s | speedup, second "
            "| speedup, later |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in results.items():
        c, k = r.get("candidate", {}), r.get("mergekit", {})
        if "candidate_s" in c and "total_s" in k:
            st = c.get("steady_s", c["candidate_s"])
            sm, se = c.get("steady_merge_s", c["merge_s"]), c.get("steady_eval_s", c["eval_s"])
            out.append(f"| {m} | {c['first_s']:.1f} | "
                       f"{c['candidate_s']:.1f} ({c['merge_s']:.1f} + {c['eval_s']:.1f}) | "
                       f"{st:.1f} ({sm:.1f} + {se:.1f}) | "
                       f"{k['merge_write_s']:.1f} | {k['load_s']:.1f} | {k['eval_s']:.1f} | {k['total_s']:.1f} | "
                       f"{k['total_s'] / c['candidate_s']:.1f}x | {k['total_s'] / st:.1f}x |")
    out += ["", "| method | tokens | plain s | cached / plain | on the fly / plain | bandwidth floor (n+1) |",
            "|---|---:|---:|---:|---:|---:|"]
    for m, r in results.items():
        for row in r.get("forward", {}).get("forward", []):
            out.append(f"| {m} | {row['tokens']} | {row['plain_s']:.3f} | {row['cached_ratio']:.2f} | "
                       f"{row['on_the_fly_ratio']:.2f} | 4.00 |")
    out += ["", "| method | batch | cached lazy tok/s | transformers generate tok/s | ratio |",
            "|---|---:|---:|---:|---:|"]
    for m, r in results.items():
        for row in r.get("decode", {}).get("decode", []):
            out.append(f"| {m} | {row['batch']} | {row['lazy_tok_s']:.1f} | {row['hf_tok_s']:.1f} | "
                       f"{row['ratio']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    global DEVICE, TASKS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="build folder (default: a new temporary folder, deleted at the end)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--methods", nargs="+", default=["ties", "dare_ties", "della", "model_stock"])
    ap.add_argument("--parts", nargs="+", default=["score", "candidate", "mergekit", "forward", "decode"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each forward and decode timing")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument("--keep", action="store_true", help="keep the built family")
    ap.add_argument("--smoke", action="store_true", help="a tiny family instead (checks the script, measures nothing)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=os.environ.get("LAZYMERGE_BENCH_SHAPE", "280m"),
                    help="the family's shape (7b-layers: two layers of a 7B model's shapes, for a GPU)")
    ap.add_argument("--device", default=DEVICE,
                    help="where forward and decode run (cuda: the Triton kernels against transformers in bf16)")
    ap.add_argument("--tasks", choices=["both", "generate", "loglik"], default=TASKS,
                    help="a search candidate's evaluation: greedy generation (8 tokens) + exact match, answer "
                         "log-likelihood, or both (default)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ["LAZYMERGE_BENCH_SHAPE"], os.environ["LAZYMERGE_BENCH_DEVICE"] = args.shape, args.device  # children
    DEVICE = args.device
    TASKS = os.environ["LAZYMERGE_BENCH_TASKS"] = args.tasks
    if os.environ.get("LAZYMERGE_BENCH_SMOKE") != "1":  # a child of --smoke keeps the module's tiny shape
        SHAPE.clear()
        SHAPE.update(SHAPES[args.shape])
    if args.smoke:
        os.environ["LAZYMERGE_BENCH_SMOKE"] = "1"
        SHAPE.update(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=1000)
    if args.child:
        root = Path(args.root)
        kw = {"method": args.method} if args.child != "build" else {}
        if args.child in ("forward", "decode"):
            kw["repeats"] = args.repeats
        res = CHILDREN[args.child](root, **kw)
        res["peak_rss_mb"] = _rss_mb()
        if DEVICE != "cpu":
            import torch

            res["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(res))
        return 0

    from lazymerge.engine.threads import default_threads

    if DEVICE != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {DEVICE}: CUDA is not available on this machine")
        if set(args.parts) - {"forward", "decode"}:
            raise SystemExit("error: on a GPU only the forward and decode parts run (--parts forward decode); the "
                             "others measure the CPU's peak RSS and mergekit's CPU merge")
    made = args.root is None
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="lazymerge-scale-"))
    results: dict = {}
    try:
        marker = root / "built.json"
        if not marker.exists():
            b = run_child("build", root, timeout=args.timeout)
            if "error" in b:
                raise SystemExit(f"error: building the family failed: {b['error']}")
            marker.write_text(json.dumps(b))
        built = json.loads(marker.read_text())
        for m in args.methods:
            results[m] = {}
            for part in args.parts:
                print(f"[bench_scale] {m}: {part}", file=sys.stderr, flush=True)
                results[m][part] = run_child(part, root, m, args.repeats, args.timeout)
                print(json.dumps({"method": m, "part": part, **results[m][part]}), file=sys.stderr, flush=True)
    finally:
        if made and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    from lazymerge.engine import host

    info = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "host": host.describe(),
            "threads": default_threads(), "params": built["params"], "source_bytes": built["source_bytes"],
            "shape": SHAPE, "device": DEVICE, "tasks": TASKS}
    if DEVICE != "cpu":
        import torch

        info.update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    print(table(info, results))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
