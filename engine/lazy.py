"""A transformers Llama-family model whose weights are computed from the recipe when the forward pass needs them.

`build_lazy_module(plan, provider)` builds the architecture's own transformers class on the `meta` device (no weight
is allocated), then swaps every Linear, the embedding and every RMSNorm for a lazy twin that asks the
`WeightProvider` for its merged weight at call time (the gpt-fast pattern of a Linear whose real weight is computed
inside `forward`). Everything else (rotary embeddings, attention, masks, KV cache) is transformers' own code, so the
logits agree with transformers' forward of the same merged weights. A layer path becomes a model with one decoder
layer per hop: each hop has its own KV-cache slot (its layer index) even when two hops run the same source layer,
and a forward pre-hook multiplies the hidden state entering a hop by its scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .plan import ModelPlan, TensorPlan
from .weights import WeightProvider


class LazyLinear(nn.Module):
    def __init__(self, provider: WeightProvider, weight: TensorPlan, bias: TensorPlan | None):
        super().__init__()
        self.provider, self.w, self.b = provider, weight, bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        return self.provider.linear(x, self.w, self.b)

    def extra_repr(self) -> str:
        return f"{self.w.out_name} [{self.w.method}]"


class LazyEmbedding(nn.Module):
    def __init__(self, provider: WeightProvider, weight: TensorPlan):
        super().__init__()
        self.provider, self.w = provider, weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.provider.rows(self.w, ids)


class LazyRMSNorm(nn.Module):
    """Same arithmetic as transformers' Llama/Mistral/Qwen2 RMSNorm, with a lazily merged weight."""

    def __init__(self, provider: WeightProvider, weight: TensorPlan, eps: float):
        super().__init__()
        self.provider, self.w, self.variance_epsilon = provider, weight, eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.provider.weight(self.w) * h.to(dtype)


def _scale_hook(scale: float):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * scale,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] * scale
        return args, kwargs

    return hook


def build_lazy_module(plan: ModelPlan, provider: WeightProvider, attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(plan.config)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg_dict.items() if k != "transformers_version"})
    config.tie_word_embeddings = "lm_head.weight" not in plan.tensors
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    T = plan.tensors
    eps = config.rms_norm_eps
    inner = model.model
    inner.embed_tokens = LazyEmbedding(provider, T["model.embed_tokens.weight"])
    for i, layer in enumerate(inner.layers):
        pre = f"model.layers.{i}."
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(layer, parent_name)
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    base = f"{pre}{parent_name}.{name}"
                    setattr(parent, name, LazyLinear(provider, T[f"{base}.weight"], T.get(f"{base}.bias")))
        layer.input_layernorm = LazyRMSNorm(provider, T[f"{pre}input_layernorm.weight"], eps)
        layer.post_attention_layernorm = LazyRMSNorm(provider, T[f"{pre}post_attention_layernorm.weight"], eps)
        if plan.layer_scales[i] != 1.0:
            layer.register_forward_pre_hook(_scale_hook(plan.layer_scales[i]), with_kwargs=True)
    inner.norm = LazyRMSNorm(provider, T["model.norm.weight"], eps)
    head = T.get("lm_head.weight", T["model.embed_tokens.weight"])
    model.lm_head = LazyLinear(provider, head, None)
    # rotary embeddings: the only real buffers; rebuild them on the target device
    with torch.device("cpu"):
        inner.rotary_emb = type(inner.rotary_emb)(config=config).to(provider.device)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise RuntimeError(f"lazy model still has unmaterialized tensors: {leftover[:5]}")
    return model.eval()
