"""The paper's experiment in miniature: zoo -> evolved merge vs sources, baselines and a control, on held-out data.

`run_experiment(zoo_dir, out_dir, ...)` (one zoo seed):
1. searches (CMA-ES, `lazymerge.search.run_search`) a parameter-space TIES merge (a weight and a density per source,
   per layer group, with separate genes for the embeddings and the LM head) of the foreign and the math experts over
   the base, on the intersection task's search split (the paper's PS searched TIES/DARE weights and densities too;
   on zoo v4 seed 0 a task-arithmetic search reached 21.8% held-out, below TIES at its default settings, 22.8%, while
   the TIES search reached 31.7%);
2. runs the *control*: the same search over the math expert's weights alone (no foreign expert) — the confound the
   feasibility prototype found (rescaling the math expert's layers alone already beats the raw math expert);
3. runs the paper's data-flow searches (DFS, `spaces`): a layer path through the foreign expert (model A: embeddings,
   head, first and last layer) and the math expert (B), their M layers laid out and repeated r = 3 times, an
   indicator per slot and the M x M scaling matrix W on the hidden state entering each hop; the same with W fixed to
   1 (the paper's ablation); and PS+DFS, a path whose model A is the evolved PS merge;
   and (`ps_weighted`) the PS search again with each expert's own task weighted into the fitness (the off-target
   trade-off: the paper reports JP-LMEH beside MGSM-JA);
4. chooses each search's reported candidate on a *validation* split of the target task (`target_validation_split`:
   fresh problems, disjoint from the search and test splits): the `TOP_K` best candidates by search-split fitness are
   scored on it and the best there is reported (a search's single best is partly the luck of its 400 problems:
   best search fitness 22-26% against 17-23% held out on zoo v5). The row of kind `evolved` repeats the evolved
   model with the best validation score (chosen without looking at the held-out split). The control search's
   candidate is chosen the same way; the expert-weighted search keeps its own best (its fitness is not the target's);
5. scores every source, the untuned baselines (plain average, TIES and DARE-TIES at default settings), the control
   and each evolved model on the held-out test split of the intersection task and on each expert's own task;
6. returns the table as {"target_task", "rows": [{"model", "kind", "scores": {task: accuracy %}}]} and writes it
   with plots under `out_dir`. Nothing but run records is written: every model is evaluated lazily.

Row kinds: source, baseline, control, evolved_ps, evolved_dfs, evolved_dfs_w1, evolved_ps_dfs, evolved_ps_weighted,
evolved.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TARGET = "target"
TASK_FILES = {TARGET: ("target_search.jsonl", "target_test.jsonl"), "foreign": (None, "foreign_test.jsonl"),
              "math": (None, "math_test.jsonl")}
MAX_TOKENS = 8


def baselines() -> dict[str, dict]:
    """The untuned merges people try first (mergekit's usual defaults)."""
    two = lambda p: [{"model": "foreign", "parameters": dict(p)}, {"model": "math", "parameters": dict(p)}]  # noqa: E731
    return {
        "average": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}}
                                                         for m in ("base", "foreign", "math")]},
        "ties": {"merge_method": "ties", "base_model": "base", "models": two({"weight": 1.0, "density": 0.5})},
        "dare_ties": {"merge_method": "dare_ties", "base_model": "base",
                      "models": two({"weight": 1.0, "density": 0.5})},
    }


# Separate genes for the embeddings and the LM head: the foreign expert's knowledge of the foreign words sits in
# their embedding rows, which the math expert never touched (the zoo's experiments weighted them very differently
# from the layers). One gene each for all layer groups: the tensors live outside the layers.
FILTERS = ("embed_tokens", "lm_head")


MAX_WORKERS = 4


def search_runtime(workers: int | None = None) -> dict:
    """How the demo's searches run: `workers` worker processes (default: one per CPU this process may use, at most
    MAX_WORKERS), the CPUs shared among them (one torch thread each by default), every search-split prompt in one
    batch. Runtime settings do not enter a run's identity (`SearchConfig.digest`); on zoo v5 seed 0 this layout
    recorded the same fitness and genomes, bit for bit, as one 2-thread process with batches of 128 (36 candidates
    of the PS search)."""
    from lazymerge.engine.threads import available_cpus, per_worker

    workers = workers or max(1, min(MAX_WORKERS, available_cpus()))
    return {"workers": workers, "threads": per_worker(workers), "batch_size": 400}


