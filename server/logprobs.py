"""OpenAI's log-probability formats from the engine's `TokenScores` (pure functions of a tokenizer and scores).

Completions (`logprobs: k`): tokens as decoded text, each token's log-probability given the tokens before it (None
for the very first token of an echoed prompt), the top-k alternatives per position as {token text: logprob} (k
distinct entries: alternatives that decode to the same text are told apart by their vocabulary piece), and each
token's character offset in the returned text. Chat (`logprobs: true, top_logprobs: k`): one entry per generated
token with its own raw bytes (OpenAI: the concatenated `bytes` of the tokens are the UTF-8 bytes of the text): for a
byte-level BPE token (GPT-2/Llama 3 style) or a SentencePiece byte-fallback token (`<0xE6>`) that is a piece of a
multi-byte character, the byte(s) it stands for, not the bytes of U+FFFD.
"""

from __future__ import annotations

import functools
import json
import re

from . import protocol as P

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def echo_text(tok, prompt: list[int]) -> str:
    """The prompt's text as echoed before the completion (whose text carries its own leading separator)."""
    return tok.decode(prompt, skip_special_tokens=True)


@functools.lru_cache(maxsize=16)
def _byte_decoder(tok) -> dict[str, int] | None:
    """{symbol: byte} of a byte-level BPE tokenizer (its decoder is, or contains, tokenizers' ByteLevel), else None."""
    try:
        dec = json.loads(tok.backend_tokenizer.to_str()).get("decoder") or {}
    except Exception:  # noqa: BLE001 - a slow (Python) tokenizer has no backend
        return None
    kinds = {d.get("type") for d in dec.get("decoders", [dec])}
    if "ByteLevel" not in kinds:
        return None
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)  # GPT-2's bytes_to_unicode, in byte order
    printable = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    order = printable + [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    assert sorted(symbols, key=ord) == alphabet
    return dict(zip(symbols, order))


def _raw(tok, table, t: int, piece: str, ctx: list[int] | None) -> bytes:
    """Token t's own bytes (see the module docstring); `ctx`: the tokens before it (None: decoded alone)."""
    if t in tok.all_special_ids:
        return (piece or "").encode()
    if table is not None and piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if piece and (m := _BYTE_FALLBACK.match(piece)):
        return bytes([int(m.group(1), 16)])
    if ctx is None:
        return tok.decode([t]).encode()
    before = tok.decode(ctx, skip_special_tokens=True)
    return tok.decode(ctx + [t], skip_special_tokens=True)[len(before):].encode()


def token_texts(tok, ids: list[int], start: int) -> list[tuple[str, bytes]]:
    """(text, raw bytes) of tokens ids[start:], each in the context of the tokens before it.

    Byte-level tokens give the bytes they stand for; byte-fallback pieces their byte; any other token the UTF-8 of
    the text it adds to the decode (so that SentencePiece's "\u2581the" reads " the" mid-sentence). The text of a
    token that is part of a character is that byte decoded with U+FFFD, as OpenAI shows it."""
    table = _byte_decoder(tok)
    pieces = tok.convert_ids_to_tokens(ids[start:])
    out = []
    for i, (t, piece) in enumerate(zip(ids[start:], pieces), start):
        raw = _raw(tok, table, t, piece, ids[max(0, i - 4):i])
        out.append((raw.decode("utf-8", errors="replace"), raw))
    return out


def top_tokens(tok, alternatives: dict[int, float] | None, k: int,
               ctx: list[int] | None = None) -> list[tuple[str, float, bytes]] | None:
    """The k best alternatives as (text, logprob, bytes), each read after `ctx` (None: decoded alone); k distinct
    texts (a collision falls back to the vocabulary piece, then to the piece with its id)."""
    if alternatives is None or k <= 0:
        return None
    best = sorted(alternatives.items(), key=lambda kv: -kv[1])[:k]
    table = _byte_decoder(tok)
    out, seen = [], set()
    for t, lp in best:
        piece = tok.convert_ids_to_tokens(t) or ""
        raw = _raw(tok, table, t, piece, ctx)
        text = raw.decode("utf-8", errors="replace") if ctx is not None or table is not None else tok.decode([t])
        key = next(x for x in (text, piece, f"{piece}<{t}>") if x not in seen)
        seen.add(key)
        out.append((key, lp, raw))
    return out


def completion_logprobs(tok, seq: list[int], scores, start: int, k: int) -> P.CompletionLogprobs:
    """Positions start.. of `seq` (scored as `scores`). `tokens` are decoded alone; a token's `text_offset` is where
    that text ends up in the decode of `seq` (counted from the prompt's start, as OpenAI does, echoed or not)."""
    part = seq[start:]
    tokens = tok.batch_decode([[t] for t in part])
    prefix = tok.batch_decode([seq[:j + 1] for j in range(start, len(seq))], skip_special_tokens=True)
    single = tok.batch_decode([[t] for t in part], skip_special_tokens=True)
    offsets = [max(0, len(pf) - len(s)) for pf, s in zip(prefix, single)]
    tops = [top_tokens(tok, d, k) for d in scores.top[start:]]
    return P.CompletionLogprobs(text_offset=offsets, token_logprobs=scores.logprobs[start:], tokens=tokens,
                                top_logprobs=[None if t is None else {x: v for x, v, _ in t} for t in tops])


def chat_logprobs(tok, scores, start: int, k: int) -> P.ChoiceLogprobs:
    content = []
    ids = scores.token_ids
    texts = token_texts(tok, ids, start)
    for i, ((s, raw), lp, d) in enumerate(zip(texts, scores.logprobs[start:], scores.top[start:]), start):
        alts = top_tokens(tok, d, k, ids[max(0, i - 4):i]) or []
        tops = [P.TopLogprob(token=x, bytes=list(b), logprob=v) for x, v, b in alts]
        content.append(P.TokenLogprob(token=s, bytes=list(raw), logprob=lp, top_logprobs=tops))
    return P.ChoiceLogprobs(content=content)


def stream_completion_logprobs(tok, token_ids: list[int], lps, k: int, offset: int) -> P.CompletionLogprobs:
    """A streamed completions chunk's logprobs: its tokens (decoded alone, as `completion_logprobs` does), each
    with (logprob, {id: logprob} top-k) from the decoding loop; `offset` is the text offset of the chunk's text."""
    tops = [top_tokens(tok, d, k) for _, d in lps]
    return P.CompletionLogprobs(text_offset=[offset] * len(token_ids), token_logprobs=[lp for lp, _ in lps],
                                tokens=tok.batch_decode([[t] for t in token_ids]),
                                top_logprobs=[{x: v for x, v, _ in t} if t is not None else None for t in tops])


def stream_chat_logprobs(tok, context: list[int], token_ids: list[int], lps, k: int) -> P.ChoiceLogprobs:
    """A streamed chat chunk's logprobs: each token after `context` (the ids before it) with its own bytes."""
    ids = context[-4:] + token_ids
    start = len(ids) - len(token_ids)
    content = []
    for i, ((s, raw), (lp, d)) in enumerate(zip(token_texts(tok, ids, start), lps), start):
        alts = top_tokens(tok, d, k, ids[max(0, i - 4):i]) or []
        tops = [P.TopLogprob(token=x, bytes=list(b), logprob=v) for x, v, b in alts]
        content.append(P.TokenLogprob(token=s, bytes=list(raw), logprob=lp, top_logprobs=tops))
    return P.ChoiceLogprobs(content=content)
