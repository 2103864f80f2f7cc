"""Search spaces: pure mappings genome -> recipe, with their inverses.

A genome is a vector in [0, 1]^n (CMA-ES works in these scaled coordinates); `space.to_recipe(x)` returns a recipe
dict of the engine's language and `space.from_recipe(recipe)` the genome that maps back to the same recipe.
Nothing here reads a checkpoint: the spaces know only names and layer counts.

* `PSSpace` (parameter space): per model, a weight (and a density for sparsifying methods), for the whole model or per
  group of layers (`slices:`, one per group), optionally per tensor-name filter (`[{filter, value}, ..., {value}]`);
  `shared_filters` have one value for all groups (for the tensors outside the layers: embeddings, LM head).
  genome -> recipe -> genome is the identity (up to rounding values to 6 decimals).
* `DFSSpace` (data-flow space, the paper's layer path): the M layers of models A and B laid out (model by model, or
  interleaved) and repeated r times give T = M r slots; gene t > 0.5 takes slot t. Model A supplies embeddings and
  head, and its first and last layers anchor the path. With `scales: matrix`, M x M more genes give the factor
  W[i, j] on the hidden state entering a hop to layer j from layer i. The inverse maps a path to the genome with
  included slots at 0.75, others at 0.25 and unused W entries at 1.0: recipe -> genome -> recipe is the identity.
* PS+DFS: a `DFSSpace` whose model A is the definition "ps" (an earlier PS merge) carried in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest

import numpy as np

from lazymerge.engine.methods import get_method, global_params

DENSITY_METHODS = ("dare_ties", "ties", "dare_linear", "della", "breadcrumbs_ties")
ON, OFF = 0.75, 0.25


def _val(x: float, lo: float, hi: float) -> float:
    return round(lo + float(x) * (hi - lo), 6)


def _gene(v: float, lo: float, hi: float) -> float:
    return (float(v) - lo) / (hi - lo)


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges splitting the layers as evenly as possible."""
    if not 1 <= groups <= num_layers:
        raise ValueError(f"layer_groups: {groups} groups for {num_layers} layers")
    b = [round(i * num_layers / groups) for i in range(groups + 1)]
    return [(b[i], b[i + 1]) for i in range(groups)]