def search_config(zoo: Path, models: list[str], evaluations: int, seed: int, layer_groups: int,
                  method: str = "ties", runtime: dict | None = None, filters=FILTERS,
                  space: dict | None = None) -> dict:
    """A search over the zoo on the target's search split: the PS space by default, or `space` as given; `runtime`
    defaults to `search_runtime()`."""
    return {
        "sources": {m: str(zoo / m) for m in ("base", "foreign", "math")},
        "base_model": "base",
        "space": space or {"kind": "ps", "method": method, "models": models, "layer_groups": layer_groups,
                           "shared_filters": list(filters), "weight_range": [0.0, 2.0]},
        "tasks": [{"name": TARGET, "type": "generate_exact_match", "data": str(zoo / "data" / TASK_FILES[TARGET][0]),
                   "test_data": str(zoo / "data" / TASK_FILES[TARGET][1]), "max_tokens": MAX_TOKENS}],
        "budget": {"evaluations": evaluations, "seed": seed},
        "runtime": search_runtime() if runtime is None else runtime,
    }


# The paper's DFS: model A (here the foreign expert, which reads the prompt's language) gives embeddings, head, first
# and last layer; A's and B's layers laid out in sequence and repeated r = 3 times; W scales the hidden state.
SPACES = ("ps", "dfs", "dfs_w1", "ps_dfs", "ps_weighted")
DFS_SPACES = {"dfs": {"kind": "dfs", "models": ["foreign", "math"], "repeats": 3, "scales": "matrix"},
              "dfs_w1": {"kind": "dfs", "models": ["foreign", "math"], "repeats": 3, "scales": "ones"},
              "ps_dfs": {"kind": "ps+dfs", "models": ["math"], "repeats": 3, "scales": "matrix"}}
ROW_NAMES = {"ps": "evolved merge (PS)", "dfs": "evolved path (DFS)", "dfs_w1": "evolved path, W = 1 (DFS)",
             "ps_dfs": "evolved PS+DFS", "ps_weighted": "evolved merge (PS), experts' tasks weighted in"}
# The off-target trade-off (the paper reports JP-LMEH beside MGSM-JA): a PS search whose fitness adds each expert's
# own task, weight EXPERT_WEIGHT each, on search splits drawn fresh from the experts' task generators
# (`expert_search_splits`: disjoint from the held-out test files). Not a candidate for the `evolved` row: its fitness
# is on another scale, and the claim is about the target.
EXPERT_WEIGHT = 0.5
EXPERT_SEARCH_N = 100


def expert_search_splits(zoo: Path, seed: int, out: Path, n: int = EXPERT_SEARCH_N) -> dict[str, Path]:
    """Search splits for the experts' own tasks, written under `out` (the zoo is left as built): `n` foreign
    lookup questions and `n` English word problems from the zoo's generators (demo/corpus.py) with seed-derived
    randomness, none of them a prompt of the held-out test files (nor, for word problems, the English of a target
    problem). Returns {task name: JSONL path}."""
    import random

    from lazymerge.demo import corpus

    world = corpus.World(seed)
    rng = random.Random(f"expert-search-{seed}")
    prompts = lambda f: {json.loads(x)["prompt"] for x in (zoo / "data" / f).read_text().splitlines() if x}  # noqa: E731
    foreign_test = prompts(TASK_FILES["foreign"][1])
    lookups = corpus.unique_examples(corpus.lookup_qa, rng, 4 * n)
    foreign = [(q, a) for q, a in ((world.translate(p), a) for p, a in lookups) if q not in foreign_test][:n]
    targets = prompts(TASK_FILES[TARGET][0]) | prompts(TASK_FILES[TARGET][1])
    math = [(p, a) for p, a in corpus.unique_examples(corpus.word_problem, rng, 4 * n, prompts(TASK_FILES["math"][1]))
            if world.translate(p) not in targets][:n]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("foreign", foreign), ("math", math)):
        paths[name] = out / f"{name}_search.jsonl"
        paths[name].write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return paths


