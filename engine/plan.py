"""Compile a recipe against named sources into a `ModelPlan`: for every output tensor, how to compute it.

Nothing here reads a tensor: only configs and safetensors headers. All checks that need the sources happen here
(unknown source, layer range out of bounds, vocabulary mismatch, della's density +/- epsilon, linear weights that sum
to zero...) and raise `RecipeError` naming the field.

Conventions (documented in README):
* `models:` form: output layer l is the merge of layer l of every model, gradients at t = l / (L - 1).
* `slices:` form: output layers are the slices in order; a slice's i-th layer merges layer start_s + i of each of
  its sources, gradients at t = i / (n - 1) (t = 1 for a one-layer slice, as mergekit). Embeddings come from the
  first slice's sources, final norm and LM head from the last slice's; all non-layer tensors use t = 0 (a
  gradient's first value).
* `path`: see engine/path.py (one output layer per hop; scales on the hidden state entering a hop).
* Vocabulary: the output vocabulary is the reference model's (base_model, else the first model); larger
  embeddings / LM heads are cropped to it (as mergekit does), smaller ones are an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CheckpointError, Source, check_compatible
from .methods import SPARSIFY_PARAMS, Family, Sparsify
from .params import resolve
from .recipe import Recipe, RecipeError, load_recipe

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
PRE_TENSORS = ("model.embed_tokens.weight",)
POST_TENSORS = ("model.norm.weight", "lm_head.weight")


@dataclass(frozen=True)
class TensorRef:
    source: str  # source name in the SourceSet
    name: str  # tensor name in that source
    rows: int | None = None  # crop the first dimension to this many rows (vocabulary)


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is computed. `key` identifies it by content (source fingerprints, not names)."""

    out_name: str
    family: Family
    method: str
    shape: tuple[int, ...]
    base: TensorRef | None
    inputs: tuple[TensorRef, ...]  # GTA: non-base sources; linear/slerp/passthrough: every input (slerp: base first)
    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    gammas: tuple[float, ...] = ()
    epsilons: tuple[float, ...] = ()
    sparsify: Sparsify = Sparsify.none
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False
    lam: float = 1.0
    t: float = 0.0
    seed: int = 0
    mask_name: str = ""  # the tensor name DARE/DELLA masks are keyed by (default: out_name)
    key: str = field(default="", compare=False)

    def refs(self) -> tuple[TensorRef, ...]:
        return ((self.base,) if self.base is not None else ()) + self.inputs

    def is_identity(self) -> bool:
        return self.family is Family.passthrough and self.weights == (1.0,)


@dataclass
class ModelPlan:
    recipe: Recipe
    config: dict  # config.json of the output model
    tensors: dict[str, TensorPlan]  # output tensor name -> plan, in checkpoint order
    layer_scales: list[float]  # per output layer: factor on the hidden state entering it
    tokenizer_source: str  # source name
    dtype: str
    sources: "SourceSet"

    @property
    def num_layers(self) -> int:
        return len(self.layer_scales)

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, p in self.tensors.items():
            h.update(f"{name}={p.key};".encode())
        h.update(json.dumps(self.layer_scales).encode())
        return h.hexdigest()[:16]


