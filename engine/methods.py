"""Merge methods as data.

Every method the recipe language accepts is one row of `METHODS`. The task-arithmetic family (task_arithmetic, ties,
dare_*, breadcrumbs*, della*) is a single generalized algorithm configured by a sparsification kind, a consensus
kind and two defaults, as in mergekit:

    delta_i = W_i - W_base
    delta_i = sparsify(delta_i, density_i)              # magnitude | random | breadcrumbs | della | none
    delta_i *= L1 rescale factor                        # if rescale
    x_i = weight_i * delta_i
    counted_i = sign(x_i) == sign(sum_j x_j)  (0 -> +)  # if consensus == "sum"; else every source counts
    mixed = sum counted x_i / (normalize ? sum counted weight_i (0 -> 1) : 1)
    W = W_base + lambda * mixed

`linear` and `slerp` combine whole tensors; `passthrough` copies one source (layer stacking via slices), and `path`
is this project's layer-path extension (see engine/recipe.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Sparsify(str, Enum):
    none = "none"
    magnitude = "magnitude"  # TIES: top-k by |delta| over the whole tensor
    random = "random"  # DARE: keep each element with probability = density
    breadcrumbs = "breadcrumbs"  # drop the top gamma fraction and the bottom so that density remains
    della = "della"  # keep with a per-row rank-based probability in [density - eps, density + eps]


class Consensus(str, Enum):
    none = "none"
    sum = "sum"


class Family(str, Enum):
    task_arithmetic = "task_arithmetic"  # the generalized family above
    linear = "linear"
    slerp = "slerp"
    passthrough = "passthrough"
    path = "path"


@dataclass(frozen=True)
class MethodDef:
    name: str
    family: Family
    sparsify: Sparsify = Sparsify.none
    consensus: Consensus = Consensus.none
    default_normalize: bool = False
    default_rescale: bool = False
    needs_base: bool = False
    min_models: int = 1  # models contributing a tensor, the base included
    max_models: int | None = None


def _gta(name, sparsify, consensus, normalize, rescale) -> MethodDef:
    return MethodDef(name, Family.task_arithmetic, sparsify, consensus, normalize, rescale, needs_base=True)


METHODS: dict[str, MethodDef] = {
    m.name: m
    for m in [
        MethodDef("linear", Family.linear, default_normalize=True, min_models=1),
        MethodDef("slerp", Family.slerp, needs_base=True, min_models=2, max_models=2),
        MethodDef("passthrough", Family.passthrough, min_models=1, max_models=1),
        MethodDef("path", Family.path),
        _gta("task_arithmetic", Sparsify.none, Consensus.none, False, False),
        _gta("ties", Sparsify.magnitude, Consensus.sum, True, False),
        _gta("dare_ties", Sparsify.random, Consensus.sum, False, True),
        _gta("dare_linear", Sparsify.random, Consensus.none, False, True),
        _gta("breadcrumbs", Sparsify.breadcrumbs, Consensus.none, False, False),
        _gta("breadcrumbs_ties", Sparsify.breadcrumbs, Consensus.sum, False, False),
        _gta("della", Sparsify.della, Consensus.sum, True, True),
        _gta("della_linear", Sparsify.della, Consensus.none, False, True),
    ]
}

# Per-source ("tensor") parameters each family reads, with their defaults (None: required).
TENSOR_PARAMS: dict[Family, dict[str, float | None]] = {
    Family.task_arithmetic: {"weight": None, "density": 1.0},
    Family.linear: {"weight": None},
    Family.slerp: {},
    Family.passthrough: {"scale": 1.0},
    Family.path: {},
}
SPARSIFY_PARAMS: dict[Sparsify, dict[str, float]] = {
    Sparsify.breadcrumbs: {"gamma": 0.01},
    Sparsify.della: {"epsilon": 0.15},
}
# Global (whole-merge) parameters: name -> default (None: required).
GLOBAL_PARAMS: dict[Family, dict[str, object]] = {
    Family.task_arithmetic: {"normalize": None, "rescale": None, "lambda": 1.0, "int8_mask": False},
    Family.linear: {"normalize": None},
    Family.slerp: {"t": None},
    Family.passthrough: {},
    Family.path: {},
}


def get_method(name: str) -> MethodDef:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge_method {name!r}; known: {', '.join(sorted(METHODS))}") from None