# Choosing the reported candidate: the TOP_K best candidates of a search by search-split fitness, scored on a
# validation split of VALID_N fresh target problems.
TOP_K = 5
VALID_N = 400


def target_validation_split(zoo: Path, seed: int, out: Path, n: int = VALID_N) -> Path:
    """A validation split of the target task, written to `out`/target_valid.jsonl (the zoo is left as built): `n`
    English word problems from the zoo's generator (demo/corpus.py, seed-derived randomness) put into the zoo's
    foreign language, none of them a prompt of the target's search or test split. (The math expert may have trained
    on a few of these problems' English forms: only the target's own splits are kept out of its training text.)
    Returns the file's path."""
    import random

    from lazymerge.demo import corpus

    world = corpus.World(seed)
    rng = random.Random(f"target-valid-{seed}")
    taken = {json.loads(x)["prompt"] for f in TASK_FILES[TARGET]
             for x in (zoo / "data" / f).read_text().splitlines() if x}
    rows = []
    for p, a in corpus.unique_examples(corpus.word_problem, rng, 4 * n):
        q = world.translate(p)
        if q not in taken:
            rows.append((q, a))
            if len(rows) == n:
                break
    out.mkdir(parents=True, exist_ok=True)
    path = out / "target_valid.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


def top_candidates(history: list[dict], k: int = TOP_K) -> list[dict]:
    """The `k` best distinct recipes of a search's history by search-split fitness (first of equals: the earlier
    evaluation), as history records."""
    seen, out = set(), []
    for h in sorted(history, key=lambda h: (-h["fitness"], h["eval"])):
        key = json.dumps(h["recipe"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(h)
            if len(out) == k:
                break
    return out


def choose_on_validation(history: list[dict], score, k: int = TOP_K) -> tuple[dict, list[dict]]:
    """The record among `top_candidates(history, k)` with the best `score(recipe)` (the validation accuracy, 0-1;
    first of equals: the better search fitness), and every candidate's {"eval", "search", "validation"} in %."""
    cands = top_candidates(history, k)
    scored = [(score(h["recipe"]), h) for h in cands]
    best = max(scored, key=lambda t: t[0])[1]  # max keeps the first of equals: candidates are in fitness order
    return best, [{"eval": h["eval"], "search": round(100 * h["fitness"], 1), "validation": round(100 * v, 1)}
                  for v, h in scored]


def _key(recipe: dict) -> str:
    return json.dumps(recipe, sort_keys=True)


def scorer(pool, zoo: Path, seed: int, runtime: dict, tasks: list[dict]):
    """A function of a list of recipes -> {recipe's JSON (`_key`): {task: score 0-1}}, each distinct recipe scored
    once on `tasks` ({"name", "data"}: generation, exact match, MAX_TOKENS) by the shared pool's workers. The config
    is a DFS search's, for its merged-weight cache (room for a path's repeated layers); its space is not used."""
    from lazymerge.search.config import load_config

    cfg = search_config(zoo, [], 1, seed, 2, runtime=runtime, space=dict(DFS_SPACES["dfs"]))
    cfg["tasks"] = [{"type": "generate_exact_match", "max_tokens": MAX_TOKENS, **t} for t in tasks]
    bound = pool.bind(load_config(cfg))

    def scores(recipes: list[dict]) -> dict[str, dict[str, float]]:
        todo = list({_key(r): r for r in recipes}.values())
        return {_key(r): res.scores for r, res in zip(todo, bound.map(todo))}

    return scores


# The searches run at once, in LANES (threads of this process, each running its searches in order) sharing one pool
# of worker processes (`search.evaluate.SharedPool`): while one search waits for the last candidates of a
# generation, another's keep the workers busy, and the workers start once for all of them. PS+DFS needs the PS
# search's best merge, so it follows PS in its lane. Each search records what it records alone (its own numpy
# random stream: `search.run._OwnRandom`); on zoo v5 seed 0 the six histories equal those of one search at a time
# (session 15).
LANES = (("ps", "ps_dfs"), ("control", "dfs_w1"), ("ps_weighted", "dfs"))


def run_searches(configs: dict, out: Path, runtime: dict, quiet: bool = False, say=None, stream=None,
                 pool=None) -> dict:
    """Run the searches of `configs` ({key: search config dict, or a function of the finished searches returning
    one}) in LANES at once on `pool` (a SharedPool; None: one of `runtime`'s workers for these searches alone); run
    directories out/search_<key>. One progress bar (or a line every 20 s) for all of them on `stream` (default
    stderr) unless `quiet`; `say` gets a line as each search starts and ends. Returns {key: SearchResult}. The first
    search error (or an interrupt) stops every lane at once (no new search, the pool's queued candidates cancelled and
    `pool` closed) and is raised."""
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from lazymerge.search import run_search
    from lazymerge.search.evaluate import SharedPool

    from .progress import StepProgress

    say = say or (lambda *a: None)
    done: dict = {}
    lanes = [[k for k in lane if k in configs] for lane in LANES]
    lanes = [lane for lane in lanes if lane] + [[k] for k in configs if not any(k in lane for lane in LANES)]
    counts: dict[str, tuple[int, int]] = {}
    lock = threading.Lock()

    def budget(key: str) -> int:
        cfg = configs[key]
        # a config made later (PS+DFS) has PS's budget
        return cfg["budget"]["evaluations"] if isinstance(cfg, dict) else configs["ps"]["budget"]["evaluations"]

    progress = None if quiet else StepProgress(f"searches ({len(configs)}, {len(lanes)} at a time)",
                                               sum(budget(k) for k in configs), stream=stream, unit="candidate")

    def evaluated(key: str, n: int, total: int) -> None:
        with lock:
            counts[key] = (n, total)
            if progress is not None:  # searches not started yet count their budget (whole generations when started)
                planned = sum(counts[k][1] if k in counts else budget(k) for k in configs)
                progress.update(sum(c[0] for c in counts.values()), total=planned)

    stop = threading.Event()

    def lane(keys: list[str]) -> None:
        for key in keys:
            if stop.is_set():
                return
            cfg = configs[key] if isinstance(configs[key], dict) else configs[key](done)
            t = time.time()
            say(f"search {key}: {cfg['space']['kind']} space, {cfg['budget']['evaluations']} evaluations ...")
            done[key] = run_search(cfg, out / f"search_{key}", quiet=True, summary=False, pool=pool,
                                   on_evaluated=lambda n, total, key=key: evaluated(key, n, total))
            say(f"search {key}: best search-split fitness {done[key].best_fitness:.3f} ({time.time() - t:.0f} s)")

    own = pool is None
    pool = SharedPool(runtime["workers"], runtime.get("threads")) if own else pool
    ex = ThreadPoolExecutor(len(lanes))
    try:
        futures = [ex.submit(lane, keys) for keys in lanes]
        first = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in first.done and f.exception() is not None]
        if failed:
            raise failed[0].exception()
    except BaseException:
        # a search failed (or Ctrl-C): no lane starts another search, queued candidates are cancelled (the running
        # ones finish), so every lane's search raises at once instead of running to its end
        stop.set()
        pool.close()
        raise
    finally:
        ex.shutdown(wait=True)
        if own:
            pool.close()
    if progress is not None:
        progress.close()
    return done


def run_experiment(zoo: str | Path, out: str | Path, evaluations: int = 150, layer_groups: int = 2, seed: int = 0,
                   quiet: bool = False, spaces: tuple[str, ...] = SPACES, say=None, workers: int | None = None) -> dict:
    """Run the searches of `spaces` (a subset of SPACES, "ps" always included) and the control on `zoo`; score every
    row on the held-out splits. `say` (a print-like function) gets one line per phase. Searches, validation and
    scoring run in one pool of `workers` processes (`search_runtime`, `search.evaluate.SharedPool`)."""
    from lazymerge.search.evaluate import SharedPool

    zoo, out = Path(zoo), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = say or (lambda *a: None)
    t0 = time.time()
    unknown = set(spaces) - set(SPACES)
    if unknown:
        raise ValueError(f"unknown search spaces {sorted(unknown)}; known: {', '.join(SPACES)}")
    runtime = search_runtime(workers)
    configs = {"ps": search_config(zoo, ["foreign", "math"], evaluations, seed, layer_groups, runtime=runtime),
               "control": search_config(zoo, ["math"], evaluations, seed, layer_groups, runtime=runtime)}
    if "ps_weighted" in spaces:
        cfg = search_config(zoo, ["foreign", "math"], evaluations, seed, layer_groups, runtime=runtime)
        cfg["tasks"][0]["weight"] = 1.0
        for name, path in expert_search_splits(zoo, seed, out / "search_ps_weighted").items():
            cfg["tasks"].append({"name": name, "type": "generate_exact_match", "data": str(path),
                                 "test_data": str(zoo / "data" / TASK_FILES[name][1]), "max_tokens": MAX_TOKENS,
                                 "weight": EXPERT_WEIGHT})
        configs["ps_weighted"] = cfg
    for key in ("dfs", "dfs_w1"):
        if key in spaces:
            configs[key] = search_config(zoo, [], evaluations, seed, layer_groups, runtime=runtime,
                                         space=dict(DFS_SPACES[key]))

    def ps_dfs_config(done: dict) -> dict:  # PS+DFS: a path whose model A is the PS search's best merge
        return search_config(zoo, [], evaluations, seed, layer_groups, runtime=runtime,
                             space={**DFS_SPACES["ps_dfs"], "ps_recipe": done["ps"].best_recipe})

    if "ps_dfs" in spaces:
        configs["ps_dfs"] = ps_dfs_config
    pool = SharedPool(runtime["workers"], runtime.get("threads"))
    try:
        searches = run_searches(configs, out, runtime, quiet=quiet, say=say, pool=pool)
        evolved = searches["ps"]
        evolved_keys = [k for k in SPACES if k in searches]
        # each search's reported candidate, chosen on the validation split; the expert-weighted search keeps its own
        # best (its fitness weighs the experts' tasks in: the target alone would choose against it)
        say(f"choosing each search's candidate: its {TOP_K} best by search fitness, on {VALID_N} validation "
            "problems ...")
        valid = scorer(pool, zoo, seed, runtime, [{"name": TARGET, "data": str(target_validation_split(zoo, seed,
                                                                                                          out))}])
        keys = [k for k in ("control", *evolved_keys) if k != "ps_weighted"]
        valid_scores = valid([h["recipe"] for k in keys for h in top_candidates(searches[k].history)])
        chosen = {"ps_weighted": searches["ps_weighted"].best_recipe} if "ps_weighted" in searches else {}
        validation = {}
        for k in keys:
            rec, cands = choose_on_validation(searches[k].history, lambda r: valid_scores[_key(r)][TARGET])
            chosen[k] = rec["recipe"]
            validation[k] = {"n": VALID_N, "top_k": TOP_K, "chosen": max(c["validation"] for c in cands),
                             "candidates": cands}
            say(f"  {k}: candidate {rec['eval']} (search {100 * rec['fitness']:.1f}%, validation "
                f"{validation[k]['chosen']:.1f}%)")
        models: list[tuple[str, str, dict]] = []
        for m in ("base", "foreign", "math"):
            identity = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}}]}
            models.append((m, "source", identity))
        models += [(f"{k} (default)", "baseline", r) for k, r in baselines().items()]
        models.append(("math alone, evolved", "control", chosen["control"]))
        for k in evolved_keys:
            models.append((ROW_NAMES[k], f"evolved_{k}", chosen[k]))
        # first of equals: PS; the expert-weighted search is not a candidate (its fitness is not a target-only score)
        best_key = max((k for k in evolved_keys if k != "ps_weighted"), key=lambda k: validation[k]["chosen"])
        models.append(("best evolved (by validation split)", "evolved", chosen[best_key]))
        say(f"scoring {len(models)} models on the held-out splits ...")
        held_out = scorer(pool, zoo, seed, runtime, [{"name": name, "data": str(zoo / "data" / test)}
                                                        for name, (_, test) in TASK_FILES.items()])
        scores = held_out([r for _, _, r in models])
    finally:
        pool.close()
    rows, said = [], set()
    for name, kind, recipe in models:
        got = {k: round(100 * v, 1) for k, v in scores[_key(recipe)].items()}
        if _key(recipe) not in said:
            said.add(_key(recipe))
            say(f"  {name}: target {got[TARGET]:.1f}%")
        rows.append({"model": name, "kind": kind, "scores": got})
    table = {"target_task": TARGET, "rows": rows, "seconds": round(time.time() - t0, 1),
             "evaluations": evolved.evaluations, "zoo": str(zoo), "platform": platform_facts(zoo),
             "best_space": best_key,
             "search_fitness": {k: round(100 * searches[k].best_fitness, 1) for k in evolved_keys},
             "validation": validation,
             "expert_weight": EXPERT_WEIGHT if "ps_weighted" in searches else None}
    (out / "results.json").write_text(json.dumps(table, indent=2))
    (out / "evolved.yaml").write_text(_yaml(chosen[best_key]))
    for k in evolved_keys:
        (out / f"evolved_{k}.yaml").write_text(_yaml(chosen[k]))
    (out / "control.yaml").write_text(_yaml(chosen["control"]))
    plot_results(table, out / "results.png")
    return table


