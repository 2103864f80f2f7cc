"""What an architecture looks like, asked of transformers: module tree, decoder layers, checkpoint conversion rules.

Nothing here knows a tensor or module name. For a `config.json` (a dict) and the tensor names of a checkpoint,
`analyze` builds the architecture's own transformers class on the `meta` device and answers:

* which `ModuleList` holds the decoder layers (the one whose length is the config's `num_hidden_layers` and whose
  modules are of a class transformers marks as a unit, `_no_split_modules`), and so the layer index of every
  parameter and of every checkpoint tensor feeding it;
* which parameters come before the layers (embeddings) and which after (final norm, output head), by registration
  order in the module tree;
* how checkpoint tensors become model parameters: the same renaming and conversion rules (`WeightRenaming`,
  `WeightConverter`: per-expert MoE tensors stacked and fused into one 3-D parameter) that `from_pretrained` applies,
  from `transformers.conversion_mapping`, applied in the same order (`core_model_loading.rename_source_key`, keys in
  `dot_natural_key` order). Every checkpoint tensor must feed a parameter and every parameter must be fed, otherwise
  `CheckpointError` names the tensor or parameter.

`meta_model(config)` returns a fresh model whose parameters are on `meta` and whose buffers (rotary frequencies,
Gemma's `embed_scale`, ...) are real, computed by transformers' own `initialize_weights`, as `from_pretrained` does
for buffers no checkpoint holds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CheckpointError

_CACHE: dict[str, "Architecture"] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Group:
    """Checkpoint tensors that become model parameters together.

    `converter` is None when one tensor is one parameter (`keys == (key,)`, `params == (param,)`, possibly renamed);
    otherwise it is transformers' `WeightConverter` template whose operations build `params` from `keys` (e.g. a MoE
    layer's per-expert `w1`/`w3` tensors, stacked and concatenated into one `(E, 2 * I, H)` parameter)."""

    params: tuple[str, ...]
    keys: tuple[str, ...]  # in transformers' load order
    patterns: tuple[str, ...]  # per key: the converter's source pattern it matched
    first: str  # the renamed key of the group (the converter's `layer_name`)
    converter: object | None = None

    def build(self, tensors: list[torch.Tensor], config) -> dict[str, torch.Tensor]:
        """{param name: tensor} from the group's checkpoint tensors (same order as `keys`), by transformers' ops."""
        if self.converter is None:
            return {self.params[0]: tensors[0]}
        conv = copy.deepcopy(self.converter)
        for key, pat, t in zip(self.keys, self.patterns, tensors):
            conv.add_tensor(self.first, key, pat, (lambda t=t: t))
        out = conv.convert(self.first, config=config)
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


@dataclass
class Architecture:
    """Facts about one architecture + checkpoint layout (see module docstring). Names: `key` = checkpoint tensor name,
    `param` = model parameter name (first name of a tied parameter)."""

    class_name: str
    layers_prefix: str  # module path of the decoder-layer ModuleList
    num_layers: int
    groups: list[Group]
    key_group: dict[str, int]  # checkpoint key -> index into groups
    param_group: dict[str, int]  # parameter -> index into groups
    key_layer: dict[str, int | None]  # checkpoint key -> decoder layer index (None: outside the layers)
    pre_keys: list[str]  # checkpoint keys outside the layers, before them
    post_keys: list[str]  # ... after them
    layer_keys: list[list[str]]  # per layer, its checkpoint keys in checkpoint order
    embed_key: str | None  # the checkpoint key of the input embedding
    head_key: str | None  # the checkpoint key of an untied output head (None: tied / absent)
    head_param: str | None  # the output head's parameter name (whether tied or not)
    tied: bool
    _templates: dict[str, tuple[list[str], str]] = field(default_factory=dict, repr=False)

    def rename_layer(self, key: str, layer: int) -> str:
        """`key` (a layer tensor) moved to decoder layer `layer`."""
        parts, tail = self._templates[key]
        return ".".join(parts + [str(layer)]) + tail

    @property
    def vocab_keys(self) -> tuple[str, ...]:
        return tuple(k for k in (self.embed_key, self.head_key) if k is not None)


