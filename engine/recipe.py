"""The recipe language: mergekit's YAML schema plus this project's layer-path extension, validated on read.

A recipe is validated structurally when it is read (`load_recipe`): unknown method, NaN or infinite values, a
density outside (0, 1], the wrong number of models for a method, a missing base... raise `RecipeError` naming the
field. Checks that need the sources (unknown source, a layer range out of bounds) happen in `engine.plan`, still
before any tensor is read.

mergekit form (see README for the whole language)::

    merge_method: dare_ties          # linear | slerp | task_arithmetic | ties | dare_ties | dare_linear |
    base_model: base                 # breadcrumbs | breadcrumbs_ties | della | della_linear | passthrough |
                                     # nuslerp | multislerp | karcher | model_stock | sce | arcee_fusion |
                                     # nearswap | ram | ramplus_tl (engine/methods.py)
    models:                          # or `slices:` with `sources: [{model, layer_range, parameters}]`
      - model: math
        parameters: {weight: [0.2, 0.8], density: 0.5}
    parameters: {normalize: true}
    dtype: bfloat16
    tokenizer_source: base           # union | base | a model; or mergekit's `tokenizer:` section
    random_seed: 0                   # extension: seeds the deterministic DARE / DELLA masks

Layer-path extension (data-flow merging)::

    merge_method: path
    base_model: a                    # supplies embeddings, final norm and LM head
    definitions:                     # optional parameter merges whose layers hops may use (PS+DFS)
      ps: {merge_method: task_arithmetic, base_model: base, models: [...]}
    path:
      - {model: a, layer: 0}
      - {model: b, layer: 3, scale: 0.8}        # the hidden state entering this hop is multiplied by 0.8
      - {model: ps, layer_range: [4, 8]}        # shorthand for hops 4, 5, 6, 7 (scale applies to each)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import limits
from .chat_template import check_chat_template
from .methods import (
    BOOL_PARAMS,
    INT_PARAMS,
    METHODS,
    SPARSIFY_PARAMS,
    TENSOR_PARAMS,
    Family,
    Sparsify,
    get_method,
    global_params,
    required_global_params,
)
from .params import all_numbers, check_value, numbers_from_text

DTYPES = ("float32", "float16", "bfloat16")
# fields of mergekit 0.1.5's MergeConfiguration that lazymerge refuses, and why (README lists them)
UNSUPPORTED_FIELDS = {
    "modules": "mergekit's per-module merges (`modules:`, for multi-module models) are not supported; "
               "use `models:` or `slices:`",
}


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the offending field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _name(v: str) -> str:
    return limits.check_name(v)


ModelRef = Annotated[str, AfterValidator(_name)]


class ModelEntry(_Frozen):
    model: ModelRef
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(_Frozen):
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v):
        # [n, n] is an empty slice: mergekit uses a final one to take the final norm and LM head from its model
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start <= end")
        return v


class Slice(_Frozen):
    sources: list[SliceSource] = Field(max_length=limits.MAX_MODELS)
    parameters: dict[str, Any] = Field(default_factory=dict)
    base_model: Optional[ModelRef] = None  # mergekit: this slice's base, instead of the recipe's
    residual_weight: Optional[float] = None  # accepted as mergekit 0.1.5 does: it has no effect there

    @model_validator(mode="after")
    def _lengths(self):
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lens = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lens) != 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lens)}")
        return self


class Hop(_Frozen):
    model: ModelRef
    layer: Optional[int] = None
    layer_range: Optional[tuple[int, int]] = None
    scale: float = 1.0

    @model_validator(mode="after")
    def _one(self):
        if (self.layer is None) == (self.layer_range is None):
            raise ValueError("a hop gives exactly one of `layer` or `layer_range`")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer {self.layer} is negative")
        if self.layer_range is not None and not (0 <= self.layer_range[0] < self.layer_range[1]):
            raise ValueError(f"layer_range {list(self.layer_range)} must be [start, end) with 0 <= start < end")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale {self.scale} is not finite")
        return self

    def layers(self) -> range:
        """The layers of this hop, lazily (check `stop` against the model's depth before iterating)."""
        if self.layer is not None:
            return range(self.layer, self.layer + 1)
        return range(*self.layer_range)


class ZeroEmbedding(_Frozen):
    """`{kind: zero}`: the token's row is zero (mergekit/tokenizer/config.py)."""

    kind: Literal["zero"]


class ModelTokenEmbedding(_Frozen):
    """`{kind: model_token, model, token_id | token}`: the row of one token (by id or by string in that model's own
    tokenizer) of one model (mergekit/tokenizer/config.py)."""

    kind: Literal["model_token"]
    model: ModelRef
    token_id: Optional[int] = Field(None, ge=0, lt=2**31)
    token: Optional[str] = Field(None, max_length=limits.MAX_TOKEN_CHARS)

    @model_validator(mode="after")
    def _one(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source gives exactly one of `token_id` or `token`")
        return self


class TokenEmbedding(_Frozen):
    """`tokenizer.tokens.<token>`: where the token's row comes from; `force` uses it for every model, even those
    that have the token."""

    source: Union[ZeroEmbedding, ModelTokenEmbedding, ModelRef, None] = None
    force: bool = False


class TokenizerSection(_Frozen):
    """mergekit's `tokenizer:` section (mergekit/tokenizer/config.py): output vocabulary `source` (`union`, `base`
    or a model), per-token row sources, and padding of the vocabulary to a multiple."""

    source: ModelRef = "union"
    tokens: Optional[dict[Annotated[str, Field(max_length=limits.MAX_TOKEN_CHARS)], TokenEmbedding]] = Field(
        None, max_length=limits.MAX_TOKEN_OVERRIDES)
    pad_to_multiple_of: Optional[int] = Field(None, lt=2**20)

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {v}")
        return v


class Recipe(_Frozen):
    merge_method: str = Field(max_length=64)
    base_model: Optional[ModelRef] = None
    models: Optional[list[ModelEntry]] = Field(None, max_length=limits.MAX_MODELS)
    slices: Optional[list[Slice]] = Field(None, max_length=limits.MAX_SLICES)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Optional[str] = Field(None, max_length=64)
    out_dtype: Optional[str] = Field(None, max_length=64)  # mergekit: the written dtype (merged as `dtype` says)
    tokenizer_source: Optional[ModelRef] = None
    tokenizer: Optional[TokenizerSection] = None
    chat_template: Optional[str] = Field(None, max_length=limits.MAX_RECIPE_CHARS)  # mergekit: auto | a built-in name
    # | Jinja text (engine/chat_template.py)
    name: Optional[str] = Field(None, max_length=limits.MAX_NAME_CHARS)  # mergekit-multi's document name: no effect
    random_seed: int = Field(0, ge=0, lt=2**64)
    definitions: Optional[dict[ModelRef, "Recipe"]] = Field(None, max_length=limits.MAX_DEFINITIONS)
    path: Optional[list[Hop]] = Field(None, max_length=limits.MAX_OUTPUT_LAYERS)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if isinstance(data, dict):
            for key, why in UNSUPPORTED_FIELDS.items():
                if key in data:
                    raise ValueError(f"{key}: {why}")
        return data

    @model_validator(mode="after")
    def _validate(self):
        _validate_recipe(self)
        return self

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def method(self):
        return get_method(self.merge_method)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_defaults=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _output_layers(r: Recipe) -> int:
    """Decoder layers the recipe's output has, from the unexpanded numbers (0 for `models:`: the sources' own)."""
    if r.path:
        return sum(1 if h.layer is not None else h.layer_range[1] - h.layer_range[0] for h in r.path)
    if r.slices:
        return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in r.slices if s.sources)
    return 0


def _validate_recipe(r: Recipe) -> None:
    n_out = _output_layers(r)
    if n_out > limits.MAX_OUTPUT_LAYERS:
        raise ValueError(f"{'path' if r.path else 'slices'}: the output would have {n_out} layers; the limit is "
                         f"{limits.MAX_OUTPUT_LAYERS}")
    if r.merge_method not in METHODS:
        raise ValueError(f"merge_method: unknown method {r.merge_method!r}; known: {', '.join(sorted(METHODS))}")
    m = r.method
    for key in ("dtype", "out_dtype"):
        value = getattr(r, key)
        if value is not None and value not in DTYPES:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(DTYPES)}")
    if r.chat_template is not None:
        try:
            check_chat_template(r.chat_template)
        except ValueError as e:
            raise ValueError(f"chat_template: {e}") from None
    if r.tokenizer_source is not None and r.tokenizer is not None:
        raise ValueError("tokenizer/tokenizer_source: give one of them, not both (as mergekit)")
    if m.family is Family.path:
        if r.tokenizer is not None or r.tokenizer_source == "union":
            raise ValueError("tokenizer: a path recipe takes its embeddings and LM head from base_model, so it cannot "
                             "merge vocabularies; name a source (or 'base') in tokenizer_source")
        if not r.path:
            raise ValueError("path: merge_method 'path' needs a non-empty `path` of hops")
        if r.models or r.slices:
            raise ValueError("models/slices: a path recipe gives `path`, not `models` or `slices`")
        if r.base_model is None:
            raise ValueError("base_model: a path recipe names the model that supplies embeddings and LM head")
        for name, d in (r.definitions or {}).items():
            if d.method.family is Family.path:
                raise ValueError(f"definitions.{name}: a definition is a parameter merge, not another path")
        return
    if r.path is not None or r.definitions is not None:
        raise ValueError("path/definitions: only merge_method 'path' takes `path` and `definitions`")
    if (r.models is None) == (r.slices is None):
        raise ValueError("models/slices: give exactly one of `models` or `slices`")
    if r.models is not None and not r.models:
        raise ValueError("models: empty list")
    if r.slices is not None and not r.slices:  # mergekit: "Must specify either output slices or models to merge"
        raise ValueError("slices: empty list")
    if m.needs_base and r.base_model is None and not (r.slices and all(s.base_model for s in r.slices)):
        raise ValueError(f"base_model: merge_method {m.name!r} needs a base_model")

    # global parameters
    tensor_known = set(TENSOR_PARAMS[m.family]) | set(SPARSIFY_PARAMS.get(m.sparsify, {}))
    known_global = set(global_params(m)) | tensor_known
    _check_params(r.parameters, "parameters", m, known_global)
    for key in required_global_params(m):
        if key not in r.parameters and (
                r.slices is None or not all(key in s.parameters for s in r.slices)):
            raise ValueError(f"parameters.{key}: {m.name} needs `{key}`")

    # model groups: one group for `models`, one per slice
    groups: list[tuple[str, list[tuple[str, str, dict]]]] = []
    if r.models is not None:
        groups.append(("models", [(f"models[{i}]", e.model, e.parameters) for i, e in enumerate(r.models)]))
    else:
        for si, s in enumerate(r.slices):
            _check_params(s.parameters, f"slices[{si}].parameters", m, known_global)
            groups.append((f"slices[{si}]", [(f"slices[{si}].sources[{j}]", e.model, e.parameters)
                                             for j, e in enumerate(s.sources)]))
    for gname, entries in groups:
        names = [e[1] for e in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"{gname}: a model is listed twice")
        gbase = _group_base(r, gname)
        with_base = m.needs_base or m.family is Family.karcher  # mergekit adds an unlisted base to the inputs
        n_models = len(set(names) | ({gbase} if with_base and gbase else set()))
        if n_models < m.min_models or (m.max_models is not None and n_models > m.max_models):
            want = m.min_models if m.max_models == m.min_models else f"{m.min_models}..{m.max_models or 'n'}"
            raise ValueError(f"{gname}: merge_method {m.name!r} takes {want} models (base included), got {n_models}")
        if m.non_base is not None:
            k = len([x for x in names if x != gbase])
            lo, hi = m.non_base
            if k < lo or (hi is not None and k > hi):
                want = lo if hi == lo else f"{lo}..{hi or 'n'}"
                raise ValueError(f"{gname}: merge_method {m.name!r} takes {want} models besides the base, got {k}")
        for where, _name, params in entries:
            _check_params(params, f"{where}.parameters", m, tensor_known)
        if "weight" in TENSOR_PARAMS[m.family] and TENSOR_PARAMS[m.family]["weight"] is None:
            for where, name, params in entries:
                if name == gbase and m.family is not Family.linear:
                    continue
                if "weight" not in params and "weight" not in r.parameters and not _slice_has(r, gname, "weight"):
                    raise ValueError(f"{where}.parameters.weight: required by {m.name!r}")


