"""The merged vocabulary: the output tokenizer of a recipe and, per source tensor, its rows in that vocabulary.

With `tokenizer_source: union | base | <model>` or mergekit's `tokenizer:` section (`source`, `tokens`,
`pad_to_multiple_of`), the embedding and LM head of every source are re-indexed by token *string* into the output
vocabulary before they are merged, with mergekit 0.1.5's rules for the rows a source lacks
(mergekit/tokenizer/build.py, embed.py):

* output vocabulary: `base` is the reference model's tokenizer (base_model, else the first model), `<model>` that
  model's, `union` the reference's plus every token of the other models (plain tokens first, then added tokens, first
  settings win); then every token named under `tokens:` that is not in it yet; the output has `len(vocab)` rows,
  rounded up to `pad_to_multiple_of`. A model's token counts as present only if its id is below the model's
  embedding rows.
* a token every model of the tensor has (and no `force`): each model's own row.
* otherwise a default row: the `tokens:` entry's source if given (`{kind: zero}`, a model's row of the same token,
  or `{kind: model_token, model, token_id | token}`); else the only model that has it; else, when the base model
  is among the tensor's models and has it, the base's row; else the mean of the rows of the models that have it;
  a token no model has gets a zero row. Models that lack the token (every model, with `force`) take that row.
* padding rows: the mean of each model's (re-indexed) rows.

The merge method then runs on these re-indexed tensors. Everything here reads tokenizers and safetensors headers,
never a tensor: the rows are `RowMap`s (engine/rowmap.py) that the merger applies on demand. Deliberate differences
from mergekit (README): the ids of the union's new tokens are assigned in a fixed order (reference first, then the
recipe's order; each model's tokens by id), where mergekit's order follows Python set and hash-map iteration and
changes from run to run; a tokenizer token whose id is beyond its model's embedding counts as absent from that model
(mergekit strips such tokens from the base's BPE tokenizer, and fails with a KeyError for any other model's).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from .checkpoint import Source
from .recipe import ModelTokenEmbedding, Recipe, RecipeError, TokenEmbedding, ZeroEmbedding
from .rowmap import RowMap

_TOKENIZERS: OrderedDict = OrderedDict()  # (path, fingerprint) -> tokenizer (shared, never mutated)
_VOCABS: OrderedDict = OrderedDict()  # content key -> OutputVocab
_CACHE_SIZE = 16


@dataclass
class OutputVocab:
    """The recipe's output vocabulary and where each model's tokens sit in its own tokenizer."""

    source: str  # the source whose tokenizer files (and generation_config.json) the output starts from
    tokenizer: object | None  # the built tokenizer, or None when it is `source`'s tokenizer unchanged
    vocab: dict[str, int]  # output token -> id
    n_rows: int  # output vocabulary rows (len(vocab), padded to pad_to_multiple_of)
    perms: dict[str, torch.Tensor]  # model -> (n_rows,) int64: the model's row of each output id, or -1
    original: dict[str, dict[str, int]]  # model -> its own tokenizer's vocab (model_token lookups by string)
    fingerprints: dict[str, str]  # model -> source fingerprint
    tokens: dict[str, TokenEmbedding]  # the recipe's per-token settings (string -> setting)
    key: str


def _stamp(src: Source) -> str:
    """The source's identity including its tokenizer files (the fingerprint covers weights and config only)."""
    files = sorted(p for p in src.path.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab.",
                                                                        "merges", "added_tokens")))
    return src.fingerprint + "".join(f":{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files)


def _tokenizer(name: str, src: Source):
    key = (str(src.path), _stamp(src))
    tok = _TOKENIZERS.get(key)
    if tok is None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(src.path))
        except (OSError, ValueError) as e:
            raise RecipeError(f"tokenizer: cannot load the tokenizer of source {name!r} ({src.path}): "
                              f"{str(e).splitlines()[0]}") from None
        _TOKENIZERS[key] = tok
        while len(_TOKENIZERS) > _CACHE_SIZE:
            _TOKENIZERS.popitem(last=False)
    return tok


def _rows(src: Source) -> int:
    return src.vocab_size  # rows of the input embedding


