"""Tokenizer, model config and the training loop of the toy zoo.

Contract: `make_tokenizer(vocab)` returns a word-level `PreTrainedTokenizerFast` (adds `<s>` in front,
decodes to space-joined words); `make_model(spec, tokenizer)` a freshly initialised transformers
`MistralForCausalLM`; `train(model, texts, ...)` runs plain AdamW with warmup + cosine on a fixed,
seeded stream of texts and returns stats. `train` can leave parameters untouched: `frozen` names parameters that do
not train (by substring), `rows` restricts the token-indexed matrices (embeddings, LM head) to the given token rows;
every other parameter and row ends bit-identical to where it started. Everything is deterministic given the seed
and the thread count; nothing here knows which language or task a text belongs to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q : {{ m['content'] }} A :"
    "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_len: int = 96


def make_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", ids["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_len,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return MistralForCausalLM(config)


def _batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token rows; labels are -100 on padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def train(
    model: MistralForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    next_text: Callable[[], str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    frozen: tuple[str, ...] = (),
    rows: list[int] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train in place on `steps * batch_size` texts drawn from `next_text` (already seeded by the caller).

    `frozen`: substrings of parameter names that stay fixed. `rows`: if given, only these token rows of
    `embed_tokens` and `lm_head` train (their other rows get zero gradient; with weight decay 0, AdamW leaves them
    exactly unchanged). `on_step(k)`: called after step k (1-based), e.g. `StepProgress.update`."""
    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab()
    bos = tokenizer.bos_token_id
    if rows is not None and weight_decay:
        raise ValueError("rows= needs weight_decay=0 (decay would move the rows that do not train)")
    params, hooks, fixed = [], [], []
    for name, p in model.named_parameters():
        if any(f in name for f in frozen):
            p.requires_grad_(False)
            fixed.append(p)
            continue
        if rows is not None and ("embed_tokens" in name or "lm_head" in name):
            keep = torch.zeros(p.shape[0], 1, dtype=p.dtype)
            keep[rows] = 1
            hooks.append(p.register_hook(lambda g, keep=keep: g * keep))
        params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        batch = [[bos] + [vocab[w] for w in next_text().split()] for _ in range(batch_size)]
        ids, mask, labels = _batch(batch, tokenizer.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    for h in hooks:
        h.remove()
    for p in fixed:
        p.requires_grad_(True)
    tail = losses[-max(1, steps // 10) :]
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "final_loss": round(sum(tail) / len(tail), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
