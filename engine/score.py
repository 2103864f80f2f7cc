"""Log-likelihoods under a `LazyModel`, batched: per-token log-probabilities of whole sequences, and of
continuations given contexts (lm-evaluation-harness's `loglikelihood`: sum of log-probs and whether the
continuation is the greedy one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenScores:
    token_ids: list[int]
    logprobs: list[float | None]  # None for the first token (nothing before it)
    top: list[dict[int, float] | None]  # top-k alternatives per position (when asked)
    greedy: list[bool | None]  # was each token the argmax given the tokens before it


def _batches(order: list[int], lengths: list[int], max_batch_tokens: int):
    batch: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if batch and w * (len(batch) + 1) > max_batch_tokens:
            yield batch
            batch, w = [], lengths[i]
        batch.append(i)
        width = w
    if batch:
        yield batch


@torch.inference_mode()
def score_tokens(model, seqs: list[list[int]], top_k: int = 0, max_batch_tokens: int = 8192) -> list[TokenScores]:
    """Log-probability of every token of every sequence given the tokens before it (batched, right-padded)."""
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -lengths[i])
    out: list[TokenScores | None] = [None] * len(seqs)
    pad = model.pad_id
    for batch in _batches(order, lengths, max_batch_tokens):
        T = max(lengths[i] for i in batch)
        if T == 0:  # only empty sequences (a tokenizer without BOS, empty text): nothing to run the model on
            for i in batch:
                out[i] = TokenScores([], [], [], [])
            continue
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : lengths[i]] = torch.tensor(seqs[i], dtype=torch.long)
            mask[r, : lengths[i]] = 1
        logp = torch.log_softmax(model.logits(ids, mask).float(), dim=-1)  # (B, T, V)
        for r, i in enumerate(batch):
            n = lengths[i]
            if n == 0:
                out[i] = TokenScores([], [], [], [])
                continue
            lp = logp[r, : n - 1]  # predictions for tokens 1..n-1
            tgt = ids[r, 1:n]
            chosen = lp.gather(-1, tgt[:, None])[:, 0].tolist()
            greedy = (lp.argmax(-1) == tgt).tolist()
            top: list[dict[int, float] | None] = [None]
            if top_k > 0:
                v, k = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
                top += [dict(zip(kk.tolist(), vv.tolist())) for kk, vv in zip(k, v)]
            else:
                top += [None] * (n - 1)
            out[i] = TokenScores(list(seqs[i]), [None] + chosen, top, [None] + greedy)
    return out  # type: ignore[return-value]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context move to the continuation; the continuation's
    tokens are those of the whole text after the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=True)
    ctx = tokenizer.encode(context, add_special_tokens=True)
    return ctx, whole[len(ctx):]


def loglikelihood(model, pairs: list[tuple[str, str]], max_batch_tokens: int = 8192) -> list[tuple[float, bool]]:
    """For each (context, continuation): sum of the continuation's token log-probs, and whether it is greedy."""
    encoded = [encode_pair(model.tokenizer, c, x) for c, x in pairs]
    seqs = [c + x for c, x in encoded]
    scores = score_tokens(model, seqs, max_batch_tokens=max_batch_tokens)
    res = []
    for (ctx, cont), s in zip(encoded, scores):
        if not cont:
            res.append((0.0, True))
            continue
        lps = s.logprobs[len(ctx):]
        if lps and lps[0] is None:  # empty context: the first token has no prediction
            raise ValueError("loglikelihood needs a non-empty context (or a tokenizer that adds BOS)")
        res.append((float(sum(lps)), all(s.greedy[len(ctx):])))
    return res
