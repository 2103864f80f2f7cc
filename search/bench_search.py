"""Benchmark: candidate evaluations per minute of the search, lazy engine vs materialize-then-load.

    python -m lazymerge.search.bench_search [--json out.json] [--hidden 512 --layers 8] [--candidates 8]

Both paths evaluate the same candidates (recipes of the same PS space, DARE-TIES over two experts, the paper's
setting) on the same dataset with the same task code (greedy generation + exact match):

* lazy: `Evaluator.evaluate(recipe)`: compile, merge every weight once into the engine's cache, evaluate.
* materialize-then-load (mergekit-evolve's way): write the candidate's merged checkpoint with `engine.export` (the
  same fast merger, whose TIES / DARE statistics are cached too, so the baseline is a conservative one), load it with
  transformers' `AutoModelForCausalLM.from_pretrained`, evaluate through the same generation code, delete it.

The model is built with `engine.toy.make_family` (tens of millions of parameters at the defaults). Prints a table and
writes JSON with the machine and date. A benchmark is a script, not a timed test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class _NoSources:
    """The part of `Engine` that LazyModel's methods use, for a model with its weights already in memory."""

    def __init__(self, lock):
        self.lock = lock

    def check_sources(self, names) -> None:  # nothing read lazily: nothing can change under it
        pass

    def invalidate(self) -> None:
        pass


class LoadedModel:
    """A transformers model loaded from disk behind the interface the tasks use (LazyModel's own methods)."""

    def __init__(self, path: Path, tokenizer, threads_lock):
        from transformers import AutoModelForCausalLM

        from lazymerge.engine.api import LazyModel

        self.module = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.tokenizer, self.device = tokenizer, torch.device("cpu")
        self.engine = _NoSources(threads_lock)
        self.source_names: list[str] = []
        self.vocab_rows = self.module.get_input_embeddings().num_embeddings
        self.plan = type("Plan", (), {"tokenizer_source": str(path)})()  # named by check_ids' message
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = {tokenizer.eos_token_id}
        import inspect

        params = inspect.signature(self.module.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        for name in ("_forward", "logits", "session", "check_ids", "encode", "_params", "generate", "loglikelihood"):
            setattr(self, name, getattr(LazyModel, name).__get__(self))


def build(root: Path, hidden: int, layers: int, prompts: int, max_tokens: int) -> dict:
    import random

    from lazymerge.engine import Engine
    from lazymerge.engine.toy import WORDS, make_family

    fam = make_family(root, "mistral", 2, seed=0, hidden=hidden, layers=layers, intermediate=3 * hidden,
                      heads=8, kv_heads=4)
    paths = {k: str(v) for k, v in fam.items()}
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(prompts)]
    target = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "e1", "parameters": {"weight": 0.5}},
                         {"model": "e2", "parameters": {"weight": 1.0}}]}
    outs = Engine(paths).compile(target).generate(texts, max_tokens=max_tokens)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": o.text}) + "\n" for p, o in zip(texts, outs)))
    return {"sources": paths, "base_model": "base",
            "space": {"kind": "ps", "method": "dare_ties", "models": ["e1", "e2"]},
            "tasks": [{"name": "em", "type": "generate_exact_match", "data": str(data), "extract": "exact",
                       "max_tokens": max_tokens}],
            "budget": {"evaluations": 1}}


def _mean(rows: list[dict], k: str) -> float:
    return float(np.mean([x[k] for x in rows]))


