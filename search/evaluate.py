"""Evaluation: recipe -> task scores through the lazy engine, and the worker pools that evaluate a generation.

* `evaluate_recipe(engine, recipe, tasks)` -> {task name: score}: compiles the recipe (nothing materialized), computes
  its merged weights once into the engine's cache (`prefetch`), then runs every task batched. Writes nothing to disk.
* `Evaluator(engine, tasks)` adds the fitness (weighted sum) and timings: `evaluate(recipe) -> EvalResult`.
* `make_pool(cfg, workers)` -> a pool with `map(recipes) -> [EvalResult]` in order and `close()`: `LocalPool` (this
  process when workers == 1, else one process per worker, each opening the sources once and keeping its engine for
  the whole run) or `RayPool` (one Ray actor per worker, on a Ray cluster's CPUs or GPUs).
* `SharedPool(workers)`: one set of worker processes for several searches at once (`run_search(pool=...)`, each
  search in a thread of this process): while one search waits for the last candidates of a generation, the others'
  candidates keep the workers busy; each worker keeps an evaluator per search config.

The engine is built with the `cached` weight policy and a cache of about `cache_factor` models, so a candidate's
weights are merged once for all its batches and decoding steps; the previous candidate's weights are evicted before
the next candidate's are merged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import SearchConfig
from .tasks import Task, fitness, load_tasks, score_task


@dataclass
class EvalResult:
    fitness: float
    scores: dict[str, float]
    merge_s: float
    eval_s: float


def model_bytes(engine, source: str | None = None) -> int:
    """Bytes of one source model's tensors in the engine's compute dtype."""
    src = engine.sources[source or next(iter(engine.sources.sources))]
    n = 0
    for name in src.tensors:
        numel = 1
        for d in src.shape(name):
            numel *= d
        n += numel
    return n * engine.dtype.itemsize


def make_engine(cfg: SearchConfig, threads: int | None = None):
    from lazymerge.engine import Engine
    from lazymerge.engine.resident import default_limit
    from lazymerge.engine.threads import per_worker

    # Every candidate merges every weight again, as a forward on the fly does: source tensors stay resident after
    # their first read (the on-the-fly default: half the available memory, shared among the workers) instead of
    # being read from their files once per candidate.
    resident = default_limit("on_the_fly", cfg.runtime.device) // max(1, cfg.runtime.workers)
    eng = Engine(cfg.source_paths(), device=cfg.runtime.device, policy="cached", allow_open=False, cache_bytes=0,
                 cpu_fused=cfg.runtime.cpu_fused, threads=threads or per_worker(1, cfg.runtime.threads),
                 resident_bytes=resident)
    budget = int(cfg.runtime.cache_factor * model_bytes(eng, cfg.base_model))
    if cfg.space.kind != "ps":  # a path may run more layers than one model has
        budget = int(budget * max(1, cfg.space.repeats))
    eng.provider.cache.budget = budget
    return eng


def prefetch(engine, model) -> None:
    """Merge every weight of a compiled model into the engine's cache (once per candidate), after evicting the
    cached weights it does not use (`WeightProvider.retain`: the previous candidate's, all at once; on the CPU the
    new weights are merged into their memory where shapes match)."""
    engine.provider.retain(model.plan.tensors.values())
    try:
        for tp in model.plan.tensors.values():
            engine.provider.weight(tp)
    finally:
        engine.provider.drop_spares()


def evaluate_recipe(engine, recipe, tasks: list[Task], batch_size: int = 128) -> dict[str, float]:
    """{task name: score} of `recipe` (a dict, YAML or Recipe) on `tasks`, computed lazily by `engine`."""
    model = engine.compile(recipe)
    prefetch(engine, model)
    return {t.name: score_task(model, t, batch_size) for t in tasks}


class Evaluator:
    """The objective: a function of a recipe (and this evaluator's engine and tasks), nothing else."""

    def __init__(self, engine, tasks: list[Task], batch_size: int = 128):
        self.engine, self.tasks, self.batch_size = engine, tasks, batch_size

    def evaluate(self, recipe) -> EvalResult:
        t0 = time.perf_counter()
        model = self.engine.compile(recipe)
        prefetch(self.engine, model)
        t1 = time.perf_counter()
        scores = {t.name: score_task(model, t, self.batch_size) for t in self.tasks}
        t2 = time.perf_counter()
        return EvalResult(fitness(scores, self.tasks), scores, t1 - t0, t2 - t1)


# -- pools -------------------------------------------------------------------------------------------------------
_WORKER: Evaluator | None = None


def die_with_parent(every_s: float = 1.0) -> None:
    """End this process (`os._exit`) within `every_s` seconds of the death of the process that started it: a daemon
    thread compares the parent's pid every `every_s` seconds (a killed demo's two workers were seen running on for
    minutes, taking the CPUs of the next run). Polling, not Linux's PR_SET_PDEATHSIG, which fires when the *thread*
    that started the process ends: a search lane's thread (demo/experiment.py) starts pool workers and ends first."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="lazymerge-parent-watch", daemon=True).start()


def _worker_init(cfg_json: str, threads: int) -> None:
    die_with_parent()
    global _WORKER
    cfg = SearchConfig.model_validate_json(cfg_json)
    _WORKER = Evaluator(make_engine(cfg, threads), load_tasks(cfg), cfg.runtime.batch_size)


def _worker_eval(recipe: dict) -> EvalResult:
    return _WORKER.evaluate(recipe)


class LocalPool:
    def __init__(self, cfg: SearchConfig, workers: int = 1):
        self.workers = workers
        self.executor = None
        if workers == 1:
            self.evaluator = Evaluator(make_engine(cfg), load_tasks(cfg), cfg.runtime.batch_size)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            from lazymerge.engine.threads import per_worker

            self.evaluator = None
            self.executor = ProcessPoolExecutor(workers, mp_context=mp.get_context(cfg.runtime.start_method),
                                                initializer=_worker_init,
                                                initargs=(cfg.model_dump_json(),
                                                          per_worker(workers, cfg.runtime.threads)))

    def map(self, recipes: list[dict]):
        """Yields EvalResults in the order of `recipes` (as soon as each one and those before it are done)."""
        if self.executor is None:
            for r in recipes:
                yield self.evaluator.evaluate(r)
        else:
            yield from self.executor.map(_worker_eval, recipes)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


_SHARED: dict[str, Evaluator] = {}  # a SharedPool worker's evaluators, by search config (JSON)
_SHARED_THREADS = 1  # torch threads of a SharedPool worker (set by its initializer)
SHARED_CONFIGS = 8  # evaluators a SharedPool worker keeps (the oldest is dropped)


def _shared_init(threads: int) -> None:
    global _SHARED_THREADS
    die_with_parent()
    _SHARED_THREADS = threads


def _shared_eval(cfg_json: str, recipe: dict) -> EvalResult:
    ev = _SHARED.get(cfg_json)
    if ev is None:
        if len(_SHARED) >= SHARED_CONFIGS:
            _SHARED.pop(next(iter(_SHARED)))
        cfg = SearchConfig.model_validate_json(cfg_json)
        ev = _SHARED[cfg_json] = Evaluator(make_engine(cfg, _SHARED_THREADS), load_tasks(cfg),
                                           cfg.runtime.batch_size)
    return ev.evaluate(recipe)


class SharedPool:
    """`workers` local processes (started with `start_method`, each on `threads` torch threads, default: the CPUs this
    process may use shared among them) evaluating the candidates of several searches: `bind(cfg)` gives a search's
    view (`map`, `close`), which `run_search(pool=...)` uses in place of its own pool. Candidates are served in the
    order they are submitted. A candidate's fitness depends on its recipe and config alone, so each search records
    what it would alone. `close()` stops the workers."""

    def __init__(self, workers: int, threads: int | None = None, start_method: str = "spawn"):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from lazymerge.engine.threads import per_worker

        self.executor = ProcessPoolExecutor(workers, mp_context=mp.get_context(start_method),
                                            initializer=_shared_init, initargs=(per_worker(workers, threads),))

    def bind(self, cfg: SearchConfig) -> "_Bound":
        return _Bound(self, cfg.model_dump_json())

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)


class _Bound:
    """One search's view of a SharedPool."""

    def __init__(self, pool: SharedPool, cfg_json: str):
        self.pool, self.cfg_json = pool, cfg_json

    def map(self, recipes: list[dict]):
        """Yields EvalResults in the order of `recipes`."""
        futures = [self.pool.executor.submit(_shared_eval, self.cfg_json, r) for r in recipes]
        for f in futures:
            yield f.result()

    def close(self) -> None:
        """Nothing: the pool outlives the search."""


class RayPool:
    """One Ray actor per worker, each holding the sources once (Ray schedules them on the cluster's resources)."""

    def __init__(self, cfg: SearchConfig, workers: int):
        import ray

        if not ray.is_initialized():
            ray.init(address=cfg.runtime.ray_address, include_dashboard=False, log_to_driver=False)

        threads = cfg.runtime.threads or 1
        @ray.remote(num_cpus=threads, num_gpus=cfg.runtime.gpus_per_worker)
        class _Actor:
            def __init__(self, cfg_json: str, threads: int):
                _worker_init(cfg_json, threads)

            def evaluate(self, recipe: dict) -> EvalResult:
                return _worker_eval(recipe)

        self.ray = ray
        self.actors = [_Actor.remote(cfg.model_dump_json(), threads) for _ in range(workers)]

    def map(self, recipes: list[dict]):
        from ray.util import ActorPool

        yield from ActorPool(self.actors).map(lambda a, r: a.evaluate.remote(r), recipes)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def make_pool(cfg: SearchConfig, workers: int | None = None):
    n = workers or cfg.runtime.workers
    if cfg.runtime.backend == "ray":
        return RayPool(cfg, n)
    return LocalPool(cfg, n)
