"""Every architecture the README lists, on tiny random checkpoints written by transformers' own `save_pretrained`:
lazy logits == transformers' forward of the exported checkpoint, all weight on one source == that source, export ==
mergekit 0.1.5 tensor for tensor; tied/untied output heads mixed both ways; a checkpoint tensor no parameter takes is
reported by name.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from conftest import assert_close
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lazymerge.engine import Engine, toy
from lazymerge.engine.checkpoint import CheckpointError, Source
from lazymerge.engine.export import export
from lazymerge.engine.plan import SourceSet, compile_plan
from lazymerge.engine.recipe import RecipeError

# model type -> config fields beyond toy.tiny_config's common ones (two layers, hidden 32, 4 heads)
ARCHS = {
    "llama": {},
    "mistral": {"sliding_window": 6},
    "qwen2": {},
    "qwen3": {},  # q/k norms
    "gemma2": {"sliding_window": 6},  # 1 + w norms, scaled embedding, soft-capping, alternating attention
    "gemma3_text": {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "olmo2": {},  # norms after attention/MLP, full-width q/k norms
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 2.0,
                "attention_multiplier": 0.3},
    "stablelm": {},  # LayerNorm with bias, partial rotary
    "gpt_neox": {},  # another module tree (gpt_neox.layers.N.attention.query_key_value)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32},  # experts fused on load
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}
MOE = ("mixtral", "qwen3_moe")
TIES = {"merge_method": "ties", "base_model": "base", "models": [
    {"model": "e1", "parameters": {"weight": 0.8, "density": 0.5}},
    {"model": "e2", "parameters": {"weight": 0.5, "density": [0.3, 0.7]}}]}
DARE_TIES = {"merge_method": "dare_ties", "base_model": "base", "random_seed": 4, "models": [
    {"model": "e1", "parameters": {"weight": 0.8, "density": 0.5}},
    {"model": "e2", "parameters": {"weight": 0.5, "density": 0.7}}]}


@pytest.fixture(scope="module")
def arch_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    built: dict[str, dict[str, str]] = {}

    def get(arch: str) -> dict[str, str]:
        if arch not in built:
            fam = toy.make_family(root / arch, arch, 2, seed=len(built), layers=2, **ARCHS[arch])
            built[arch] = {k: str(v) for k, v in fam.items()}
        return built[arch]

    return get


def load_hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def batch(vocab, B=2, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lazy_logits_equal_transformers_on_export(arch_family, arch, tmp_path):
    eng = Engine(arch_family(arch), policy="on_the_fly")
    for name, recipe in (("ties", TIES), ("dare_ties", DARE_TIES)):
        model = eng.compile(recipe)
        export(model.plan, tmp_path / name, merger=eng.merger)
        ref = load_hf(tmp_path / name)
        assert type(ref).__name__ == type(model.module).__name__
        ids, mask = batch(ref.config.vocab_size)
        got, want = model.logits(ids, mask), hf_logits(ref, ids, mask)
        m = mask.bool()
        assert_close(got[m], want[m], atol=1e-5, rtol=1e-5, what=f"{arch}/{name}")
    # the merge changed the model: the base's logits are far from the merge's
    base = hf_logits(load_hf(arch_family(arch)["base"]), ids, mask)
    assert (base[m] - want[m]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_all_weight_on_one_source_gives_its_logits(arch_family, arch):
    fam = arch_family(arch)
    model = Engine(fam, policy="cached").compile({"merge_method": "linear", "models": [
        {"model": "e1", "parameters": {"weight": 1.0}}, {"model": "e2", "parameters": {"weight": 0.0}}]})
    ref = load_hf(fam["e1"])
    ids, mask = batch(ref.config.vocab_size, seed=1)
    m = mask.bool()
    assert torch.equal(model.logits(ids, mask)[m], hf_logits(ref, ids, mask)[m])


def run_mergekit(recipe: dict, paths: dict[str, str], out) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    text = yaml.safe_dump(recipe)
    for name, p in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f"model: {name}\n", f"model: {p}\n").replace(f"base_model: {name}\n", f"base_model: {p}\n")
    cfg = MergeConfiguration.model_validate({**yaml.safe_load(text), "dtype": "float32"})
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=False, quiet=True))
    return _load_all(out)


def _load_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(ours: dict, theirs: dict, what: str, tol: float = 1e-6):
    assert sorted(ours) == sorted(theirs), f"{what}: tensor names differ: {sorted(set(ours) ^ set(theirs))[:6]}"
    for name in theirs:
        diff = (theirs[name].float() - ours[name].float()).abs().max().item()
        assert diff <= tol, f"{what}: {name} differs from mergekit by {diff}"


def as_parameters(folder) -> dict[str, torch.Tensor]:
    """A checkpoint folder's tensors as transformers' model parameters (renamed, MoE experts fused), by
    transformers' own conversion rules (engine/arch.py)."""
    from lazymerge.engine.arch import analyze

    sd = _load_all(folder)
    lay = analyze(json.loads((folder / "config.json").read_text()), {k: tuple(v.shape) for k, v in sd.items()})
    out = {}
    for g in lay.groups:
        out.update(g.build([sd[k] for k in g.keys], None))
    return out


