"""`lazymerge demo` end to end on the seconds-sized zoo, through the CLI: files and the table's shape (the toy
accuracies need the full zoo and are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_small_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lazymerge.cli", "demo", "--small", "--no-serve", "--json",
                        "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "runs"), "--evaluations", "8",
                        "--workers", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.loads(r.stdout.strip().splitlines()[-1])
    assert table["target_task"] == "target"
    kinds = [row["kind"] for row in table["rows"]]
    assert kinds.count("source") == 3 and kinds.count("baseline") == 3
    assert kinds.count("control") == 1 and kinds.count("evolved") == 1
    for k in ("evolved_ps", "evolved_dfs", "evolved_dfs_w1", "evolved_ps_dfs", "evolved_ps_weighted"):
        assert kinds.count(k) == 1, k
    for row in table["rows"]:
        assert set(row["scores"]) == {"target", "foreign", "math"}
        assert all(0.0 <= v <= 100.0 for v in row["scores"].values())
    run = tmp_path / "runs" / "seed0"
    for f in ("results.json", "results.png", "evolved.yaml", "control.yaml", "search_ps/best.yaml",
              "search_ps/history.jsonl", "search_ps/fitness.png", "search_ps/params.png", "search_control/best.yaml",
              "search_dfs/path.png", "search_dfs_w1/path.png", "search_ps_dfs/path.png", "evolved_ps.yaml",
              "evolved_dfs.yaml", "evolved_dfs_w1.yaml", "evolved_ps_dfs.yaml", "evolved_ps_weighted.yaml",
              "search_ps_weighted/foreign_search.jsonl", "search_ps_weighted/math_search.jsonl"):
        assert (run / f).exists(), f
    history = [json.loads(line) for line in (run / "search_ps" / "history.jsonl").read_text().splitlines()]
    assert len(history) >= 8
    # the evolved recipe is a real, loadable mergekit-style recipe over the zoo's experts
    from pathlib import Path

    from lazymerge.engine import load_recipe
    from lazymerge.engine.refs import model_names

    rec = load_recipe((run / "evolved_ps.yaml").read_text()).to_dict()
    names = {Path(m).name for m in model_names(rec)}  # sources named by absolute folder: the file runs anywhere
    assert names == {"base", "foreign", "math"} or names == {"foreign", "math"}
    assert all(Path(m).is_absolute() for m in model_names(rec))
    dfs = load_recipe((run / "evolved_dfs.yaml").read_text())
    assert dfs.merge_method == "path" and Path(dfs.base_model).name == "foreign"
    assert "seed 0" in r.stderr and "| evolved merge (PS) | evolved_ps |" in r.stderr
    assert "search dfs:" in r.stderr  # one line per phase
    # the expert-weighted search: three tasks in its fitness, never the `evolved` row's pick
    res = json.loads((run / "results.json").read_text())
    hist = [json.loads(x) for x in (run / "search_ps_weighted" / "history.jsonl").read_text().splitlines()]
    assert set(hist[0]["scores"]) == {"target", "foreign", "math"}
    assert res["best_space"] != "ps_weighted" and res["expert_weight"] == 0.5
    # each reported candidate is chosen on a validation split disjoint from the target's search and test splits
    assert set(res["validation"]) == {"control", "ps", "dfs", "dfs_w1", "ps_dfs"}
    prompts = lambda f: {json.loads(x)["prompt"] for x in f.read_text().splitlines() if x}  # noqa: E731
    valid = prompts(run / "target_valid.jsonl")
    zoo = tmp_path / "zoo" / "seed0" / "data"
    assert len(valid) == 400 and not valid & (prompts(zoo / "target_search.jsonl") | prompts(zoo / "target_test.jsonl"))
    best = res["best_space"]
    for v in res["validation"].values():  # the chosen score is each search's best among its candidates
        assert v["chosen"] == max(c["validation"] for c in v["candidates"])
    assert all(v["chosen"] <= res["validation"][best]["chosen"] for k, v in res["validation"].items()
               if k != "control")
    assert load_recipe((run / "evolved.yaml").read_text()).to_dict() == load_recipe(
        (run / f"evolved_{best}.yaml").read_text()).to_dict()


def test_the_reported_candidate_is_the_best_on_validation_among_the_top_k():
    from lazymerge.demo.experiment import choose_on_validation, top_candidates

    rec = lambda i: {"merge_method": "linear", "models": [{"model": "m", "parameters": {"weight": i}}]}  # noqa: E731
    # fitness order: e3 (0.9), then e1 and e4 tie at 0.8 (e1 first), e2 repeats e3's recipe, e0 is last
    hist = [{"eval": 0, "fitness": 0.1, "recipe": rec(0)}, {"eval": 1, "fitness": 0.8, "recipe": rec(1)},
            {"eval": 2, "fitness": 0.9, "recipe": rec(3)}, {"eval": 3, "fitness": 0.9, "recipe": rec(3)},
            {"eval": 4, "fitness": 0.8, "recipe": rec(4)}]
    assert [h["eval"] for h in top_candidates(hist, 3)] == [2, 1, 4]
    valid = {3: 0.2, 1: 0.5, 4: 0.5, 0: 0.99}
    best, cands = choose_on_validation(hist, lambda r: valid[r["models"][0]["parameters"]["weight"]], k=3)
    assert best["eval"] == 1  # e1 and e4 tie on validation: the better (earlier) search candidate; e0 is not top-3
    assert cands == [{"eval": 2, "search": 90.0, "validation": 20.0}, {"eval": 1, "search": 80.0, "validation": 50.0},
                     {"eval": 4, "search": 80.0, "validation": 50.0}]


def test_the_demo_searches_use_one_worker_per_cpu_without_oversubscribing(monkeypatch):
    from lazymerge.demo.experiment import MAX_WORKERS, search_runtime
    from lazymerge.engine import threads

    for cpus, workers, per in ((1, 1, 1), (2, 2, 1), (16, MAX_WORKERS, 16 // MAX_WORKERS)):
        monkeypatch.setattr(threads, "available_cpus", lambda c=cpus: c)
        monkeypatch.setenv("LAZYMERGE_THREADS", str(cpus))
        rt = search_runtime()
        assert (rt["workers"], rt["threads"]) == (workers, per) and rt["workers"] * rt["threads"] <= cpus
    assert search_runtime(3)["workers"] == 3


def test_searches_at_once_record_what_each_records_alone(tmp_path):
    """`run_searches` runs the demo's searches in lanes on one shared pool of workers; each search draws its own
    numpy random stream (cma's), so its history equals, genome for genome and fitness for fitness, the one it
    records alone with a pool of its own. PS+DFS is made from the PS search's result, as the demo does."""
    from lazymerge.demo.experiment import DFS_SPACES, run_searches, search_config
    from lazymerge.demo.zoo import build_zoo
    from lazymerge.search import run_search

    zoo = build_zoo(tmp_path / "zoo", seed=0, size="small")
    runtime = {"workers": 2, "threads": 1, "batch_size": 400}
    configs = {"ps": search_config(zoo, ["foreign", "math"], 8, 0, 2, runtime=runtime),
               "control": search_config(zoo, ["math"], 8, 0, 2, runtime=runtime),
               "dfs": search_config(zoo, [], 8, 0, 2, runtime=runtime, space=dict(DFS_SPACES["dfs"])),
               "ps_dfs": lambda done: search_config(zoo, [], 8, 0, 2, runtime=runtime, space={
                   **DFS_SPACES["ps_dfs"], "ps_recipe": done["ps"].best_recipe})}
    lines = []
    together = run_searches(configs, tmp_path / "together", runtime, say=lines.append)
    assert set(together) == set(configs)
    assert any(x.startswith("search dfs: best search-split fitness") for x in lines)
    alone = {}
    for key in ("ps", "control", "dfs", "ps_dfs"):
        cfg = configs[key] if isinstance(configs[key], dict) else configs[key](alone)
        alone[key] = run_search(cfg, tmp_path / "alone" / key, workers=1, quiet=True, summary=False, plots=False)
        a, b = alone[key].history, together[key].history
        assert len(a) == len(b) >= 8
        assert [(h["genome"], h["fitness"], h["recipe"]) for h in a] == [(h["genome"], h["fitness"], h["recipe"])
                                                                         for h in b], key


def test_a_failing_search_stops_the_others_at_once(tmp_path):
    """One search's error stops every lane (no new search, the shared pool's queued candidates cancelled) and is
    raised at once: here a search of 5,000 candidates (minutes) runs beside one whose data file is missing."""
    import time

    import pytest

    from lazymerge.demo.experiment import run_searches, search_config
    from lazymerge.demo.zoo import build_zoo

    zoo = build_zoo(tmp_path / "zoo", seed=0, size="small")
    runtime = {"workers": 2, "threads": 1, "batch_size": 400}
    bad = search_config(zoo, ["math"], 8, 0, 2, runtime=runtime)
    bad["tasks"][0]["data"] = str(tmp_path / "missing.jsonl")
    configs = {"ps": search_config(zoo, ["foreign", "math"], 5_000, 0, 2, runtime=runtime), "control": bad}
    t0 = time.time()
    with pytest.raises(Exception, match="missing.jsonl"):
        run_searches(configs, tmp_path / "runs", runtime)
    assert time.time() - t0 < 60
