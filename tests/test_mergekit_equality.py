"""Exported checkpoints equal mergekit's output for the same YAML, tensor for tensor (float32 sources; issue 13's
methods also on bfloat16 sources, and with the lazy forward checked against transformers' forward of mergekit's
output).

Skipped where mergekit is not installed (`.ci/run` installs it). DARE and DELLA are left out: their masks are this
project's own deterministic ones.
"""

from __future__ import annotations

import pytest
import yaml
from safetensors.torch import load_file

mergekit = pytest.importorskip("mergekit", reason="mergekit not installed: equality with its output not checked")

from lazymerge.engine.export import export  # noqa: E402
from lazymerge.engine.plan import SourceSet, compile_plan  # noqa: E402

CASES = {
    "linear": """
merge_method: linear
models:
  - {model: E1, parameters: {weight: [0.2, 0.9]}}
  - {model: E2, parameters: {weight: 0.5}}
""",
    "task_arithmetic_filters": """
merge_method: task_arithmetic
base_model: BASE
models:
  - {model: E1, parameters: {weight: [{filter: self_attn, value: [0.1, 0.8]}, {value: 1.2}]}}
  - {model: E2, parameters: {weight: 0.4}}
parameters: {normalize: true}
""",
    "ties": """
merge_method: ties
base_model: BASE
models:
  - {model: E1, parameters: {weight: 0.8, density: [0.3, 0.7]}}
  - {model: E2, parameters: {weight: 0.5, density: 0.5}}
""",
    "ties_rescale": """
merge_method: ties
base_model: BASE
models:
  - {model: E1, parameters: {weight: 1.0, density: 0.4}}
  - {model: E2, parameters: {weight: 0.6, density: 0.6}}
parameters: {normalize: false, rescale: true}
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: BASE
models:
  - {model: E1, parameters: {weight: 0.8, density: 0.5, gamma: 0.05}}
  - {model: E2, parameters: {weight: 0.5, density: 0.6, gamma: 0.1}}
""",
    "slerp": """
merge_method: slerp
base_model: E1
models: [{model: E1}, {model: E2}]
parameters:
  t: [{filter: self_attn, value: [0.0, 0.5, 1.0]}, {filter: mlp, value: [1.0, 0.5, 0.0]}, {value: 0.4}]
""",
    "slices_ties": """
merge_method: ties
base_model: BASE
slices:
  - sources:
      - {model: BASE, layer_range: [0, 2]}
      - {model: E1, layer_range: [0, 2], parameters: {weight: 1.0, density: 0.5}}
      - {model: E2, layer_range: [0, 2], parameters: {weight: 0.3, density: 0.7}}
  - sources:
      - {model: BASE, layer_range: [2, 3]}
      - {model: E1, layer_range: [2, 3], parameters: {weight: [0.2, 0.7], density: 0.9}}  # one layer: t = 1
      - {model: E2, layer_range: [2, 3], parameters: {weight: 0.9, density: 0.3}}
""",
    "passthrough_stack": """
merge_method: passthrough
slices:
  - sources: [{model: E1, layer_range: [0, 2]}]
  - sources: [{model: E1, layer_range: [1, 3]}]
""",
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_equals_mergekit(fam, tmp_path, case):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    text = (CASES[case].replace("BASE", str(fam["base"])).replace("E1", str(fam["e1"]))
            .replace("E2", str(fam["e2"])) + "dtype: float32\n")
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(cfg, str(tmp_path / "mk"), options=MergeOptions(copy_tokenizer=False, quiet=True))
    S = SourceSet(allow_open=True)
    export(compile_plan(text, S), tmp_path / "lm")
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = load_file(tmp_path / "lm" / "model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for name in theirs:
        diff = (theirs[name].float() - ours[name].float()).abs().max().item()
        # float32 arithmetic on both sides; slerp's angle is computed in float64 here, float32 in mergekit
        tol = 2e-6 if case == "slerp" else 1e-6
        assert diff <= tol, f"{case}: {name} differs from mergekit by {diff}"


# -- issue 13: the other mergekit 0.1.5 methods, on odd shapes, float32 and bfloat16 sources ---------------------------
NEW_CASES = {
    "nuslerp": """
merge_method: nuslerp
models:
  - {model: E1, parameters: {weight: [0.2, 0.9]}}
  - {model: E2, parameters: {weight: 0.5}}
""",
    "nuslerp_base_rows": """
merge_method: nuslerp
base_model: BASE
models:
  - {model: E1, parameters: {weight: 0.3}}
  - {model: E2, parameters: {weight: [{filter: mlp, value: 0.9}, {value: 0.5}]}}
parameters: {nuslerp_flatten: false}
""",
    "nuslerp_base_cols": """
merge_method: nuslerp
base_model: BASE
models:
  - {model: E1, parameters: {weight: 0.3}}
  - {model: E2, parameters: {weight: 0.6}}
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
""",
    "nuslerp_cols_nobase": """
merge_method: nuslerp
models:
  - {model: E1, parameters: {weight: 1.0}}
  - {model: E2, parameters: {weight: [0.5, 2.0]}}
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
""",
    "multislerp": """
merge_method: multislerp
base_model: BASE
models:
  - {model: E1, parameters: {weight: [0.2, 0.9]}}
  - {model: E2, parameters: {weight: 0.5}}
  - {model: E3, parameters: {weight: [{filter: self_attn, value: 0.1}, {value: 0.7}]}}
""",
    "multislerp_nobase": """
merge_method: multislerp
models:
  - {model: E1, parameters: {weight: 1.0}}
  - {model: E2, parameters: {weight: 0.5}}
parameters: {normalize_weights: false}
""",
    "karcher": """
merge_method: karcher
base_model: BASE
models: [{model: E1}, {model: E2}]
parameters: {max_iter: 20, tol: 1.0e-6}
""",
    "karcher_slices": """
merge_method: karcher
base_model: BASE
slices:
  - sources:
      - {model: E1, layer_range: [0, 2]}
      - {model: E2, layer_range: [1, 3]}
      - {model: E3, layer_range: [0, 2]}
""",
    "model_stock": """
merge_method: model_stock
base_model: BASE
models: [{model: E1}, {model: E2}, {model: E3}]
""",
    "model_stock_filter_wise_slices": """
merge_method: model_stock
base_model: BASE
slices:
  - sources:
      - {model: BASE, layer_range: [0, 2]}
      - {model: E1, layer_range: [0, 2]}
      - {model: E2, layer_range: [0, 2]}
  - sources:
      - {model: BASE, layer_range: [2, 3]}
      - {model: E1, layer_range: [2, 3]}
      - {model: E3, layer_range: [2, 3]}
parameters: {filter_wise: true}
""",
    "sce": """
merge_method: sce
base_model: BASE
models: [{model: E1}, {model: E2}, {model: E3}]
parameters: {select_topk: [{filter: self_attn, value: 0.3}, {value: [0.5, 0.8]}]}
""",
    "sce_all": """
merge_method: sce
base_model: BASE
models: [{model: E1}, {model: E2}]
parameters: {int8_mask: true}
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: BASE
models: [{model: E1}]
""",
    "nearswap": """
merge_method: nearswap
base_model: BASE
models: [{model: E1}]
parameters: {t: [0.0005, 0.002]}
""",
    "ram": """
merge_method: ram
base_model: BASE
models: [{model: E1}, {model: E2}, {model: E3}]
parameters: {epsilon: 0.0008}
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: BASE
models: [{model: E1}, {model: E2}]
parameters: {epsilon: [{filter: mlp, value: 0.0004}, {value: 0.0008}], r: 0.5, alpha: 0.6}
""",
}
# float32 sources (and bfloat16 sources with `dtype: float32`: upcast exactly, then the same float32 arithmetic).
# Elementwise methods (arcee_fusion, nearswap, ram, ramplus_tl) reproduce mergekit's float32 operations and are
# bit-identical. The others combine inputs with coefficients that lazymerge computes once per tensor in float64
# from the Gram matrix, where mergekit computes norms, dot products and the combination in float32 element by
# element; they agree to a few float32 ulps: |ours - theirs| <= 1e-6 |theirs| + 1e-8 (the absolute term for entries
# within a few ulps of 0, where a relative bound means nothing).
EXACT = ("arcee_fusion", "nearswap", "ram", "ramplus_tl")
REL_TOL, ABS_TOL = 1e-6, 1e-8
# bfloat16 sources: one case per method (the suite's time); sce's cut is left to float32 (see the skip below)
BF16_CASES = ("nuslerp_base_rows", "multislerp", "karcher", "model_stock_filter_wise_slices", "sce_all",
              "arcee_fusion", "nearswap", "ramplus_tl")


@pytest.fixture(scope="module")
def odd_families(tmp_path_factory):
    """Base + 3 experts with odd widths (hidden 30, MLP 45, 3 heads of 10, 1 KV head), float32 and bfloat16."""
    from lazymerge.engine.toy import make_family

    root = tmp_path_factory.mktemp("odd")
    return {dt: make_family(root / dt, "mistral", 3, seed=5, dtype=dt, hidden=30, intermediate=45, heads=3,
                            kv_heads=1) for dt in ("float32", "bfloat16")}


@pytest.mark.parametrize("case,dtype", [(c, "float32") for c in NEW_CASES] + [(c, "bfloat16") for c in BF16_CASES])
def test_new_methods_equal_mergekit_and_transformers(odd_families, tmp_path, case, dtype):
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM

    from lazymerge.engine import Engine

    # (sce with select_topk < 1 is not run on bfloat16 sources: their deltas tie in variance at the top-k cut,
    # which mergekit's torch.topk breaks arbitrarily; the cut's exact-k rule is checked in test_merge_math)
    f = odd_families[dtype]
    text = (NEW_CASES[case].replace("BASE", str(f["base"])).replace("E1", str(f["e1"])).replace("E2", str(f["e2"]))
            .replace("E3", str(f["e3"])) + "dtype: float32\n")
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(cfg, str(tmp_path / "mk"), options=MergeOptions(copy_tokenizer=False, quiet=True))
    eng = Engine(policy="on_the_fly")
    model = eng.compile(text)
    export(model.plan, tmp_path / "lm", merger=eng.merger)
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = load_file(tmp_path / "lm" / "model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for name in theirs:
        a, b = theirs[name].float(), ours[name].float()
        if case in EXACT:
            assert torch.equal(a, b), f"{case}/{dtype}: {name}: {int((a != b).sum())} elements differ from mergekit"
        else:
            bad = (a - b).abs() > REL_TOL * a.abs() + ABS_TOL
            assert not bad.any(), (f"{case}/{dtype}: {name}: {int(bad.sum())} elements beyond tolerance, max "
                                   f"diff {(a - b).abs().max().item():.3g}")
    # the lazy forward (merged weights computed inside it) equals transformers' forward of mergekit's output
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mk"), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, ref.config.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    got = model.logits(ids)
    assert (got - want).abs().max().item() <= 2e-5, f"{case}/{dtype}: lazy logits differ from transformers'"
