"""LoRA inputs (`model: BASE+ADAPTER`): a merge with a LoRA input equals the merge of PEFT's `merge_and_unload` model,
tensor for tensor and in the lazy logits, and equals mergekit 0.1.5's output for the same YAML.

The adapters are built here with PEFT's `get_peft_model` on the tiny test family, with every LoRA matrix (and the
`modules_to_save` copy of the LM head) randomized so that the adapter changes what it targets.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lazymerge.engine import Engine, toy
from lazymerge.engine.checkpoint import CheckpointError
from lazymerge.engine.export import export
from lazymerge.engine.lora import LoraSource, open_source
from lazymerge.engine.plan import SourceSet, compile_plan
from lazymerge.engine.recipe import RecipeError

peft = pytest.importorskip("peft", reason="peft not installed: LoRA inputs not checked")


def _make_lora(base_dir, out_dir, merged_dir, seed, **lora_kw):
    """A random LoRA on the checkpoint `base_dir` (saved to `out_dir`) and PEFT's merge of it (to `merged_dir`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(base_dir))
        pm = peft.get_peft_model(model, peft.LoraConfig(**lora_kw))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g) + (p if "modules_to_save" in n else 0))
        pm.save_pretrained(str(out_dir))
        merged = pm.merge_and_unload()
        merged.save_pretrained(str(merged_dir))
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(merged_dir))
    return out_dir, merged_dir