class SourceSet:
    """Named sources, opened once. Recipes refer to a source by name or by its registered path; with
    `allow_open`, an unknown path is opened (CLI), otherwise it is an error (server)."""

    def __init__(self, sources: dict[str, Source] | None = None, allow_open: bool = False,
                 base_dir: Path | None = None):
        self.sources: dict[str, Source] = dict(sources or {})
        self.allow_open = allow_open
        self.base_dir = base_dir

    @classmethod
    def open(cls, paths: dict[str, str | Path], allow_open: bool = False) -> "SourceSet":
        srcs = {}
        for name, p in paths.items():
            try:
                srcs[name] = Source.open(p)
            except CheckpointError as e:
                raise CheckpointError(f"source {name!r}: {e}") from None
            srcs[name].name = name
        check_compatible(srcs)
        return cls(srcs, allow_open=allow_open)

    def __getitem__(self, name: str) -> Source:
        return self.sources[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def resolve(self, ref: str, where: str) -> str:
        """The source name a recipe's model reference denotes (opening it if allowed)."""
        if ref in self.sources:
            return ref
        cands = [Path(ref)]
        if self.base_dir is not None and not Path(ref).is_absolute():
            cands.insert(0, self.base_dir / ref)
        for c in cands:
            try:
                rp = c.expanduser().resolve()
            except OSError:
                continue
            for name, src in self.sources.items():
                if src.path == rp:
                    return name
        if not self.allow_open:
            known = ", ".join(sorted(self.sources)) or "(none)"
            raise RecipeError(f"{where}: unknown source {ref!r}; registered sources: {known}")
        for c in cands:
            if c.exists():
                try:
                    src = Source.open(c)
                except CheckpointError as e:
                    raise RecipeError(f"{where}: {e}") from None
                check_compatible({**self.sources, ref: src})
                src.name = ref
                self.sources[ref] = src
                return ref
        raise RecipeError(f"{where}: unknown source {ref!r} (not a registered name, and no such folder)")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _Planner:
    def __init__(self, recipe: Recipe, sources: SourceSet):
        self.r = recipe
        self.S = sources

    def fp(self, ref: TensorRef) -> list:
        return [self.S[ref.source].fingerprint, ref.name, ref.rows]

    def finish(self, p: TensorPlan) -> TensorPlan:
        d = {k: getattr(p, k) for k in ("family", "method", "shape", "weights", "densities", "gammas", "epsilons",
                                        "sparsify", "consensus", "normalize", "rescale", "lam", "t")}
        d["base"] = self.fp(p.base) if p.base else None
        d["inputs"] = [self.fp(x) for x in p.inputs]
        if p.sparsify in (Sparsify.random, Sparsify.della):
            d["seed"] = p.seed
            d["mask_name"] = p.mask_name or p.out_name  # masks depend on the tensor name
        object.__setattr__(p, "key", _digest(d))
        return p


def _ref_rows(S: SourceSet, src: str, name: str, vocab: int | None, where: str) -> TensorRef:
    s = S[src]
    if name == "lm_head.weight" and s.tied_embeddings:
        name = "model.embed_tokens.weight"
    if name not in s.tensors:
        raise RecipeError(f"{where}: source {src!r} has no tensor {name!r}")
    rows = None
    if vocab is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
        have = s.shape(name)[0]
        if have < vocab:
            raise RecipeError(f"{where}: source {src!r} has a vocabulary of {have} < {vocab} of the reference model")
        rows = vocab if have > vocab else None
    return TensorRef(src, name, rows)


def _param(entry_params: list[dict], key: str, tensor: str, t: float, default, where: str):
    """First value found along the parameter chain (most specific first)."""
    for params in entry_params:
        if key in params:
            v = resolve(params[key], tensor, t)
            if v is not None:
                return v
    if default is None:
        raise RecipeError(f"{where}: parameter {key!r} has no value for tensor {tensor!r}")
    return default


def plan_group(P: _Planner, out_name: str, in_name: str, models: list[tuple[str, dict]], slice_params: dict,
               t: float, vocab: int | None, where: str, shape) -> TensorPlan:
    """Plan one output tensor merged from `in_name` of `models` [(source name, model-level params)]."""
    r, S = P.r, P.S
    m = r.method
    fam = m.family
    g = lambda key, default: _param([slice_params, r.parameters], key, in_name, t, default, f"{where}.parameters")  # noqa: E731
    base = S.resolve(r.base_model, "base_model") if r.base_model is not None else None
    ref = lambda src: _ref_rows(S, src, in_name, vocab, where)  # noqa: E731
    chain = lambda params: [params, slice_params, r.parameters]  # noqa: E731

    if fam is Family.passthrough:
        (src, params), = models
        scale = _param(chain(params), "scale", in_name, t, 1.0, where)
        return P.finish(TensorPlan(out_name, fam, m.name, shape, None, (ref(src),), weights=(float(scale),)))
    if fam is Family.linear:
        ins, ws = [], []
        for src, params in models:
            ins.append(ref(src))
            ws.append(float(_param(chain(params), "weight", in_name, t, None, where)))
        normalize = bool(g("normalize", m.default_normalize))
        if normalize and abs(sum(ws)) < 1e-8:
            raise RecipeError(f"{where}: linear weights sum to 0 for tensor {in_name!r} with normalize on")
        return P.finish(TensorPlan(out_name, fam, m.name, shape, None, tuple(ins), weights=tuple(ws),
                                   normalize=normalize))
    if fam is Family.slerp:
        others = [src for src, _ in models if src != base]
        if len(others) != 1:
            raise RecipeError(f"{where}: slerp needs base_model and exactly one other model, got {others}")
        tt = float(g("t", None))
        return P.finish(TensorPlan(out_name, fam, m.name, shape, None, (ref(base), ref(others[0])), t=tt))
    # generalized task arithmetic
    normalize = bool(g("normalize", m.default_normalize))
    rescale = bool(g("rescale", m.default_rescale))
    lam = float(g("lambda", 1.0))
    ins, ws, ds, gs, es = [], [], [], [], []
    for src, params in models:
        if src == base:
            continue
        c = chain(params)
        ins.append(ref(src))
        ws.append(float(_param(c, "weight", in_name, t, None, where)))
        ds.append(float(_param(c, "density", in_name, t, 1.0, where)))
        if m.sparsify is Sparsify.breadcrumbs:
            gs.append(float(_param(c, "gamma", in_name, t, SPARSIFY_PARAMS[Sparsify.breadcrumbs]["gamma"], where)))
        if m.sparsify is Sparsify.della:
            e = float(_param(c, "epsilon", in_name, t, SPARSIFY_PARAMS[Sparsify.della]["epsilon"], where))
            if ds[-1] < 1 and not (0 < ds[-1] - e and ds[-1] + e < 1):
                raise RecipeError(f"{where}: della needs density +/- epsilon inside (0, 1) for model {src!r}, "
                                  f"got density {ds[-1]} and epsilon {e}")
            es.append(e)
    return P.finish(TensorPlan(out_name, fam, m.name, shape, ref(base), tuple(ins), weights=tuple(ws),
                               densities=tuple(ds), gammas=tuple(gs), epsilons=tuple(es), sparsify=m.sparsify,
                               consensus=m.consensus.value == "sum", normalize=normalize, rescale=rescale, lam=lam,
                               seed=r.random_seed))


def _layer_names(src: Source, layer: int) -> list[str]:
    pre = f"model.layers.{layer}."
    return [n for n in src.tensors if n.startswith(pre)]


def _dtype_of(cfg: dict) -> str:
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return d if d in ("float32", "float16", "bfloat16") else "float32"


def _merge_plan(recipe: Recipe, S: SourceSet, prefix: str = "") -> ModelPlan:
    P = _Planner(recipe, S)
    r = recipe
    # resolve every model reference first: unknown sources fail before anything else
    groups: list[tuple[str, list[tuple[str, dict, tuple[int, int] | None]], dict]] = []
    if r.models is not None:
        entries = [(S.resolve(e.model, f"{prefix}models[{i}].model"), e.parameters, None)
                   for i, e in enumerate(r.models)]
        groups.append((f"{prefix}models", entries, {}))
    else:
        for si, sl in enumerate(r.slices):
            entries = [(S.resolve(e.model, f"{prefix}slices[{si}].sources[{j}].model"), e.parameters,
                        tuple(e.layer_range)) for j, e in enumerate(sl.sources)]
            groups.append((f"{prefix}slices[{si}]", entries, sl.parameters))
    base = S.resolve(r.base_model, f"{prefix}base_model") if r.base_model is not None else None
    ref_src = base if base is not None else groups[0][1][0][0]
    ref = S[ref_src]
    vocab = ref.vocab_size
    for gname, entries, _ in groups:
        for j, (src, _, lr) in enumerate(entries):
            if lr is not None and lr[1] > S[src].num_layers:
                where = f"{gname}.sources[{j}].layer_range"
                raise RecipeError(f"{where}: {list(lr)} is out of bounds: source {src!r} has "
                                  f"{S[src].num_layers} layers")

    tensors: dict[str, TensorPlan] = {}

    def plan_nonlayer(names, gname, entries, sparams):
        models = [(src, params) for src, params, _ in entries]
        for name in names:
            if name == "lm_head.weight" and ref.tied_embeddings:
                continue
            shape = (vocab,) + tuple(ref.shape(name)[1:]) if name in PRE_TENSORS + POST_TENSORS[1:] else ref.shape(name)
            tensors[name] = plan_group(P, name, name, models, sparams, 0.0, vocab, gname, shape)

    g0 = groups[0]
    plan_nonlayer(PRE_TENSORS, *g0)
    out_layer = 0
    for gname, entries, sparams in groups:
        if entries[0][2] is None:
            n_layers, starts = ref.num_layers, [0] * len(entries)
        else:
            n_layers = entries[0][2][1] - entries[0][2][0]
            starts = [lr[0] for _, _, lr in entries]
        for i in range(n_layers):
            t = i / (n_layers - 1) if n_layers > 1 else 1.0  # mergekit: t = 1 for one layer
            first_src, _, _ = entries[0]
            for name in _layer_names(S[first_src], starts[0] + i):
                suffix = LAYER_RE.match(name).group(2)
                out_name = f"model.layers.{out_layer}.{suffix}"
                per_model = []
                for (src, params, _), st in zip(entries, starts):
                    per_model.append((src, params, f"model.layers.{st + i}.{suffix}"))
                shape = S[first_src].shape(name)
                tensors[out_name] = _plan_layer_tensor(P, out_name, per_model, sparams, t, gname, shape)
            out_layer += 1
    plan_nonlayer(POST_TENSORS, *groups[-1])
    cfg = dict(ref.config)
    cfg["num_hidden_layers"] = out_layer
    dtype = r.dtype or _dtype_of(ref.config)
    tok = _tokenizer_source(r, S, base or ref_src)
    return ModelPlan(r, _fix_config(cfg, dtype, [None] * out_layer), tensors, [1.0] * out_layer, tok, dtype, S)


def _plan_layer_tensor(P, out_name, per_model, sparams, t, gname, shape):
    """Layer tensors may sit at different layer indices in each source (slices); plan with per-source names."""
    names = {src: n for src, _, n in per_model}
    first = per_model[0][2]
    if len(set(names.values())) == 1:
        return plan_group(P, out_name, first, [(s, p) for s, p, _ in per_model], sparams, t, None, gname, shape)
    # different layer indices per source: plan under the first name, then rename each input
    p = plan_group(P, out_name, first, [(s, pr) for s, pr, _ in per_model], sparams, t, None, gname, shape)
    base_name = names.get(p.base.source, first) if p.base else None
    object.__setattr__(p, "inputs", tuple(TensorRef(x.source, names[x.source], x.rows) for x in p.inputs))
    if p.base is not None:
        if p.base.source not in names:
            raise RecipeError(f"{gname}: base_model must be one of the slice's sources when layer ranges differ")
        object.__setattr__(p, "base", TensorRef(p.base.source, base_name, p.base.rows))
    return P.finish(p)


def _tokenizer_source(r: Recipe, S: SourceSet, default: str) -> str:
    ts = r.tokenizer_source
    if ts is None or ts == "base":
        return default
    if ts == "union":
        raise RecipeError("tokenizer_source: 'union' (building a merged vocabulary) is not supported; "
                          "name a source or 'base'")
    return S.resolve(ts, "tokenizer_source")


def _fix_config(cfg: dict, dtype: str, layer_types_from: list) -> dict:
    cfg = dict(cfg)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype
    n = cfg["num_hidden_layers"]
    if "layer_types" in cfg:
        lt = cfg["layer_types"]
        cfg["layer_types"] = [lt[i] if i is not None and i < len(lt) else lt[0] for i in
                              (layer_types_from if any(x is not None for x in layer_types_from) else range(n))]
        if len(cfg["layer_types"]) != n:
            cfg["layer_types"] = [lt[0]] * n
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(cfg["max_window_layers"], n)
    return cfg


def compile_plan(recipe: str | dict | Path | Recipe, sources: SourceSet) -> ModelPlan:
    """Validate `recipe` against `sources` and plan every output tensor (reads no tensor data)."""
    if isinstance(recipe, Path) and sources.base_dir is None:
        sources.base_dir = recipe.parent
    r = load_recipe(recipe)
    try:
        if r.method.family is Family.path:
            from .path import path_plan  # noqa: PLC0415  (path.py builds on this module)

            return path_plan(r, sources)
        return _merge_plan(r, sources)
    except CheckpointError as e:
        raise RecipeError(str(e)) from None


