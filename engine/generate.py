"""Batched generation with a KV cache over a `LazyModel`: greedy, or sampling with temperature, top-p and a seed;
stop strings, max tokens and EOS. Each row of a batch has its own sampling settings.

`stream(model, prompts, params)` yields, after every decoding step, the list of `Delta`s (new text per row, and
whether the row finished). The text is the decode of the new tokens in the context of the prompt (a SentencePiece
leading space survives: prompt text + completion text == the decode of prompt + completion), produced
incrementally (`detokenize`: O(1) per token, not a re-decode of the row). Text that might be the beginning of a
stop string, or that ends in a partly decoded multi-byte character (byte-level tokenizers), is held back until it
is certain, so what is streamed never has to be taken back. `generate` collects the stream into `Completion`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .detokenize import IncrementalDetokenizer

COMPACT = 0.75  # drop finished rows from the batch once at most this fraction of it is still running


class UsageError(ValueError):
    """A request the engine cannot run (bad sampling settings, an empty prompt, an absent device)."""


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # report each sampled token's log-probability and its top-k alternatives (k >= 0)

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
    eos_token: int | None = None  # the EOS token that ended the row (not in token_ids, not in the text)
    logprobs: list[tuple[float, dict[int, float]]] | None = None  # per token of token_ids: (logprob, top-k)


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
    detok = [IncrementalDetokenizer(tok, p) for p in prompts]
    held = [""] * B  # decoded text not yet streamed: it might be the start of a stop string
    longest = [max((len(s) for s in p.stop), default=0) for p in params]
    done = [p.max_tokens == 0 for p in params]
    if all(done):
        yield [Delta(i, "", [], "length") for i in range(B)]
        return
    session = model.session(prompts)
    logits = session.prefill()  # (len(live), V): row r of the session is prompt live[r]
    live = list(range(B))
    while True:
        deltas = []
        next_tokens = []
        for r, i in enumerate(live):
            if done[i]:
                next_tokens.append(tok.pad_token_id if tok.pad_token_id is not None else 0)
                continue
            t = _sample(logits[r].float(), params[i], gens[i])
            next_tokens.append(t)
            lps = None
            if params[i].logprobs is not None and t not in eos:  # the model's distribution, before temperature
                lp = torch.log_softmax(logits[r].float(), dim=-1)
                v, k = lp.topk(min(params[i].logprobs, lp.shape[-1])) if params[i].logprobs else (lp[:0], lp[:0])
                lps = [(float(lp[t]), dict(zip(k.tolist(), v.tolist())))]
            reason = None
            if t in eos:
                reason = "stop"
                new = detok[i].flush()
            else:
                out_ids[i].append(t)
                if len(out_ids[i]) >= params[i].max_tokens:
                    reason = "length"
                new = detok[i].push(t) + (detok[i].flush() if reason else "")
            # no stop string starts in the text already streamed (see `safe`), so the held text plus the new
            # text is all that needs searching: O(longest stop + new text) per step
            text = held[i] + new
            hit = min((text.find(s) for s in params[i].stop if s in text), default=-1)
            if hit >= 0:
                text, reason = text[:hit], "stop"
            safe = len(text) if reason else max(0, len(text) - longest[i] + 1) if longest[i] else len(text)
            piece, held[i] = text[:safe], text[safe:]
            if reason:
                done[i] = True
            deltas.append(Delta(i, piece, [t] if t not in eos else [], reason, t if t in eos else None, lps))
        if deltas:
            yield deltas
        if all(done):
            return
        keep = [r for r, i in enumerate(live) if not done[i]]
        if len(keep) <= COMPACT * len(live):  # finished rows leave the batch: later steps cost what is still running
            session.select(keep)
            live, next_tokens = [live[r] for r in keep], [next_tokens[r] for r in keep]
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