TASK_ARITHMETIC = {"merge_method": "task_arithmetic", "base_model": "base", "models": [
    {"model": "e1", "parameters": {"weight": 0.8}}, {"model": "e2", "parameters": {"weight": [0.3, 0.6]}}]}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_equals_mergekit(arch_family, arch, tmp_path):
    """TIES tensor for tensor. MoE: mergekit 0.1.5 merges the fused (E, out, in) expert parameter of transformers 5
    (so its TIES top-k runs over all experts at once) while lazymerge keeps the per-expert checkpoint tensor as the
    merge unit; the two agree where the unit does not matter (task arithmetic), compared as model parameters."""
    pytest.importorskip("mergekit", reason="mergekit not installed")
    if arch == "gpt_neox":
        pytest.skip("mergekit 0.1.5's gpt-neox definition requires attention.bias/masked_bias buffers, which "
                    "transformers 5 checkpoints no longer contain: mergekit cannot merge them")
    fam = arch_family(arch)
    recipe = TASK_ARITHMETIC if arch in MOE else TIES
    run_mergekit(recipe, fam, tmp_path / "mk")
    S = SourceSet.open(fam)
    export(compile_plan(recipe, S), tmp_path / "lm")
    assert_same_tensors(as_parameters(tmp_path / "lm"), as_parameters(tmp_path / "mk"), arch)


# -- tied and untied output heads -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_mix(tmp_path_factory):
    """Qwen2-style: a tied model and an untied one (changed head), each as base and as fine-tune of the other."""
    root = tmp_path_factory.mktemp("tied")
    tok = toy.make_tokenizer()
    tied = toy.make_model(toy.tiny_config("qwen2", vocab_size=len(tok), layers=2, tie=True), 0)
    untied = toy.make_model(toy.tiny_config("qwen2", vocab_size=len(tok), layers=2, tie=False), 0)
    untied.load_state_dict(tied.state_dict())  # same body and embedding ...
    untied = toy.perturb(untied, 7)  # ... then fine-tuned, head included (now different from its embedding)
    with torch.no_grad():
        untied.lm_head.weight.add_(0.05 * torch.randn_like(untied.lm_head.weight))
    return {"tied": str(toy.save(copy.deepcopy(tied), tok, root / "tied")),
            "untied": str(toy.save(untied, tok, root / "untied")),
            "tied_ft": str(toy.save(toy.perturb(copy.deepcopy(tied), 8), tok, root / "tied_ft"))}


@pytest.mark.parametrize("base,ft", [("tied", "untied"), ("untied", "tied_ft")])
def test_tied_untied_mix_equals_mergekit(tied_mix, base, ft, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit not installed")
    paths = {"base": tied_mix[base], "ft": tied_mix[ft]}
    recipe = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "ft", "parameters": {"weight": 0.7}}]}
    eng = Engine(paths, policy="on_the_fly")
    model = eng.compile(recipe)
    export(model.plan, tmp_path / "lm", merger=eng.merger)
    ours = _load_all(tmp_path / "lm")
    assert_same_tensors(ours, run_mergekit(recipe, paths, tmp_path / "mk"), f"{base}+{ft}")
    # the head is untied and computed from each source's own head (a tied source's head is its embedding)
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["tie_word_embeddings"] is False
    b, f = Source.open(paths["base"]), Source.open(paths["ft"])
    want = b.get(b.head_name) + 0.7 * (f.get(f.head_name) - b.get(b.head_name))
    assert_close(ours["lm_head.weight"], want, atol=1e-6, what="lm_head")
    ref = load_hf(tmp_path / "lm")
    ids, mask = batch(ref.config.vocab_size)
    m = mask.bool()
    assert_close(model.logits(ids, mask)[m], hf_logits(ref, ids, mask)[m], atol=1e-5, rtol=1e-5, what="logits")


