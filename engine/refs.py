"""The model references of a recipe: every place a recipe names a source, and rewriting those names.

A recipe names its sources in `base_model`, `models[].model`, `slices[].sources[].model`, `slices[].base_model`,
`tokenizer_source` (unless it is `base` or `union`), `tokenizer.source` and `tokenizer.tokens.*.source`, a path
recipe's hops (`path[].model`, unless the name is one of its `definitions`) and, recursively, in the definitions
themselves. A reference may be a
LoRA pair `base+adapter` (mergekit's syntax): each side is rewritten on its own.

`rename_models(recipe, mapping)` is how the project writes recipes that run anywhere: a search evaluates recipes
that name sources by their config keys (`a`, `base`), and writes them to disk with those names replaced by the
absolute folders they were loaded from, so that `lazymerge merge best.yaml OUT` and mergekit's `mergekit-yaml` work
from any working directory (mergekit resolves a relative model path against the working directory, not the file).
"""

from __future__ import annotations

import copy
from typing import Callable

_KEYWORDS = ("base", "union")  # tokenizer_source / tokenizer.source values that are not model references


def _map_ref(ref, fn: Callable[[str], str]):
    if not isinstance(ref, str):
        return ref
    if "+" in ref:  # base+lora: each part is a model reference
        return "+".join(fn(part) for part in ref.split("+"))
    return fn(ref)


def _walk(r: dict, fn: Callable[[str], str]) -> None:
    defs = r.get("definitions") or {}
    local = set(defs) if isinstance(defs, dict) else set()
    g = lambda ref: ref if ref in local else _map_ref(ref, fn)  # noqa: E731  (a path hop may name a definition)
    if "base_model" in r:
        r["base_model"] = g(r["base_model"])
    for e in r.get("models") or []:
        if isinstance(e, dict) and "model" in e:
            e["model"] = g(e["model"])
    for s in r.get("slices") or []:
        if isinstance(s, dict) and isinstance(s.get("base_model"), str):  # a slice's own base (mergekit)
            s["base_model"] = g(s["base_model"])
        for e in (s.get("sources") or []) if isinstance(s, dict) else []:
            if isinstance(e, dict) and "model" in e:
                e["model"] = g(e["model"])
    for hop in r.get("path") or []:
        if isinstance(hop, dict) and "model" in hop:
            hop["model"] = g(hop["model"])
    ts = r.get("tokenizer_source")
    if isinstance(ts, str) and ts not in _KEYWORDS:
        r["tokenizer_source"] = g(ts)
    tok = r.get("tokenizer")
    if isinstance(tok, dict):
        if isinstance(tok.get("source"), str) and tok["source"] not in _KEYWORDS:
            tok["source"] = g(tok["source"])
        for spec in (tok.get("tokens") or {}).values():
            src = spec.get("source") if isinstance(spec, dict) else None
            if isinstance(src, str):
                spec["source"] = g(src)
            elif isinstance(src, dict) and isinstance(src.get("model"), str):
                src["model"] = g(src["model"])
    if isinstance(defs, dict):
        for d in defs.values():
            if isinstance(d, dict):
                _walk(d, fn)


def rename_models(recipe: dict, mapping: dict[str, str] | Callable[[str], str]) -> dict:
    """A deep copy of `recipe` (a recipe as a plain dict) with every model reference `name` replaced by
    `mapping[name]` (names not in the mapping stay as they are), or by `mapping(name)` if it is a function."""
    fn = mapping if callable(mapping) else (lambda ref: mapping.get(ref, ref))
    out = copy.deepcopy(recipe)
    _walk(out, fn)
    return out


def model_names(recipe: dict) -> set[str]:
    """Every model reference the recipe makes (LoRA pairs split into their parts)."""
    seen: set[str] = set()

    def note(ref: str) -> str:
        seen.add(ref)
        return ref

    _walk(copy.deepcopy(recipe), note)
    return seen


def mergekit_note(recipe: dict) -> str | None:
    """A comment line for a recipe file that mergekit cannot run, or None: path recipes (this project's layer-path
    extension) with a hop whose scale is not 1 change the residual stream, which no checkpoint can express."""
    if recipe.get("merge_method") != "path":
        return None
    scaled = [i for i, hop in enumerate(recipe.get("path") or []) if float(hop.get("scale", 1.0)) != 1.0]
    if scaled:
        return (f"# lazymerge layer path with scaled hops ({len(scaled)} of {len(recipe['path'])}): mergekit cannot "
                "run it and it cannot be exported as a checkpoint; serve or evaluate it with lazymerge")
    return ("# lazymerge layer path (merge_method: path): `lazymerge merge` exports it as a plain deeper checkpoint; "
            "mergekit does not know this method")
