"""Bounded cost before expansion: what a recipe may ask for, checked before anything is built from it.

A recipe is small text that can ask for a lot: YAML aliases that expand a 600-byte document into millions of nodes,
a layer range of thirty million hops, thousands of slices or models. Every such expansion is bounded here *before*
it happens:

* `safe_yaml_load(text)` composes the YAML node graph (aliases stay shared references, so composing is linear in the
  text), measures the size the document would have once constructed (every alias counted in full) and its nesting
  depth, and refuses past `MAX_RECIPE_NODES` / `MAX_RECIPE_DEPTH`; only then does it construct Python objects.
* `check_tree(data)` applies the same bounds to an already constructed structure (a JSON object recipe).
* `MAX_OUTPUT_LAYERS`, `MAX_MODELS`, `MAX_DEFINITIONS` bound what the recipe schema lets a recipe expand into
  (`engine/recipe.py` checks them on the unexpanded numbers: a layer range is checked by its length, not by listing it).
* `clip(text)` bounds any message built from user input (`MAX_MESSAGE_CHARS`).

Raises `ValueError` subclasses only through the callers (`RecipeError`); this module imports nothing of the engine.
"""

from __future__ import annotations

import yaml

MAX_RECIPE_NODES = 20_000  # scalars + lists + mappings of the constructed recipe, aliases counted in full
MAX_RECIPE_DEPTH = 32  # nesting of lists/mappings
MAX_RECIPE_CHARS = 256 << 10  # YAML text (a real recipe is a few KB)
MAX_OUTPUT_LAYERS = 1024  # decoder layers a recipe's output model may have (slices / path hops, expanded)
MAX_MODELS = 64  # models of one group (`models:`, or one slice's `sources:`)
MAX_SLICES = 1024
MAX_DEFINITIONS = 32
MAX_NAME_CHARS = 1024  # a model reference: a source name or a registered path
MAX_TOKEN_CHARS = 1024  # a token string of a recipe's `tokenizer.tokens` section
MAX_TOKEN_OVERRIDES = 4096  # entries of `tokenizer.tokens`
MAX_MESSAGE_CHARS = 2000  # any error message that may quote user input


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the same document, faster


class TooLarge(ValueError):
    """The recipe would expand past a bound (the message names the bound)."""


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to at most `limit` characters (with a marker saying how much was cut)."""
    if len(text) <= limit:
        return text
    return text[: limit - 40] + f"... [{len(text) - limit + 40} more characters]"


def _node_size(node, memo: dict[int, int], depth: int) -> int:
    """Constructed size of a composed YAML node (aliases are the same node object: counted in full each time, but
    computed once), raising TooLarge past the depth bound."""
    if depth > MAX_RECIPE_DEPTH:
        raise TooLarge(f"recipe nests deeper than {MAX_RECIPE_DEPTH} levels")
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_RECIPE_NODES + 1  # a cycle (not possible from the composer, but never loop)
    if isinstance(node, yaml.ScalarNode):
        n = 1
    elif isinstance(node, yaml.SequenceNode):
        n = 1
        for child in node.value:
            n += _node_size(child, memo, depth + 1)
            if n > MAX_RECIPE_NODES:
                break
    else:  # MappingNode: (key, value) pairs
        n = 1
        for k, v in node.value:
            n += _node_size(k, memo, depth + 1) + _node_size(v, memo, depth + 1)
            if n > MAX_RECIPE_NODES:
                break
    memo[key] = n
    return n


def safe_yaml_load(text: str):
    """Parse YAML text (safe tags only) after checking its constructed size and depth.

    Raises TooLarge (over a bound) or yaml.YAMLError (not YAML)."""
    if len(text) > MAX_RECIPE_CHARS:
        raise TooLarge(f"recipe text is {len(text)} characters; the limit is {MAX_RECIPE_CHARS}")
    depth = 0
    for i, ev in enumerate(yaml.parse(text, Loader=_LOADER)):  # the event stream: flat, no recursion, no expansion
        if i > 2 * MAX_RECIPE_NODES + 8:
            raise TooLarge(f"recipe has more than {MAX_RECIPE_NODES} values")
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                raise TooLarge(f"recipe nests deeper than {MAX_RECIPE_DEPTH} levels")
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _node_size(node, {}, 0)
        if n > MAX_RECIPE_NODES:
            raise TooLarge(f"recipe expands to more than {MAX_RECIPE_NODES} values (YAML aliases count in full)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def check_tree(data) -> None:
    """The same bounds on an already constructed structure (dicts, lists, scalars); raises TooLarge."""
    count = 0
    stack = [(data, 0)]  # shared or cyclic references are walked in full: the count bound ends the walk
    while stack:
        v, depth = stack.pop()
        count += 1
        if count > MAX_RECIPE_NODES:
            raise TooLarge(f"recipe has more than {MAX_RECIPE_NODES} values")
        if depth > MAX_RECIPE_DEPTH:
            raise TooLarge(f"recipe nests deeper than {MAX_RECIPE_DEPTH} levels")
        if isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, depth + 1))
                stack.append((x, depth + 1))
        elif isinstance(v, (list, tuple)):
            if count + len(v) > MAX_RECIPE_NODES:
                raise TooLarge(f"recipe has more than {MAX_RECIPE_NODES} values")
            stack.extend((x, depth + 1) for x in v)


def check_name(value: str, what: str = "model") -> str:
    """A model reference or name: 1..MAX_NAME_CHARS characters, no control characters (NUL included)."""
    if not value:
        raise ValueError(f"{what} name is empty")
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{what} name is {len(value)} characters; the limit is {MAX_NAME_CHARS}")
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"{what} name contains the control character {bad!r}")
    return value