def _group_base(r: Recipe, gname: str) -> str | None:
    """The base model of a model group: a slice's own `base_model` (mergekit's OutputSliceDefinition), else the
    recipe's."""
    if gname.startswith("slices["):
        return r.slices[int(gname[7:-1])].base_model or r.base_model
    return r.base_model


def _slice_has(r: Recipe, gname: str, key: str) -> bool:
    if not gname.startswith("slices["):
        return False
    return key in r.slices[int(gname[7:-1])].parameters


def _check_params(params: dict, where: str, m, known: set[str]) -> None:
    for key, value in params.items():
        w = f"{where}.{key}"
        if key == "seed":
            raise ValueError(f"{w}: the mask seed is the top-level `random_seed`")
        if key not in known:
            raise ValueError(f"{w}: unknown parameter for merge_method {m.name!r}; known: {', '.join(sorted(known))}")
        params[key] = value = numbers_from_text(value)  # `5e-1`: a string to YAML 1.1, a number to mergekit
        check_value(value, w)
        nums = all_numbers(value)
        if key == "density":
            for x in nums:
                if not (0.0 < x <= 1.0):
                    raise ValueError(f"{w}: density {x} outside (0, 1]")
        elif key == "gamma":
            for x in nums:
                if not (0.0 <= x < 1.0):
                    raise ValueError(f"{w}: gamma {x} outside [0, 1)")
        elif key == "epsilon" and m.sparsify is Sparsify.della:
            for x in nums:
                if not (0.0 <= x < 0.5):
                    raise ValueError(f"{w}: epsilon {x} outside [0, 0.5)")
        elif key in BOOL_PARAMS:
            if not isinstance(value, bool):
                raise ValueError(f"{w}: expected true or false, got {value!r}")
        elif key in INT_PARAMS:
            if any(x != int(x) for x in nums) or (isinstance(value, list) and not all(
                    isinstance(v, dict) for v in value)):
                raise ValueError(f"{w}: expected an integer, got {value!r}")


