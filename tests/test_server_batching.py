"""Serving under load, in-process: concurrent clients over mixed recipes get exactly the greedy outputs each recipe
gives alone (computed directly with the engine), requests of one recipe really share batches, and re-registering a
name never serves the old weights."""

from __future__ import annotations

import asyncio
import re

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

PROMPTS = ["the cat sees", "one plus two is the", "hello", "red blue green sky day night", "I", "what is",
           "we they runs big small red blue", "a"]


@pytest.fixture(scope="module")
def engine(server_sources):
    from lazymerge.engine import Engine

    return Engine(server_sources, allow_open=False)


def _greedy(engine, recipe, prompts, max_tokens):
    return [c.text for c in engine.compile(recipe).generate(prompts, max_tokens=max_tokens)]


async def _with_app(config, fn):
    """Run `fn(client, app)` against the app with its lifespan (httpx's ASGI transport does not run it)."""
    from lazymerge.server.app import create_app

    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            return await fn(c, app)


def _config(server_sources, server_recipes, **kw):
    from lazymerge.server.serving import ServerConfig

    return ServerConfig(sources=server_sources, recipes=server_recipes, num_threads=1, **kw)


def _count_submits(serving) -> list:
    """Record every job the scheduler accepts (in a list, returned)."""
    seen, orig = [], serving.scheduler.submit_all

    def submit_all(jobs):
        orig(jobs)
        seen.extend(jobs)

    serving.scheduler.submit_all = submit_all
    return seen


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("cache_mb", [1024, 0], ids=["cached", "on_the_fly"])
def test_concurrent_mixed_recipes_equal_alone(server_sources, server_recipes, engine, cache_mb):
    from lazymerge.server.registry import identity_recipe

    models = ["ta_e1", "ta_e2", "ties", "base"]
    recipes = {**server_recipes, "base": identity_recipe("base", 3)}
    max_tokens = 6
    want = {m: _greedy(engine, recipes[m], PROMPTS, max_tokens) for m in models}
    # 32 requests: every (model, prompt) pair, interleaved across models, chat and completions mixed
    reqs = [(m, i) for i in range(len(PROMPTS)) for m in models]

    async def run(c, app):
        async def one(m, i):
            r = await c.post("/v1/completions", json={"model": m, "prompt": PROMPTS[i], "max_tokens": max_tokens,
                                                      "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        # hold the engine's forward lock until every request is queued: the worker blocks inside the first batch's
        # forward pass, so the requests necessarily queue together whatever the machine's speed
        serving = app.state.serving
        submitted = _count_submits(serving)
        with serving.engine.lock:
            tasks = [asyncio.ensure_future(one(m, i)) for m, i in reqs]
            while len(submitted) < len(reqs):
                await asyncio.sleep(0.005)
        got = await asyncio.gather(*tasks)
        metrics = (await c.get("/metrics")).text
        return got, metrics

    got, metrics = asyncio.run(_with_app(_config(server_sources, server_recipes, cache_mb=cache_mb,
                                                 batch_window_s=0.02), run))
    for (m, i), text in zip(reqs, got):
        assert text == want[m][i], (m, PROMPTS[i])
    # batching happened: fewer batches than requests, and some batch held several requests of one recipe
    for m in models:
        n_batches = _metric(metrics, "lazymerge_batch_requests_count", model=m, kind="generate")
        singles = _metric(metrics, "lazymerge_batch_requests_bucket", model=m, kind="generate", le="1.0")
        assert 1 <= n_batches < len(PROMPTS), (m, n_batches)
        assert singles < n_batches, m
    assert _metric(metrics, "lazymerge_batch_requests_sum", kind="generate") == len(reqs)
    if cache_mb:
        assert _metric(metrics, "lazymerge_cache_hits_total", model="ties") > 0
        assert _metric(metrics, "lazymerge_cache_misses_total", model="ties") > 0
    else:
        assert _metric(metrics, "lazymerge_engine", stat="cache_entries") == 0


def test_reregistration_never_serves_stale_weights(server_sources, server_recipes, engine):
    rec_a, rec_b = server_recipes["ta_e1"], server_recipes["ta_e2"]
    a = _greedy(engine, rec_a, PROMPTS[:4], 6)
    b = _greedy(engine, rec_b, PROMPTS[:4], 6)
    assert a != b  # the test means something only if the two recipes answer differently

    async def run(c, app):
        async def ask():
            r = await c.post("/v1/completions", json={"model": "x", "prompt": PROMPTS[:4], "max_tokens": 6,
                                                      "temperature": 0})
            assert r.status_code == 200, r.text
            return [ch["text"] for ch in r.json()["choices"]]

        seen = []
        for rec in (rec_a, rec_b, rec_a, rec_b):
            r = await c.post("/v1/recipes", json={"name": "x", "recipe": rec})
            assert r.status_code in (200, 201), r.text
            seen.append((r.json()["digest"], await ask()))
        # while requests stream under the old recipe, re-register: queued requests finish on what they resolved,
        # and the next request gets the new recipe
        await c.post("/v1/recipes", json={"name": "x", "recipe": rec_a})
        submitted = _count_submits(app.state.serving)
        pending = [asyncio.create_task(ask()) for _ in range(3)]
        while len(submitted) < 3:  # all three resolved "x" (to rec_a) and are queued or running
            await asyncio.sleep(0.001)
        await c.post("/v1/recipes", json={"name": "x", "recipe": rec_b})
        after = await ask()
        return seen, [await p for p in pending], after

    seen, during, after = asyncio.run(_with_app(_config(server_sources, {}), run))
    assert [s[1] for s in seen] == [a, b, a, b]
    assert seen[0][0] == seen[2][0] != seen[1][0] == seen[3][0]
    assert during == [a, a, a]
    assert after == b
