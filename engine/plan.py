"""Compile a recipe against named sources into a `ModelPlan`: for every output tensor, how to compute it.

Nothing here reads a tensor: only configs and safetensors headers. All checks that need the sources happen here
(unknown source, layer range out of bounds, vocabulary mismatch, della's density +/- epsilon, linear weights that sum
to zero...) and raise `RecipeError` naming the field.

Conventions (documented in README):
* `models:` form: output layer l is the merge of layer l of every model, gradients at t = l / (L - 1).
* `slices:` form: output layers are the slices in order; a slice's i-th layer merges layer start_s + i of each of
  its sources, gradients at t = i / (n - 1) (t = 1 for a one-layer slice, as mergekit). Embeddings come from the
  first slice's sources, final norm and LM head from the last slice's (its first k sources, k = the first slice's
  source count, as mergekit's planner pairs them); an empty slice (`layer_range: [n, n]`) adds no layer but can
  supply those. A slice's own `base_model` replaces the recipe's for it. All non-layer tensors use t = 0 (a
  gradient's first value).
* Model references: a source name, a checkpoint folder, or `BASE+ADAPTER` (a LoRA input, engine/lora.py).
* `path`: see engine/path.py (one output layer per hop; scales on the hidden state entering a hop).
* Tensor names are the checkpoints' own; which tensors form decoder layer i, which come before / after the layers,
  and which are the embedding and output head come from transformers (engine/arch.py, `Source.layout`). The planned
  output must be exactly what its architecture loads (`check_output`). An output head is planned when any source of
  the merge has an untied one (a tied source contributes its embedding), as mergekit's optional `lm_head`.
* Vocabulary: with `tokenizer_source` / `tokenizer:`, every source's embedding and LM head is re-indexed into the
  merged vocabulary by token string (engine/vocab.py, mergekit's rules); without, the output vocabulary is the
  reference model's (base_model, else the first model): larger embeddings / LM heads are cropped to it (mergekit's
  `unsafe_truncate_embeddings`), smaller ones are an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .arch import Architecture, analyze
from .chat_template import resolve_chat_template
from .checkpoint import CheckpointError, Source, check_compatible
from .lora import open_source, source_identity, split_reference
from .methods import SPARSIFY_PARAMS, TENSOR_PARAMS, Family, Sparsify, global_params
from .params import resolve
from .recipe import Recipe, RecipeError, load_recipe
from .rowmap import RowMap
from .vocab import OutputVocab, output_vocab, row_maps


@dataclass(frozen=True)
class TensorRef:
    source: str  # source name in the SourceSet
    name: str  # tensor name in that source
    rows: int | None = None  # crop the first dimension to this many rows (vocabulary)
    vocab: RowMap | None = None  # re-index the first dimension into the merged vocabulary (engine/rowmap.py)


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
    options: tuple[tuple[str, float | bool], ...] = ()  # the method's global parameters (nuslerp, sce, ram, ...)
    # the output's dtype when narrower than float32 (the plan's `dtype`): the merged tensor is rounded to it, so that
    # the lazy model computes with the very values an export writes (engine/merger.py `rounded`); "" for float32
    round_to: str = ""
    key: str = field(default="", compare=False)

    def option(self, name: str):
        return dict(self.options)[name]

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
    dtype: str  # the output's dtype (export, config): the recipe's out_dtype, else dtype, else the reference's
    sources: "SourceSet"
    _layout: Architecture | None = field(default=None, repr=False, compare=False)
    vocab: OutputVocab | None = None  # the merged vocabulary, when the recipe merges one
    chat_template: str | None = None  # the recipe's chat_template resolved to Jinja text (None: the tokenizer's own)

    @property
    def num_layers(self) -> int:
        return len(self.layer_scales)

    @property
    def layout(self) -> Architecture:
        """The output checkpoint's architecture facts (engine/arch.py): layers, embeddings, head, conversions."""
        if self._layout is None:
            self._layout = analyze(self.config, {n: p.shape for n, p in self.tensors.items()}, "merged model")
        return self._layout

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
                srcs[name] = open_source(p)  # a folder, or BASE+ADAPTER (engine/lora.py)
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
        """The source name a recipe's model reference denotes (opening it if allowed). A reference is a name, a
        checkpoint folder, or mergekit's `BASE+LORA` (a PEFT adapter applied lazily, engine/lora.py)."""
        if ref in self.sources:
            return ref
        try:
            parts = [p for p in split_reference(ref) if p is not None]
        except ValueError as e:
            raise RecipeError(f"{where}: {e}") from None
        cands = [self._candidates(p) for p in parts]
        for name, src in self.sources.items():
            ident = source_identity(src)
            if len(ident) == len(parts) and all(want in c for want, c in zip(ident, cands)):
                return name
        if not self.allow_open:
            known = ", ".join(sorted(self.sources)) or "(none)"
            raise RecipeError(f"{where}: unknown source {ref!r}; registered sources: {known}")
        found = [next((c for c in cs if c.exists()), None) for cs in cands]
        if all(found):
            try:
                src = open_source("+".join(str(f) for f in found))
            except CheckpointError as e:
                raise RecipeError(f"{where}: {e}") from None
            check_compatible({**self.sources, ref: src})
            src.name = ref
            self.sources[ref] = src
            return ref
        missing = parts[found.index(None)]
        raise RecipeError(f"{where}: unknown source {ref!r} (not a registered name, and no such folder"
                          + (f": {missing!r})" if len(parts) > 1 else ")"))

    def absolute(self, ref: str) -> str:
        """The absolute folder a model reference (one side of a `base+adapter` pair, or a whole name) denotes, for a
        recipe written to run from anywhere (an export's `lazymerge_recipe.yaml`): a registered or opened source's
        identity (`base+adapter` for a LoRA source), else the first existing folder `resolve` would try, else `ref`
        unchanged."""
        if ref in self.sources:
            return "+".join(str(p) for p in source_identity(self.sources[ref]))
        return str(next((c for c in self._candidates(ref) if c.exists()), ref))

    def _candidates(self, ref: str) -> list[Path]:
        """Resolved folders a path-like reference may mean: relative to the recipe's folder first, then as given."""
        cands = [Path(ref)]
        if self.base_dir is not None and not Path(ref).is_absolute():
            cands.insert(0, self.base_dir / ref)
        out = []
        for c in cands:
            try:
                out.append(c.expanduser().resolve())
            except OSError:
                continue
        return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _Planner:
    def __init__(self, recipe: Recipe, sources: SourceSet):
        self.r = recipe
        self.S = sources

    def fp(self, ref: TensorRef) -> list:
        fp = [self.S[ref.source].fingerprint, ref.name, ref.rows]
        return fp + [ref.vocab.key] if ref.vocab is not None else fp

    def finish(self, p: TensorPlan) -> TensorPlan:
        d = {k: getattr(p, k) for k in ("family", "method", "shape", "weights", "densities", "gammas", "epsilons",
                                        "sparsify", "consensus", "normalize", "rescale", "lam", "t", "options")}
        d["base"] = self.fp(p.base) if p.base else None
        d["inputs"] = [self.fp(x) for x in p.inputs]
        if p.sparsify in (Sparsify.random, Sparsify.della) or p.family is Family.arcee_fusion:
            d["seed"] = p.seed
            d["mask_name"] = p.mask_name or p.out_name  # masks depend on the tensor name
        if p.round_to:
            d["round_to"] = p.round_to
        object.__setattr__(p, "key", _digest(d))
        return p


