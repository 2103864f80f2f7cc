"""Any transformers decoder whose parameters are computed from the recipe when the forward pass needs them.

`build_lazy_module(plan, provider)` builds the architecture's own transformers class with its parameters on `meta`
and its buffers real (engine/arch.py: rotary frequencies, Gemma's `embed_scale`... computed by transformers), then
makes every parameter of every module lazy, whatever the module's class:

* a module whose forward is `nn.Linear`'s becomes a `LazyLinear` (the gpt-fast pattern of a Linear whose weight is
  computed inside `forward`): `WeightProvider.linear`, i.e. the fused merge-matmul on CUDA for few tokens;
* an `nn.Embedding` (or a subclass: Gemma's scaled embedding) keeps its own forward; a forward pre-hook merges only
  the rows of the ids in the batch and remaps the ids onto them (or hands the cached full matrix);
* any other module (norms of any arithmetic, q/k norms, routers, fused 3-D expert tensors...) keeps its own forward:
  a pre-hook puts the merged tensors into `module._parameters` for the call and a forward hook puts the `meta`
  placeholders back, so the model never holds a merged tensor between calls (the cache policy decides that).

Parameters that transformers builds from several checkpoint tensors (a MoE layer's per-expert tensors stacked into
one 3-D parameter) are built by transformers' own conversion ops from the merged checkpoint tensors (`Group.build`).
All arithmetic is transformers' code, so the logits agree with transformers' forward of the same merged weights. A
layer path becomes a model with one decoder layer per hop: each hop has its own KV-cache slot (its layer index) even
when two hops run the same source layer, and a forward pre-hook multiplies the hidden state entering a hop by its
scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import Group, meta_model
from .plan import ModelPlan, TensorPlan
from .weights import WeightProvider


class LazyLinear(nn.Module):
    """nn.Linear with a merged weight (and bias): x (..., in) -> (..., out)."""

    def __init__(self, provider: WeightProvider, weight: TensorPlan, bias: TensorPlan | None):
        super().__init__()
        self.provider, self.w, self.b = provider, weight, bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        return self.provider.linear(x, self.w, self.b)

    def extra_repr(self) -> str:
        return f"{self.w.out_name} [{self.w.method}]"


class _Binding:
    """The merged tensors of one module's parameters: {param attribute: (group, its plans, parameter name)}."""

    def __init__(self, provider: WeightProvider, config, entries: dict[str, tuple[Group, tuple[TensorPlan, ...], str]]):
        self.provider, self.config, self.entries = provider, config, entries
        self.saved: dict[str, nn.Parameter] = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        out, built = {}, {}
        for attr, (g, plans, pname) in self.entries.items():
            if id(g) not in built:
                built[id(g)] = self.provider.group(g, plans, self.config)
            out[attr] = built[id(g)][pname]
        return out

    def put(self, module: nn.Module, values: dict[str, torch.Tensor]) -> None:
        for attr, t in values.items():
            self.saved.setdefault(attr, module._parameters[attr])
            module._parameters[attr] = t  # a plain tensor for the call (no autograd: inference only)

    def restore(self, module: nn.Module) -> None:
        for attr, p in self.saved.items():
            module._parameters[attr] = p
        self.saved.clear()


def _generic_hooks(module: nn.Module, b: _Binding) -> None:
    def pre(mod, args, kwargs):
        b.put(mod, b.tensors())
        return None

    def post(mod, args, kwargs, output):
        b.restore(mod)
        return None

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True, always_call=True)


def _embedding_hooks(module: nn.Embedding, b: _Binding, plan: TensorPlan) -> None:
    provider = b.provider
    state = {}

    def pre(mod, args, kwargs):
        key = None if args else next(iter(kwargs))  # the ids: first positional argument, or the only keyword one
        ids = args[0] if args else kwargs[key]
        full = provider.full_rows(plan)
        if full is not None:
            b.put(mod, {"weight": full})
            return None
        uniq, inverse = torch.unique(ids, return_inverse=True)  # merge only the rows this batch looks up
        b.put(mod, {"weight": provider.some_rows(plan, uniq)})
        state["padding_idx"] = mod.padding_idx
        mod.padding_idx = None  # row indices are remapped; padding_idx only matters for gradients
        if args:
            return (inverse,) + tuple(args[1:]), kwargs
        return args, {**kwargs, key: inverse}

    def post(mod, args, kwargs, output):
        if "padding_idx" in state:
            mod.padding_idx = state.pop("padding_idx")
        b.restore(mod)
        return None

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True, always_call=True)


def _scale_hook(scale: float):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * scale,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] * scale
        return args, kwargs

    return hook


def build_lazy_module(plan: ModelPlan, provider: WeightProvider, attn_implementation: str = "sdpa") -> nn.Module:
    """The plan's output architecture as a transformers model whose every parameter is lazily merged."""
    lay = plan.layout
    model = meta_model(plan.config, attn_implementation, provider.device, provider.dtype)
    config = model.config
    T = plan.tensors
    first_name = {id(p): n for n, p in model.named_parameters()}
    groups = [(g, tuple(T[k] for k in g.keys)) for g in lay.groups]

    def entry(p: nn.Parameter):
        pname = first_name[id(p)]
        g, plans = groups[lay.param_group[pname]]
        return g, plans, pname

    covered = set()
    for mod_name, module in list(model.named_modules()):
        own = {a: p for a, p in module._parameters.items() if p is not None}
        if not own:
            continue
        ents = {a: entry(p) for a, p in own.items()}
        covered.update(first_name[id(p)] for p in own.values())
        simple = all(g.converter is None for g, _, _ in ents.values())
        if simple and type(module).forward is nn.Linear.forward and set(own) <= {"weight", "bias"}:
            parent_name, _, leaf = mod_name.rpartition(".")
            bias = ents["bias"][1][0] if "bias" in ents else None
            setattr(model.get_submodule(parent_name), leaf, LazyLinear(provider, ents["weight"][1][0], bias))
        elif simple and isinstance(module, nn.Embedding) and set(own) == {"weight"}:
            _embedding_hooks(module, _Binding(provider, config, ents), ents["weight"][1][0])
        else:
            _generic_hooks(module, _Binding(provider, config, ents))
    missed = [n for n in first_name.values() if n not in covered]
    if missed:
        raise RuntimeError(f"lazy model: parameters without a lazy binding: {missed[:5]}")
    layers = model.get_submodule(lay.layers_prefix)
    for i, layer in enumerate(layers):
        if plan.layer_scales[i] != 1.0:
            layer.register_forward_pre_hook(_scale_hook(plan.layer_scales[i]), with_kwargs=True)
    return model.eval()
