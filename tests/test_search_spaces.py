"""Search spaces: genome <-> recipe round trips for PS, DFS and PS+DFS; every recipe a space makes is valid."""

from __future__ import annotations

import numpy as np
import pytest

from lazymerge.engine import SourceSet, compile_plan, load_recipe
from lazymerge.search.spaces import DFSSpace, PSSpace, layer_groups

PS_SPACES = [
    PSSpace("dare_ties", "base", ("e1", "e2"), 4),  # the paper's final setting: a (weight, density) per source
    PSSpace("dare_ties", "base", ("e1", "e2"), 4, layer_groups=3, filters=("self_attn", "mlp")),
    PSSpace("ties", "base", ("e1", "e2"), 4, layer_groups=2),
    PSSpace("task_arithmetic", "base", ("e1", "e2"), 4, filters=("mlp",)),
    PSSpace("linear", None, ("base", "e1", "e2"), 4, layer_groups=4, normalize=None),
    PSSpace("ties", "base", ("e1", "e2"), 4, layer_groups=2, shared_filters=("embed_tokens", "lm_head")),
    PSSpace("ties", "base", ("e1", "e2"), 4, layer_groups=3, filters=("mlp",), shared_filters=("lm_head",)),
    # issue 13: weight-only genomes of the spherical methods (with a base: they merge the deltas)
    PSSpace("nuslerp", "base", ("e1", "e2"), 4, layer_groups=2, weight_range=(0.1, 1.0)),
    PSSpace("multislerp", None, ("base", "e1", "e2"), 4, filters=("mlp",)),
]
DFS_SPACES = [
    DFSSpace("e1", "e2", 4, 4, repeats=3),
    DFSSpace("e1", "e2", 4, 4, repeats=2, layout="interleaved", scales="ones"),
    DFSSpace("e2", "base", 4, 4, repeats=1, scale_range=(0.5, 1.5)),
]


def _ps_def():
    return PSSpace("dare_ties", "base", ("e1", "e2"), 4).to_recipe(np.full(4, 0.5))


@pytest.fixture(scope="module")
def sources(search_toy):
    return SourceSet.open(search_toy["paths"])


@pytest.mark.parametrize("space", PS_SPACES, ids=lambda s: f"{s.method}-g{s.layer_groups}-f{len(s.filters)}-s{len(s.shared_filters)}")
def test_ps_genome_recipe_genome(space, sources):
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.uniform(size=space.dim)
        r = space.to_recipe(x)
        np.testing.assert_allclose(space.from_recipe(r), x, atol=1e-6)  # values are rounded to 6 decimals
        assert space.to_recipe(space.from_recipe(r)) == r
        assert space.from_recipe(load_recipe(r)).shape == (space.dim,)  # a Recipe object works too
        plan = compile_plan(r, sources)
        assert plan.num_layers == 4


def test_ps_values_at_bounds_and_paper_dims():
    s = PS_SPACES[0]
    assert s.dim == 4  # 2 sources x (weight, density); 3 sources -> 6 as in the paper
    assert PSSpace("dare_ties", "base", ("a", "b", "c"), 32).dim == 6
    r = s.to_recipe(np.array([0.0, 1.0, 1.0, 0.0]))
    e1, e2 = (m["parameters"] for m in r["models"])
    assert e1 == {"weight": 0.0, "density": 1.0} and e2 == {"weight": 2.0, "density": 0.1}
    assert s.to_recipe(np.full(4, 0.5))["models"][0]["parameters"]["weight"] == 1.0  # x0 = 0.5 -> weight 1 > ...
    assert s.weight_range[1] > 1  # weights reach above 1 by default


def test_ps_layer_groups_and_filters_reach_the_plan(sources):
    s = PS_SPACES[1]
    x = np.zeros(s.dim)
    # e1's weight: group 1, filter mlp -> 1.0 (the top of [0, 2] is x = 1, so 0.5)
    x[s._index(0, 0, 1, 1)] = 0.5
    plan = compile_plan(s.to_recipe(x), sources)
    g = layer_groups(4, 3)
    assert g == [(0, 1), (1, 3), (3, 4)]
    for layer in range(4):
        w_mlp = plan.tensors[f"model.layers.{layer}.mlp.up_proj.weight"].weights[0]
        w_att = plan.tensors[f"model.layers.{layer}.self_attn.q_proj.weight"].weights[0]
        assert w_att == 0.0
        assert w_mlp == (1.0 if g[1][0] <= layer < g[1][1] else 0.0)


