"""Every refusal of the merge server with its status and OpenAI's error JSON (400/401/404/413/422/429), and that a
failing request never takes the server down or spoils another request."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")

KEY = "sekret-key"


def _app(server_sources, server_recipes, **kw):
    from lazymerge.server.app import create_app
    from lazymerge.server.serving import ServerConfig

    kw.setdefault("num_threads", 1)
    return create_app(ServerConfig(sources=server_sources, recipes=server_recipes, **kw))


@pytest.fixture(scope="module")
def client(server_sources, server_recipes):
    from fastapi.testclient import TestClient

    app = _app(server_sources, server_recipes, api_key=KEY, max_tokens=20, max_prompt_tokens=12, max_batch_size=4,
               max_body_bytes=4096, max_recipes=4)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def assert_error(r, status, param=None, contains=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert contains in err["message"], err
    return err


def test_401_api_key(client):
    from fastapi.testclient import TestClient

    anon = TestClient(client.app)  # same app, running lifespan of `client`, no credentials
    assert anon.get("/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/", "/static/app.js", "/v1/leaderboard"):
        assert_error(anon.get(path), 401)
    assert_error(anon.post("/v1/completions", json={"model": "base", "prompt": "a"}), 401)
    assert_error(anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert anon.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
    # the page: /?api_key=KEY sets a cookie that then authorizes the page's own requests
    r = anon.get(f"/?api_key={KEY}")
    assert r.status_code == 200 and "lazymerge_key" in r.headers["set-cookie"]
    assert anon.get("/static/app.js").status_code == 200
    assert anon.get("/v1/models").status_code == 200

    import openai

    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=TestClient(client.app),
                        max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_400_invalid_requests(client):
    post = client.post
    assert_error(post("/v1/completions", json={"model": "base", "prompt": "a", "max_tokens": 21}), 400, "max_tokens")
    long = " ".join(["the"] * 13)
    err = assert_error(post("/v1/completions", json={"model": "base", "prompt": long}), 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    assert_error(post("/v1/completions", json={"model": "base", "prompt": "a", "n": 5}), 400, "n")
    assert_error(post("/v1/completions", json={"model": "base", "prompt": ["a", "b", "c"], "n": 2}), 400, "n")
    assert_error(post("/v1/completions", json={"model": "base", "prompt": ""}), 400, "prompt")
    assert_error(post("/v1/completions", json={"model": "base", "prompt": []}), 400, "prompt")
    assert_error(post("/v1/completions", json={"model": "base", "prompt": [[1, 99999]]}), 400, "prompt")
    assert_error(post("/v1/completions", json={"model": "base", "prompt": "a", "max_tokens": -1}), 400, "max_tokens")
    assert_error(post("/v1/completions", json={"model": "base", "prompt": "a", "top_p": 0}), 400, "top_p")
    assert_error(post("/v1/completions", json={"model": "base", "prompt": "a", "logit_bias": {"5": 1}}), 400)
    assert_error(post("/v1/completions", json={"model": "base", "prompt": "a", "logprobs": 1, "stream": True}), 400)
    assert_error(post("/v1/completions", json={"model": "base"}), 400, "prompt")
    r = post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 400)
    assert_error(post("/v1/chat/completions", json={"model": "base", "messages": []}), 400, "messages")
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(post("/v1/chat/completions", json={"model": "base", "messages": msgs}), 400)
    assert_error(post("/v1/compare", json={"prompts": ["a"], "recipes": ["base"]}), 400, "recipes")
    assert_error(post("/v1/compare", json={"prompts": ["a"], "recipes": ["base", "e1"], "references": []}), 400)
    assert_error(post("/v1/recipes", json={"name": "bad/name", "recipe": "merge_method: linear"}), 400, "name")
    assert_error(post("/v1/recipes", json={"name": "base", "recipe": {"merge_method": "passthrough", "models": [
        {"model": "e1"}]}}), 400, "name")
    assert_error(post("/v1/arena/battles", json={"prompt": "a", "recipes": ["base", "base"]}), 400, "recipes")


def test_404_not_found(client):
    import openai
    from fastapi.testclient import TestClient

    err = assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "a"}), 404, "model")
    assert err["code"] == "model_not_found"
    assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "a", "stream": True}), 404)
    assert_error(client.post("/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "a"}]}), 404)
    assert_error(client.get("/v1/recipes/nope"), 404)
    assert_error(client.delete("/v1/recipes/nope"), 404)
    assert_error(client.get("/v1/models/nope"), 404)
    assert_error(client.get("/v2/nothing"), 404)
    assert_error(client.post("/v1/arena/votes", json={"battle_id": "nope", "winner": "A"}), 404, "battle_id")
    assert_error(client.post("/v1/compare", json={"prompts": ["a"], "recipes": ["base", "nope"]}), 404)
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=TestClient(client.app),
                        max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="a")


def test_413_body_too_large(client):
    big = {"model": "base", "prompt": "the " * 2000}
    assert_error(client.post("/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: counted while reading
        yield b'{"model": "base", "prompt": "'
        for _ in range(100):
            yield b"the " * 20
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413)


def test_422_bad_recipes(client):
    err = assert_error(client.post("/v1/recipes", json={"name": "x", "recipe": {"merge_method": "slerp",
                       "base_model": "e1", "models": [{"model": "e1"}, {"model": "e2"}]}}), 422, "recipe")
    assert "parameters.t" in err["message"]
    assert_error(client.post("/v1/recipes", json={"name": "x", "recipe": "merge_method: [unclosed"}), 422)
    assert_error(client.post("/v1/recipes", json={"name": "x", "recipe": "merge_method: nope\nmodels: []"}), 422,
                 contains="merge_method")
    # a path that is not a registered source is never opened, inline or registered
    for path in ("/etc", "/tmp", "../../e1"):
        rec = {"merge_method": "linear", "models": [{"model": path, "parameters": {"weight": 1.0}}]}
        err = assert_error(client.post("/v1/recipes", json={"name": "x", "recipe": rec}), 422)
        assert "unknown source" in err["message"]
        assert_error(client.post("/v1/completions", json={"model": "x", "prompt": "a", "recipe": rec}), 422)
    layers = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "base", "layer_range": [0, 9]}]}]}
    assert_error(client.post("/v1/recipes", json={"name": "x", "recipe": layers}), 422, contains="layer")
    assert_error(client.get("/v1/recipes/x"), 404)


def test_registered_source_path_is_accepted(client, server_sources):
    rec = {"merge_method": "linear", "models": [{"model": server_sources["e1"], "parameters": {"weight": 1.0}}]}
    r = client.post("/v1/recipes", json={"name": "by-path", "recipe": rec})
    assert r.status_code == 201, r.text
    assert client.delete("/v1/recipes/by-path").status_code == 200


def test_429_recipe_limit(client, server_recipes):
    existing = sum(x["kind"] == "recipe" for x in client.get("/v1/recipes").json()["data"])
    made = []
    for i in range(4 - existing):
        r = client.post("/v1/recipes", json={"name": f"lim{i}", "recipe": server_recipes["ties"]})
        assert r.status_code == 201
        made.append(f"lim{i}")
    err = assert_error(client.post("/v1/recipes", json={"name": "one-more", "recipe": server_recipes["ties"]}), 429)
    assert err["code"] == "recipe_limit_reached"
    assert client.post("/v1/recipes", json={"name": made[-1] if made else "ties",
                                            "recipe": server_recipes["ta_e1"]}).status_code == 200  # replacing is ok
    for name in made:
        client.delete(f"/v1/recipes/{name}")


def test_429_queue_full_then_everyone_served(server_sources, server_recipes):
    """Hold the engine's forward lock so that the worker blocks inside the first request's forward pass: the queue
    fills deterministically; the next request is refused with 429, the queued ones complete once released."""
    from fastapi.testclient import TestClient

    with TestClient(_app(server_sources, server_recipes, max_queue=2)) as c:
        serving = c.app.state.serving
        body = {"model": "ta_e1", "prompt": "the cat", "max_tokens": 3, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            with serving.engine.lock:
                first = pool.submit(c.post, "/v1/completions", json=body)
                _wait(lambda: serving.scheduler.depth() == (0, 1))
                second = pool.submit(c.post, "/v1/completions", json={**body, "n": 2})
                _wait(lambda: serving.scheduler.depth()[0] == 2)
                err = assert_error(c.post("/v1/completions", json=body), 429)
                assert err["code"] == "queue_full"
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert len(second.result().json()["choices"]) == 2
        assert c.post("/v1/completions", json=body).status_code == 200


def _wait(cond, timeout=20.0):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


class _FakeModel:
    """Stands in for a LazyModel in the scheduler: echoes each prompt's first token, fails on a token < 0."""

    digest = "fake"

    def stream(self, prompts, params):
        from lazymerge.engine.generate import Delta

        if any(t < 0 for p in prompts for t in p):
            raise ValueError("poisoned prompt")
        for step in range(2):
            yield [Delta(i, f"{p[0]}.", [p[0]], "length" if step == 1 else None) for i, p in enumerate(prompts)]


