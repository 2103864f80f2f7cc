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

The other mergekit 0.1.5 methods (mergekit/merge_methods/<name>.py), each computed as per-tensor statistics then one
elementwise pass (engine/method_stats.py, kernels/merge.py):

    nuslerp       slerp of two models (or of their deltas to an optional base), t = w_1 / (w_0 + w_1); the whole
                  tensor flattened (default), per row (`nuslerp_flatten: false`) or per column (`nuslerp_row_wise`)
    multislerp    barycentric slerp of n models (or deltas): tangent-space mean on the unit sphere, times the
                  weighted mean norm
    karcher       iterative Karcher mean on the unit sphere of every input (the base is an ordinary input)
    model_stock   base + t (mean - base), t from the mean pairwise cosine of the deltas (per row if `filter_wise`)
    sce           top-k elements by cross-model variance of the deltas (`select_topk`), sign consensus, weights
                  from each delta's mean square
    arcee_fusion  keep the delta where |delta| * KL(softmax rows) >= median + 1.5 IQR of that importance
    nearswap      interpolate towards the model by min(1, t / |delta|), elementwise
    ram           deltas above `epsilon`: unique ones kept, overlapping ones averaged; ramplus_tl scales the unique
                  ones by 1 + r * clamp(shared / unique count, 0, alpha)
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
    nuslerp = "nuslerp"
    multislerp = "multislerp"
    karcher = "karcher"
    model_stock = "model_stock"
    sce = "sce"
    arcee_fusion = "arcee_fusion"
    nearswap = "nearswap"
    ram = "ram"


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
    base_optional: bool = False  # the base, if given, changes the result (nuslerp, multislerp: merge the deltas)
    non_base: tuple[int, int | None] | None = None  # (min, max) models besides the base, where mergekit counts them


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
        # mergekit 0.1.5 contracts (InputContract of each method): base policy, input counts
        MethodDef("nuslerp", Family.nuslerp, base_optional=True, non_base=(2, 2)),
        MethodDef("multislerp", Family.multislerp, base_optional=True, non_base=(1, None)),
        MethodDef("karcher", Family.karcher),
        MethodDef("model_stock", Family.model_stock, needs_base=True, min_models=3),
        MethodDef("sce", Family.sce, needs_base=True),
        MethodDef("arcee_fusion", Family.arcee_fusion, needs_base=True, min_models=2, max_models=2),
        MethodDef("nearswap", Family.nearswap, needs_base=True, min_models=2, max_models=2),
        MethodDef("ram", Family.ram, needs_base=True),
        MethodDef("ramplus_tl", Family.ram, needs_base=True),
    ]
}

# Per-source ("tensor") parameters each family reads, with their defaults (None: required).
TENSOR_PARAMS: dict[Family, dict[str, float | None]] = {
    Family.task_arithmetic: {"weight": None, "density": 1.0},
    Family.linear: {"weight": None},
    Family.slerp: {},
    Family.passthrough: {"scale": 1.0},
    Family.path: {},
    Family.nuslerp: {"weight": None},
    Family.multislerp: {"weight": None},
    Family.karcher: {},
    Family.model_stock: {},
    Family.sce: {},
    Family.arcee_fusion: {},
    Family.nearswap: {},
    Family.ram: {},
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
    Family.nuslerp: {"nuslerp_row_wise": False, "nuslerp_flatten": True},
    Family.multislerp: {"normalize_weights": True, "eps": 1e-8},
    Family.karcher: {"max_iter": 10, "tol": 1e-5},
    Family.model_stock: {"filter_wise": False},
    Family.sce: {"int8_mask": False, "select_topk": 1.0},
    Family.arcee_fusion: {},
    Family.nearswap: {"t": None},
    Family.ram: {"epsilon": 1e-5},
}
# Methods whose global parameters differ from their family's.
METHOD_GLOBAL_PARAMS: dict[str, dict[str, object]] = {
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}
BOOL_PARAMS = ("normalize", "rescale", "int8_mask", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights",
               "filter_wise")
INT_PARAMS = ("max_iter",)


def global_params(m: MethodDef) -> dict[str, object]:
    """Global (whole-merge) parameters of method `m`: name -> default (None: required, except normalize and
    rescale, whose None is the method's default_normalize / default_rescale)."""
    return METHOD_GLOBAL_PARAMS.get(m.name, GLOBAL_PARAMS[m.family])


def required_global_params(m: MethodDef) -> list[str]:
    """Global parameters a recipe of method `m` must give (slerp's and nearswap's `t`)."""
    return [k for k, v in global_params(m).items() if v is None and k not in ("normalize", "rescale")]


def get_method(name: str) -> MethodDef:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge_method {name!r}; known: {', '.join(sorted(METHODS))}") from None
