"""The merge server in-process (FastAPI TestClient), driven by the official `openai` client where the API is
OpenAI's: completions, chat, streaming, echo+logprobs, compare, the recipe registry, metrics, the arena's votes.
Every expected output is computed directly with the engine (a separate `Engine`, no server involved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

PROMPTS = ["the cat sees", "one plus two is the", "hello", "red blue green sky day night"]


@pytest.fixture(scope="module")
def oracle(server_sources):
    """recipe name -> LazyModel compiled by a separate engine (the expected outputs)."""
    from conftest import SERVER_RECIPES

    from lazymerge.engine import Engine
    from lazymerge.server.registry import identity_recipe

    eng = Engine(server_sources, allow_open=False)
    models = {name: eng.compile(r) for name, r in SERVER_RECIPES.items()}
    for s in server_sources:
        models[s] = eng.compile(identity_recipe(s, eng.sources[s].num_layers))
    return models


@pytest.fixture(scope="module")
def client(server_sources, server_recipes, tmp_path_factory):
    from fastapi.testclient import TestClient

    from lazymerge.server.app import create_app
    from lazymerge.server.serving import ServerConfig

    db = tmp_path_factory.mktemp("votes") / "votes.sqlite"
    cfg = ServerConfig(sources=server_sources, recipes=server_recipes, db_path=str(db), num_threads=1)
    with TestClient(create_app(cfg)) as c:
        yield c


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def greedy(model, prompts, max_tokens=6, **kw):
    return [c.text for c in model.generate(prompts, max_tokens=max_tokens, **kw)]


def test_models_list_recipes_and_sources(oai, client, oracle):
    models = {m.id: m for m in oai.models.list().data}
    assert set(models) == {"base", "e1", "e2", "ta_e1", "ta_e2", "ties"}
    assert models["base"].model_extra["kind"] == "source" and models["ties"].model_extra["kind"] == "recipe"
    assert models["ta_e1"].model_extra["digest"] == oracle["ta_e1"].digest
    assert oai.models.retrieve("ties").id == "ties"


@pytest.mark.parametrize("name", ["ta_e1", "ties", "base"])
def test_completions_equal_engine_greedy(oai, oracle, name):
    r = oai.completions.create(model=name, prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == greedy(oracle[name], PROMPTS)
    ids = [oracle[name].encode(p) for p in PROMPTS]
    assert r.usage.prompt_tokens == sum(map(len, ids))
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in oracle[name].generate(PROMPTS, max_tokens=6))
    assert r.system_fingerprint == oracle[name].digest
    # token ids as the prompt (what lm-eval's local-completions sends) give the same text
    r2 = oai.completions.create(model=name, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in r2.choices] == [c.text for c in r.choices]


def test_chat_equals_engine_greedy(oai, oracle):
    msgs = [{"role": "user", "content": "hello world"}]
    r = oai.chat.completions.create(model="ta_e2", messages=msgs, max_tokens=5, temperature=0)
    m = oracle["ta_e2"]
    want = m.generate([m.chat_prompt(msgs)], max_tokens=5)[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(m.chat_prompt(msgs))


def test_streaming_equals_non_streaming(oai):
    full = oai.completions.create(model="ties", prompt="the cat sees", max_tokens=7, temperature=0)
    chunks = list(oai.completions.create(model="ties", prompt="the cat sees", max_tokens=7, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 7

    msgs = [{"role": "user", "content": "red blue"}]
    full = oai.chat.completions.create(model="ta_e1", messages=msgs, max_tokens=6, temperature=0)
    chunks = list(oai.chat.completions.create(model="ta_e1", messages=msgs, max_tokens=6, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_echo_logprobs_equal_engine_scores(oai, oracle):
    m = oracle["ta_e1"]
    text = "the cat sees the dog and the bird"
    ids = m.encode(text)
    want = m.score([ids], top_k=3)[0]
    r = oai.completions.create(model="ta_e1", prompt=text, max_tokens=0, echo=True, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text
    assert lp.tokens == m.tokenizer.convert_ids_to_tokens(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-5)
    for got, exp in zip(lp.top_logprobs[1:], want.top[1:]):
        assert got == pytest.approx({m.tokenizer.decode([k]): v for k, v in exp.items()}, abs=1e-5)
    assert [text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens

    # lm-evaluation-harness local-completions: token ids, echo, max_tokens=1, logprobs=1; it reads [ctxlen:-1]
    r = oai.completions.create(model="ta_e1", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[1:-1] == pytest.approx(want.logprobs[1:], abs=1e-5)
    nxt = m.generate([ids], max_tokens=1)[0]
    full = m.score([ids + nxt.token_ids])[0]
    assert lp.token_logprobs[-1] == pytest.approx(full.logprobs[-1], abs=1e-5)
    assert max(lp.top_logprobs[-1], key=lp.top_logprobs[-1].get) == lp.tokens[-1]  # greedy: the top-1 token


def test_generated_logprobs_without_echo(oai, oracle):
    m = oracle["ties"]
    r = oai.completions.create(model="ties", prompt="one plus two is", max_tokens=4, logprobs=2, temperature=0)
    ids = m.encode("one plus two is")
    out = m.generate([ids], max_tokens=4)[0]
    s = m.score([ids + out.token_ids])[0]
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(s.logprobs[len(ids):], abs=1e-5)
    assert len(r.choices[0].logprobs.tokens) == 4


def test_chat_logprobs(oai, oracle):
    msgs = [{"role": "user", "content": "one two"}]
    r = oai.chat.completions.create(model="ties", messages=msgs, max_tokens=3, temperature=0, logprobs=True,
                                    top_logprobs=2)
    m = oracle["ties"]
    p = m.chat_prompt(msgs)
    out = m.generate([p], max_tokens=3)[0]
    s = m.score([p + out.token_ids])[0]
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(s.logprobs[len(p):], abs=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)


def test_stop_seed_and_n(oai, oracle):
    m = oracle["ta_e1"]
    full = greedy(m, ["one plus two is the"], max_tokens=6)[0]
    stop = full.split()[2]
    r = oai.completions.create(model="ta_e1", prompt="one plus two is the", max_tokens=6, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"

    kw = {"model": "ties", "prompt": "the cat", "max_tokens": 8, "temperature": 1.5, "seed": 7, "n": 3}
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # rows get distinct seeds


def test_inline_recipe(client, oracle):
    from conftest import SERVER_RECIPES

    body = {"model": "my-experiment", "prompt": PROMPTS[:2], "max_tokens": 5, "temperature": 0,
            "recipe": SERVER_RECIPES["ta_e2"]}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "my-experiment"
    assert [c["text"] for c in r.json()["choices"]] == greedy(oracle["ta_e2"], PROMPTS[:2], max_tokens=5)
    assert "my-experiment" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_compare(client, oracle):
    refs = [greedy(oracle["ta_e1"], [PROMPTS[0]], max_tokens=4)[0], "the dog"]
    body = {"prompts": PROMPTS[:2], "recipes": ["ta_e1", "ta_e2", {"merge_method": "linear", "models": [
        {"model": "e1", "parameters": {"weight": 1.0}}]}], "references": refs, "max_tokens": 4}
    r = client.post("/v1/compare", json=body)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["recipe"] for x in res[:2]] == ["ta_e1", "ta_e2"] and res[2]["recipe"].startswith("inline-")
    for x in res[:2]:
        m = oracle[x["recipe"]]
        assert x["outputs"] == greedy(m, PROMPTS[:2], max_tokens=4)
        assert x["latency_s"] > 0 and x["tokens_per_s"] > 0 and x["completion_tokens"] > 0
        from lazymerge.engine.score import encode_pair

        lls = m.loglikelihood(list(zip(PROMPTS[:2], refs)))
        n_tok = [len(encode_pair(m.tokenizer, p, ref)[1]) for p, ref in zip(PROMPTS[:2], refs)]
        assert x["reference_logprob"] == pytest.approx([ll / n for (ll, _), n in zip(lls, n_tok)], abs=1e-5)
    assert res[0]["exact_match"] == [True, False] and res[0]["exact_match_rate"] == 0.5
    assert res[1]["exact_match"][1] is False


def test_registry_round_trip(client, oracle):
    from conftest import SERVER_RECIPES

    r = client.post("/v1/recipes", json={"name": "rt", "recipe": SERVER_RECIPES["ties"]})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "rt" and info["kind"] == "recipe" and info["digest"] == oracle["ties"].digest
    assert info["recipe"]["merge_method"] == "ties" and info["num_layers"] == 3
    assert client.get("/v1/recipes/rt").json() == info
    assert "rt" in [x["id"] for x in client.get("/v1/recipes").json()["data"]]
    assert "rt" in [x["id"] for x in client.get("/v1/models").json()["data"]]
    # the same recipe as a JSON object: same digest, replaced (200)
    as_json = {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "e1", "parameters": {"weight": 10.0, "density": 0.5}},
        {"model": "e2", "parameters": {"weight": 10.0, "density": 0.5}}]}
    r = client.post("/v1/recipes", json={"name": "rt", "recipe": as_json})
    assert r.status_code == 200 and r.json()["digest"] == info["digest"]
    assert client.delete("/v1/recipes/rt").json() == {"id": "rt", "object": "recipe", "deleted": True}
    assert client.get("/v1/recipes/rt").status_code == 404
    assert client.post("/v1/completions", json={"model": "rt", "prompt": "a"}).status_code == 404
    assert client.delete("/v1/recipes/base").status_code == 400  # sources stay


def test_health_and_metrics(client, oai, server_sources):
    assert client.get("/health").json()["status"] == "ok"
    oai.completions.create(model="ta_e2", prompt="hello", max_tokens=2, temperature=0)
    text = client.get("/metrics").text
    for needle in ('lazymerge_requests_total{endpoint="completions",model="ta_e2",outcome="ok"}',
                   'lazymerge_request_latency_seconds_count{endpoint="completions",model="ta_e2"}',
                   'lazymerge_time_to_first_token_seconds_count{model="ta_e2"}',
                   'lazymerge_queue_time_seconds_count{model="ta_e2"}',
                   'lazymerge_prompt_tokens_total{model="ta_e2"}', 'lazymerge_generation_tokens_total{model="ta_e2"}',
                   'lazymerge_cache_hits_total{model="ta_e2"}', 'lazymerge_cache_misses_total{model="ta_e2"}',
                   'lazymerge_cache_bytes{model="ta_e2"}', 'lazymerge_batch_size_count{kind="generate",model="ta_e2"}',
                   'lazymerge_http_requests_total{method="POST",route="/v1/completions",status="200"}'):
        assert needle in text, needle
    cache_bytes = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("lazymerge_cache_bytes{")}
    assert cache_bytes['lazymerge_cache_bytes{model="ta_e2"}'] > 0
    # an identity recipe's tensors are read copies (engine/reader.py), cached like merged ones: at most the source
    assert 0 <= cache_bytes['lazymerge_cache_bytes{model="base"}'] <= sum(
        p.stat().st_size for p in Path(server_sources["base"]).glob("*.safetensors"))


def _battle(client, **body):
    r = client.post("/v1/arena/battles", json=body)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    return events


def test_arena_vote_and_leaderboard_persist(client, server_sources, oracle):
    from fastapi.testclient import TestClient

    from lazymerge.server.app import create_app

    ev = _battle(client, prompt="the cat sees", recipes=["ta_e1", "ta_e2"], max_tokens=5)
    bid = ev[0]["battle_id"]
    text = {s: "".join(e["text"] for e in ev if e["type"] == "delta" and e["side"] == s) for s in "AB"}
    assert sorted(e["side"] for e in ev if e["type"] == "done") == ["A", "B"]
    assert all("ta_e" not in json.dumps(e) for e in ev)  # blind: no names before the vote
    r = client.post("/v1/arena/votes", json={"battle_id": bid, "winner": "A"})
    assert r.status_code == 200, r.text
    names = r.json()["recipes"]
    assert sorted(names.values()) == ["ta_e1", "ta_e2"]
    for s in "AB":
        assert text[s] == greedy(oracle[names[s]], ["the cat sees"], max_tokens=5)[0]
    assert client.post("/v1/arena/votes", json={"battle_id": bid, "winner": "B"}).status_code == 400
    board = {x["recipe"]: x for x in client.get("/v1/leaderboard").json()["data"]}
    assert board[names["A"]]["wins"] == 1 and board[names["A"]]["rating"] == 1016.0
    assert board[names["B"]]["losses"] == 1 and board[names["B"]]["win_rate"] == 0.0

    ev = _battle(client, prompt="hello", max_tokens=3)  # two models at random
    client.post("/v1/arena/votes", json={"battle_id": ev[0]["battle_id"], "winner": "tie"})
    before = client.get("/v1/leaderboard").json()
    # a new server over the same database: the leaderboard survives the restart
    cfg = client.app.state.config
    with TestClient(create_app(cfg)) as c2:
        assert c2.get("/v1/leaderboard").json() == before


def test_elo_and_win_rate():
    from lazymerge.server.votes import leaderboard

    rows = {r["recipe"]: r for r in leaderboard([("x", "y", "A"), ("x", "y", "A"), ("y", "z", "tie")])}
    assert rows["x"]["wins"] == 2 and rows["x"]["win_rate"] == 1.0
    assert rows["y"]["losses"] == 2 and rows["y"]["ties"] == 1 and rows["y"]["win_rate"] == pytest.approx(1 / 6)
    assert rows["x"]["rating"] == pytest.approx(1000 + 16 + 32 * (1 - 1 / (1 + 10 ** (-32 / 400))), abs=0.01)
    assert rows["x"]["rating"] > rows["z"]["rating"] > rows["y"]["rating"]


def test_serve_cpu_fused_flag_reaches_the_engine(monkeypatch, server_sources):
    """`lazymerge serve --eager-merge` -> ServerConfig(cpu_fused=False) -> Engine(..., cpu_fused=False); without it
    (or with the old `--cpu-fused`) the engine keeps its default (None: fused)."""
    import argparse

    import lazymerge.engine
    from lazymerge.server import cli
    from lazymerge.server.serving import MergeServing

    got = []
    monkeypatch.setattr(cli, "serve_blocking", lambda *a, **kw: got.append(kw))
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    for argv, want in ((["--eager-merge"], False), (["--cpu-fused"], None), ([], None)):
        args = parser.parse_args(["serve", "--source", f"base={server_sources['base']}", *argv])
        assert args.func(args) == 0 and got[-1]["cpu_fused"] is want
    seen, real = [], lazymerge.engine.Engine

    def engine(*a, cpu_fused=None, **kw):  # records the flag; builds the engine without its process-wide effect
        seen.append(cpu_fused)
        return real(*a, **kw)

    monkeypatch.setattr(lazymerge.engine, "Engine", engine)
    serving = MergeServing(cli.build_config(server_sources, {}, cpu_fused=True, db_path=None))
    serving.close()
    assert seen == [True]
