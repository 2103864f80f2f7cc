"""lm-evaluation-harness tasks as search fitness, as mergekit-evolve has them:

    tasks:
      - {lm_eval: arc_easy, metric: acc, limit: 200, weight: 1.0}
      - {lm_eval: my_task, metric: "exact_match,strip", limit: 50, include_path: tasks/}   # local YAML + data

The task is built once (lm-eval's `TaskManager(include_path=...)` + `get_task_dict`: YAML, dataset, prompts) when the
run's tasks are loaded, never per candidate; each candidate is then scored by `lm_eval.evaluator.evaluate` with
`LazymergeLM` over the candidate's `LazyModel` (engine/harness.py), on a fixed list of documents.

Splits. lm-eval scores a task on its evaluation split (`test_split`, else `validation_split`, as lm-eval chooses).
The search split is that split's first `limit` documents (all of them without `limit`); the held-out split of the
summary table is the documents after them, up to `test_limit` (default: as many as `limit`), so the two never share a
document. A task without `limit`, or with no documents after it, has no held-out split.

`metric` names one of the task's metrics: "acc" takes the task's first filter ("acc,none"); "exact_match,strip"
names the filter. Offline use: a task defined by a local YAML under `include_path` whose `dataset_kwargs.data_files`
are local files needs no network (set HF_DATASETS_OFFLINE=1 to make sure nothing is tried). lm_eval is imported here
only, and only when such a task is configured.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass


class LmEvalTaskError(ValueError):
    """An lm-eval task that cannot be built or scored as configured."""


@dataclass
class LmEvalTask:
    task: str  # lm-eval task name
    metric: str  # "acc" or "acc,none"
    indices: list[int]  # documents of the evaluation split scored on this split
    task_dict: dict  # lm-eval's {name: Task}, built once


@functools.lru_cache(maxsize=32)
def _task_dict(task: str, include_path: str | None) -> dict:
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise LmEvalTaskError(f"lm_eval task {task!r}: the lm-eval package is not installed "
                              "(pip install 'lazymerge[lm_eval]')") from None
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = TaskManager(include_path=include_path)
    if task not in tm.all_tasks:
        raise LmEvalTaskError(f"lm_eval task {task!r} not found" + (f" (include_path {include_path})" if include_path
                                                                    else ""))
    td = get_task_dict([task], tm)
    if set(td) != {task} or isinstance(td[task], dict):
        raise LmEvalTaskError(f"lm_eval task {task!r} is a group: name its tasks one by one")
    return td


def build(task: str, metric: str, include_path: str | None, split: str, limit: int | None,
          test_limit: int | None) -> LmEvalTask | None:
    """The task on `split` ("data": search, "test_data": held out); None when the split has no document."""
    td = _task_dict(task, include_path)
    n = len(td[task].eval_docs)
    if split == "data":
        idx = list(range(min(n, limit) if limit else n))
    else:
        if not limit:
            return None
        idx = list(range(limit, min(n, limit + (test_limit or limit))))
    return LmEvalTask(task, metric, idx, td) if idx else None


def score(model, t: LmEvalTask, batch_size: int = 32) -> float:
    """The task's `metric` for a `LazyModel` on the split's documents (higher is better for acc/exact_match)."""
    from lm_eval.evaluator import evaluate

    from lazymerge.engine.harness import LazymergeLM

    lm = LazymergeLM(model=model, batch_size=batch_size)
    res = evaluate(lm, t.task_dict, samples={t.task: t.indices}, log_samples=False, bootstrap_iters=0,
                   verbosity="ERROR")
    values = res["results"][t.task]
    key = t.metric if "," in t.metric else next((k for k in values if k.split(",")[0] == t.metric), None)
    if key not in values:
        found = sorted(k for k in values if "," in k and "_stderr" not in k)
        raise LmEvalTaskError(f"lm_eval task {t.task!r} has no metric {t.metric!r}; it reports {found}")
    return float(values[key])