def _is_head(S: SourceSet, name: str) -> bool:
    return any(src.layout.head_key == name for src in S.sources.values())


def _ref_rows(S: SourceSet, src: str, name: str, vocab: int | None, where: str) -> TensorRef:
    s = S[src]
    if name not in s.tensors and s.tied_embeddings and _is_head(S, name):
        name = s.embed_name  # a tied source's output head is its embedding (mergekit: lm_head's tied_names)
    if name not in s.tensors:
        raise RecipeError(f"{where}: source {src!r} has no tensor {name!r}")
    rows = None
    if vocab is not None and name in s.layout.vocab_keys:
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
    if fam is not Family.task_arithmetic:
        return _plan_stats_method(P, out_name, in_name, models, g, chain, ref, base, t, where, shape)
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


def _plan_stats_method(P: _Planner, out_name, in_name, models, g, chain, ref, base, t, where, shape) -> TensorPlan:
    """Plan one tensor of nuslerp, multislerp, karcher, model_stock, sce, arcee_fusion, nearswap, ram, ramplus_tl.

    Inputs follow mergekit's order: the listed models, the base (if given) added when not listed; `base` is the
    base's TensorRef for methods that treat it apart (None for karcher, for which it is an ordinary input)."""
    m = P.r.method
    fam = m.family
    options = tuple((k, _cast_option(k, g(k, d))) for k, d in global_params(m).items())
    non_base = [(src, params) for src, params in models if src != base]
    listed = base is None or base in dict(models)
    if fam is Family.karcher:
        # `models:` form: mergekit adds an unlisted base to the inputs (karcher has no base role: an ordinary input)
        srcs = [src for src, _ in models] + ([] if listed or P.r.models is None else [base])
        if len(srcs) == 1:
            return P.finish(TensorPlan(out_name, Family.passthrough, m.name, shape, None, (ref(srcs[0]),),
                                       weights=(1.0,)))
        return P.finish(TensorPlan(out_name, fam, m.name, shape, None, tuple(ref(s) for s in srcs), options=options))
    if not listed and P.r.models is None:
        raise RecipeError(f"{where}: base_model {base!r} is not one of the slice's sources (mergekit 0.1.5 refuses "
                          f"a base that is not an input of the slice)")
    ws = ()
    if "weight" in TENSOR_PARAMS[fam]:
        ws = tuple(float(_param(chain(params), "weight", in_name, t, None, where))
                   for _, params in non_base)
    ins = tuple(ref(src) for src, _ in non_base)
    bref = ref(base) if base is not None else None
    if not ins or (fam is Family.multislerp and len(ins) == 1):
        # mergekit: sce/ram of the base alone is the base; multislerp of one model is that model (base or not)
        only = ins[0] if ins else bref
        return P.finish(TensorPlan(out_name, Family.passthrough, m.name, shape, None, (only,), weights=(1.0,)))
    return P.finish(TensorPlan(out_name, fam, m.name, shape, bref, ins, weights=ws, options=options,
                               seed=P.r.random_seed))


