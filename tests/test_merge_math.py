"""Merge math against a straightforward whole-tensor reference written here (mergekit's formulation: argsort
top-k, mask * L1 rescale, stacked sign election), plus exact invariants."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

from lazymerge.engine.merger import Merger
from lazymerge.engine.plan import SourceSet, compile_plan
from lazymerge.kernels.merge import keep_mask
from lazymerge.kernels.rng import uniform

TENSORS = ["model.layers.1.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"]


# ---------------------------------------------------------------- whole-tensor reference (mergekit's formulation)
def rescaled(t, mask, rescale):
    masked = t * mask
    if not rescale:
        return masked
    before, after = t.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def ref_magnitude(d, density, rescale):
    if density >= 1:
        return d
    k = int(density * d.numel())
    mask = torch.zeros_like(d)
    order = torch.argsort(d.abs().reshape(-1), descending=True, stable=True)
    mask.view(-1)[order[:k]] = 1
    return rescaled(d, mask, rescale)


def ref_breadcrumbs(d, density, gamma, rescale):
    if density >= 1:
        return d
    n = d.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = torch.argsort(d.abs().reshape(-1), descending=False, stable=True)
    mask = torch.zeros_like(d)
    mask.view(-1)[order[n_bot:n - n_top]] = 1
    return rescaled(d, mask, rescale)


def ref_random(d, density, keys, rescale):
    if density >= 1:
        return d
    u = uniform(torch.arange(d.numel()), keys).reshape(d.shape)
    return rescaled(d, (u < density).float(), rescale)


def ref_della(d, density, eps, keys, rescale):
    if density >= 1:
        return d
    t = d.unsqueeze(0) if d.dim() < 2 else d
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1, stable=True), dim=1).float() + 1
    lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1).reshape(d.shape)
    probs = (density - eps) + rank_norm * (2 * eps)
    u = uniform(torch.arange(d.numel()), keys).reshape(d.shape)
    return rescaled(d, (u < probs).float(), rescale)


def ref_gta(base, xs, weights, sparsified, consensus, normalize, lam):
    deltas = torch.stack(sparsified)
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    wd = deltas * w
    if consensus:
        majority = (wd.sum(0) >= 0).float() * 2 - 1
        mask = wd.sign() == majority
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum(0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def ref_slerp(t, v0, v1):
    n0, n1 = v0.double().norm(), v1.double().norm()
    a = v0.double() / n0 if n0 > 1e-8 else v0.double()
    b = v1.double() / n1 if n1 > 1e-8 else v1.double()
    dot = float((a * b).sum())
    if abs(dot) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    th = math.acos(dot)
    s0, s1 = math.sin(th - th * t) / math.sin(th), math.sin(th * t) / math.sin(th)
    return (s0 * v0.double() + s1 * v1.double()).float()


# ---------------------------------------------------------------- recipes
def gta_recipe(method, extra_params, rescale=None, normalize=None, lam=None, seed=7):
    params = {}
    if rescale is not None:
        params["rescale"] = rescale
    if normalize is not None:
        params["normalize"] = normalize
    if lam is not None:
        params["lambda"] = lam
    return {"merge_method": method, "base_model": "base", "random_seed": seed, "parameters": params,
            "models": [{"model": "e1", "parameters": {"weight": 0.7, **extra_params[0]}},
                       {"model": "e2", "parameters": {"weight": -0.4, **extra_params[1]}}]}


GTA_CASES = [
    ("task_arithmetic", [{}, {}], {}),
    ("ties", [{"density": 0.5}, {"density": 0.3}], {}),
    ("ties", [{"density": 0.5}, {"density": 1.0}], {"rescale": True, "normalize": False}),
    ("dare_ties", [{"density": 0.6}, {"density": 0.4}], {}),
    ("dare_linear", [{"density": 0.6}, {"density": 0.9}], {"lam": 1.3}),
    ("breadcrumbs", [{"density": 0.5, "gamma": 0.05}, {"density": 0.8, "gamma": 0.1}], {}),
    ("breadcrumbs_ties", [{"density": 0.5, "gamma": 0.05}, {"density": 0.6, "gamma": 0.3}], {"rescale": True}),
    ("della", [{"density": 0.5, "epsilon": 0.1}, {"density": 0.4, "epsilon": 0.2}], {}),
    ("della_linear", [{"density": 0.5}, {"density": 0.7}], {"lam": 0.8}),
]


def reference_for(method, plan, S, name):
    from lazymerge.engine.methods import METHODS
    from lazymerge.kernels.rng import mask_keys

    p = plan.tensors[name]
    base = S["base"].get(name).float()
    xs = [S[r.source].get(r.name).float() for r in p.inputs]
    m = METHODS[method]
    out = []
    for i, x in enumerate(xs):
        d = x - base
        keys = mask_keys(p.seed, name, i)
        if m.sparsify.value == "magnitude":
            out.append(ref_magnitude(d, p.densities[i], p.rescale))
        elif m.sparsify.value == "breadcrumbs":
            out.append(ref_breadcrumbs(d, p.densities[i], p.gammas[i], p.rescale))
        elif m.sparsify.value == "random":
            out.append(ref_random(d, p.densities[i], keys, p.rescale))
        elif m.sparsify.value == "della":
            out.append(ref_della(d, p.densities[i], p.epsilons[i], keys, p.rescale))
        else:
            out.append(d)
    return ref_gta(base, xs, list(p.weights), out, p.consensus, p.normalize, p.lam)


@pytest.mark.parametrize("method,extra,glob", GTA_CASES, ids=[c[0] + str(i) for i, c in enumerate(GTA_CASES)])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_gta_methods_match_whole_tensor_reference(families, family, method, extra, glob):
    S = SourceSet.open(families[family])
    plan = compile_plan(gta_recipe(method, extra, **glob), S)
    M = Merger(S)
    names = TENSORS + (["model.layers.0.self_attn.q_proj.bias"] if family == "qwen2" else [])
    for name in names:
        got = M.merge(plan.tensors[name])
        want = reference_for(method, plan, S, name)
        # float32 throughout; the only difference is summation order of the L1 norms (rescale factor)
        assert_close(got, want, atol=1e-6, rtol=1e-5, what=f"{method} {name}")


def test_linear_and_slerp_match_reference(fam):
    S = SourceSet.open(fam)
    lin = compile_plan({"merge_method": "linear", "models": [
        {"model": "e1", "parameters": {"weight": 0.3}}, {"model": "e2", "parameters": {"weight": 0.5}}]}, S)
    sl = compile_plan({"merge_method": "slerp", "base_model": "e1", "parameters": {"t": 0.3},
                       "models": [{"model": "e1"}, {"model": "e2"}]}, S)
    M = Merger(S)
    for name in TENSORS:
        a, b = S["e1"].get(name).float(), S["e2"].get(name).float()
        assert_close(M.merge(lin.tensors[name]), (0.3 * a + 0.5 * b) / 0.8, atol=1e-7, rtol=1e-6, what=name)
        assert_close(M.merge(sl.tensors[name]), ref_slerp(0.3, a, b), atol=1e-6, rtol=1e-5, what=name)


def test_all_weight_on_one_source_is_that_source_exactly(fam):
    S = SourceSet.open(fam)
    M = Merger(S)
    for method in ("linear", "task_arithmetic", "ties"):
        recipe = {"merge_method": method, "models": [{"model": "e1", "parameters": {"weight": 1.0}},
                                                     {"model": "e2", "parameters": {"weight": 0.0}}]}
        if method != "linear":
            recipe["base_model"] = "base"
        plan = compile_plan(recipe, S)
        for name in TENSORS:
            got = M.merge(plan.tensors[name])
            want = S["e1"].get(name).float()
            if method == "linear":
                assert torch.equal(got, want), name
            else:  # base + (e1 - base): exact up to one rounding of the subtraction/addition
                assert_close(got, want, atol=1e-6, rtol=0, what=name)


# ---------------------------------------------------------------- exact invariants
def test_ties_keeps_exactly_k_even_with_ties(families):
    """bf16 sources give many equal |delta|: the kept set still has exactly int(density * numel) elements."""
    S = SourceSet.open(families["mistral_bf16"])
    M = Merger(S)
    name = "model.layers.1.mlp.down_proj.weight"
    d = S["e1"].get(name).float() - S["base"].get(name).float()
    assert d.abs().unique().numel() < d.numel() * 0.9  # there really are ties
    for density in (0.1, 0.33, 0.5, 0.77, 0.999):
        plan = compile_plan(gta_recipe("ties", [{"density": density}, {"density": density}]), S)
        spec, _ = M.spec(plan.tensors[name])
        idx = torch.arange(d.numel()).reshape(d.shape)
        kept = keep_mask(spec, 0, d, idx, None)
        assert int(kept.sum()) == int(density * d.numel())
        # every kept magnitude >= every dropped one
        assert d.abs()[kept].min() >= d.abs()[~kept].max()
        # and it is mergekit's top-k with a stable sort (ties to the lower index)
        ref = torch.zeros(d.numel(), dtype=torch.bool)
        ref[torch.argsort(d.abs().reshape(-1), descending=True, stable=True)[: int(density * d.numel())]] = True
        assert torch.equal(kept.reshape(-1), ref)


def test_ties_sign_election(fam):
    S = SourceSet.open(fam)
    M = Merger(S)
    plan = compile_plan(gta_recipe("ties", [{"density": 0.6}, {"density": 0.6}]), S)
    name = TENSORS[0]
    p = plan.tensors[name]
    base = S["base"].get(name).float()
    mixed = M.merge(p) - base
    spec, _ = M.spec(p)
    idx = torch.arange(base.numel()).reshape(base.shape)
    wds = []
    for i, r in enumerate(p.inputs):
        d = S[r.source].get(r.name).float() - base
        wds.append(d * keep_mask(spec, i, d, idx, None) * p.weights[i])
    majority = torch.where(sum(wds) >= 0, 1.0, -1.0)
    nz = mixed.abs() > 1e-9
    assert nz.sum() > 0
    # every surviving element has the majority sign of the weighted deltas (normalize divides by positive sums
    # of counted weights, here weights have mixed signs: compare sign of numerator instead)
    num = sum(torch.where(w.sign() == majority, w, torch.zeros_like(w)) for w in wds)
    assert torch.all((num[nz].sign() == majority[nz]) | (num[nz] == 0))


def test_task_arithmetic_is_base_plus_weighted_deltas(fam):
    S = SourceSet.open(fam)
    plan = compile_plan(gta_recipe("task_arithmetic", [{}, {}], normalize=True), S)
    name = TENSORS[0]
    b, x1, x2 = (S[k].get(name).float() for k in ("base", "e1", "e2"))
    want = b + (0.7 * (x1 - b) - 0.4 * (x2 - b)) / (0.7 - 0.4)
    assert_close(Merger(S).merge(plan.tensors[name]), want, atol=1e-6, rtol=1e-5)


def test_dare_masks_identical_across_runs_orders_and_dtypes(families):
    recipe = gta_recipe("dare_ties", [{"density": 0.5}, {"density": 0.5}], seed=123)
    name_a, name_b = "model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.o_proj.weight"
    masks = []
    for fam_name, order in (("mistral", (name_a, name_b)), ("mistral", (name_b, name_a)),
                            ("mistral_bf16", (name_a, name_b))):
        S = SourceSet.open(families[fam_name])
        M = Merger(S)
        plan = compile_plan(recipe, S)
        got = {}
        for n in order:
            spec, _ = M.spec(plan.tensors[n])
            shape = plan.tensors[n].shape
            d = torch.ones(shape)  # the DARE mask does not depend on values
            got[n] = keep_mask(spec, 1, d, torch.arange(d.numel()).reshape(shape), None)
        masks.append(got)
    for n in (name_a, name_b):
        assert torch.equal(masks[0][n], masks[1][n]) and torch.equal(masks[0][n], masks[2][n])
        frac = masks[0][n].float().mean().item()
        assert 0.4 < frac < 0.6
    # a different seed gives a different mask
    S = SourceSet.open(families["mistral"])
    spec2, _ = Merger(S).spec(compile_plan(gta_recipe("dare_ties", [{"density": 0.5}] * 2, seed=124), S).tensors[name_a])
    d = torch.ones(compile_plan(recipe, S).tensors[name_a].shape)
    assert not torch.equal(keep_mask(spec2, 1, d, torch.arange(d.numel()).reshape(d.shape), None), masks[0][name_a])


def test_cut_statistics_are_reused_and_flat_in_size(fam, monkeypatch):
    """A new density reuses the first-digit histogram of each (source, tensor); what the merger keeps per tensor is
    O(1) in its size (a fixed-size histogram), never the O(elements) magnitude order."""
    from lazymerge.engine import merger as merger_mod
    from lazymerge.kernels import select

    monkeypatch.setattr(merger_mod, "KEEP_HISTOGRAM_FROM", 1)  # the toy tensors are small: keep them all
    monkeypatch.setattr(select, "SMALL_SORT", 0)  # ... and cut them by histograms, not by one sort
    S = SourceSet.open(fam)
    M = Merger(S)
    names = [n for n in TENSORS if S["base"].get(n).numel() > 1]
    for dens in (0.2, 0.4, 0.6, 0.8):
        plan = compile_plan(gta_recipe("ties", [{"density": dens}, {"density": dens}]), S)
        for name in names:
            M.merge(plan.tensors[name])
    tops = [k for k in M.stats.data if k[0] == "top"]
    assert len(tops) == 2 * len(names)  # one statistic per (source, tensor), not per density
    assert M.stats.hits == 3 * len(tops)
    for k in tops:  # a value table (at most TABLE_MAX entries) or a 128 KiB histogram, whatever the tensor's size
        v = M.stats.data[k]
        if isinstance(v, tuple):
            assert v[0].numel() == v[1].numel() <= select.TABLE_MAX
        else:
            assert v.numel() * v.element_size() == (1 << 15) * 4
    monkeypatch.setattr(select, "TABLE_MAX", 0)  # no tables: the first-digit histogram of every (source, tensor)
    M = Merger(S)
    for name in names:
        M.merge(plan.tensors[name])
    assert M.stats.bytes == 2 * len(names) * (1 << 15) * 4


def test_gradient_and_filter_parameters(fam):
    S = SourceSet.open(fam)
    plan = compile_plan({"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "e1", "parameters": {"weight": [0.0, 1.0]}},
        {"model": "e2", "parameters": {"weight": [{"filter": "self_attn", "value": [1.0, 0.0, 1.0]},
                                                   {"value": 0.25}]}}]}, S)
    w = lambda n: plan.tensors[n].weights  # noqa: E731
    assert w("model.layers.0.mlp.up_proj.weight") == (0.0, 0.25)
    assert w("model.layers.1.mlp.up_proj.weight") == (0.5, 0.25)
    assert w("model.layers.2.mlp.up_proj.weight") == (1.0, 0.25)
    assert w("model.layers.1.self_attn.q_proj.weight") == (0.5, 0.0)
    assert w("model.layers.2.self_attn.k_proj.weight") == (1.0, 1.0)
    assert w("model.embed_tokens.weight") == (0.0, 0.25)  # non-layer tensors take the first value
    assert w("lm_head.weight") == (0.0, 0.25)


# ---------------------------------------------------------------- issue 13: statistics-driven methods
def _slerp64(t, v0, v1):
    """Textbook slerp of two float64 vectors (the independent reference of the Gram-matrix coefficients)."""
    u0, u1 = v0 / v0.norm(), v1 / v1.norm()
    th = torch.acos((u0 * u1).sum().clamp(-1, 1))
    return (torch.sin((1 - t) * th) * v0 + torch.sin(t * th) * v1) / torch.sin(th)


def test_gram_coefficients_reproduce_slerp_rowwise_and_model_stock():
    from lazymerge.engine import method_stats as ms

    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 13, generator=g, dtype=torch.float64)
    xs = [base + torch.randn(7, 13, generator=g, dtype=torch.float64) * s for s in (0.3, 0.5)]
    # flattened, with a base
    c0, c1 = ms.nuslerp_coeffs(ms.gram(xs, base), 0.3)
    want = _slerp64(0.3, (xs[0] - base).reshape(-1), (xs[1] - base).reshape(-1))
    got = float(c0) * (xs[0] - base).reshape(-1) + float(c1) * (xs[1] - base).reshape(-1)
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-12)
    # per row and per column
    for layout, rows in (("row", [(xs[0][r], xs[1][r]) for r in range(7)]),
                         ("col", [(xs[0][:, c], xs[1][:, c]) for c in range(13)])):
        c0, c1 = ms.nuslerp_coeffs(ms.gram(xs, None, layout), 0.7)
        assert c0.shape == (len(rows),)
        for r, (a, b) in enumerate(rows):
            assert torch.allclose(c0[r] * a + c1[r] * b, _slerp64(0.7, a, b), atol=1e-12, rtol=1e-12)
    # endpoints, orthogonal and colinear vectors
    e = torch.eye(2, dtype=torch.float64)
    assert [float(v) for v in ms.nuslerp_coeffs(e, 0.0)] == [1.0, 0.0]
    c0, c1 = ms.nuslerp_coeffs(e, 0.5)
    assert abs(float(c0) - math.sqrt(0.5)) < 1e-15 and abs(float(c1) - math.sqrt(0.5)) < 1e-15
    same = torch.ones(2, 2, dtype=torch.float64)
    assert [float(v) for v in ms.nuslerp_coeffs(same, 0.25)] == [0.75, 0.25]  # colinear: linear interpolation
    # model_stock: identical deltas t = 1, orthogonal t = 0, opposite (n = 2) singular -> 0
    assert float(ms.model_stock_t(torch.ones(3, 3, dtype=torch.float64))) == 1.0
    assert float(ms.model_stock_t(torch.eye(3, dtype=torch.float64))) == 0.0
    assert float(ms.model_stock_t(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))) == 0.0
    # nuslerp's t from the weights, and its degenerate sum
    assert ms.nuslerp_t((1.0, 3.0)) == 0.75 and ms.nuslerp_t((1.0, -1.0)) == 0.5


def test_multislerp_and_karcher_invariants():
    from lazymerge.engine import method_stats as ms

    e = torch.eye(3, dtype=torch.float64)
    # karcher of orthonormal vectors: the normalized sum, times the mean norm 1
    c = ms.karcher_coeffs(e)
    assert all(abs(x - 1 / math.sqrt(3)) < 1e-9 for x in c)
    # the same vector twice: multislerp and karcher return it (coefficients summing to 1), whatever the weights
    same = torch.full((2, 2), 4.0, dtype=torch.float64)  # |v| = 2, both inputs equal
    assert abs(sum(ms.multislerp_coeffs(same, [0.3, 0.9])) - 1.0) < 1e-7
    assert abs(sum(ms.karcher_coeffs(same)) - 1.0) < 1e-12
    # antipodal pair with balancing weights: mergekit's linear fallback for two inputs, an error for more
    anti = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert ms.multislerp_coeffs(anti, [1.0, 1.0]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="zero"):
        ms.multislerp_coeffs(torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 1]], dtype=torch.float64), [1, 1, 0])


def _spec_of(fam, recipe, tensor):
    S = SourceSet.open(fam)
    plan = compile_plan(recipe, S)
    m = Merger(S)
    return m, plan.tensors[tensor], S


def test_sce_cut_keeps_exactly_k_by_variance_with_ties(fam):
    """sce: one mask for every model, exactly int(count_nonzero(var) * select_topk) elements, ties at the cut to the
    lower flat index; the models' weights are their kept deltas' mean squares, normalized."""
    from lazymerge.kernels.merge import merge_reference, source_variance

    name = "model.layers.1.mlp.up_proj.weight"
    r = {"merge_method": "sce", "base_model": "base", "models": [{"model": "e1"}, {"model": "e2"}],
         "parameters": {"select_topk": 0.37}}
    m, p, S = _spec_of(fam, r, name)
    base = S["base"].get(name).float()
    xs = [S[s].get(name).float() for s in ("e1", "e2")]
    # quantize the sources so that variances tie at the cut
    xs = [base + torch.round((x - base) * 200) / 200 for x in xs]
    var = source_variance([x - base for x in xs]).reshape(-1)
    k = int(int(torch.count_nonzero(var)) * 0.37)
    from lazymerge.kernels import select

    t, c = select.topk_cuts(None, var, (k,))[0]  # what sce's spec uses
    assert (t, c) == select.topk_cut_reference(None, var, k)
    kept = (var > t) | ((var == t) & (torch.arange(var.numel()) <= c))
    assert int(kept.sum()) == k and int((var == t).sum()) > 1  # a real tie straddles the cut
    order = torch.argsort(var, descending=True, stable=True)
    assert set(order[:k].tolist()) == set(kept.nonzero().reshape(-1).tolist())
    spec, _ = m.spec(p)
    assert spec.keep == "vartopk" and abs(sum(spec.weights) - 1.0) < 1e-6
    out = merge_reference(S["base"].get(name), [S[s].get(name) for s in ("e1", "e2")], spec)
    vv = source_variance([S[s].get(name).float() - base for s in ("e1", "e2")]).reshape(-1)
    dropped = ~((vv > spec.t_in[0]) | ((vv == spec.t_in[0]) & (torch.arange(vv.numel()) <= spec.c_in[0])))
    assert torch.equal(out.reshape(-1)[dropped], base.reshape(-1)[dropped])  # outside the cut: the base exactly


def test_ram_nearswap_arcee_invariants(fam):
    from lazymerge.kernels.merge import merge_reference

    name = "model.layers.0.self_attn.q_proj.weight"
    S = SourceSet.open(fam)
    base = S["base"].get(name).float()
    d = [S[s].get(name).float() - base for s in ("e1", "e2")]
    eps = float(d[0].abs().median())
    for method, lam in (("ram", 1.0), ("ramplus_tl", None)):
        r = {"merge_method": method, "base_model": "base", "models": [{"model": "e1"}, {"model": "e2"}],
             "parameters": {"epsilon": eps}}
        m = Merger(S)
        spec, _ = m.spec(compile_plan(r, S).tensors[name])
        out = merge_reference(S["base"].get(name), [S[s].get(name) for s in ("e1", "e2")], spec) - base
        k = [x.abs() > eps for x in d]
        only0, only1, both, none = k[0] & ~k[1], k[1] & ~k[0], k[0] & k[1], ~k[0] & ~k[1]
        assert only0.any() and only1.any() and both.any() and none.any()
        assert torch.equal(out[none], torch.zeros_like(out[none]))
        assert torch.allclose(out[both], (d[0][both] / 2 + d[1][both] / 2), atol=1e-7)
        lam0 = spec.scales[0]
        assert torch.allclose(out[only0], (base + d[0] * lam0)[only0] - base[only0], atol=1e-6)
        if lam == 1.0:
            assert spec.scales == (1.0, 1.0)
        else:  # 1 + 0.1 * clamp(shared / unique, 0, 0.2)
            sh, un = int((k[0] & k[1]).sum()), int((k[0] & ~k[1]).sum())
            assert abs(lam0 - (1 + 0.1 * min(max(sh / un, 0.0), 0.2))) < 1e-6
    # nearswap: |delta| <= t takes the model exactly, elsewhere a convex mix of model and base
    t = float(d[0].abs().median())
    r = {"merge_method": "nearswap", "base_model": "base", "models": [{"model": "e1"}], "parameters": {"t": t}}
    m = Merger(S)
    out = m.merge(compile_plan(r, S).tensors[name])
    near = d[0].abs() <= t
    assert torch.equal(out[near], S["e1"].get(name).float()[near])
    lo, hi = torch.minimum(base, base + d[0]), torch.maximum(base, base + d[0])
    assert bool(((out >= lo) & (out <= hi)).all())
    # arcee_fusion: each element is the base or the model; the kept ones are the important ones
    r = {"merge_method": "arcee_fusion", "base_model": "base", "models": [{"model": "e1"}]}
    m = Merger(S)
    plan = compile_plan(r, S).tensors[name]
    spec, aux = m.spec(plan)
    out = m.merge(plan)
    e1 = S["e1"].get(name).float()
    took = out == e1
    assert bool((took | (out == base)).all()) and 0 < int(took.sum()) < took.numel()
    imp = d[0].abs() * aux[0][:, None]
    assert bool((imp[took & (d[0] != 0)] >= spec.t_in[0]).all()) and bool((imp[~took] < spec.t_in[0]).all())


def test_arcee_fusion_samples_deterministically_above_a_million():
    """mergekit samples 1,000,000 elements without a seed above that size; lazymerge's sample is a pure function of
    (random_seed, tensor name): the same indices every time, different for another seed, uniform in range."""
    from lazymerge.kernels.rng import mask_keys, sample_indices

    a = sample_indices(mask_keys(0, "w", 0), 1000, 3_000_001)
    assert torch.equal(a, sample_indices(mask_keys(0, "w", 0), 1000, 3_000_001))
    assert not torch.equal(a, sample_indices(mask_keys(1, "w", 0), 1000, 3_000_001))
    big = sample_indices(mask_keys(0, "w", 0), 200_000, 10)
    assert int(big.min()) == 0 and int(big.max()) == 9 and abs(float(big.float().mean()) - 4.5) < 0.05


@pytest.mark.parametrize("recipe,match", [
    ({"merge_method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "2 models besides"),
    ({"merge_method": "nearswap", "base_model": "b", "models": [{"model": "a"}]}, "needs `t`"),
    ({"merge_method": "arcee_fusion", "base_model": "b", "models": [{"model": "a"}, {"model": "c"}]}, "takes 2"),
    ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "a"}]}, "takes 3"),
    ({"merge_method": "multislerp", "models": [{"model": "a"}]}, "weight: required"),
    ({"merge_method": "karcher", "models": [{"model": "a"}], "parameters": {"max_iter": 2.5}}, "integer"),
    ({"merge_method": "sce", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}]},
     "unknown parameter"),
    ({"merge_method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 1}},
                                            {"model": "c", "parameters": {"weight": 1}}],
      "parameters": {"nuslerp_flatten": 0}}, "true or false"),
])
def test_new_methods_validate_like_mergekit(recipe, match):
    from lazymerge.engine.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=match):
        load_recipe(recipe)
    # ram's epsilon is a threshold, not della's (density +/- epsilon) one: any value is accepted
    load_recipe({"merge_method": "ram", "base_model": "b", "models": [{"model": "a"}], "parameters": {"epsilon": 0.7}})

def test_della_keeps_no_per_element_statistic(fam):
    """DELLA's per-row ranks are formed inside the merge pass: nothing of the tensor's size stays in the merger, only
    the L1 rescale's first norm, one float per (source, tensor)."""
    S = SourceSet.open(fam)
    M = Merger(S)
    plan = compile_plan(gta_recipe("della", [{"density": 0.5, "epsilon": 0.1}, {"density": 0.6, "epsilon": 0.1}]), S)
    for name in TENSORS:
        M.merge(plan.tensors[name])
    assert len(M.stats.data) == 2 * len(TENSORS)
    assert all(k[0].startswith("l1:") and isinstance(v, float) for k, v in M.stats.data.items())
    assert all(aux is None for _, aux in M.specs.data.values())