@dataclass(frozen=True)
class PSSpace:
    method: str
    base_model: str | None
    models: tuple[str, ...]
    num_layers: int
    layer_groups: int = 1
    filters: tuple[str, ...] = ()
    weight_range: tuple[float, float] = (0.0, 2.0)
    density_range: tuple[float, float] = (0.1, 1.0)
    normalize: bool | None = False
    random_seed: int = 0
    # Filters with one value per (model, param) for every layer group: the tensors outside the layers. A sliced
    # recipe takes the embeddings from its first slice and the head from its last, so per-group genes for them
    # would be inert dimensions of the search.
    shared_filters: tuple[str, ...] = ()
    kind: str = field(default="ps", init=False)

    @property
    def params(self) -> tuple[str, ...]:
        return ("weight", "density") if self.method in DENSITY_METHODS else ("weight",)

    @property
    def conditions(self) -> tuple[str, ...]:
        """The filters of every parameter's condition list, in order (shared ones first); a last value follows."""
        return self.shared_filters + self.filters

    @property
    def slots(self) -> int:  # values per (model, param, group) in the recipe
        return len(self.conditions) + 1 if self.conditions else 1

    @property
    def slot_names(self) -> list[str]:
        return list(self.conditions) + ["other"] if self.conditions else [""]

    @property
    def _block(self) -> int:  # genes per (model, param)
        return len(self.shared_filters) + self.layer_groups * (len(self.filters) + 1)

    @property
    def dim(self) -> int:
        return len(self.models) * len(self.params) * self._block

    def _range(self, p: str) -> tuple[float, float]:
        return self.weight_range if p == "weight" else self.density_range

    def _index(self, mi: int, pi: int, g: int, f: int) -> int:
        """Gene of slot f (in `slot_names` order) of group g; a shared slot has one gene for all groups."""
        base, ns = (mi * len(self.params) + pi) * self._block, len(self.shared_filters)
        return base + f if f < ns else base + ns + g * (len(self.filters) + 1) + f - ns

    def gene_names(self) -> list[str]:
        out = []
        for m in self.models:
            for p in self.params:
                out += [f"{m}.{p}.{s}" for s in self.shared_filters]
                for g in range(self.layer_groups):
                    for f in self.slot_names[len(self.shared_filters):]:
                        out.append(f"{m}.{p}" + (f"[g{g}]" if self.layer_groups > 1 else "") + (f".{f}" if f else ""))
        return out

    def values(self, x) -> dict[tuple[str, str], np.ndarray]:
        """(model, param) -> (groups, slots) array of the recipe's values (shared slots repeat in every group)."""
        x = np.asarray(x, dtype=float)
        out = {}
        for mi, m in enumerate(self.models):
            for pi, p in enumerate(self.params):
                lo, hi = self._range(p)
                arr = np.empty((self.layer_groups, self.slots))
                for g in range(self.layer_groups):
                    for f in range(self.slots):
                        arr[g, f] = _val(x[self._index(mi, pi, g, f)], lo, hi)
                out[(m, p)] = arr
        return out

    def _param_value(self, row: np.ndarray):
        if not self.conditions:
            return float(row[0])
        conds = [{"filter": f, "value": float(v)} for f, v in zip(self.conditions, row[:-1])]
        return conds + [{"value": float(row[-1])}]

    def to_recipe(self, x) -> dict:
        if len(x) != self.dim:
            raise ValueError(f"genome of length {len(x)}, space has {self.dim}")
        vals = self.values(x)

        def params(m: str, g: int) -> dict:
            return {p: self._param_value(vals[(m, p)][g]) for p in self.params}

        r: dict = {"merge_method": self.method}
        if self.base_model is not None and self.method != "linear":  # nuslerp, multislerp: merge the deltas
            r["base_model"] = self.base_model
        if self.layer_groups == 1:
            r["models"] = [{"model": m, "parameters": params(m, 0)} for m in self.models]
        else:
            slices = []
            for g, (a, b) in enumerate(layer_groups(self.num_layers, self.layer_groups)):
                srcs = []
                if "base_model" in r and self.base_model not in self.models:
                    srcs.append({"model": self.base_model, "layer_range": [a, b]})
                srcs += [{"model": m, "layer_range": [a, b], "parameters": params(m, g)} for m in self.models]
                slices.append({"sources": srcs})
            r["slices"] = slices
        if self.normalize is not None and "normalize" in global_params(get_method(self.method)):
            r["parameters"] = {"normalize": self.normalize}
        r["random_seed"] = self.random_seed
        return r

    def from_recipe(self, recipe: dict) -> np.ndarray:
        if hasattr(recipe, "to_dict"):
            recipe = recipe.to_dict()
        if recipe.get("merge_method") != self.method:
            raise ValueError(f"merge_method: {recipe.get('merge_method')!r}, the space's method is {self.method!r}")
        if self.layer_groups == 1:
            entries = [{e["model"]: e.get("parameters", {}) for e in recipe.get("models") or []}]
        else:
            entries = [{s["model"]: s.get("parameters", {}) for s in sl["sources"]}
                       for sl in recipe.get("slices") or []]
        if len(entries) != self.layer_groups:
            raise ValueError(f"recipe has {len(entries)} layer groups, the space {self.layer_groups}")
        x = np.empty(self.dim)
        for g, ent in enumerate(entries):
            for mi, m in enumerate(self.models):
                if m not in ent:
                    raise ValueError(f"model {m!r} missing from the recipe")
                for pi, p in enumerate(self.params):
                    v = ent[m][p]
                    row = [c["value"] for c in v] if isinstance(v, list) else [v]
                    if len(row) != self.slots:
                        raise ValueError(f"{m}.{p}: {len(row)} values, the space has {self.slots}")
                    lo, hi = self._range(p)
                    for f, val in enumerate(row):
                        i = self._index(mi, pi, g, f)
                        if g > 0 and f < len(self.shared_filters) and _gene(val, lo, hi) != x[i]:
                            raise ValueError(f"{m}.{p}: the shared filter {self.shared_filters[f]!r} has different "
                                             "values in different layer groups")
                        x[i] = _gene(val, lo, hi)
        return x


