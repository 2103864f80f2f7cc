"""OpenAI's log-probability formats from the engine's `TokenScores` (pure functions of a tokenizer and scores).

Completions (`logprobs: k`): tokens as decoded text, each token's log-probability given the tokens before it (None
for the very first token of an echoed prompt), the top-k alternatives per position as {token text: logprob}, and
each token's character offset in the returned text. Chat (`logprobs: true, top_logprobs: k`): one entry per
generated token with its UTF-8 bytes.
"""

from __future__ import annotations

from . import protocol as P


def echo_text(tok, prompt: list[int], gen: list[int]) -> str:
    """The prompt's text as it reads before the generated text (with the separator the tokenizer puts between)."""
    ptext = tok.decode(prompt, skip_special_tokens=True)
    if not gen:
        return ptext
    full, first = tok.decode(prompt + gen[:1], skip_special_tokens=True), tok.decode(gen[:1], skip_special_tokens=True)
    if full.startswith(ptext) and full.endswith(first) and len(full) - len(first) >= len(ptext):
        return full[:len(full) - len(first)]
    return ptext


def top_tokens(tok, alternatives: dict[int, float] | None, k: int) -> list[tuple[str, float]] | None:
    if alternatives is None or k <= 0:
        return None
    best = sorted(alternatives.items(), key=lambda kv: -kv[1])[:k]
    return [(tok.decode([t]), lp) for t, lp in best]


def completion_logprobs(tok, seq: list[int], scores, start: int, k: int, base: int) -> P.CompletionLogprobs:
    """Positions start.. of `seq` (scored as `scores`); `base` is the text offset of position `start`."""
    part = seq[start:]
    tokens = tok.batch_decode([[t] for t in part])
    prefix = tok.batch_decode([part[:i + 1] for i in range(len(part))], skip_special_tokens=True)
    single = tok.batch_decode([[t] for t in part], skip_special_tokens=True)
    offsets = [base + max(0, len(pf) - len(s)) for pf, s in zip(prefix, single)]
    tops = [top_tokens(tok, d, k) for d in scores.top[start:]]
    return P.CompletionLogprobs(text_offset=offsets, token_logprobs=scores.logprobs[start:], tokens=tokens,
                                top_logprobs=[None if t is None else dict(t) for t in tops])


def chat_logprobs(tok, scores, start: int, k: int) -> P.ChoiceLogprobs:
    content = []
    for t, lp, d in zip(scores.token_ids[start:], scores.logprobs[start:], scores.top[start:]):
        s = tok.decode([t])
        tops = [P.TopLogprob(token=x, bytes=list(x.encode()), logprob=v) for x, v in top_tokens(tok, d, k) or []]
        content.append(P.TokenLogprob(token=s, bytes=list(s.encode()), logprob=lp, top_logprobs=tops))
    return P.ChoiceLogprobs(content=content)
