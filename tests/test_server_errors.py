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
    assert_error(post("/v1/completions", json={"model": "base", "prompt": "a", "logprobs": 1, "stream": True,
                                              "echo": True}), 400)
    assert_error(post("/v1/completions", json={"model": "base"}), 400, "prompt")
    r = post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 400)
    r = post("/v1/completions", content=b'{"model": "base",', headers={"Content-Type": "application/json"})
    err = assert_error(r, 400, contains="invalid JSON in the request body")
    assert err["param"] is None and "character 17" in err["message"], err
    wizard = [{"role": "wizard", "content": "hi"}]
    assert_error(post("/v1/chat/completions", json={"model": "base", "messages": wizard}), 400, "messages",
                 contains="messages.0.role")
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


class _MidStreamModel:
    """A fake LazyModel: prompt [t, L] decodes L steps of text f"{t}."; a batch holding a prompt with t < 0 raises
    at step 1, after its first step was delivered. `calls` records each run's prompts; `shift` changes the text a
    later run produces (to make a re-run diverge)."""

    digest = "fake-mid"

    def __init__(self):
        self.calls = []
        self.shift = 0

    def stream(self, prompts, params):
        from lazymerge.engine.generate import Delta

        self.calls.append([list(p) for p in prompts])
        shift = self.shift * (len(self.calls) - 1)
        for step in range(max(p[1] for p in prompts)):
            if step == 1 and any(p[0] < 0 for p in prompts):
                raise ValueError("poisoned prompt")
            yield [Delta(i, f"{p[0] + shift}.", [p[0] + shift], "length" if step == p[1] - 1 else None)
                   for i, p in enumerate(prompts) if step < p[1]]


async def _drain(job):
    """(text per row, token ids per row, error or None) of a scheduler job, from its events."""
    texts, ids = [""] * job.rows, [[] for _ in range(job.rows)]
    while True:
        _, kind, value = await job.sink.queue.get()
        if kind == "deltas":
            for row, d in value:
                texts[row] += d.text
                ids[row] += d.token_ids
        elif kind in ("error", "end"):
            return texts, ids, value if kind == "error" else None


def _run_jobs(model, prompts_per_job):
    from lazymerge.server.scheduler import Job, Scheduler, Sink

    async def main():
        sched = Scheduler(batch_window_s=0.05)
        sched.start()
        try:
            jobs = [Job("generate", "m", model, ps, params=[None] * len(ps)) for ps in prompts_per_job]
            for j in jobs:
                j.sink = Sink()
            sched.submit_all(jobs)  # one batch
            results = [await _drain(j) for j in jobs]
            # a client sees "done" inside the worker's step, just before the worker retires the batch: let it settle
            for _ in range(200):
                if sched.depth() == (0, 0):
                    break
                await asyncio.sleep(0.01)
            return results, sched.depth()
        finally:
            sched.stop()

    return asyncio.run(main())


def test_scheduler_mid_stream_failure_reruns_the_others_without_duplicates():
    """A shared batch that fails after streaming output fails only the culprit: the other requests are re-run alone
    and their clients get each row exactly once (the replayed prefix is not sent again); finished rows are not
    re-run."""
    model = _MidStreamModel()
    results, depth = _run_jobs(model, [[[1, 3], [2, 1]], [[-1, 3]], [[3, 3]]])
    (a_text, a_ids, a_err), (b_text, _, b_err), (c_text, c_ids, c_err) = results
    assert a_err is None and c_err is None
    assert a_text == ["1.1.1.", "2."] and a_ids == [[1, 1, 1], [2]]
    assert c_text == ["3.3.3."] and c_ids == [[3, 3, 3]]
    assert b_text == ["-1."] and "poisoned" in str(b_err)
    assert model.calls[0] == [[1, 3], [2, 1], [-1, 3], [3, 3]]
    assert sorted(model.calls[1:]) == [[[-1, 3]], [[1, 3]], [[3, 3]]]  # row [2, 1] had finished: not re-run
    assert depth == (0, 0)


