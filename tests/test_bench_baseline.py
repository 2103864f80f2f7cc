"""The search benchmarks' baseline (search/bench_search.py `LoadedModel`: a transformers model loaded from a
materialized merge, driven through LazyModel's own task methods) scores a task exactly as the lazy engine scores the
same recipe. A baseline that fails or scores differently makes every speed-up it prints meaningless (issue 17's
checks once broke it: `check_ids` and the engine's source checks were missing)."""

from __future__ import annotations

import json
import threading

import pytest


def test_loaded_model_scores_as_the_lazy_engine(fam, tmp_path):
    from lazymerge.engine import Engine
    from lazymerge.engine.export import export
    from lazymerge.engine.toy import WORDS
    from lazymerge.search.bench_search import LoadedModel
    from lazymerge.search.tasks import load_task, score_task

    recipe = {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "e1", "parameters": {"weight": 0.7, "density": 0.5}},
        {"model": "e2", "parameters": {"weight": 0.5, "density": 0.4}}]}
    lazy = Engine({k: str(v) for k, v in fam.items()}).compile(recipe)
    export(lazy.plan, tmp_path / "export")
    prompts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5)) for i in range(6)]
    outs = lazy.generate(prompts, max_tokens=3)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": o.text if i % 2 else "nope"}) + "\n"
                            for i, (p, o) in enumerate(zip(prompts, outs))))
    tasks = [load_task({"name": "gen", "type": "generate_exact_match", "data": str(data), "extract": "exact",
                        "max_tokens": 3}),
             load_task({"name": "ll", "type": "answer_loglik", "data": str(data)})]
    loaded = LoadedModel(tmp_path / "export", lazy.tokenizer, threading.RLock())
    for t in tasks:
        ours, theirs = score_task(lazy, t), score_task(loaded, t)
        assert theirs == pytest.approx(ours, abs=1e-4), t.name
    assert score_task(lazy, tasks[0]) == pytest.approx(0.5)  # half the answers are the model's own: not a 0 == 0