def mergekit_merge(recipe: dict, paths: dict[str, str], out: Path) -> None:
    """Materialize a candidate with mergekit itself (mergekit-evolve's way), the recipe's names mapped to folders."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    r = json.loads(json.dumps(recipe))
    r.pop("random_seed", None)
    text = yaml.safe_dump(r)
    for name, path in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f"model: {name}\n", f"model: {path}\n").replace(f"base_model: {name}\n",
                                                                          f"base_model: {path}\n")
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text + "dtype: float32\n"))
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=False, quiet=True))


def bench(cfg_dict: dict, method: str, n_lazy: int, n_base: int, threads: int | None = None, seed: int = 0,
          cpu_fused: bool | None = None) -> dict:
    """Per-candidate timings of the lazy path and of two materialize-then-load baselines: `fresh` merges each
    candidate from scratch (a standalone merge per candidate, as mergekit-evolve does), `shared` reuses this engine's
    merge statistics (TIES magnitude orders), leaving only the write and the load as the difference."""
    import threading

    from lazymerge.engine.export import export

    from .config import load_config
    from .evaluate import Evaluator, make_engine, model_bytes
    from .run import make_space
    from .tasks import fitness, load_tasks, score_task

    cfg_dict = {**cfg_dict, "space": {**cfg_dict["space"], "method": method},
                "runtime": {k: v for k, v in (("threads", threads), ("cpu_fused", cpu_fused)) if v is not None}}
    cfg = load_config(cfg_dict)
    space = make_space(cfg)
    xs = np.random.default_rng(seed).uniform(0.2, 0.8, size=(max(n_lazy, n_base) + 1, space.dim))
    recipes = [space.to_recipe(x) for x in xs]
    tasks = load_tasks(cfg)
    ev = Evaluator(make_engine(cfg), tasks, cfg.runtime.batch_size)
    size = model_bytes(ev.engine)
    ev.evaluate(recipes[-1])  # warm-up: lazy imports, tokenizer, the per-(source, tensor) statistics
    lazy = []
    for r in recipes[:n_lazy]:
        res = ev.evaluate(r)
        lazy.append({"merge_s": res.merge_s, "eval_s": res.eval_s, "fitness": res.fitness})

    lock = threading.RLock()
    tok = ev.engine.tokenizer("base")
    tmp = Path(tempfile.mkdtemp(prefix="lazymerge-bench-"))
    base: dict[str, list[dict]] = {"fresh": [], "shared": []}
    try:
        import mergekit  # noqa: F401

        base["mergekit"] = []
    except ImportError:
        pass
    try:
        for kind, rows in base.items():
            for i, r in enumerate(recipes[:n_base]):
                d = tmp / f"{kind}{i}"
                t0 = time.perf_counter()
                if kind == "shared":
                    ev.engine.merger.specs.clear()  # keep the statistics, not this candidate's scalars
                if kind == "mergekit":
                    mergekit_merge(r, cfg.source_paths(), d)
                else:
                    export(ev.engine.plan(r), d, merger=ev.engine.merger if kind == "shared" else None)
                t1 = time.perf_counter()
                model = LoadedModel(d, tok, lock)
                t2 = time.perf_counter()
                scores = {t.name: score_task(model, t, cfg.runtime.batch_size) for t in tasks}
                t3 = time.perf_counter()
                del model
                shutil.rmtree(d)
                rows.append({"merge_write_s": t1 - t0, "load_s": t2 - t1, "eval_s": t3 - t2,
                             "fitness": fitness(scores, tasks)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for kind, rows in base.items():  # same candidates, same task code: same fitness
        if kind == "mergekit" and method in ("dare_ties", "dare_linear", "della", "della_linear"):
            continue  # mergekit draws its own random masks
        for a, b in zip(lazy, rows):
            assert abs(a["fitness"] - b["fitness"]) < 1e-9, (a, b)

    lazy_s = _mean(lazy, "merge_s") + _mean(lazy, "eval_s")
    out = {"method": method, "params": size // 4, "model_bytes": size, "examples": len(tasks[0].examples),
           "threads": torch.get_num_threads(),
           "lazy": {"candidates": n_lazy, "merge_s": _mean(lazy, "merge_s"), "eval_s": _mean(lazy, "eval_s"),
                    "per_candidate_s": lazy_s, "per_minute": 60 / lazy_s}}
    for kind, rows in base.items():
        s = _mean(rows, "merge_write_s") + _mean(rows, "load_s") + _mean(rows, "eval_s")
        out[f"materialize_{kind}"] = {"candidates": n_base, "merge_write_s": _mean(rows, "merge_write_s"),
                                      "load_s": _mean(rows, "load_s"), "eval_s": _mean(rows, "eval_s"),
                                      "per_candidate_s": s, "per_minute": 60 / s, "speedup": s / lazy_s}
    return out


PATHS = (("lazy", "lazy (this engine)"), ("materialize_mergekit", "mergekit merge, write, load"),
         ("materialize_fresh", "materialize-then-load"), ("materialize_shared", "materialize, shared stats"))


def table(rows: list[dict]) -> str:
    head = ["method", "examples", "path", "merge(+write) s", "load s", "eval s", "s/candidate", "candidates/min",
            "lazy speedup"]
    body = []
    for r in rows:
        for key, label in PATHS:
            if key not in r:
                continue
            x = r[key]
            merge = x.get("merge_s", x.get("merge_write_s"))
            body.append([r["method"], str(r["examples"]), label, f"{merge:.3f}",
                         f"{x['load_s']:.3f}" if "load_s" in x else "-", f"{x['eval_s']:.3f}",
                         f"{x['per_candidate_s']:.3f}", f"{x['per_minute']:.1f}",
                         f"{x['speedup']:.1f}x" if "speedup" in x else "-"])
    w = [max(len(c[i]) for c in [head] + body) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(v.ljust(w[i]) if i < 3 else v.rjust(w[i]) for i, v in enumerate(c)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [line(c) for c in body])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--examples", type=int, nargs="+", default=[64], help="dataset sizes to run")
    ap.add_argument("--methods", nargs="+", default=["dare_ties", "ties"], help="merge methods of the PS space")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=5, help="lazy candidates per size and method")
    ap.add_argument("--baseline-candidates", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's default, the CPUs "
                    "this process may use)")
    ap.add_argument("--root", help="where to build the models (default: a temporary folder)")
    ap.add_argument("--eager", action="store_true", help="lazy path with the eager reference merge (not the default "
                    "fused CPU one)")
    args = ap.parse_args(argv)
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="lazymerge-bench-models-"))
    rows = []
    try:
        for n in args.examples:
            cfg = build(root / f"n{n}", args.hidden, args.layers, n, args.max_tokens)
            for m in args.methods:
                rows.append(bench(cfg, m, args.candidates, args.baseline_candidates, args.threads,
                                  cpu_fused=False if args.eager else None))
            shutil.rmtree(root / f"n{n}", ignore_errors=True)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    from lazymerge.engine import host

    info = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
            "cpu": host.cpu_model(), "cpu_count": os.cpu_count(), "host": host.describe(),
            "torch": torch.__version__, "device": "cpu", "hidden": args.hidden, "layers": args.layers,
            "max_tokens": args.max_tokens, "space": "ps, 2 experts (weight, density each: 4 genes)"}
    print(f"lazymerge search benchmark: {rows[0]['params'] / 1e6:.1f}M-parameter Mistral-style model "
          f"(hidden {args.hidden}, {args.layers} layers), {info['space']}, greedy {args.max_tokens} tokens, "
          f"torch threads {rows[0]['threads']}, {info['machine']}, {info['date']}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