def test_scheduler_replay_that_diverges_fails_with_a_clear_error():
    model = _MidStreamModel()
    model.shift = 10  # a re-run produces other tokens than the ones already streamed
    results, _ = _run_jobs(model, [[[1, 3]], [[-1, 3]]])
    (a_text, _, a_err), (_, _, b_err) = results
    assert a_text == ["1."]  # what was streamed before the failure, never contradicted
    assert a_err is not None and a_err.code == "replay_diverged" and a_err.status == 500
    assert b_err is not None  # the culprit's own re-run diverged too (or failed): an error either way


def test_scheduler_pins_a_seed_on_unseeded_sampled_rows():
    """So that a re-run after a shared batch failed reproduces a sampled row."""
    from lazymerge.engine import SamplingParams
    from lazymerge.server.scheduler import Job, Scheduler

    async def main():
        sched = Scheduler()  # not started: submission only
        params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, seed=7), SamplingParams()]
        job = Job("generate", "m", _MidStreamModel(), [[1, 1]] * 3, params=params)
        sched.submit(job)
        return job.params

    p = asyncio.run(main())
    assert p[0].seed is not None and p[0].temperature == 1.0 and p[1].seed == 7 and p[2].seed is None


def _oracle(server_sources, recipe, prompts, max_tokens):
    from lazymerge.engine import Engine

    m = Engine(server_sources, allow_open=False).compile(recipe)
    return [c.text for c in m.generate(prompts, max_tokens=max_tokens)]


def _sse_text(lines) -> tuple[str, list]:
    import json

    text, errors = "", []
    for line in lines:
        if line.startswith("data: {"):
            obj = json.loads(line[6:])
            if "error" in obj:
                errors.append(obj["error"])
            else:
                text += "".join(ch["text"] for ch in obj["choices"])
    return text, errors


def test_mid_stream_failure_spares_the_other_requests_of_its_batch(server_sources, server_recipes):
    """Over the real app: three requests of one recipe queue together (the worker is held inside another recipe's
    forward pass) and share one batch; the batch fails after its first decoding steps because of one request. That
    request alone gets the error; the streamed and the non-streamed request get exactly their greedy outputs, the
    streamed one without any text repeated."""
    from fastapi.testclient import TestClient

    good, bad, max_tokens = ["the cat sees", "one plus two is the"], "red blue green sky day night", 8
    want = _oracle(server_sources, server_recipes["ties"], good, max_tokens)
    with TestClient(_app(server_sources, server_recipes)) as c:
        serving = c.app.state.serving
        model = serving.registry.get("ties").model
        bad_ids = model.encode(bad)
        orig, failed_at = model.stream, []

        def stream(prompts, params=None, **kw):
            for step, deltas in enumerate(orig(prompts, params=params, **kw)):
                if step == 2 and bad_ids in prompts:
                    failed_at.append(len(prompts))
                    raise RuntimeError("poisoned row")
                yield deltas

        model.stream = stream
        body = {"model": "ties", "max_tokens": max_tokens, "temperature": 0}

        def streamed():
            with c.stream("POST", "/v1/completions", json={**body, "prompt": good[0], "stream": True}) as r:
                return _sse_text(list(r.iter_lines()))

        try:
            with ThreadPoolExecutor(4) as pool:
                with serving.engine.lock:
                    blocker = pool.submit(c.post, "/v1/completions", json={**body, "model": "base", "prompt": "a"})
                    _wait(lambda: serving.scheduler.depth() == (0, 1))
                    s = pool.submit(streamed)
                    _wait(lambda: serving.scheduler.depth()[0] == 1)
                    n = pool.submit(c.post, "/v1/completions", json={**body, "prompt": good[1]})
                    _wait(lambda: serving.scheduler.depth()[0] == 2)
                    b = pool.submit(c.post, "/v1/completions", json={**body, "prompt": bad})
                    _wait(lambda: serving.scheduler.depth()[0] == 3)
                assert blocker.result().status_code == 200
                assert s.result() == (want[0], [])
                assert n.result().status_code == 200 and n.result().json()["choices"][0]["text"] == want[1]
                err = assert_error(b.result(), 500, contains="internal error (id ")  # no internals leave the server
                assert err["type"] == "internal_error" and "poisoned" not in err["message"]
            assert failed_at == [3, 1]  # the shared batch, then the culprit alone
            assert c.post("/v1/completions", json={**body, "prompt": good[1]}).json()["choices"][0]["text"] == want[1]
        finally:
            del model.stream


