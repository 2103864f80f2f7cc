"""Bad search configs fail early with a message naming the field, through the API and the CLI (no traceback)."""

from __future__ import annotations

import pytest
import yaml

from lazymerge.search.config import SearchConfigError, load_config
from lazymerge.search.tasks import extract_answer, load_tasks, passes_check


def _good(toy) -> dict:
    return {"sources": toy["paths"], "base_model": "base",
            "space": {"kind": "ps", "method": "dare_ties", "models": ["e1", "e2"]},
            "tasks": [{"name": "em", "type": "generate_exact_match", "data": toy["data"]}],
            "budget": {"evaluations": 10, "seed": 0}}


def _bad(toy, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    nojson = tmp_path / "nojson.jsonl"
    nojson.write_text('{"prompt": "a", "answer": "1"}\nnot json\n')
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"prompt": "a", "choices": ["x", "y"], "answer": 5}\n')
    g = _good(toy)
    t0 = g["tasks"][0]
    return {
        "unknown source": ({**g, "space": {**g["space"], "models": ["e1", "nope"]}},
                           "space.models[1]: unknown source 'nope'"),
        "unknown base": ({**g, "base_model": "nope"}, "base_model: unknown source 'nope'"),
        "missing dataset": ({**g, "tasks": [{**t0, "data": str(tmp_path / "missing.jsonl")}]},
                            "tasks[0].data: dataset file"),
        "missing test split": ({**g, "tasks": [{**t0, "test_data": str(tmp_path / "missing.jsonl")}]},
                               "tasks[0].test_data: dataset file"),
        "empty dataset": ({**g, "tasks": [{**t0, "data": str(empty)}]}, "tasks[0].data: dataset file"),
        "budget 0": ({**g, "budget": {"evaluations": 0}}, "budget.evaluations: must be >= 1"),
        "no budget": ({**g, "budget": {"seed": 1}}, "budget.evaluations: give `evaluations` or `generations`"),
        "missing checkpoint": ({**g, "sources": {**g["sources"], "e2": str(tmp_path / "nockpt")}},
                               "sources.e2: no checkpoint"),
        "unknown task type": ({**g, "tasks": [{**t0, "type": "bleu"}]}, "tasks[0].type"),
        "unknown field": ({**g, "budgett": 3}, "budgett: unknown field"),
        "dfs needs two": ({**g, "space": {"kind": "dfs", "models": ["e1"]}}, "space.models: a dfs space takes two"),
        "bad method": ({**g, "space": {**g["space"], "method": "slerp"}}, "space.method: 'slerp'"),
        "density range": ({**g, "space": {**g["space"], "density_range": [0.0, 1.0]}}, "space.density_range"),
        "filter shared and not": ({**g, "space": {**g["space"], "filters": ["mlp", "lm_head"],
                                                  "shared_filters": ["lm_head"]}},
                                  "shared_filters: ['lm_head'] also in filters"),
        "no tasks": ({**g, "tasks": []}, "tasks: empty list"),
        "ps+dfs without ps": ({**g, "space": {"kind": "ps+dfs", "models": ["e1"]}}, "space.ps_recipe"),
        "bad jsonl": ({**g, "tasks": [{**t0, "data": str(nojson)}]}, "nojson.jsonl:2: not JSON"),
        "bad choice": ({**g, "tasks": [{**t0, "type": "multiple_choice", "data": str(mc)}]}, "mc.jsonl:1: `answer`"),
    }


def test_good_config_loads(search_toy, tmp_path):
    cfg = load_config(_good(search_toy))
    assert cfg.cma.sigma0 == pytest.approx(1 / 6) and cfg.cma.x0 == 0.5 and cfg.space.weight_range[1] > 1
    assert len(load_tasks(cfg)[0].examples) == 200 and load_tasks(cfg, "test_data") == []
    # relative paths resolve against the config file's folder
    p = tmp_path / "c.yaml"
    g = _good(search_toy)
    g["tasks"][0]["data"] = "data.jsonl"
    (tmp_path / "data.jsonl").write_text('{"prompt": "two plus two", "answer": 4}\n')
    p.write_text(yaml.safe_dump(g))
    assert load_tasks(load_config(p))[0].examples[0].answer == "4"
    from lazymerge.search.tasks import load_task

    t = load_task({"name": "x", "type": "answer_loglik", "data": "data.jsonl"}, base_dir=tmp_path)
    assert t.type == "answer_loglik" and len(t.examples) == 1


@pytest.mark.parametrize("case", ["unknown source", "unknown base", "missing dataset", "missing test split",
                                  "empty dataset", "budget 0", "no budget", "missing checkpoint", "unknown task type",
                                  "unknown field", "dfs needs two", "bad method", "density range", "filter shared and not", "no tasks",
                                  "ps+dfs without ps", "bad jsonl", "bad choice"])
def test_bad_config_names_the_field(search_toy, tmp_path, case):
    cfg, msg = _bad(search_toy, tmp_path)[case]
    with pytest.raises(SearchConfigError) as e:
        load_tasks(load_config(cfg))
    assert msg in str(e.value)


def test_cli_prints_one_line_error(search_toy, tmp_path, capsys):
    from lazymerge.cli import main

    for case in ("unknown source", "empty dataset", "budget 0", "bad jsonl"):
        cfg, msg = _bad(search_toy, tmp_path)[case]
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(cfg))
        assert main(["search", str(p), "--out", str(tmp_path / "run"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing is written for a config that cannot run


@pytest.mark.parametrize("text,how,want", [
    ("so the answer is 1,234.", "last_number", "1234"),
    ("3 apples and #### 42 then 7", "last_number", "42"),
    ("it costs 3.50 dollars", "last_number", "3.5"),
    ("-7", "last_number", "-7"),
    ("no number here", "last_number", None),
    ("  Paris \n more", "first_line", "Paris"),
    (" yes ", "exact", "yes"),
])
def test_answer_extraction(text, how, want):
    assert extract_answer(text, how) == want


def test_output_check():
    ja = "[\u3040-\u30ff\u4e00-\u9fff]"
    assert passes_check("答えは 42 です", None, ja, 0.5)
    assert not passes_check("the answer is 42", None, ja, 0.5)
    assert not passes_check("42", None, ja, 0.5)  # no letters: not in the language
    assert passes_check("#### 42", r"####", None, 0.5) and not passes_check("42", r"####", None, 0.5)
