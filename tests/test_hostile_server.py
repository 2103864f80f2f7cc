"""Issue 17, server side: bounded values at the edge, 500s without internals, context limits, hang-ups that cancel,
sources that change or hold NaN refused for themselves only, and a blind arena with bounded /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time

import pytest

pytest.importorskip("fastapi")

from test_hostile_engine import ALIAS_BOMB, _poison  # noqa: E402


@pytest.fixture(scope="module")
def sources(server_sources, tmp_path_factory):
    """A private copy of the server family plus `bad` (gets NaN) and `gone` (gets truncated)."""
    root = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, p in server_sources.items():
        shutil.copytree(p, root / name)
        out[name] = str(root / name)
    for extra, src in (("bad", "e1"), ("gone", "e2")):
        shutil.copytree(server_sources[src], root / extra)
        out[extra] = str(root / extra)
    _poison(out["bad"], "model.layers.0.self_attn.q_proj.weight", float("nan"))
    return out


@pytest.fixture(scope="module")
def client(sources, server_recipes):
    from fastapi.testclient import TestClient

    from lazymerge.server.app import create_app
    from lazymerge.server.serving import ServerConfig

    app = create_app(ServerConfig(sources=sources, recipes=server_recipes, num_threads=1, max_tokens=300,
                                  max_recipes=8))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _err(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    assert len(r.content) < 4096 and "Traceback" not in r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_out_of_range_values_are_400_naming_the_field(client, route):
    body = ({"model": "base", "prompt": "the cat"} if "chat" not in route else
            {"model": "base", "messages": [{"role": "user", "content": "the cat"}]})
    cases = [("seed", 2**64), ("seed", -(2**63) - 1), ("n", 10**30), ("top_p", 0), ("max_tokens", 2**70),
             ("frequency_penalty", 5), ("temperature", 3.0)]
    for field, value in cases:
        _err(client.post(route, json={**body, field: value, "max_tokens": 2} if field != "max_tokens" else
                         {**body, field: value}), 400, param=field)
    # non-finite floats arrive as JSON's extensions (Python's json accepts them)
    text = json.dumps({**body, "max_tokens": 1})[:-1] + ', "temperature": Infinity}'
    _err(client.post(route, content=text, headers={"content-type": "application/json"}), 400, param="temperature")
    ok = client.post(route, json={**body, "seed": 2**63 - 1, "max_tokens": 2, "temperature": 1.0})
    assert ok.status_code == 200, ok.text


def test_inline_recipe_faults_are_422_not_500(client):
    for recipe in ("merge_method: linear\nmodels: [{model: \"ba\\0se\", parameters: {weight: 1}}]\n", ALIAS_BOMB,
                   {"merge_method": "path", "base_model": "base", "path": [{"model": "base",
                                                                          "layer_range": [0, 30000000]}]},
                   "merge_method: linear\nrandom_seed: 18446744073709551616\n"
                   "models: [{model: base, parameters: {weight: 1}}]\n"):
        t0 = time.perf_counter()
        _err(client.post("/v1/completions", json={"model": "x", "prompt": "a", "recipe": recipe}), 422, "recipe")
        _err(client.post("/v1/recipes", json={"name": "bomb", "recipe": recipe}), 422, "recipe")
        assert time.perf_counter() - t0 < 10


def test_prompt_past_the_model_context_is_400_naming_both_numbers(client):
    ctx = 256  # max_position_embeddings of the tiny family
    err = _err(client.post("/v1/completions", json={"model": "base", "prompt": "the cat", "max_tokens": 290}), 400,
               param="max_tokens", code="context_length_exceeded")
    assert str(ctx) in err["message"] and "290" in err["message"]
    err = _err(client.post("/v1/completions", json={"model": "base", "prompt": list(range(3, 60)) * 5,
                                                    "max_tokens": 1}), 400, code="context_length_exceeded")
    assert str(ctx) in err["message"] and "285" in err["message"]
    err = _err(client.post("/v1/chat/completions", json={"model": "ta_e1", "max_tokens": 280, "messages": [
        {"role": "user", "content": "the cat"}]}), 400, param="max_tokens", code="context_length_exceeded")
    assert str(ctx) in err["message"]
    err = _err(client.post("/v1/compare", json={"prompts": ["the cat"], "recipes": ["base", "ta_e1"],
                                                "max_tokens": 290}), 400, code="context_length_exceeded")
    assert client.post("/v1/completions", json={"model": "base", "prompt": "the cat", "max_tokens": 2}).status_code \
        == 200


def test_nan_source_is_refused_for_itself_only(client):
    err = _err(client.post("/v1/completions", json={"model": "bad", "prompt": "the cat", "max_tokens": 2}), 422,
               code="non_finite_weights")
    assert "source 'bad'" in err["message"] and "model.layers.0.self_attn.q_proj.weight" in err["message"]
    err = _err(client.post("/v1/chat/completions", json={"model": "x", "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"}], "recipe": {"merge_method": "task_arithmetic", "base_model": "base",
                                                       "models": [{"model": "bad", "parameters": {"weight": 0.5}}]}}),
               422, code="non_finite_weights")
    assert client.post("/v1/completions", json={"model": "ta_e1", "prompt": "the cat", "max_tokens": 2}).status_code \
        == 200


def test_changed_source_is_503_for_itself_only(client, sources):
    ok = client.post("/v1/completions", json={"model": "gone", "prompt": "the cat", "max_tokens": 2})
    assert ok.status_code == 200
    os.truncate(os.path.join(sources["gone"], "model.safetensors"), 1000)
    for _ in range(2):
        err = _err(client.post("/v1/completions", json={"model": "gone", "prompt": "the cat", "max_tokens": 2}), 503,
                   code="source_unavailable")
        assert "source 'gone'" in err["message"] and sources["gone"] not in err["message"]
    for model in ("base", "ta_e2", "ties"):
        r = client.post("/v1/completions", json={"model": model, "prompt": "the cat", "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert client.get("/health").status_code == 200


def _recorded_jobs(serving):
    jobs = []
    orig = serving.scheduler.submit_all

    def submit_all(js):
        jobs.extend(js)
        return orig(js)

    serving.scheduler.submit_all = submit_all
    return jobs, lambda: setattr(serving.scheduler, "submit_all", orig)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_non_streaming_client_that_hangs_up_cancels_its_generation(client, route):
    serving = client.app.state.serving
    model = serving.registry.get("ta_e1").model
    orig_stream = model.stream

    def slow_stream(prompts, params=None, **kw):  # 20 ms per step: a 250-token generation takes 5 s
        for out in orig_stream(prompts, params=params, **kw):
            time.sleep(0.02)
            yield out

    model.stream = slow_stream
    jobs, restore = _recorded_jobs(serving)
    body = ({"model": "ta_e1", "prompt": "the cat", "max_tokens": 250, "temperature": 0} if "chat" not in route else
            {"model": "ta_e1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0})
    payload = json.dumps(body).encode()
    sent = []

    async def call():
        msgs = [{"type": "http.request", "body": payload, "more_body": False}]

        async def receive():
            if msgs:
                return msgs.pop(0)
            await asyncio.sleep(0.4)  # the client hangs up 0.4 s in
            return {"type": "http.disconnect"}

        async def send(msg):
            sent.append(msg)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": route, "raw_path": route.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(payload)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": client.app}
        await client.app(scope, receive, send)

    try:
        t0 = time.perf_counter()
        client.portal.call(call)
        assert time.perf_counter() - t0 < 3.0
        assert sent and sent[0]["status"] == 499
        job = jobs[-1]
        assert job.cancelled
        deadline = time.time() + 5
        while serving.scheduler.depth() != (0, 0):
            assert time.time() < deadline
            time.sleep(0.02)
        assert len(job.log[0].sent_ids) < 100  # stopped long before its 200-250 tokens
    finally:
        model.stream = orig_stream
        restore()


def _series(text: str, name: str) -> set[str]:
    return set(re.findall(rf'^lazymerge_[a-z_]+{{[^}}]*model="{re.escape(name)}"[^}}]*}} [^\n]+$', text, re.M))


def test_arena_is_blind_and_metrics_cardinality_is_bounded(client):
    names = ("ta_e1", "ta_e2")
    before = client.get("/metrics").text
    snap = {n: _series(before, n) for n in names}
    r = client.post("/v1/arena/battles", json={"prompt": "the cat", "recipes": list(names), "max_tokens": 6})
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    battle = events[0]["battle_id"]
    assert not any(n in r.text for n in names)
    after = client.get("/metrics").text
    for n in names:  # no per-recipe series moved (the scrape-time cache gauge aside, which does not tell sides)
        moved = {s for s in _series(after, n) ^ snap[n] if not s.startswith("lazymerge_cache_bytes")}
        assert not moved, moved
    assert 'model="arena"' in after
    assert client.post("/v1/arena/votes", json={"battle_id": battle, "winner": "A"}).status_code == 200

    def labels(text):
        return set(re.findall(r'model="([^"]*)"', text))

    base_labels = labels(client.get("/metrics").text)
    for i in range(6):  # inline recipes and registered-then-deleted ones must not grow the page
        inline = {"merge_method": "task_arithmetic", "base_model": "base",
                  "models": [{"model": "e1", "parameters": {"weight": 0.1 * (i + 1)}}]}
        assert client.post("/v1/completions", json={"model": f"x{i}", "prompt": "a", "max_tokens": 1,
                                                    "recipe": inline}).status_code == 200
        assert client.post("/v1/recipes", json={"name": f"tmp{i}", "recipe": inline}).status_code == 201
        assert client.post("/v1/completions", json={"model": f"tmp{i}", "prompt": "a", "max_tokens": 1}).status_code \
            == 200
        assert client.delete(f"/v1/recipes/tmp{i}").status_code == 200
        assert client.post("/v1/compare", json={"prompts": ["a"], "recipes": ["base", inline],
                                                "max_tokens": 1}).status_code == 200
    grown = labels(client.get("/metrics").text) - base_labels
    assert grown <= {"inline", "other"}, grown