def _format_validation_error(e: ValidationError, max_errors: int = 5) -> str:
    lines = []
    errors = e.errors(include_input=False, include_url=False)
    for err in errors[:max_errors]:
        loc = limits.clip(".".join(str(x) for x in err["loc"]), 200)
        msg = limits.clip(err["msg"].removeprefix("Value error, "), 300)
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > max_errors:
        lines.append(f"and {len(errors) - max_errors} more errors")
    return "invalid recipe: " + "; ".join(lines)


def load_recipe(src: str | dict | Path | Recipe) -> Recipe:
    """Parse and validate a recipe from YAML text, a path to a YAML file, a dict or a Recipe."""
    if isinstance(src, Recipe):
        return src
    if isinstance(src, Path):
        try:
            src = src.read_text()
        except OSError as e:
            raise RecipeError(f"cannot read recipe file {src}: {e.strerror}") from None
    try:
        if isinstance(src, str):
            try:
                data = limits.safe_yaml_load(src)  # bounded before any alias is expanded
            except yaml.composer.ComposerError as e:
                if "single document" in str(e):
                    raise RecipeError("a recipe is one YAML document, this text has several (mergekit-multi's "
                                      "multi-document form is not supported)") from None
                raise RecipeError(limits.clip(f"recipe is not valid YAML: {e}", 1000)) from None
            except yaml.YAMLError as e:
                raise RecipeError(limits.clip(f"recipe is not valid YAML: {e}", 1000)) from None
        else:
            data = src
            limits.check_tree(data)
    except limits.TooLarge as e:
        raise RecipeError(f"recipe too large: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping with at least `merge_method`")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e)) from None
