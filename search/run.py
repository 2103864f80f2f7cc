"""The search loop: CMA-ES (the `cma` package) over a space's genomes, candidates evaluated by a worker pool.

`run_search(config, out_dir)` -> `SearchResult`. The run directory holds the run's records only:

    best.yaml        the best recipe so far (mergekit-compatible YAML), rewritten on each improvement
    history.jsonl    one line per evaluated candidate: eval, generation, index, fitness, scores, genome, recipe, timings

Recipes on disk (best.yaml, history.jsonl) name every source by its absolute folder, not by its config key, so they
run from any working directory (`lazymerge merge best.yaml OUT`, `mergekit-yaml best.yaml OUT`); a layer path
that mergekit cannot run says so in a comment. `SearchResult.best_recipe` is the same self-contained recipe.
    optimizer.pkl    the optimizer's checkpoint (CMA-ES state + numpy RNG state), rewritten after each generation
    (at the end)     summary.json, fitness.png, and params.png (PS) or path.png (DFS)

Nothing is written per candidate but its history line: candidate weights exist only inside the engine.

Defaults follow the paper: genomes in [0, 1] coordinates, x0 = 0.5, sigma0 = 1/6, population 4 + floor(3 ln n) (the
library's default), bounds by the library's own boundary handler (`bounds: [0, 1]`); the genome recorded is the one
`ask()` returned, i.e. the one evaluated. The budget is rounded up to whole generations.

Resume: running again with the same config and run directory loads the checkpoint (the state before the generation
in progress), asks the same population again, reuses the recorded fitness of candidates already in history.jsonl and
evaluates the others: with the same seed the records equal those of an uninterrupted run (timings aside).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import SearchConfig, SearchConfigError, load_config
from .spaces import build_space

CHECKPOINT = "optimizer.pkl"
HISTORY = "history.jsonl"
BEST = "best.yaml"


@dataclass
class SearchResult:
    out_dir: Path
    best_recipe: dict
    best_fitness: float
    best_scores: dict[str, float]
    best_genome: list[float]
    evaluations: int
    generations: int
    history: list[dict] = field(repr=False)
    summary: list[dict] | None = field(default=None, repr=False)  # rows: model, split, task scores


def source_layers(cfg: SearchConfig) -> tuple[dict[str, int], dict | None]:
    """Layer counts of every model the space names (reads headers and configs only) and the ps+dfs recipe."""
    from lazymerge.engine import SourceSet, compile_plan, load_recipe

    S = SourceSet.open(cfg.source_paths())
    layers = {n: S[n].num_layers for n in S.sources}
    ps = None
    if cfg.space.kind == "ps+dfs":
        r = cfg.space.ps_recipe
        ps = load_recipe(cfg.path(r) if isinstance(r, str) else r).to_dict()
        layers["ps"] = compile_plan(ps, S).num_layers
    return layers, ps


def make_space(cfg: SearchConfig):
    layers, ps = source_layers(cfg)
    return build_space(cfg.space, cfg.base_model, layers, ps)


def cma_options(cfg: SearchConfig, dim: int) -> dict:
    opts = {"bounds": [0.0, 1.0], "seed": cfg.budget.seed % (2**31 - 2) + 1,  # cma: seed 0 means "from the clock"
            "verbose": -9, "verb_log": 0, "verb_disp": 0, "maxiter": math.inf, "maxfevals": math.inf}
    if cfg.cma.popsize is not None:
        opts["popsize"] = cfg.cma.popsize
    opts.update(cfg.cma.options)
    return opts


_NUMPY_RANDOM = threading.Lock()


class _OwnRandom:
    """numpy's global RNG, which cma seeds and samples from, as one search's own stream: `with rng:` holds a lock,
    puts the search's state in (None: leaves it, e.g. for cma's constructor, which seeds it) and takes it back out at
    the end. Searches run in threads of one process (`run_search(pool=...)`) then draw exactly what each would draw
    alone."""

    def __init__(self, state=None):
        self.state = state

    def __enter__(self):
        _NUMPY_RANDOM.acquire()
        if self.state is not None:
            np.random.set_state(self.state)
        return self

    def __exit__(self, *exc):
        self.state = np.random.get_state()
        _NUMPY_RANDOM.release()
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read_history(path: Path) -> list[dict]:
    """Complete lines of history.jsonl; a line cut by a kill is dropped (and truncated from the file)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode().splitlines() if line.strip()]


def self_contained(recipe: dict, cfg: SearchConfig) -> dict:
    """`recipe` (naming sources by their config keys) with every source named by its absolute folder, so that the
    file runs from any working directory with `lazymerge merge` and with mergekit (engine/refs.py)."""
    from lazymerge.engine.refs import rename_models

    paths = {k: str(Path(v).resolve()) for k, v in cfg.source_paths().items()}
    return rename_models(recipe, paths)


def recipe_text(recipe: dict, head: str = "") -> str:
    """YAML of a self-contained recipe, with `head` (comment lines) and the note for recipes mergekit cannot run."""
    from lazymerge.engine import load_recipe
    from lazymerge.engine.refs import mergekit_note

    note = mergekit_note(recipe)
    return head + (note + "\n" if note else "") + load_recipe(recipe).to_yaml()


def _write_best(path: Path, rec: dict) -> None:
    head = (f"# lazymerge search: fitness {rec['fitness']:.6g} (evaluation {rec['eval']}, "
            f"generation {rec['generation']})\n")
    _atomic_write(path, recipe_text(rec["recipe"], head).encode())


