"""Non-finite values: found where they cost nothing, explained by name.

Every forward pass checks its logits for NaN/Inf (one `isfinite` over (B, V) or the real positions of (B, T, V):
cheap next to the forward itself). Only when that check fails does `diagnose` look for the cause, tensor by tensor
over the plan: first the source tensors it reads (a checkpoint that holds NaN/Inf), then the merged tensors (a recipe
whose numbers overflow, e.g. a weight of 1e38), and reports the first culprit by source or recipe and tensor name.
Nothing here runs on the normal path; a non-finite model never yields empty text, a garbage sample or a 500.
"""

from __future__ import annotations

import torch


class NonFiniteError(ValueError):
    """A model's weights or outputs are NaN/Inf; the message names the source or recipe tensor responsible."""


def _finite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t).all())


def diagnose(model) -> str:
    """Why `model` (a LazyModel) produced non-finite logits: the first non-finite source tensor it reads, else the
    first non-finite merged tensor, else the forward pass itself (all weights finite)."""
    with model.engine.lock:
        return _diagnose(model.plan, model.engine.provider)


def _diagnose(plan, provider) -> str:
    store = provider.merger.store
    seen: set = set()
    for p in plan.tensors.values():
        for ref in p.refs():
            key = (ref.source, ref.name)
            if key in seen:
                continue
            seen.add(key)
            if not _finite(store.get(ref)):
                return (f"source {ref.source!r}: tensor {ref.name!r} holds NaN or infinite values; this checkpoint "
                        "cannot be served")
    for name, p in plan.tensors.items():
        if not _finite(provider.weight(p)):
            return (f"the recipe produces NaN or infinite values in tensor {name!r} (method {p.method!r}; its sources "
                    "are finite): check its weights and scales")
    return "the forward pass produced NaN or infinite logits although every weight is finite (overflow in the dtype?)"


def check_logits(model, logits: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise NonFiniteError (with `diagnose`'s reason) if `logits` has a non-finite value at a real position.

    logits: (B, V) for last positions, or (B, T, V) with `mask` (B, T), 1 = real token."""
    x = logits if mask is None or logits.dim() == 2 else logits[mask.bool()]
    if bool(torch.isfinite(x).all()):
        return
    raise NonFiniteError(diagnose(model))