def _gate(model, after_steps=1):
    """Make `model` stop after `after_steps` decoding steps until the returned event is set; returns (event, steps
    pulled so far: a list with one counter, closed: a list that gets True once its generator is closed)."""

    orig, gate, pulled, closed = model.stream, threading.Event(), [0], []

    def stream(prompts, params=None, **kw):
        try:
            for step, deltas in enumerate(orig(prompts, params=params, **kw)):
                if step >= after_steps:
                    assert gate.wait(30), "gate never opened"
                pulled[0] += 1
                yield deltas
        finally:
            closed.append(True)

    model.stream = stream
    return gate, pulled, closed


def _record_jobs(scheduler) -> list:
    """Make `scheduler.submit_all` also append every submitted job to the returned list (undo: del
    scheduler.submit_all)."""
    jobs, orig = [], scheduler.submit_all

    def submit_all(js):
        orig(js)
        jobs.extend(js)

    scheduler.submit_all = submit_all
    return jobs


def test_compare_queues_all_recipes_or_none(server_sources, server_recipes):
    """A comparison whose rows do not all fit in the queue is refused with 429 and leaves no job behind (before the
    fix its first recipe's job was queued and ran for nobody)."""
    from fastapi.testclient import TestClient

    with TestClient(_app(server_sources, server_recipes, max_queue=3)) as c:
        serving = c.app.state.serving
        body = {"prompts": ["the cat", "hello"], "recipes": ["ta_e1", "ta_e2"], "max_tokens": 3, "temperature": 0}
        with serving.engine.lock:  # anything queued would stay visible: the worker could not finish it
            err = assert_error(c.post("/v1/compare", json=body), 429)
            assert err["code"] == "queue_full"
            time.sleep(0.1)
            assert serving.scheduler.depth() == (0, 0) and serving.scheduler.batches == 0
        r = c.post("/v1/compare", json={**body, "prompts": ["the cat"]})  # 2 rows: fits
        assert r.status_code == 200, r.text
        assert [x["recipe"] for x in r.json()["results"]] == ["ta_e1", "ta_e2"]


def test_compare_cancels_the_other_recipes_when_one_fails(server_sources, server_recipes):
    from fastapi.testclient import TestClient

    with TestClient(_app(server_sources, server_recipes)) as c:
        serving = c.app.state.serving
        slow, bad = serving.registry.get("ta_e1").model, serving.registry.get("ta_e2").model
        gate, pulled, closed = _gate(slow)

        def fail(prompts, params=None, **kw):
            raise RuntimeError("broken recipe")
            yield  # a generator

        bad.stream = fail
        jobs = _record_jobs(serving.scheduler)
        try:
            body = {"prompts": ["the cat"], "recipes": ["ta_e1", "ta_e2"], "max_tokens": 12, "temperature": 0}
            assert_error(c.post("/v1/compare", json=body), 500, contains="internal error (id ")
            slow_job = next(j for j in jobs if j.model is slow)
            _wait(lambda: slow_job.cancelled)  # the sibling is cancelled, not left running for nobody
            gate.set()
            _wait(lambda: serving.scheduler.depth() == (0, 0) and closed)
            assert pulled[0] < 12  # stopped early, not decoded to the end
        finally:
            gate.set()
            del slow.stream, bad.stream, serving.scheduler.submit_all


def test_server_survives_client_disconnect_and_errors(client, server_sources, server_recipes):
    """A stream abandoned mid-way is cancelled (its job stops decoding, the queue drains); the worker keeps serving
    others, with the right output."""
    serving = client.app.state.serving
    model = serving.registry.get("ties").model
    gate, pulled, closed = _gate(model)
    jobs = _record_jobs(serving.scheduler)
    try:
        with client.stream("POST", "/v1/completions", json={"model": "ties", "prompt": "the cat", "max_tokens": 20,
                                                            "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        _wait(lambda: jobs and jobs[0].cancelled)
        gate.set()
        _wait(lambda: serving.scheduler.depth() == (0, 0) and closed)
        assert pulled[0] < 20
    finally:
        gate.set()
        del model.stream, serving.scheduler.submit_all
    want = _oracle(server_sources, server_recipes["ties"], ["the cat"], 3)
    r = client.post("/v1/completions", json={"model": "ties", "prompt": "the cat", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[0]
    assert client.get("/health").json()["status"] == "ok"