def test_tied_sources_stay_tied(tied_mix, tmp_path):
    eng = Engine({"base": tied_mix["tied"], "ft": tied_mix["tied_ft"]})
    plan = eng.plan({"merge_method": "task_arithmetic", "base_model": "base",
                     "models": [{"model": "ft", "parameters": {"weight": 0.7}}]})
    assert "lm_head.weight" not in plan.tensors and plan.config["tie_word_embeddings"] is True


# -- checkpoint tensors vs model parameters --------------------------------------------------------------------
def test_extra_or_missing_tensor_is_reported_by_name(arch_family, tmp_path):
    import shutil

    src = arch_family("llama")["base"]
    extra = tmp_path / "extra"
    shutil.copytree(src, extra)
    sd = load_file(extra / "model.safetensors")
    sd["model.layers.0.mlp.adapter.weight"] = torch.zeros(2, 2)
    save_file(sd, extra / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensor 'model.layers.0.mlp.adapter.weight' is not used"):
        Source.open(extra)
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    sd = load_file(missing / "model.safetensors")
    del sd["model.layers.1.post_attention_layernorm.weight"]
    save_file(sd, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="parameter 'model.layers.1.post_attention_layernorm.weight' .* has no"):
        Source.open(missing)


def test_moe_experts_merge_per_checkpoint_tensor(arch_family):
    """TIES' top-k runs per expert tensor of the checkpoint (mergekit's scope), not over the fused parameter."""
    S = SourceSet.open(arch_family("mixtral"))
    plan = compile_plan(TIES, S)
    experts = [n for n in plan.tensors if ".experts." in n and n.startswith("model.layers.0.")]
    assert len(experts) == 3 * ARCHS["mixtral"]["num_local_experts"]
    assert all(len(plan.tensors[n].shape) == 2 for n in experts)
    lay = plan.layout  # transformers fuses them into two 3-D parameters per layer
    fused = [g for g in lay.groups if g.converter is not None and any(".layers.0." in p for p in g.params)]
    assert sorted(len(g.keys) for g in fused) == [4, 8]


# -- layer paths across architectures ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gemma3_text", "mixtral"])
def test_layer_path_equals_its_export(arch_family, arch, tmp_path):
    eng = Engine(arch_family(arch), policy="on_the_fly")
    model = eng.compile({"merge_method": "path", "base_model": "e1", "path": [
        {"model": "e1", "layer": 0}, {"model": "e2", "layer": 1}, {"model": "e1", "layer": 1}, {"model": "e2",
                                                                                                 "layer": 0}]})
    export(model.plan, tmp_path / "out", merger=eng.merger)
    ref = load_hf(tmp_path / "out")
    assert ref.config.num_hidden_layers == 4
    ids, mask = batch(ref.config.vocab_size)
    m = mask.bool()
    assert_close(model.logits(ids, mask)[m], hf_logits(ref, ids, mask)[m], atol=1e-5, rtol=1e-5, what=arch)


def test_path_refused_where_layers_are_not_interchangeable(tmp_path):
    # qwen3_moe with mlp_only_layers=[1]: layer 0 is MoE, layer 1 dense; a hop cannot move one to the other's place
    fam = toy.make_family(tmp_path, "qwen3_moe", 1, layers=2, **ARCHS["qwen3_moe"], mlp_only_layers=[1])
    S = SourceSet.open({"e1": fam["base"], "e2": fam["e1"]})
    with pytest.raises(RecipeError, match="path: the merged model is not a valid qwen3_moe checkpoint"):
        compile_plan({"merge_method": "path", "base_model": "e1",
                      "path": [{"model": "e1", "layer": 1}, {"model": "e2", "layer": 0}]}, S)


def test_single_file_wins_over_an_index_as_in_transformers(arch_family, tmp_path):
    import shutil

    d = tmp_path / "both"
    shutil.copytree(arch_family("llama")["base"], d)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    src = Source.open(d)  # transformers' from_pretrained reads model.safetensors and never looks at the index
    ref = load_hf(d)
    for name, p in ref.named_parameters():
        assert torch.equal(src.get(name), p.detach()), name
