"""lazymerge.search: evolutionary merge search (Akiba et al.): CMA-ES over merge recipes, candidates evaluated
lazily by the engine, nothing materialized.

    from lazymerge.search import run_search, evaluate_recipe
    result = run_search("search.yaml", "runs/ja_math")        # -> SearchResult(best_recipe, best_fitness, ...)
"""

from .config import SearchConfig, SearchConfigError, load_config


def __getattr__(name):  # the runtime pulls in torch / transformers: load on first use
    if name in ("run_search", "SearchResult"):
        from . import run

        return getattr(run, name)
    if name in ("evaluate_recipe", "Evaluator", "make_engine"):
        from . import evaluate

        return getattr(evaluate, name)
    if name in ("load_tasks", "load_task", "Task", "Example"):
        from . import tasks

        return getattr(tasks, name)
    raise AttributeError(name)


__all__ = [
    "Evaluator",
    "Example",
    "SearchConfig",
    "SearchConfigError",
    "SearchResult",
    "Task",
    "evaluate_recipe",
    "load_config",
    "load_task",
    "load_tasks",
    "make_engine",
    "run_search",
]
