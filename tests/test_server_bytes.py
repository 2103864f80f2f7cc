"""The OpenAI API right to the byte, on a SentencePiece-style (Metaspace) and a byte-level BPE tokenizer, both built
locally: completion text is the decode in context (leading space kept, prompt + text == echo, space-led stops fire),
streamed too; chat logprob `bytes` are each token's own bytes (pieces of a multi-byte character included); `logprobs`
with `stream: true`; k distinct top_logprobs; vLLM's tokenizer routes; /v1/compare never scores an empty reference."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

RECIPE = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: e1\n    parameters: {weight: 4.0}\n"


def _client(tmp_path_factory, tokenizer):
    from fastapi.testclient import TestClient

    from lazymerge.engine.toy import make_family
    from lazymerge.server.app import create_app
    from lazymerge.server.serving import ServerConfig

    fam = make_family(tmp_path_factory.mktemp(tokenizer), "mistral", 1, seed=0, tokenizer=tokenizer)
    cfg = ServerConfig(sources={k: str(v) for k, v in fam.items()}, recipes={"ta": RECIPE}, num_threads=1)
    return TestClient(create_app(cfg))


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    with _client(tmp_path_factory, "metaspace") as c:
        yield c


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory):
    with _client(tmp_path_factory, "bytelevel") as c:
        yield c


def _events(r) -> list[dict]:
    return [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: ") and x != "data: [DONE]"]


def test_metaspace_completion_text_is_the_decode_in_context(meta):
    body = {"model": "base", "prompt": "the cat sees", "max_tokens": 4, "temperature": 0}
    c = meta.post("/v1/completions", json=body).json()["choices"][0]
    assert c["text"] == " 1 plus a in"  # the case ('1 plus a in' before)
    echo = meta.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]["text"]
    assert echo == "the cat sees" + c["text"]
    streamed = "".join(e["choices"][0]["text"] for e in _events(meta.post("/v1/completions", json={**body, "stream": True}))
                       if e["choices"])
    assert streamed == c["text"]
    stopped = meta.post("/v1/completions", json={**body, "stop": [" plus"]}).json()["choices"][0]
    assert (stopped["text"], stopped["finish_reason"]) == (" 1", "stop")


def test_tokenizer_routes_have_vllm_shapes(meta):
    info = meta.get("/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["model"]) == ("</s>", "<s>", "ta") and info["chat_template"]
    t = meta.post("/tokenize", json={"prompt": "the cat sees", "add_special_tokens": False}).json()
    assert t["count"] == len(t["tokens"]) == 3 and t["max_model_len"] == 256
    assert meta.post("/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": "the cat sees"}
    chat = meta.post("/tokenize", json={"messages": [{"role": "user", "content": "hello"}]}).json()
    assert chat["count"] > 2
    assert meta.post("/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
    assert meta.post("/tokenize", json={"model": "nope", "prompt": "a"}).status_code == 404


def test_completion_top_logprobs_are_k_distinct_alternatives(meta):
    r = meta.post("/v1/completions", json={"model": "ta", "prompt": "the cat sees", "max_tokens": 3,
                                           "temperature": 0, "logprobs": 5}).json()["choices"][0]["logprobs"]
    assert all(len(t) == 5 for t in r["top_logprobs"])


def test_logprobs_with_stream_match_the_non_streamed_ones(meta):
    body = {"model": "ta", "prompt": "the cat sees", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    whole = meta.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    events = _events(meta.post("/v1/completions", json={**body, "stream": True}))
    lps = [e["choices"][0]["logprobs"] for e in events if e["choices"] and e["choices"][0]["logprobs"]]
    assert [x for lp in lps for x in lp["token_logprobs"]] == pytest.approx(whole["token_logprobs"], abs=1e-4)
    assert [x for lp in lps for x in lp["tokens"]] == whole["tokens"]
    chat = {"model": "ta", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 3, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    ref = meta.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
    got = [c for e in _events(meta.post("/v1/chat/completions", json={**chat, "stream": True})) if e["choices"]
           for c in ((e["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert [c["token"] for c in got] == [c["token"] for c in ref]
    assert [c["bytes"] for c in got] == [c["bytes"] for c in ref]
    assert [c["logprob"] for c in got] == pytest.approx([c["logprob"] for c in ref], abs=1e-4)


def test_chat_logprob_bytes_are_each_tokens_own_bytes(bytelevel):
    chat = {"model": "ta", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 12, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    r = bytelevel.post("/v1/chat/completions", json=chat).json()["choices"][0]
    content = r["logprobs"]["content"]
    assert bytes(b for c in content for b in c["bytes"]).decode("utf-8", errors="replace") == r["message"]["content"]
    assert all(len(c["top_logprobs"]) == 3 for c in content)
    # a scored reference with multi-byte characters: every byte-level piece reports the byte it stands for
    from lazymerge.engine.toy import make_bytelevel_tokenizer
    from lazymerge.server.logprobs import token_texts

    tok = make_bytelevel_tokenizer()
    ids = tok.encode("the 数は", add_special_tokens=False)
    texts = token_texts(tok, ids, 1)
    assert b"".join(raw for _, raw in texts) == " 数は".encode()
    assert b"\xef\xbf\xbd" not in b"".join(raw for _, raw in texts)  # never U+FFFD's bytes


def test_streamed_byte_level_text_reassembles(bytelevel):
    body = {"model": "ta", "prompt": "the cat", "max_tokens": 12, "temperature": 0}
    whole = bytelevel.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]["text"]
    pieces = [e["choices"][0]["text"] for e in _events(bytelevel.post("/v1/completions", json={**body, "stream": True}))
              if e["choices"]]
    assert "the cat" + "".join(pieces) == whole  # (a random model emits invalid UTF-8: U+FFFD is in the decode too)


def test_compare_never_scores_an_empty_reference_as_perfect(meta):
    r = meta.post("/v1/compare", json={"prompts": ["the cat sees", "the cat sees:", "the cat sees"],
                                       "recipes": ["ta", "base"], "references": [" dog", "6", " zzz qqq"],
                                       "max_tokens": 2}).json()
    for res in r["results"]:
        assert res["reference_logprob"][0] < 0 and res["reference_logprob"][1:] == [None, None]
        assert res["reference_notes"][0] is None
        assert "no token" in res["reference_notes"][1]  # "6" glued to ":" is one unknown word: nothing added
        assert "unknown" in res["reference_notes"][2]
        assert res["mean_reference_logprob"] == res["reference_logprob"][0]