def test_scheduler_isolates_a_failing_request():
    """A batch that fails is retried request by request: only the poisoned request errors, the others get their
    own outputs; the worker thread survives."""
    from lazymerge.server.scheduler import Job, Scheduler, Sink

    async def main():
        sched = Scheduler(batch_window_s=0.05)
        sched.start()
        try:
            jobs = [Job("generate", "m", _FakeModel(), [[t]], params=[None]) for t in (1, -1, 3)]
            for j in jobs:
                j.sink = Sink()
                sched.submit(j)
            results = []
            for j in jobs:
                texts, err = [], None
                while True:
                    _, kind, value = await j.sink.queue.get()
                    if kind == "deltas":
                        texts += [d.text for _, d in value]
                    elif kind == "error":
                        err = value
                        break
                    elif kind == "end":
                        break
                results.append(("".join(texts), err))
            again = Job("generate", "m", _FakeModel(), [[5]], params=[None], sink=Sink())
            sched.submit(again)
            kinds = []
            while not kinds or kinds[-1] != "end":
                kinds.append((await again.sink.queue.get())[1])
            return results, sched.batches
        finally:
            sched.stop()

    results, batches = asyncio.run(main())
    assert results[0] == ("1.1.", None) and results[2] == ("3.3.", None)
    assert results[1][0] == "" and "poisoned" in str(results[1][1])
    assert batches >= 4  # the failed batch of 3, then one per request, then the last one


def test_server_survives_client_disconnect_and_errors(client):
    """A stream abandoned mid-way is cancelled; the worker keeps serving others."""
    with client.stream("POST", "/v1/completions", json={"model": "ties", "prompt": "the cat", "max_tokens": 20,
                                                        "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    assert threading.active_count() > 0
    r = client.post("/v1/completions", json={"model": "ties", "prompt": "the cat", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    assert client.get("/health").json()["status"] == "ok"