@pytest.fixture(scope="module")
def loras(fam, families, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    out = {}
    out["plain"] = _make_lora(fam["e1"], root / "plain", root / "plain_merged", 1, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                              modules_to_save=["lm_head"])
    out["rslora"] = _make_lora(fam["e2"], root / "rslora", root / "rslora_merged", 2, r=8, lora_alpha=4,
                               use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
                               rank_pattern={"layers.1.self_attn.o_proj": 2}, alpha_pattern={"up_proj": 16},
                               layers_to_transform=[0, 1])
    bf = families["mistral_bf16"]
    out["bf16"] = _make_lora(bf["e1"], root / "bf16", root / "bf16_merged", 3, r=4, lora_alpha=16,
                             target_modules=["q_proj", "up_proj"])
    qw = families["qwen2"]  # attention biases: lora_bias adds scale * B's bias to them
    out["bias"] = _make_lora(qw["e1"], root / "bias", root / "bias_merged", 4, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"], lora_bias=True)
    return out


@pytest.mark.parametrize("which,base", [("plain", "e1"), ("rslora", "e2"), ("bf16", "e1"), ("bias", "e1")])
def test_lora_source_equals_peft_merge(fam, families, loras, which, base):
    """Every tensor of BASE+ADAPTER equals PEFT's merge_and_unload bit for bit (dtype included)."""
    root = {"bf16": families["mistral_bf16"], "bias": families["qwen2"]}.get(which, fam)
    adapter, merged = loras[which]
    src = open_source(f"{root[base]}+{adapter}")
    ref = open_source(merged)
    assert isinstance(src, LoraSource) and src.deltas
    assert sorted(src.tensors) == sorted(ref.tensors)
    changed = 0
    for name in ref.tensors:
        a, b = src.get(name), ref.get(name)
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{which}: {name} differs from PEFT's merge by {(a.float() - b.float()).abs().max()}"
        changed += not torch.equal(a, open_source(root[base]).get(name))
    assert changed >= 4  # the adapter really changes the tensors it targets
    assert src.fingerprint != open_source(root[base]).fingerprint


RECIPE = """
merge_method: ties
base_model: BASE
models:
  - {model: LORA1, parameters: {weight: 0.8, density: [0.4, 0.9]}}
  - {model: LORA2, parameters: {weight: 0.6, density: 0.6}}
dtype: float32
"""


def _recipe(fam, loras, lora_form: bool) -> str:
    if lora_form:
        m1, m2 = f"{fam['e1']}+{loras['plain'][0]}", f"{fam['e2']}+{loras['rslora'][0]}"
    else:
        m1, m2 = str(loras["plain"][1]), str(loras["rslora"][1])
    return RECIPE.replace("BASE", str(fam["base"])).replace("LORA1", m1).replace("LORA2", m2)


def test_merge_with_lora_inputs_equals_merge_of_peft_merged(fam, loras, tmp_path):
    """Export and lazy logits of a TIES merge of two LoRA inputs == those of the same merge of PEFT's merges."""
    outs = {}
    for form in (True, False):
        S = SourceSet(allow_open=True)
        plan = compile_plan(_recipe(fam, loras, form), S)
        export(plan, tmp_path / str(form))
        outs[form] = load_file(tmp_path / str(form) / "model.safetensors")
        ids = torch.tensor([[1, 5, 9, 14, 22, 7, 30]])
        outs[(form, "logits")] = Engine(S).compile(plan).logits(ids)
    assert sorted(outs[True]) == sorted(outs[False])
    for name in outs[True]:
        assert torch.equal(outs[True][name], outs[False][name]), name
    assert torch.equal(outs[(True, "logits")], outs[(False, "logits")])


@pytest.mark.parametrize("case", ["ties_float32", "passthrough_bf16"])
def test_merge_with_lora_inputs_equals_mergekit(fam, families, loras, tmp_path, case):
    """mergekit 0.1.5 merges each LoRA into a cached copy first; lazymerge's lazy LoRA gives the same merge
    (bf16: the LoRA sum rounded to the base's bf16, as PEFT does in mergekit's LoRA cache)."""
    pytest.importorskip("mergekit", reason="mergekit not installed")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    if case == "ties_float32":
        text = _recipe(fam, loras, True)
    else:
        text = f"merge_method: passthrough\nmodels: [{{model: '{families['mistral_bf16']['e1']}+{loras['bf16'][0]}'}}]\n"
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_merge(cfg, str(tmp_path / "mk"), options=MergeOptions(copy_tokenizer=False, quiet=True,
                                                                   lora_merge_cache=str(tmp_path / "cache")))
    export(compile_plan(text, SourceSet(allow_open=True)), tmp_path / "lm")
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = load_file(tmp_path / "lm" / "model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for name in theirs:
        assert theirs[name].dtype == ours[name].dtype, name
        diff = (theirs[name].float() - ours[name].float()).abs().max().item()
        assert diff <= 1e-6, f"{name} differs from mergekit by {diff}"


def test_lora_source_by_name_and_reference(fam, loras):
    """A registered `name=BASE+ADAPTER` source is found again by its reference; the base alone stays distinct."""
    ref = f"{fam['e1']}+{loras['plain'][0]}"
    S = SourceSet.open({"base": fam["base"], "e1": fam["e1"], "tuned": ref})
    assert isinstance(S["tuned"], LoraSource)
    assert S.resolve(ref, "models[0].model") == "tuned"
    assert S.resolve(str(fam["e1"]), "models[0].model") == "e1"
    with pytest.raises(RecipeError, match=r"models\[0\]\.model: unknown source"):
        S.resolve(f"{fam['e2']}+{loras['plain'][0]}", "models[0].model")
    # relative folders, each part relative to the recipe's folder (the CLI's base_dir)
    root = fam["e1"].parent
    adapter = loras["plain"][0]
    S2 = SourceSet(allow_open=True, base_dir=root)
    rel = f"e1+{os.path.relpath(adapter, root)}"
    name = S2.resolve(rel, "models[0].model")
    assert S2[name].path == fam["e1"] and S2[name].adapter_path == adapter


def test_lora_errors(fam, loras, tmp_path):
    adapter = loras["plain"][0]
    with pytest.raises(RecipeError, match=r"models\[0\]\.model: cannot parse model reference"):
        compile_plan(f"merge_method: linear\nmodels: [{{model: '{fam['e1']}+{adapter}+{adapter}', "
                     "parameters: {weight: 1.0}}]", SourceSet(allow_open=True))
    with pytest.raises(RecipeError, match="no such folder: '/nonexistent'"):
        compile_plan(f"merge_method: linear\nmodels: [{{model: '{fam['e1']}+/nonexistent', "
                     "parameters: {weight: 1.0}}]", SourceSet(allow_open=True))
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        open_source(f"{fam['e1']}+{fam['e2']}")
    # DoRA is not a low-rank sum: refused, naming the module
    dora = tmp_path / "dora"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoModelForCausalLM

        m = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(fam["e1"])),
                                peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
        m.save_pretrained(str(dora))
    with pytest.raises(CheckpointError, match="q_proj.*LoRA variant"):
        open_source(f"{fam['e1']}+{dora}")
    # an adapter for another architecture's shapes
    other = toy.make_family(tmp_path / "wide", "mistral", 0, hidden=48)["base"]
    with pytest.raises(CheckpointError, match="do not fit the base"):
        open_source(f"{other}+{adapter}")


@pytest.mark.parametrize("how", ["truncate", "overwrite", "replace", "delete"])
def test_changed_adapter_is_refused_by_name_never_sigbus(fam, loras, tmp_path, how):
    """Issue 17, kind 1, for the adapter file a LoRA input adds: it is read like base weights (pread copies, identity
    checked), so an adapter truncated, overwritten, replaced or deleted under a running engine is refused by the
    source's name, in a child process that must survive (a memory-mapped read of a truncated file is a SIGBUS)."""
    import shutil
    import subprocess
    import sys

    adapter = tmp_path / "adapter"
    shutil.copytree(loras["plain"][0], adapter)
    sources = {"base": str(fam["base"]), "tuned": f"{fam['e1']}+{adapter}"}
    recipe = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "tuned", "parameters": {"weight": 0.8}}]}
    code = f"""
import os, shutil, time
from lazymerge.engine import Engine
from lazymerge.engine.checkpoint import SourceUnavailable
eng = Engine({sources!r}, policy="on_the_fly", allow_open=False)
m = eng.compile({recipe!r})
m.generate(["the cat"], max_tokens=2)
f = os.path.join({str(adapter)!r}, "adapter_model.safetensors")
time.sleep(0.01)
how = {how!r}
if how == "truncate":
    os.truncate(f, 100)
elif how == "overwrite":
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) - 64); fh.write(os.urandom(64))
elif how == "replace":
    shutil.copyfile(f, f + ".new"); os.replace(f + ".new", f)
else:
    os.remove(f)
for _ in range(2):
    try:
        m.generate(["the cat"], max_tokens=2)
        print("served")
    except SourceUnavailable as e:
        print("refused:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(x.startswith("refused: source 'tuned'") for x in lines), r.stdout
    assert "adapter_model.safetensors" in lines[0] and str(adapter) not in r.stdout


def test_truncated_adapter_at_open_is_a_checkpoint_error(fam, loras, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(loras["plain"][0], adapter)
    f = adapter / "adapter_model.safetensors"
    os.truncate(f, os.path.getsize(f) - 8)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: tensor .* lies outside the file"):
        open_source(f"{fam['e1']}+{adapter}")
