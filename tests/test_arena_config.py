"""The A/B page's opening state: example prompts and the two featured recipes come from the server's config
(`lazymerge demo` passes the held-out split's prompts and evolved vs the best untuned baseline)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")


def _client(server_sources, server_recipes, **kw):
    from fastapi.testclient import TestClient

    from lazymerge.server.app import create_app
    from lazymerge.server.serving import ServerConfig

    return TestClient(create_app(ServerConfig(sources=server_sources, recipes=server_recipes, num_threads=1, **kw)))


def test_arena_config_offers_examples_and_featured(server_sources, server_recipes):
    with _client(server_sources, server_recipes, examples=["the cat sees", "one plus two is"],
                 featured=("ties", "ta_e1")) as c:
        body = c.get("/v1/arena/config").json()
        assert body == {"object": "arena.config", "examples": ["the cat sees", "one plus two is"],
                        "featured": ["ties", "ta_e1"]}
        page = c.get("/static/app.js").text
        assert "/v1/arena/config" in page and "showExamples" in page
        assert 'id="examples"' in c.get("/").text


def test_arena_config_drops_unknown_featured(server_sources, server_recipes):
    with _client(server_sources, server_recipes, featured=("ties", "deleted")) as c:
        assert c.get("/v1/arena/config").json() == {"object": "arena.config", "examples": [], "featured": None}


def test_demo_helpers(tmp_path):
    import json

    from lazymerge.demo.cli import best_baseline, example_prompts

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "target_test.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"p{i}", "answer": "1"}) for i in range(6)) + "\n")
    assert example_prompts(tmp_path, 3) == ["p0", "p1", "p2"]
    table = {"target_task": "target", "rows": [
        {"model": "average (default)", "kind": "baseline", "scores": {"target": 4.0}},
        {"model": "ties (default)", "kind": "baseline", "scores": {"target": 15.0}},
        {"model": "evolved merge (PS)", "kind": "evolved", "scores": {"target": 30.0}}]}
    assert best_baseline(table) == "ties-default"