def _cast_option(key: str, value):
    if isinstance(value, bool):
        return value
    return int(value) if key == "max_iter" else float(value)


def _layer_names(src: Source, layer: int) -> list[str]:
    """The checkpoint tensors of decoder layer `layer` of `src`, in checkpoint order."""
    return list(src.layout.layer_keys[layer])


def _head_key(S: SourceSet, srcs: list[str]) -> str | None:
    """The output head tensor of a merge of `srcs`: present when any of them has an untied head (mergekit: lm_head is
    `optional`, written when any input has it; a tied input contributes its embedding)."""
    for src in srcs:
        if S[src].layout.head_key is not None:
            return S[src].layout.head_key
    return None


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
    referenced = list(dict.fromkeys(([base] if base is not None else []) + [e[0] for g in groups for e in g[1]]))
    ov = output_vocab(r, S.sources, ref_src, referenced, S.resolve)
    vocab = ref.vocab_size if ov is None else None
    for gname, entries, _ in groups:
        for j, (src, _, lr) in enumerate(entries):
            if lr is not None and lr[1] > S[src].num_layers:
                where = f"{gname}.sources[{j}].layer_range"
                raise RecipeError(f"{where}: {list(lr)} is out of bounds: source {src!r} has "
                                  f"{S[src].num_layers} layers")

    tensors: dict[str, TensorPlan] = {}
    lay = ref.layout
    vocab_keys = set(lay.vocab_keys)

    def planner(gname: str) -> _Planner:
        """A slice with its own `base_model` (mergekit's OutputSliceDefinition.base_model) plans against it."""
        sb = r.slices[int(gname.removeprefix(f"{prefix}slices[")[:-1])].base_model if r.slices else None
        if sb is None:
            return P
        S.resolve(sb, f"{gname}.base_model")
        return _Planner(r.model_copy(update={"base_model": sb}), S)

    def group_base(gname: str) -> str | None:
        """The source name of a group's base: its slice's own `base_model`, else the recipe's."""
        sb = r.slices[int(gname.removeprefix(f"{prefix}slices[")[:-1])].base_model if r.slices else None
        return S.resolve(sb, f"{gname}.base_model") if sb is not None else base

    def plan_nonlayer(names, gname, entries, sparams):
        GP = planner(gname)
        models = [(src, params) for src, params, _ in entries]
        for name in names:
            shape = next(S[src].shape(name) for src in [ref_src] + [m for m, _ in models] if name in S[src].tensors)
            is_vocab = name in vocab_keys or name == head
            if is_vocab:
                shape = ((vocab if ov is None else ov.n_rows),) + tuple(shape[1:])
            p = plan_group(GP, name, name, models, sparams, 0.0, vocab, gname, shape)
            # the vocabulary maps use the recipe base_model, as mergekit's tokenizer merge does
            tensors[name] = _in_vocab(GP, p, ov, base, gname) if is_vocab and ov is not None else p

    g0 = groups[0]
    plan_nonlayer(lay.pre_keys, *g0)
    out_layer = 0
    for gname, entries, sparams in groups:
        GP = planner(gname)
        if entries[0][2] is None:
            n_layers, starts = ref.num_layers, [0] * len(entries)
        else:
            n_layers = entries[0][2][1] - entries[0][2][0]
            starts = [lr[0] for _, _, lr in entries]
        for i in range(n_layers):
            t = i / (n_layers - 1) if n_layers > 1 else 1.0  # mergekit: t = 1 for one layer
            first_src, _, _ = entries[0]
            first_lay = S[first_src].layout
            for name in _layer_names(S[first_src], starts[0] + i):
                out_name = first_lay.rename_layer(name, out_layer)
                per_model = []
                for (src, params, _), st in zip(entries, starts):
                    per_model.append((src, params, S[src].layout.rename_layer(name, st + i)))
                shape = S[first_src].shape(name)
                tensors[out_name] = _plan_layer_tensor(GP, out_name, per_model, sparams, t, gname, shape)
            out_layer += 1
    # final norm and LM head: the last slice's sources, only as many as the first slice has (mergekit 0.1.5's
    # MergePlanner.plan_module zips them with the first slice's weight list); an empty last slice ([n, n]) thus
    # picks the model(s) they come from
    gname, entries, sparams = groups[-1]
    entries = entries[: len(groups[0][1])]
    last_base = group_base(gname)
    head = _head_key(S, [src for src, _, _ in entries] + ([last_base] if last_base is not None else []))
    post = [k for k in lay.post_keys if k != lay.head_key] + ([head] if head is not None else [])
    plan_nonlayer(post, gname, entries, sparams)
    cfg = dict(ref.config)
    cfg["num_hidden_layers"] = out_layer
    cfg["tie_word_embeddings"] = head is None
    dtype = r.out_dtype or r.dtype or _dtype_of(ref.config)
    if ov is not None:
        cfg["vocab_size"] = ov.n_rows
        tok = ov.source
    else:
        tok = _tokenizer_source(r, S, base or ref_src)
    plan = ModelPlan(r, _fix_config(cfg, dtype, [None] * out_layer), tensors, [1.0] * out_layer, tok, dtype, S,
                     vocab=ov)
    return check_output(plan, prefix.rstrip(".") or "recipe")