def hf_config(cfg: dict, attn_implementation: str | None = None):
    """A transformers config object from a config.json dict (CheckpointError if transformers does not know it)."""
    from transformers import AutoConfig

    d = {k: v for k, v in cfg.items() if k != "transformers_version"}
    model_type = d.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not a transformers architecture "
                              f"({e})") from None
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def causal_lm_class(config, arch_name: str | None):
    """The transformers class `from_pretrained` would build: `architectures[0]` if transformers has it and it is a
    causal LM, else AutoModelForCausalLM's choice for the model type."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update(v if isinstance(v, (list, tuple)) else [v])
    if arch_name and arch_name in causal and hasattr(transformers, arch_name):
        cls = getattr(transformers, arch_name)
        if not isinstance(config, cls.config_class):
            raise CheckpointError(f"config.json: architecture {arch_name!r} does not match model_type "
                                  f"{config.model_type!r}")
        return cls
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise CheckpointError(f"architecture {arch_name or config.model_type!r} is not a transformers causal "
                              "language model (AutoModelForCausalLM does not know it)") from None


def meta_model(cfg: dict, attn_implementation: str = "sdpa", device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """The architecture's own model: parameters on `meta`, buffers real on `device` (transformers' initialization,
    built under default dtype `dtype` as `from_pretrained(dtype=...)` does)."""
    config = hf_config(cfg)
    archs = cfg.get("architectures") or [None]
    cls = causal_lm_class(config, archs[0])
    if attn_implementation == "sdpa" and not getattr(cls, "_supports_sdpa", False):
        attn_implementation = "eager"  # what from_pretrained falls back to for such a class
    config._attn_implementation = attn_implementation
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = cls(config)
    except (AttributeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"config.json: transformers cannot build {cls.__name__} from it "
                              f"({type(e).__name__}: {e})") from None
    finally:
        torch.set_default_dtype(old)
    for name, buf in list(model.named_buffers(remove_duplicate=False)):
        mod, _, leaf = name.rpartition(".")
        sub = model.get_submodule(mod)
        sub.register_buffer(leaf, torch.empty_like(buf, device="cpu"),
                            persistent=leaf not in sub._non_persistent_buffers_set)
    for p in model.parameters():  # transformers' init functions skip these (`_is_hf_initialized`): on meta they
        p._is_hf_initialized = True  # would only run decompositions (~0.1 s for 13 small layers), never write
    model.initialize_weights()  # fills buffers (rotary inv_freq, embed_scale...); parameters on meta stay untouched
    if torch.device(device).type != "cpu":
        for name, buf in list(model.named_buffers(remove_duplicate=False)):
            mod, _, leaf = name.rpartition(".")
            sub = model.get_submodule(mod)
            sub.register_buffer(leaf, buf.to(device), persistent=leaf not in sub._non_persistent_buffers_set)
    return model.eval()


def decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """(module path, ModuleList) of the decoder layers: length `num_layers`, elements of a `_no_split_modules` class."""
    units = set(getattr(model, "_no_split_modules", None) or [])
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and len(mod) > 0:
            if not units or type(mod[0]).__name__ in units:
                found.append((name, mod))
    if not found:
        raise CheckpointError(f"{type(model).__name__}: no list of {num_layers} decoder layers found in the model")
    return min(found, key=lambda x: x[0].count("."))


def _num_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def _layer_template(key: str, layer: int) -> tuple[list[str], str]:
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p == str(layer):
            return parts[:i], ("." + ".".join(parts[i + 1:])) if i + 1 < len(parts) else ""
    raise CheckpointError(f"tensor {key!r}: its layer index {layer} does not appear in its name")


def analyze(cfg: dict, shapes: dict[str, tuple[int, ...]], where: str = "") -> Architecture:
    """The `Architecture` of checkpoint `shapes` ({key: shape}, in checkpoint order) under config `cfg`.

    Raises CheckpointError naming an unused checkpoint tensor, a parameter no tensor feeds, or a shape mismatch."""
    digest = hashlib.sha256(json.dumps([cfg, list(shapes.items())], sort_keys=True, default=str).encode()).hexdigest()
    with _LOCK:
        hit = _CACHE.get(digest)
    if hit is not None:
        return hit
    pre = f"{where}: " if where else ""
    try:
        arch = _analyze(cfg, shapes)
    except CheckpointError as e:
        raise CheckpointError(pre + str(e)) from None
    with _LOCK:
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[digest] = arch
    return arch


def _analyze(cfg: dict, shapes: dict[str, tuple[int, ...]]) -> Architecture:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    model = meta_model(cfg)
    config = model.config
    n_layers = _num_layers(config)
    layers_prefix, _ = decoder_layers(model, n_layers)
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    meta_sd = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    tied_alias = {}  # parameter name as the checkpoint would call it -> first name
    for name, p in model.named_parameters(remove_duplicate=False):
        for first, q in params.items():
            if q is p:
                tied_alias[name] = first
                break

    pending: dict[str, dict] = {}  # renamed (target) key -> {"keys": [...], "patterns": [...], "conv": ...}
    for key in sorted(shapes, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = rename_source_key(key, [], [], model.base_model_prefix, meta_sd)
        if renamed not in meta_sd:
            if any(r.search(key) for r in ignore):
                raise CheckpointError(f"tensor {key!r} is not used by {type(model).__name__} (transformers ignores it "
                                      "on load); remove it from the checkpoint")
            raise CheckpointError(f"tensor {key!r} is not used by {type(model).__name__} (no parameter takes it)")
        if renamed in buffers:
            raise CheckpointError(f"tensor {key!r} loads into buffer {renamed!r}; checkpoint buffers are not supported")
        entry = pending.setdefault(renamed, {"keys": [], "patterns": [], "conv": by_pattern.get(pattern)})
        entry["keys"].append(key)
        entry["patterns"].append(pattern)

    groups: list[Group] = []
    key_group: dict[str, int] = {}
    param_group: dict[str, int] = {}
    for renamed, e in pending.items():
        conv = e["conv"]
        if conv is None:
            if len(e["keys"]) > 1:
                raise CheckpointError(f"tensors {e['keys']} all load into parameter {renamed!r}")
            out_names = (renamed,)
            g = Group(out_names, tuple(e["keys"]), (None,), renamed, None)
            built = {renamed: torch.empty(shapes[e["keys"][0]], device="meta")}
        else:
            g = Group((), tuple(e["keys"]), tuple(e["patterns"]), renamed, conv)
            try:
                built = g.build([torch.empty(shapes[k], device="meta") for k in e["keys"]], config)
            except Exception as ex:  # transformers' conversion ops raise whatever they raise
                raise CheckpointError(f"tensors {e['keys'][:2]}...: transformers' conversion into {renamed!r} "
                                      f"failed ({type(ex).__name__}: {ex})") from None
            g = Group(tuple(built), g.keys, g.patterns, renamed, copy.deepcopy(conv))
        gi = len(groups)
        groups.append(g)
        for k in g.keys:
            key_group[k] = gi
        for pname, t in built.items():
            first = tied_alias.get(pname, pname)
            if first not in params:
                raise CheckpointError(f"tensors {list(g.keys)[:2]} load into {pname!r}, which is not a parameter")
            if tuple(t.shape) != tuple(params[first].shape):
                raise CheckpointError(f"tensor {g.keys[0]!r} gives parameter {pname!r} the shape {list(t.shape)}, "
                                      f"the model expects {list(params[first].shape)}")
            if first in param_group:
                raise CheckpointError(f"parameter {first!r} is loaded twice (tensors {list(g.keys)[:2]} and "
                                      f"{list(groups[param_group[first]].keys)[:2]})")
            param_group[first] = gi
    missing = [p for p in params if p not in param_group]
    if missing:
        raise CheckpointError(f"parameter {missing[0]!r} of {type(model).__name__} has no tensor in the checkpoint"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    # layer index, position (before/after the layers), head and embedding
    lp = layers_prefix + "."
    order = list(params)
    first_layer_pos = next((i for i, p in enumerate(order) if p.startswith(lp)), len(order))
    pos = {p: i for i, p in enumerate(order)}
    key_layer: dict[str, int | None] = {}
    templates: dict[str, tuple[list[str], str]] = {}
    layer_keys: list[list[str]] = [[] for _ in range(n_layers)]
    pre_keys, post_keys = [], []
    for key in shapes:
        g = groups[key_group[key]]
        layers = {int(p[len(lp):].split(".")[0]) for p in g.params if p.startswith(lp)}
        if len(layers) > 1 or (layers and len(layers) != 1):
            raise CheckpointError(f"tensor {key!r} feeds parameters of several decoder layers")
        if layers:
            (li,) = layers
            key_layer[key] = li
            templates[key] = _layer_template(key, li)
            layer_keys[li].append(key)
        else:
            key_layer[key] = None
            first = tied_alias.get(g.params[0], g.params[0])
            (pre_keys if pos[first] < first_layer_pos else post_keys).append(key)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    embed_param = f"{names[id(emb)]}.weight" if emb is not None else None
    head_param = f"{names[id(head)]}.weight" if head is not None else None
    tied = head is not None and emb is not None and head.weight is emb.weight
    embed_key = _key_of(groups, param_group, embed_param)
    head_key = None if tied or head_param is None else _key_of(groups, param_group, head_param)
    return Architecture(type(model).__name__, layers_prefix, n_layers, groups, key_group, param_group, key_layer,
                        pre_keys, post_keys, layer_keys, embed_key, head_key, head_param, tied, templates)


def _key_of(groups, param_group, param) -> str | None:
    if param is None or param not in param_group:
        return None
    g = groups[param_group[param]]
    return g.keys[0] if g.converter is None else None
