"""Text exactly as the tokenizer decodes it: incremental detokenization equals the decode of prompt + output minus
the decode of the prompt (SentencePiece leading spaces survive; byte-level pieces of one character wait for the
rest), and stop strings that start with a space match, on a real (tiny) model and in the stream."""

from __future__ import annotations

import random

import pytest

from lazymerge.engine import toy
from lazymerge.engine.detokenize import IncrementalDetokenizer
from lazymerge.engine.generate import SamplingParams, generate, stream

JAPANESE = "数は 42 です。猫が見る"


def _tokenizers():
    return {"metaspace": toy.make_metaspace_tokenizer(), "bytelevel": toy.make_bytelevel_tokenizer(),
            "word": toy.make_tokenizer()}


@pytest.mark.parametrize("kind", ["metaspace", "bytelevel", "word"])
def test_incremental_text_equals_the_decode_in_context(kind):
    tok = _tokenizers()[kind]
    rng = random.Random(0)
    words = list(toy.WORDS)
    for _ in range(20):
        prompt = tok.encode(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))), add_special_tokens=False)
        extra = " ".join(rng.choice(words + [JAPANESE]) for _ in range(rng.randint(1, 12)))
        gen = tok.encode(" " + extra, add_special_tokens=False)
        d = IncrementalDetokenizer(tok, prompt)
        pieces = [d.push(t) for t in gen] + [d.flush()]
        whole = tok.decode(prompt + gen, skip_special_tokens=True)
        assert "".join(pieces) == whole[len(tok.decode(prompt, skip_special_tokens=True)):], (kind, prompt, gen)
        assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenizer_keeps_a_bounded_window():
    tok = toy.make_metaspace_tokenizer()
    d = IncrementalDetokenizer(tok, tok.encode("the cat sees"))
    for t in tok.encode(" ".join(["one two three"] * 200), add_special_tokens=False):
        d.push(t)
        assert len(d.ids) <= 6  # O(1) tokens decoded per step, whatever the output length


@pytest.fixture(scope="module")
def metaspace_model(tmp_path_factory):
    from lazymerge.engine import Engine

    fam = toy.make_family(tmp_path_factory.mktemp("metaspace"), "mistral", 1, seed=0, tokenizer="metaspace")
    eng = Engine({k: str(v) for k, v in fam.items()})
    return eng.compile({"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1.0}}]})


def test_metaspace_completion_keeps_its_leading_space_and_space_stops_fire(metaspace_model):
    m = metaspace_model
    prompt = m.encode("the cat sees")
    c = m.generate([prompt], max_tokens=4)[0]
    assert c.text == " 1 plus a in"  # the case: was '1 plus a in'
    assert m.tokenizer.decode(prompt) + c.text == m.tokenizer.decode(prompt + c.token_ids)
    first = c.text.split()[0]
    stopped = m.generate([prompt], max_tokens=4, stop=(" " + first,))[0]
    assert (stopped.text, stopped.finish_reason) == ("", "stop")
    stopped = m.generate([prompt], max_tokens=4, stop=(" a",))[0]
    assert (stopped.text, stopped.finish_reason) == (" 1 plus", "stop")
    pieces = [d.text for step in m.stream([prompt], max_tokens=4) for d in step]
    assert "".join(pieces) == c.text and pieces[0].startswith(" ")


def test_stream_of_byte_level_pieces_reassembles_each_character():
    from test_generate_stream import Scripted

    tok = toy.make_bytelevel_tokenizer()
    prompt = tok.encode("the cat", add_special_tokens=False)
    script = tok.encode(" " + JAPANESE, add_special_tokens=False)
    assert len(script) > len(JAPANESE)  # the characters really are split over several tokens
    model = Scripted(tok, script)
    pieces = [d.text for step in stream(model, [prompt], [SamplingParams(max_tokens=64)]) for d in step]
    assert "".join(pieces) == " " + JAPANESE and all("\ufffd" not in p for p in pieces)
    out = generate(model, [prompt], [SamplingParams(max_tokens=64, stop=(" 42",))])[0]
    assert (out.text, out.finish_reason) == (" 数は", "stop")
