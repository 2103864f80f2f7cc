"""The same search over a local Ray instance (one actor per worker, each holding the sources once): same records
as the serial run. Skipped where Ray is not installed (`pip install lazymerge[ray]`)."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (optional extra `lazymerge[ray]`)")


def test_ray_search_equals_serial(search_toy, tmp_path):
    from lazymerge.search import run_search

    cfg = {"sources": search_toy["paths"], "base_model": "base",
           "space": {"kind": "ps", "method": "task_arithmetic", "models": ["e1", "e2"]},
           "tasks": [{"name": "em", "type": "generate_exact_match", "data": search_toy["data"], "extract": "exact",
                      "max_tokens": 4}],
           "budget": {"generations": 2, "seed": 7}}
    serial = run_search(cfg, tmp_path / "serial", quiet=True, summary=False)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        par = run_search({**cfg, "runtime": {"backend": "ray"}}, tmp_path / "ray", workers=2, quiet=True,
                         summary=False)
    finally:
        ray.shutdown()

    def records(d):
        return [{k: v for k, v in json.loads(x).items() if k not in ("wall_s", "merge_s", "eval_s", "time")}
                for x in (d / "history.jsonl").read_text().splitlines()]

    assert records(tmp_path / "serial") == records(tmp_path / "ray")
    assert par.best_fitness == serial.best_fitness