@dataclass(frozen=True)
class DFSSpace:
    a: str  # supplies embeddings, final norm and head; its first and last layers anchor the path
    b: str
    layers_a: int
    layers_b: int
    repeats: int = 3
    layout: str = "sequential"  # sequential: A's layers then B's; interleaved: A0 B0 A1 B1 ...
    scales: str = "matrix"  # matrix | ones
    scale_range: tuple[float, float] = (0.0, 2.0)
    definitions: dict | None = None  # ps+dfs: {"ps": <parameter-merge recipe>}
    kind: str = field(default="dfs", init=False)

    @property
    def layers(self) -> list[tuple[str, int]]:
        """The M layers in layout order; a layer's position here is its index in W."""
        la = [(self.a, i) for i in range(self.layers_a)]
        lb = [(self.b, i) for i in range(self.layers_b)]
        if self.layout == "sequential":
            return la + lb
        return [x for pair in zip_longest(la, lb) for x in pair if x is not None]

    @property
    def M(self) -> int:
        return self.layers_a + self.layers_b

    @property
    def T(self) -> int:
        return self.M * self.repeats

    @property
    def dim(self) -> int:
        return self.T + (self.M * self.M if self.scales == "matrix" else 0)

    def gene_names(self) -> list[str]:
        L = self.layers
        names = [f"take[{t}]={L[t % self.M][0]}.{L[t % self.M][1]}" for t in range(self.T)]
        if self.scales == "matrix":
            names += [f"W[{i},{j}]" for i in range(self.M) for j in range(self.M)]
        return names

    def _w(self, x, i: int, j: int) -> float:
        if self.scales != "matrix":
            return 1.0
        return _val(x[self.T + i * self.M + j], *self.scale_range)

    def hops(self, x) -> list[tuple[str, int, float, int]]:
        """(model, layer, scale, index in W) of every hop, anchors included."""
        L = self.layers
        pos = {m: i for i, m in enumerate(L)}
        first, last = pos[(self.a, 0)], pos[(self.a, self.layers_a - 1)]
        out = [(self.a, 0, 1.0, first)]
        prev = first
        for t in range(self.T):
            if x[t] > 0.5:
                j = t % self.M
                out.append((L[j][0], L[j][1], self._w(x, prev, j), j))
                prev = j
        out.append((self.a, self.layers_a - 1, self._w(x, prev, last), last))
        return out

    def to_recipe(self, x) -> dict:
        if len(x) != self.dim:
            raise ValueError(f"genome of length {len(x)}, space has {self.dim}")
        path = []
        for m, layer, s, _ in self.hops(x):
            hop = {"model": m, "layer": layer}
            if s != 1.0:
                hop["scale"] = s
            path.append(hop)
        r: dict = {"merge_method": "path", "base_model": self.a}
        if self.definitions:
            r["definitions"] = self.definitions
        r["path"] = path
        return r

    def from_recipe(self, recipe: dict) -> np.ndarray:
        if hasattr(recipe, "to_dict"):
            recipe = recipe.to_dict()
        hops = []
        for h in recipe["path"]:
            layers = [h["layer"]] if h.get("layer") is not None else list(range(*h["layer_range"]))
            hops += [(h["model"], ly, float(h.get("scale", 1.0))) for ly in layers]
        if len(hops) < 2 or hops[0][:2] != (self.a, 0) or hops[-1][:2] != (self.a, self.layers_a - 1):
            raise ValueError(f"path: must start at {self.a}.0 and end at {self.a}.{self.layers_a - 1}")
        L = self.layers
        pos = {m: i for i, m in enumerate(L)}
        x = np.full(self.dim, OFF)
        if self.scales == "matrix":
            x[self.T:] = _gene(1.0, *self.scale_range)
        prev, t = pos[(self.a, 0)], 0
        for k, (m, ly, s) in enumerate(hops[1:], 1):
            j = pos.get((m, ly))
            if j is None:
                raise ValueError(f"path[{k}]: {m}.{ly} is not a layer of the space")
            if k < len(hops) - 1:
                while t < self.T and t % self.M != j:
                    t += 1
                if t == self.T:
                    raise ValueError(f"path[{k}]: {m}.{ly} does not fit in {self.repeats} repeats of the layout")
                x[t] = ON
                t += 1
            if self.scales == "matrix":
                x[self.T + prev * self.M + j] = _gene(s, *self.scale_range)
            elif s != 1.0:
                raise ValueError(f"path[{k}]: scale {s} in a space without scales")
            prev = j
        return x


def build_space(space_cfg, base_model: str | None, num_layers: dict[str, int], ps_recipe: dict | None = None):
    """The space of a `SpaceConfig`; `num_layers` gives the layer count of every model it names ("ps" included)."""
    c = space_cfg
    if c.kind == "ps":
        return PSSpace(c.method, base_model, tuple(c.models), num_layers[c.models[0]], c.layer_groups,
                       tuple(c.filters), tuple(c.weight_range), tuple(c.density_range), c.normalize, c.random_seed,
                       tuple(c.shared_filters))
    if c.kind == "dfs":
        a, b = c.models
        return DFSSpace(a, b, num_layers[a], num_layers[b], c.repeats, c.layout, c.scales, tuple(c.scale_range))
    b = c.models[-1]
    return DFSSpace("ps", b, num_layers["ps"], num_layers[b], c.repeats, c.layout, c.scales, tuple(c.scale_range),
                    definitions={"ps": ps_recipe})