def _in_vocab(P: _Planner, p: TensorPlan, ov: OutputVocab, base: str | None, where: str) -> TensorPlan:
    """`p` with every input re-indexed into the merged vocabulary `ov` (engine/vocab.py)."""
    refs = p.refs()
    maps = row_maps(ov, [(x.source, x.name) for x in refs], base, P.S.sources, where)
    new = [TensorRef(x.source, x.name, m if isinstance(m, int) else None, m if isinstance(m, RowMap) else None)
           for x, m in zip(refs, maps)]
    nb = 1 if p.base is not None else 0
    object.__setattr__(p, "base", new[0] if nb else None)
    object.__setattr__(p, "inputs", tuple(new[nb:]))
    return P.finish(p)


def check_output(plan: ModelPlan, where: str) -> ModelPlan:
    """Raise RecipeError unless the planned tensors are exactly what the output architecture loads (transformers'
    own rules: engine/arch.py), e.g. a layer moved to an index where the architecture expects a different layer."""
    try:
        _ = plan.layout
    except CheckpointError as e:
        raise RecipeError(f"{where}: the merged model is not a valid {plan.config.get('model_type')} checkpoint: "
                          f"{e}") from None
    return plan


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
        raise RecipeError("tokenizer_source: 'union' merges vocabularies, which a layer-path recipe cannot do (its "
                          "embeddings and LM head come from base_model); name a source or 'base'")
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

            plan = path_plan(r, sources)
        else:
            plan = _merge_plan(r, sources)
    except CheckpointError as e:
        raise RecipeError(str(e)) from None
    if plan.dtype != "float32":  # the lazy model computes with the values an export of this dtype holds
        finish = _Planner(r, sources).finish
        plan.tensors = {n: finish(replace(p, round_to=plan.dtype)) for n, p in plan.tensors.items()}
    if r.chat_template is not None:
        # `auto`: one vote per source the merge reads, the base's first (engine/chat_template.py)
        used = ([sources.resolve(r.base_model, "base_model")] if r.base_model else []) + [
            ref.source for p in plan.tensors.values() for ref in p.refs()]
        dirs = [sources[n].path for n in dict.fromkeys(used)]
        plan.chat_template = resolve_chat_template(r.chat_template, dirs)
    return plan