def _union(base: str, models: list[str], sources: dict[str, Source]):
    """The reference tokenizer plus every other model's tokens (mergekit/tokenizer/build.py, in a fixed order)."""
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for m in [base] + [x for x in models if x != base]:
        tok = _tokenizer(m, sources[m])
        rows = _rows(sources[m])
        dec = tok.added_tokens_decoder
        added_strs = {info.content for info in dec.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < rows and t not in added_strs:
                plain.setdefault(t, None)
        for i, info in sorted(dec.items()):
            if i < rows:
                added.setdefault(info.content, info)
    res = copy.deepcopy(_tokenizer(base, sources[base]))
    have = res.get_vocab()
    new_plain = [t for t in plain if t not in added and t not in have]
    if new_plain:
        res.add_tokens(new_plain)
    new_added = [info for t, info in added.items() if t not in have]
    for info in new_added:
        res.add_tokens(info)
    return res, bool(new_plain or new_added)


def output_vocab(recipe: Recipe, sources: dict[str, Source], ref: str, models: list[str],
                 resolve: Callable[[str, str], str]) -> OutputVocab | None:
    """The output vocabulary of `recipe` (None when it merges no vocabulary: no `tokenizer_source`/`tokenizer`).

    `ref`: the reference model (base_model, else the first); `models`: every source the recipe references;
    `resolve(ref, where)`: a recipe's model reference -> source name. Raises RecipeError naming the field.
    """
    if recipe.tokenizer is not None:
        kind, tokens, pad = recipe.tokenizer.source, dict(recipe.tokenizer.tokens or {}), \
            recipe.tokenizer.pad_to_multiple_of
        where = "tokenizer.source"
    elif recipe.tokenizer_source is not None:
        kind, tokens, pad, where = recipe.tokenizer_source, {}, None, "tokenizer_source"
    else:
        return None
    named = kind if kind in ("union", "base") else resolve(kind, where)
    key = json.dumps([named, ref, [(m, _stamp(sources[m])) for m in models],
                      {t: c.model_dump(mode="json") for t, c in tokens.items()}, pad])
    hit = _VOCABS.get(key)
    if hit is not None:
        _VOCABS.move_to_end(key)
        return hit
    changed = False
    if named == "union":
        tok, changed = _union(ref, models, sources)
        out_src = ref
    else:
        out_src = ref if named == "base" else named
        tok = _tokenizer(out_src, sources[out_src])
    have = set(tok.get_vocab())
    extra = [t for t in tokens if t not in have]
    if extra:
        tok = copy.deepcopy(tok) if not changed else tok
        tok.add_tokens(extra)
        changed = True
    vocab = tok.get_vocab()
    n = len(vocab)
    n_rows = n if not pad or n % pad == 0 else (n // pad + 1) * pad
    top = max(vocab.values(), default=-1)
    if top >= n_rows:
        raise RecipeError(f"{where}: the output tokenizer has token ids up to {top} but only {n} tokens; a tokenizer "
                          "with holes in its ids cannot be merged")
    perms, original = {}, {}
    out_ids = torch.tensor(list(vocab.values()), dtype=torch.long)
    for m in models:
        mv = _tokenizer(m, sources[m]).get_vocab()
        original[m] = mv
        rows = _rows(sources[m])
        p = torch.full((n_rows,), -1, dtype=torch.long)
        own = torch.tensor([mv.get(t, -1) for t in vocab], dtype=torch.long)
        own[own >= rows] = -1
        p[out_ids] = own
        perms[m] = p
    for t, cfg in tokens.items():  # resolve the per-token sources now: unknown models fail at plan time
        s = cfg.source
        if isinstance(s, ModelTokenEmbedding):
            s = s.model_copy(update={"model": resolve(s.model, f"tokenizer.tokens[{t!r}].source.model")})
            tokens[t] = TokenEmbedding(source=s, force=cfg.force)
        elif isinstance(s, str):
            tokens[t] = TokenEmbedding(source=resolve(s, f"tokenizer.tokens[{t!r}].source"), force=cfg.force)
    ov = OutputVocab(out_src, tok if changed else None, vocab, n_rows, perms, original,
                     {m: sources[m].fingerprint for m in models}, tokens,
                     hashlib.sha256(key.encode()).hexdigest()[:24])
    _VOCABS[key] = ov
    while len(_VOCABS) > _CACHE_SIZE:
        _VOCABS.popitem(last=False)
    return ov


def row_maps(ov: OutputVocab, refs: list[tuple[str, str]], base: str | None, sources: dict[str, Source],
             where: str) -> list[RowMap | int | None]:
    """Per input `(source, tensor name)` of one vocabulary tensor: its RowMap in the output vocabulary, or an int
    `k` when it is the source's first `k` rows unchanged (a crop), or None when it is the whole tensor unchanged.

    The tensor's models are the distinct sources of `refs` (mergekit: the inputs of that tensor's merge).
    """
    models = list(dict.fromkeys(s for s, _ in refs))
    name_of = dict(refs)
    P = torch.stack([ov.perms[m] for m in models])  # (M, n_rows)
    present = P >= 0
    n_tok = len(ov.vocab)
    id_to_tok = {i: t for t, i in ov.vocab.items()}
    fills: dict[int, tuple] = {}
    forced: set[int] = set()
    special = set((~present.all(0)).nonzero().flatten().tolist()) & set(id_to_tok)
    special |= {ov.vocab[t] for t in ov.tokens if t in ov.vocab}
    for i in sorted(special):
        tok = id_to_tok[i]
        cfg = ov.tokens.get(tok)
        has = [m for k, m in enumerate(models) if present[k, i]]
        if cfg is not None and cfg.force:
            forced.add(i)
        elif len(has) == len(models):
            continue
        w = f"{where}: token {tok!r}"
        if cfg is None:
            if len(has) == 1 or (base in models and base in has):
                src = has[0] if len(has) == 1 else base
                fills[i] = ((src, name_of[src], int(ov.perms[src][i])),)
            else:  # none: a zero row; several without the base: their mean
                fills[i] = tuple((m, name_of[m], int(ov.perms[m][i])) for m in has)
            continue
        s = cfg.source
        if s is None:
            raise RecipeError(f"{w} has a `tokens:` entry without a source, and {'force is set' if cfg.force else ''}"
                              f"{'' if cfg.force else 'not every model has it'}: give it a source")
        if isinstance(s, ZeroEmbedding):
            fills[i] = ()
            continue
        m = s.model if isinstance(s, ModelTokenEmbedding) else s
        if m not in models:
            raise RecipeError(f"{w} takes its row from model {m!r}, which is not an input of this tensor")
        if isinstance(s, ModelTokenEmbedding):
            row = s.token_id
            if row is None:
                if s.token not in ov.original[m]:
                    raise RecipeError(f"{w}: token {s.token!r} is not in the tokenizer of model {m!r}")
                row = ov.original[m][s.token]
            rows = sources[m].shape(name_of[m])[0]
            if not 0 <= row < rows:
                raise RecipeError(f"{w}: token id {row} is out of range for model {m!r} ({rows} rows)")
        else:
            row = int(ov.perms[m][i])
            if row < 0:
                raise RecipeError(f"{w} takes its row from model {m!r}, which does not have that token")
        fills[i] = ((m, name_of[m], row),)
    pad_from = n_tok if ov.n_rows > n_tok else None
    out: list[RowMap | int | None] = []
    for m in models:
        own = ov.perms[m].clone()
        for i in forced:
            own[i] = -1
        own_list = own.tolist()
        mine = {i: f for i, f in fills.items() if own_list[i] < 0}
        src_rows = sources[m].shape(name_of[m])[0]
        if pad_from is None and not mine and torch.equal(own, torch.arange(ov.n_rows)):
            out.append(None if src_rows == ov.n_rows else ov.n_rows)
            continue
        h = hashlib.sha256()
        h.update(own.numpy().tobytes())
        h.update(json.dumps([pad_from, sorted((i, [(ov.fingerprints[s], n, r) for s, n, r in f])
                                               for i, f in mine.items())]).encode())
        out.append(RowMap(own, mine, pad_from, h.hexdigest()[:24]))
    return [out[models.index(s)] for s, _ in refs]
