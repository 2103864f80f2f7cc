"""Plan a layer-path recipe (data-flow merging): one output decoder layer per hop.

Hop h runs layer `layer` of `model` — a source, or a layer of one of the recipe's `definitions` (parameter merges,
planned with `engine.plan`); the hidden state entering hop h is multiplied by its `scale` (kept in
`ModelPlan.layer_scales`, applied by the runtime). `base_model` supplies embeddings, final norm and LM head. A hop
references a layer: nothing is copied, and a definition's merged layer used by several hops is one cache entry (its
plans keep the definition's content key and mask name).
"""

from __future__ import annotations

import dataclasses

from .methods import Family
from .plan import (
    ModelPlan,
    SourceSet,
    TensorPlan,
    TensorRef,
    _dtype_of,
    _fix_config,
    _Planner,
    _tokenizer_source,
    check_output,
)
from .plan import _merge_plan as merge_plan
from .recipe import Recipe, RecipeError


def path_plan(recipe: Recipe, S: SourceSet) -> ModelPlan:
    defs = {name: merge_plan(d, S, prefix=f"definitions.{name}.") for name, d in (recipe.definitions or {}).items()}

    def model_of(ref: str, where: str):
        if ref in defs:
            return ("def", ref)
        return ("src", S.resolve(ref, where))

    head_kind, head = model_of(recipe.base_model, "base_model")
    head_cfg = defs[head].config if head_kind == "def" else S[head].config
    P = _Planner(recipe, S)
    tensors: dict[str, TensorPlan] = {}

    def take(out_name: str, kind: str, m: str, in_name: str, where: str):
        if kind == "def":
            tensors[out_name] = _renamed(P, defs[m].tensors[in_name], out_name)
        else:
            src = S[m]
            if in_name not in src.tensors and in_name == src.layout.head_key:
                in_name = src.embed_name
            tensors[out_name] = P.finish(TensorPlan(out_name, Family.passthrough, "passthrough", src.shape(in_name),
                                                    None, (TensorRef(m, in_name),), weights=(1.0,)))

    def n_layers(kind, m):
        return defs[m].num_layers if kind == "def" else S[m].num_layers

    def layout(kind, m):
        return defs[m].layout if kind == "def" else S[m].layout

    head_lay = layout(head_kind, head)
    for name in head_lay.pre_keys:
        take(name, head_kind, head, name, "base_model")
    scales, origin = [], []
    out = 0
    for hi, hop in enumerate(recipe.path):
        where = f"path[{hi}]"
        kind, m = model_of(hop.model, f"{where}.model")
        lay = layout(kind, m)
        layers = hop.layers()
        if layers.stop > n_layers(kind, m):  # checked on the range's bounds, before any hop is expanded
            raise RecipeError(f"{where}: layer {layers.stop - 1} is out of bounds: {hop.model!r} has "
                              f"{n_layers(kind, m)} layers")
        for layer in layers:
            for name in lay.layer_keys[layer]:
                take(lay.rename_layer(name, out), kind, m, name, where)
            scales.append(float(hop.scale))
            origin.append(layer)
            out += 1
    for name in head_lay.post_keys:
        take(name, head_kind, head, name, "base_model")
    cfg = dict(head_cfg)
    cfg["num_hidden_layers"] = out
    cfg["tie_word_embeddings"] = head_lay.tied
    if head_kind == "def":
        dtype = recipe.out_dtype or recipe.dtype or defs[head].dtype
        tok = defs[head].tokenizer_source if recipe.tokenizer_source in (None, "base") else \
            _tokenizer_source(recipe, S, defs[head].tokenizer_source)
    else:
        dtype = recipe.out_dtype or recipe.dtype or _dtype_of(head_cfg)
        tok = _tokenizer_source(recipe, S, head)
    vocab = defs[head].vocab if head_kind == "def" and recipe.tokenizer_source in (None, "base") else None
    plan = ModelPlan(recipe, _fix_config(cfg, dtype, origin), tensors, scales, tok, dtype, S, vocab=vocab)
    return check_output(plan, "path")


def _renamed(P: _Planner, p: TensorPlan, out_name: str) -> TensorPlan:
    # masks keep the definition's tensor name: the same merged layer wherever a path uses it
    return P.finish(dataclasses.replace(p, out_name=out_name, mask_name=p.mask_name or p.out_name))