def test_ps_shared_filters_have_one_gene_each_and_none_is_inert(sources):
    s = PS_SPACES[5]  # 2 models x (weight, density) x (2 shared + 2 groups)
    assert s.dim == 16 and len(s.gene_names()) == 16 and len(set(s.gene_names())) == 16
    assert "e1.weight.embed_tokens" in s.gene_names() and "e2.density[g1].other" in s.gene_names()
    base = compile_plan(s.to_recipe(np.full(s.dim, 0.5)), sources)
    for i, name in enumerate(s.gene_names()):  # moving any gene changes the plan: no wasted CMA-ES dimension
        x = np.full(s.dim, 0.5)
        x[i] = 0.9
        plan = compile_plan(s.to_recipe(x), sources)
        changed = [k for k, tp in plan.tensors.items() if tp != base.tensors[k]]
        assert changed, name
        if "embed_tokens" in name:
            assert changed == ["model.embed_tokens.weight"], (name, changed)
        if "lm_head" in name:
            assert changed == ["lm_head.weight"], (name, changed)
    r = s.to_recipe(np.full(s.dim, 0.5))
    r["slices"][1]["sources"][1]["parameters"]["weight"][0]["value"] = 0.3  # group 1's embed value differs
    with pytest.raises(ValueError, match="shared filter 'embed_tokens' has different values"):
        s.from_recipe(r)


@pytest.mark.parametrize("space", DFS_SPACES, ids=lambda s: f"{s.layout}-{s.scales}-r{s.repeats}")
def test_dfs_recipe_genome_recipe(space, sources):
    rng = np.random.default_rng(1)
    assert space.T == 8 * space.repeats
    for _ in range(5):
        x = rng.uniform(size=space.dim)
        r = space.to_recipe(x)
        x2 = space.from_recipe(r)
        assert space.to_recipe(x2) == r  # recipe -> genome -> recipe is the identity
        assert space.from_recipe(space.to_recipe(x2)).tolist() == x2.tolist()
        hops = r["path"]
        assert hops[0] == {"model": space.a, "layer": 0} and hops[-1]["layer"] == 3 and hops[-1]["model"] == space.a
        assert len(hops) == 2 + int((x[: space.T] > 0.5).sum())
        assert compile_plan(r, sources).num_layers == len(hops)


def test_dfs_scales_come_from_the_matrix():
    s = DFS_SPACES[0]
    x = np.zeros(s.dim)  # no slot taken: the path is the two anchors
    i, j = 0, 3  # e1.0 -> e1.3
    x[s.T + i * s.M + j] = 0.25  # -> 0.5 in [0, 2]
    assert s.to_recipe(x)["path"] == [{"model": "e1", "layer": 0}, {"model": "e1", "layer": 3, "scale": 0.5}]
    x[s.M + 5] = 1.0  # slot in the second repeat: layout position 5 = e2.1
    hops = s.to_recipe(x)["path"]
    assert [(h["model"], h["layer"]) for h in hops] == [("e1", 0), ("e2", 1), ("e1", 3)]
    assert hops[1]["scale"] == 0.0  # W[e1.0 -> e2.1] at gene 0 -> 0.0


def test_psdfs_round_trip_and_plan(sources):
    s = DFSSpace("ps", "e2", 4, 4, repeats=2, definitions={"ps": _ps_def()})
    x = np.random.default_rng(2).uniform(size=s.dim)
    r = s.to_recipe(x)
    assert r["definitions"]["ps"]["merge_method"] == "dare_ties" and r["base_model"] == "ps"
    assert s.to_recipe(s.from_recipe(r)) == r
    plan = compile_plan(r, sources)
    assert plan.num_layers == len(r["path"])


def test_inverse_rejects_foreign_recipes():
    with pytest.raises(ValueError, match="merge_method"):
        PS_SPACES[0].from_recipe({"merge_method": "ties", "models": []})
    with pytest.raises(ValueError, match="must start"):
        DFS_SPACES[0].from_recipe({"merge_method": "path", "path": [{"model": "e2", "layer": 0}]})
    with pytest.raises(ValueError, match="does not fit"):  # 5 hops of e2.3 cannot fit in 3 repeats
        DFS_SPACES[0].from_recipe({"merge_method": "path", "path": [{"model": "e1", "layer": 0}] +
                                   [{"model": "e2", "layer": 3}] * 4 + [{"model": "e1", "layer": 3}]})
