"""A search whose fitness is an lm-evaluation-harness task (a local multiple-choice YAML over local JSONL, through
`include_path`) finds its way to a known mixture: the right choice is the target mixture's own greedy continuation,
the distractors are each source's. Held out = the documents after `limit` (search/lm_eval_tasks.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

TASK = """task: mixture_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def lm_task(search_toy, tmp_path_factory):
    from lazymerge.engine import Engine

    root = tmp_path_factory.mktemp("lm_task")
    eng = Engine(search_toy["paths"])
    rows = [json.loads(x) for x in open(search_toy["data"])][:40] + \
        [json.loads(x) for x in open(search_toy["test_data"])][:40]
    prompts = [r["prompt"] for r in rows]
    others = {m: eng.compile({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}}]})
              .generate(prompts, max_tokens=4) for m in ("base", "e1", "e2")}
    docs = []
    for i, r in enumerate(rows):  # the target's continuation first, then each source's (distinct ones only)
        choices = [c for c in dict.fromkeys([r["answer"]] + [others[m][i].text for m in ("base", "e1", "e2")]) if c]
        if len(choices) > 1 and choices[0] == r["answer"]:
            docs.append({"prompt": r["prompt"], "choices": choices})
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks").mkdir()
    (root / "tasks" / "mixture_mc.yaml").write_text(TASK.format(data=root / "mc.jsonl"))
    return root, len(docs)


def test_search_with_an_lm_eval_task_finds_the_mixture(search_toy, lm_task, tmp_path, monkeypatch):
    from lazymerge.search import run_search

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, n = lm_task
    limit = n // 2
    cfg = {"sources": search_toy["paths"], "base_model": "base",
           "space": {"kind": "ps", "method": "task_arithmetic", "models": ["e1", "e2"]},
           "tasks": [{"lm_eval": "mixture_mc", "metric": "acc", "limit": limit, "weight": 1.0,
                      "include_path": str(root / "tasks")}],
           "budget": {"evaluations": 24, "seed": 0}}
    res = run_search(cfg, tmp_path, quiet=True)
    first = max(h["fitness"] for h in res.history if h["generation"] == 0)
    assert res.best_fitness > first, (first, res.best_fitness, res.summary)
    rows = {(r["model"], r["split"]): r["score"] for r in res.summary}
    assert set(rows) == {(m, s) for m in ("base", "e1", "e2", "best") for s in ("search", "test")}
    assert rows[("best", "test")] > max(rows[(m, "test")] for m in ("base", "e1", "e2")), rows
    assert set(res.history[0]["scores"]) == {"mixture_mc"}
