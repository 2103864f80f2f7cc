"""Batched generation with a KV cache over a `LazyModel`: greedy, or sampling with temperature, top-p and a seed;
stop strings, max tokens and EOS. Each row of a batch has its own sampling settings.

`stream(model, prompts, params)` yields, after every decoding step, the list of `Delta`s (new text per row, and
whether the row finished). Text that might be the beginning of a stop string, or that ends in a partly decoded
multi-byte character (byte-level tokenizers), is held back until it is certain, so what is streamed never has to
be taken back. `generate` collects the stream into `Completion`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch


class UsageError(ValueError):
    """A request the engine cannot run (bad sampling settings, an empty prompt, an absent device)."""


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 0:
            raise UsageError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop = tuple(s for s in (self.stop or ()) if s)


@dataclass
class Delta:
    row: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" once finished


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    # logits: (V,) float32
    if p.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        cum = torch.cumsum(sp, dim=-1)
        keep = cum - sp < p.top_p  # the smallest prefix whose mass reaches top_p
        sp = sp * keep
        return int(si[torch.multinomial(sp / sp.sum(), 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def stream(model, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[Delta]]:
    """Decode every prompt (token ids) under its params; yields the deltas of each step."""
    B = len(prompts)
    tok = model.tokenizer
    eos = model.eos_ids
    gens = []
    for p in params:
        if p.temperature > 0:
            g = torch.Generator(device="cpu")
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,))))
            gens.append(g)
        else:
            gens.append(None)
    out_ids: list[list[int]] = [[] for _ in range(B)]
    sent = [0] * B
    done = [p.max_tokens == 0 for p in params]
    if all(done):
        yield [Delta(i, "", [], "length") for i in range(B)]
        return
    session = model.session(prompts)
    logits = session.prefill()  # (B, V)
    while True:
        deltas = []
        next_tokens = []
        for i in range(B):
            if done[i]:
                next_tokens.append(tok.pad_token_id if tok.pad_token_id is not None else 0)
                continue
            t = _sample(logits[i].float(), params[i], gens[i])
            next_tokens.append(t)
            reason = None
            if t in eos:
                reason = "stop"
            else:
                out_ids[i].append(t)
            text = tok.decode(out_ids[i], skip_special_tokens=True)
            stops = params[i].stop
            hit = min((text.find(s) for s in stops if s in text), default=-1)
            if hit >= 0:
                text, reason = text[:hit], "stop"
            elif reason is None and len(out_ids[i]) >= params[i].max_tokens:
                reason = "length"
            safe = len(text) if reason or not stops else max(sent[i], len(text) - max(len(s) for s in stops) + 1)
            if not reason:  # a token may end inside a multi-byte character: wait for the rest of it
                while safe > sent[i] and text[safe - 1] == "\ufffd":
                    safe -= 1
            piece = text[sent[i]:safe]
            sent[i] = max(sent[i], safe)
            if reason:
                done[i] = True
            deltas.append(Delta(i, piece, [t] if t not in eos else [], reason))
        if deltas:
            yield deltas
        if all(done):
            return
        logits = session.step(torch.tensor(next_tokens, dtype=torch.long))


def generate(model, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
    texts = [""] * len(prompts)
    ids: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    for deltas in stream(model, prompts, params):
        for d in deltas:
            texts[d.row] += d.text
            ids[d.row].extend(d.token_ids)
            if d.finish_reason:
                reasons[d.row] = d.finish_reason
    return [Completion(t, i, r, len(p)) for t, i, r, p in zip(texts, ids, reasons, prompts)]
