"""Evaluation: recipe -> task scores through the lazy engine, and the worker pools that evaluate a generation.

* `evaluate_recipe(engine, recipe, tasks)` -> {task name: score}: compiles the recipe (nothing materialized), computes
  its merged weights once into the engine's cache (`prefetch`), then runs every task batched. Writes nothing to disk.
* `Evaluator(engine, tasks)` adds the fitness (weighted sum) and timings: `evaluate(recipe) -> EvalResult`.
* `make_pool(cfg, workers)` -> a pool with `map(recipes) -> [EvalResult]` in order and `close()`: `LocalPool` (this
  process when workers == 1, else one process per worker, each opening the sources once and keeping its engine for
  the whole run) or `RayPool` (one Ray actor per worker, on a Ray cluster's CPUs or GPUs).

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


def _worker_init(cfg_json: str, threads: int) -> None:
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
