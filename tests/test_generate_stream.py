"""The decoding loop's text handling, with a scripted model: multi-byte characters split across byte-level tokens
are never streamed half-decoded; stop strings are never streamed and then taken back."""

from __future__ import annotations

import torch

from lazymerge.engine.generate import SamplingParams, generate, stream


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


class Scripted:
    """A 'model' whose greedy choice at step k is script[k] (then EOS)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.eos_ids = tokenizer, script, {tokenizer.eos_token_id}

    def session(self, prompts):
        model = self

        class S:
            k = 0

            def _logits(self):
                v = torch.full((len(prompts), len(model.tokenizer)), -1e9)
                t = model.script[self.k] if self.k < len(model.script) else model.tokenizer.eos_token_id
                v[:, t] = 0.0
                self.k += 1
                return v

            def prefill(self):
                return self._logits()

            def step(self, tokens):
                return self._logits()

        return S()


def test_multibyte_characters_are_never_streamed_half_decoded():
    tok = byte_tokenizer()
    text = "数は 42 です"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the Japanese characters really are split over several tokens
    model = Scripted(tok, ids)
    pieces = [d.text for step in stream(model, [[5]], [SamplingParams(max_tokens=64)]) for d in step]
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == text
    assert generate(model, [[5]], [SamplingParams(max_tokens=64)])[0].text == text


def test_stop_string_is_never_streamed():
    tok = byte_tokenizer()
    ids = tok.encode("abc STOP def", add_special_tokens=False)
    model = Scripted(tok, ids)
    p = SamplingParams(max_tokens=64, stop=("STOP",))
    pieces = [d.text for step in stream(model, [[5]], [p]) for d in step]
    assert "".join(pieces) == "abc " and all("S" not in x for x in pieces)
    assert generate(model, [[5]], [p])[0].finish_reason == "stop"