def run_search(config, out_dir, workers: int | None = None, quiet: bool = False, summary: bool = True,
               plots: bool = True, pool=None,
               on_evaluated: Callable[[int, int], None] | None = None) -> SearchResult:
    """Run (or resume) the search of `config` (a path, YAML text, dict or SearchConfig) in `out_dir`.

    `pool`: a `search.evaluate.SharedPool` that evaluates the candidates (several searches, each in a thread of this
    process, may share it; the same records as alone), instead of a pool of its own with `workers` workers.
    `on_evaluated(done, total)`: called after each candidate (done of total, whole generations)."""
    import cma

    from lazymerge.engine import SourceSet, compile_plan

    from .evaluate import make_pool
    from .report import Progress
    from .tasks import load_tasks

    cfg = load_config(config)
    for split in ("data", "test_data"):  # dataset errors fail now, before anything is written
        load_tasks(cfg, split)
    space = make_space(cfg)
    x0 = [cfg.cma.x0] * space.dim
    compile_plan(space.to_recipe(np.asarray(x0)), SourceSet.open(cfg.source_paths()))  # recipe errors fail now
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = cma_options(cfg, space.dim)
    ck, hist_path = out / CHECKPOINT, out / HISTORY

    if ck.exists():
        with open(ck, "rb") as f:
            state = pickle.load(f)
        if state["digest"] != cfg.digest():
            raise SearchConfigError(f"out: {out} holds a run of a different config; use another run directory")
        es, gen = state["es"], state["generation"]
        rng = _OwnRandom(state["np_random"])
        history = _read_history(hist_path)
    else:
        with _OwnRandom() as rng:
            es = cma.CMAEvolutionStrategy(x0, cfg.cma.sigma0, opts)
        gen = 0
        history = []
        hist_path.write_bytes(b"")
        _atomic_write(ck, pickle.dumps({"es": es, "generation": 0, "np_random": rng.state,
                                        "digest": cfg.digest()}))
    popsize = es.popsize
    max_gens = cfg.budget.generations or math.ceil(cfg.budget.evaluations / popsize)
    if cfg.budget.generations and cfg.budget.evaluations:
        max_gens = min(max_gens, math.ceil(cfg.budget.evaluations / popsize))
    if cfg.budget.evaluations and max_gens * popsize != cfg.budget.evaluations and not quiet and gen == 0:
        print(f"budget: {cfg.budget.evaluations} evaluations -> {max_gens} whole generations of {popsize} = "
              f"{max_gens * popsize} candidates (CMA-ES ranks whole generations)", flush=True)
    done = {(h["generation"], h["index"]): h for h in history}
    best = max(history, key=lambda h: h["fitness"], default=None)  # first of equals: max keeps the first
    progress = Progress(max_gens * popsize, max_gens, quiet=quiet)
    progress.update(gen, history)

    evaluator = (make_pool(cfg, workers) if pool is None else pool.bind(cfg)) if gen < max_gens else None
    try:
        with open(hist_path, "a", encoding="utf-8") as hf:
            while gen < max_gens:
                with rng:
                    X = es.ask()
                recipes = [space.to_recipe(x) for x in X]
                fits: list[float | None] = [None] * len(X)
                todo = []
                for k, x in enumerate(X):
                    h = done.get((gen, k))
                    if h is not None:
                        if not np.allclose(h["genome"], x, rtol=0, atol=1e-12):
                            raise SearchConfigError(f"{hist_path}: recorded candidate {gen}/{k} differs from the "
                                                    "checkpoint's; the run directory is inconsistent")
                        fits[k] = h["fitness"]
                    else:
                        todo.append(k)
                for k, res in zip(todo, evaluator.map([recipes[k] for k in todo])):
                    rec = {"eval": gen * popsize + k, "generation": gen, "index": k, "fitness": res.fitness,
                           "scores": res.scores, "genome": [float(v) for v in X[k]],
                           "recipe": self_contained(recipes[k], cfg),
                           "wall_s": round(res.merge_s + res.eval_s, 4), "merge_s": round(res.merge_s, 4),
                           "eval_s": round(res.eval_s, 4), "time": time.time()}
                    hf.write(json.dumps(rec) + "\n")
                    hf.flush()
                    history.append(rec)
                    done[(gen, k)] = rec
                    fits[k] = res.fitness
                    if best is None or rec["fitness"] > best["fitness"] or (
                            rec["fitness"] == best["fitness"] and rec["eval"] < best["eval"]):
                        best = rec
                        _write_best(out / BEST, best)
                    progress.update(gen, history)
                    if on_evaluated is not None:
                        on_evaluated(len(history), max_gens * popsize)
                with rng:
                    es.tell(X, [-f for f in fits])  # cma minimizes
                gen += 1
                _atomic_write(ck, pickle.dumps({"es": es, "generation": gen, "np_random": rng.state,
                                                "digest": cfg.digest()}))
                progress.update(gen, history)
    finally:
        if evaluator is not None:
            evaluator.close()
    progress.close()
    history.sort(key=lambda h: h["eval"])
    best = max(history, key=lambda h: h["fitness"])  # first of equals, in evaluation order
    _write_best(out / BEST, best)  # also repairs a best.yaml a kill left one improvement behind
    result = SearchResult(out, best["recipe"], best["fitness"], best["scores"], best["genome"], len(history), gen,
                          history)
    if plots:
        from .report import write_plots

        write_plots(space, history, out)
    if summary:
        from .report import summarize

        result.summary = summarize(cfg, best["recipe"], out, quiet=quiet)
    return result
