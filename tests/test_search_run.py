"""The search end to end on tiny checkpoints: it finds a known mixture, resumes after SIGKILL with identical
records, writes no model data per candidate, and reports (summary with the held-out split, plots)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lazymerge.search import run_search
from lazymerge.search.config import load_config

TIMING = ("wall_s", "merge_s", "eval_s", "time")


def _config(toy, **over) -> dict:
    cfg = {"sources": toy["paths"], "base_model": "base",
           "space": {"kind": "ps", "method": "task_arithmetic", "models": ["e1", "e2"]},
           "tasks": [{"name": "em", "type": "generate_exact_match", "data": toy["data"], "test_data": toy["test_data"],
                      "extract": "exact", "max_tokens": 4}],
           "budget": {"evaluations": 60, "seed": 0}}
    cfg.update(over)
    return cfg


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def test_search_recovers_a_known_mixture(search_toy, tmp_path):
    res = run_search(_config(search_toy), tmp_path, quiet=True)
    first_gen = max(h["fitness"] for h in res.history if h["generation"] == 0)
    assert res.evaluations == 60 and res.generations == 10  # popsize 4 + floor(3 ln 2) = 6
    assert res.best_fitness >= 0.6 > first_gen + 0.3
    w = {Path(m["model"]).name: m["parameters"]["weight"] for m in res.best_recipe["models"]}  # absolute folders
    assert abs(w["e1"] - 0.3) < 0.3 and abs(w["e2"] - 1.5) < 0.3, w  # the target is e1 0.3, e2 1.5
    # the run directory: records, then the end-of-run summary and plots
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml", "fitness.png", "history.jsonl",
                                                         "optimizer.pkl", "params.png", "summary.json"]
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best == res.best_recipe | {"random_seed": 0} or best["models"] == res.best_recipe["models"]
    rows = {(r["model"], r["split"]): r["score"] for r in res.summary}
    assert set(rows) == {(m, s) for m in ("base", "e1", "e2", "best") for s in ("search", "test")}
    assert rows[("best", "test")] > max(rows[(m, "test")] for m in ("base", "e1", "e2"))
    h = res.history[0]
    assert {"fitness", "recipe", "genome", "wall_s", "scores", "generation"} <= set(h)
    assert all(0.0 <= g <= 1.0 for r in res.history for g in r["genome"])  # the library's bounds, not clipping


@pytest.mark.parametrize("kind", ["dfs", "ps+dfs"])
def test_dfs_searches_run(search_toy, tmp_path, kind):
    space = {"kind": kind, "models": ["e2", "e1"] if kind == "dfs" else ["e1"], "repeats": 1, "scales": "ones"}
    if kind == "ps+dfs":
        space["ps_recipe"] = search_toy["target"]
    res = run_search(_config(search_toy, space=space, budget={"generations": 1, "seed": 1}), tmp_path, quiet=True)
    assert res.evaluations == 10  # dim 8 -> popsize 10
    assert res.best_recipe["merge_method"] == "path"
    assert (tmp_path / "path.png").stat().st_size > 0
    if kind == "ps+dfs":
        assert "ps" in {r["model"] for r in res.summary}
        assert res.best_fitness > 0.0  # A is the target: any path mostly through it does something right


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux I/O accounting (/proc/self/io)")
def test_no_model_data_written_per_candidate(search_toy, tmp_path):
    from lazymerge.search.evaluate import Evaluator, make_engine, model_bytes
    from lazymerge.search.run import make_space
    from lazymerge.search.tasks import load_tasks

    cfg = load_config(_config(search_toy, space={"kind": "ps", "method": "dare_ties", "models": ["e1", "e2"],
                                                 "layer_groups": 2}))
    ev = Evaluator(make_engine(cfg), load_tasks(cfg))
    space = make_space(cfg)
    import numpy as np

    xs = np.random.default_rng(0).uniform(size=(6, space.dim))
    ev.evaluate(space.to_recipe(xs[0]))  # warm-up (first use of the tokenizer, lazy imports)
    before = _io()
    for x in xs[1:]:
        ev.evaluate(space.to_recipe(x))
    after = _io()
    size = model_bytes(ev.engine)
    assert after["wchar"] - before["wchar"] == 0, "evaluating candidates wrote bytes"
    assert after["write_bytes"] - before["write_bytes"] == 0
    assert ev.engine.provider.merges > 0  # ... while the candidates' weights were merged, in memory
    # the sources stay resident after the warm-up: no candidate reads them from their files again
    assert after["rchar"] - before["rchar"] < 0.01 * size, (after["rchar"] - before["rchar"], size)

    # a whole run writes its records only: far less per candidate than one model
    before = _io()
    res = run_search(cfg, tmp_path, quiet=True, summary=False, plots=False)
    written = _io()["wchar"] - before["wchar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml", "history.jsonl", "optimizer.pkl"]
    per_candidate = written / res.evaluations
    assert per_candidate < 0.05 * size, (per_candidate, size)


def test_resume_after_sigkill_equals_an_uninterrupted_run(search_toy, tmp_path):
    cfg = _config(search_toy, budget={"evaluations": 48, "seed": 3})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lazymerge.cli", "search", str(tmp_path / "cfg.yaml"), "--out",
                             str(killed), "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hist = killed / "history.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if hist.exists() and hist.read_bytes().count(b"\n") >= 15:  # mid-generation 2 (popsize 6)
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = hist.read_bytes().count(b"\n")
    assert 15 <= n_before < 48

    resumed = run_search(tmp_path / "cfg.yaml", killed, quiet=True, summary=False)
    straight = run_search(tmp_path / "cfg.yaml", tmp_path / "straight", quiet=True, summary=False)
    a, b = _records(killed), _records(tmp_path / "straight")
    assert len(a) == 48 and len({r["eval"] for r in a}) == 48  # nothing re-evaluated twice
    assert a == b
    assert (killed / "best.yaml").read_text() == (tmp_path / "straight" / "best.yaml").read_text()
    assert resumed.best_fitness == straight.best_fitness and resumed.best_genome == straight.best_genome
    # running a finished run again evaluates nothing
    again = run_search(tmp_path / "cfg.yaml", killed, quiet=True, summary=False)
    assert _records(killed) == a and again.best_recipe == straight.best_recipe


def test_parallel_workers_give_the_serial_result(search_toy, tmp_path):
    cfg = _config(search_toy, budget={"generations": 2, "seed": 5})
    serial = run_search(cfg, tmp_path / "serial", quiet=True, summary=False)
    cfg["runtime"] = {"start_method": "fork"}  # spawn works the same, but each worker re-imports torch (slow here)
    par = run_search(cfg, tmp_path / "par", workers=2, quiet=True, summary=False)
    assert _records(tmp_path / "serial") == _records(tmp_path / "par")
    assert par.best_fitness == serial.best_fitness


def test_task_types_score_the_target_best(search_toy, tmp_path):
    """Each task type ranks the known target above the base on its own outputs (and with weights, the sum)."""
    from lazymerge.search.evaluate import evaluate_recipe, make_engine
    from lazymerge.search.tasks import fitness, load_tasks

    rows = [json.loads(x) for x in Path(search_toy["data"]).read_text().splitlines()][:40]
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"prompt": r["prompt"], "choices": [" " + r["answer"], " the the the the"],
                                      "answer": 0}) + "\n" for r in rows if r["answer"] != "the the the the"))
    cfg = load_config(_config(search_toy, tasks=[
        {"name": "em", "type": "generate_exact_match", "data": search_toy["data"], "extract": "exact", "max_tokens": 4,
         "limit": 40},
        {"name": "ll", "type": "answer_loglik", "data": search_toy["data"], "weight": 0.1, "limit": 40},
        {"name": "mc", "type": "multiple_choice", "data": str(mc), "weight": 0.5}]))
    tasks = load_tasks(cfg)
    eng = make_engine(cfg)
    target = evaluate_recipe(eng, search_toy["target"], tasks)
    base = evaluate_recipe(eng, {"merge_method": "passthrough", "models": [{"model": "base"}]}, tasks)
    assert target["em"] == 1.0 and target["mc"] == 1.0
    assert target["ll"] > base["ll"] and target["ll"] < 0
    assert base["em"] < 0.2
    assert fitness(target, tasks) == pytest.approx(1.0 + 0.1 * target["ll"] + 0.5)


def _alive(pid: int) -> bool:
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pool_workers_exit_when_their_parent_is_killed(tmp_path):
    """A search's worker processes get SIGTERM when the process that started them dies (`die_with_parent`): a killed
    demo's workers were seen running on for minutes, taking the CPUs of the next run."""
    import textwrap

    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, time
        from lazymerge.search.evaluate import SharedPool
        if __name__ == "__main__":
            pool = SharedPool(2, threads=1)
            pids = {pool.executor.submit(os.getpid).result() for _ in range(4)}
            print(" ".join(map(str, sorted(pids))), flush=True)
            time.sleep(300)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)  # stderr: the killed parent's resource tracker warns of its semaphores
    try:
        pids = [int(x) for x in parent.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a worker outlived its parent"