def platform_facts(zoo: Path) -> dict:
    """What a rebuilt zoo's numbers depend on: the zoo's content hash (its manifest), the CPU, the ATen kernel set
    the zoo was trained with and the one this process runs (demo/numerics.py), and torch's version (floating-point
    paths differ between CPUs, kernel sets and thread counts, and training amplifies them)."""
    import platform

    import torch

    from .numerics import cpu_kernels, machine_default
    from .zoo import TRAIN_THREADS

    try:
        manifest = json.loads((Path(zoo) / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    from lazymerge.engine.host import cpu_model

    cpu = cpu_model()
    return {"zoo_content_hash": str(manifest.get("content_hash", ""))[:16], "zoo_version": manifest.get("version"),
            "zoo_train_threads": manifest.get("train_threads", TRAIN_THREADS),  # zoos before the option: the default
            "zoo_cpu_kernels": manifest.get("cpu_kernels", machine_default()),
            "cpu": cpu, "cpu_kernels": cpu_kernels(), "torch": torch.__version__, "python": platform.python_version()}


def _yaml(recipe: dict) -> str:
    from lazymerge.search.run import recipe_text

    return recipe_text(recipe)  # a search's best recipe names its sources by absolute folder: runs anywhere


def format_table(table: dict) -> str:
    tasks = list(table["rows"][0]["scores"])
    head = "| model | kind | " + " | ".join(f"{t} (test, %)" for t in tasks) + " |"
    lines = [head, "|---|---|" + "---:|" * len(tasks)]
    for r in table["rows"]:
        lines.append(f"| {r['model']} | {r['kind']} | " + " | ".join(f"{r['scores'][t]:.1f}" for t in tasks) + " |")
    return "\n".join(lines)


def claim(table: dict, margin_sources: float = 15.0, margin_control: float = 5.0) -> dict:
    """The issue's claim on the held-out target split: evolved beats every source by `margin_sources` points (sources
    below 50%), beats the baselines, and beats the control by `margin_control`."""
    t = table["target_task"]
    by_kind = lambda k: [r["scores"][t] for r in table["rows"] if r["kind"] == k]  # noqa: E731
    ev, ctrl = max(by_kind("evolved")), max(by_kind("control"))
    best_src, best_base = max(by_kind("source")), max(by_kind("baseline"))
    return {"evolved": ev, "best_source": best_src, "best_baseline": best_base, "control": ctrl,
            "vs_sources": round(ev - best_src, 1), "vs_baselines": round(ev - best_base, 1),
            "vs_control": round(ev - ctrl, 1),
            "holds": (ev - best_src >= margin_sources and best_src < 50 and ev > best_base
                      and ev - ctrl >= margin_control)}


def plot_results(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, tasks = table["rows"], list(table["rows"][0]["scores"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(tasks)
    for j, t in enumerate(tasks):
        ax.bar([i + j * width for i in range(len(rows))], [r["scores"][t] for r in rows], width, label=f"{t} (test)")
    ax.set_xticks([i + width * (len(tasks) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["model"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("toy evolutionary merge: held-out accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
