"""Every bad recipe and bad checkpoint gives a clear error naming what is wrong, before any tensor is read;
through the CLI: one `error:` line, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lazymerge.engine.checkpoint import CheckpointError, Source
from lazymerge.engine.plan import SourceSet, compile_plan
from lazymerge.engine.recipe import RecipeError, load_recipe

M2 = "models: [{model: e1, parameters: {weight: 1, density: 0.5}}, {model: e2, parameters: {weight: 1}}]"
BAD_RECIPES = [
    ("merge_method: frobnicate\n" + M2, "merge_method: unknown method 'frobnicate'"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: e1, parameters: {weight: 1, density: 1.5}}]",
     "models[0].parameters.density: density 1.5 outside (0, 1]"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: e1, parameters: {weight: 1, density: 0}}]",
     "models[0].parameters.density: density 0.0 outside (0, 1]"),
    ("merge_method: linear\nmodels: [{model: e1, parameters: {weight: .nan}}]", "models[0].parameters.weight: value nan is not finite"),
    ("merge_method: linear\nmodels: [{model: e1, parameters: {weight: [0.1, .inf]}}]", "models[0].parameters.weight[1]: value inf is not finite"),
    ("merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\nmodels: [{model: base}, {model: e1}, {model: e2}]",
     "models: merge_method 'slerp' takes 2 models (base included), got 3"),
    ("merge_method: ties\n" + M2, "base_model: merge_method 'ties' needs a base_model"),
    ("merge_method: linear\nmodels: [{model: e1, parameters: {wieght: 1}}]", "models[0].parameters.wieght: unknown parameter"),
    ("merge_method: linear\nmodels: [{model: e1}]", "models[0].parameters.weight: required by 'linear'"),
    ("merge_method: slerp\nbase_model: e1\nmodels: [{model: e1}, {model: e2}]", "parameters.t: slerp needs `t`"),
    ("merge_method: linear\nmodels: []", "models: empty list"),
    # found by the fuzz (server.fuzz, 300 examples): an empty `slices` list with a base_model was a 500
    ("merge_method: ties\nbase_model: base\nslices: []", "slices: empty list"),
    ("merge_method: passthrough\nslices: []", "slices: empty list"),
    ("merge_method: linear\nmodelz: []", "modelz: unknown field"),
    ("merge_method: passthrough\nslices: [{sources: [{model: e1, layer_range: [2, 1]}]}]", "layer_range [2, 1] must be"),
    ("merge_method: path\nbase_model: e1\npath: [{model: e1}]", "a hop gives exactly one of `layer` or `layer_range`"),
    ("merge_method: path\nbase_model: e1", "path: merge_method 'path' needs a non-empty `path`"),
    ("[1, 2", "recipe is not valid YAML"),
    ("- just\n- a list", "a recipe is a mapping"),
]


@pytest.mark.parametrize("text,msg", BAD_RECIPES, ids=[m[:30] for _, m in BAD_RECIPES])
def test_bad_recipe_is_rejected_on_read(text, msg):
    with pytest.raises(RecipeError) as e:
        load_recipe(text)
    assert msg in str(e.value)


BAD_AGAINST_SOURCES = [
    ("merge_method: linear\nmodels: [{model: nosuch, parameters: {weight: 1}}]", "models[0].model: unknown source 'nosuch'"),
    ("merge_method: passthrough\nslices: [{sources: [{model: e1, layer_range: [0, 9]}]}]",
     "slices[0].sources[0].layer_range: [0, 9] is out of bounds: source 'e1' has 3 layers"),
    ("merge_method: path\nbase_model: e1\npath: [{model: e1, layer: 0}, {model: e2, layer: 3}]",
     "path[1]: layer 3 is out of bounds"),
    ("merge_method: della\nbase_model: base\nmodels: [{model: e1, parameters: {weight: 1, density: 0.1, epsilon: 0.2}}]",
     "della needs density +/- epsilon inside (0, 1)"),
    ("merge_method: linear\nmodels: [{model: e1, parameters: {weight: 1}}, {model: e2, parameters: {weight: -1}}]",
     "linear weights sum to 0"),
    ("merge_method: linear\ntokenizer: {tokens: {cat: {source: nosuch}}}\nmodels: [{model: e1, parameters: {weight: 1}}]",
     "tokenizer.tokens['cat'].source: unknown source 'nosuch'"),
]


@pytest.mark.parametrize("text,msg", BAD_AGAINST_SOURCES, ids=[m[:30] for _, m in BAD_AGAINST_SOURCES])
def test_bad_recipe_against_sources(fam, text, msg):
    S = SourceSet.open(fam)  # allow_open=False: an unknown name is never opened as a path
    with pytest.raises(RecipeError) as e:
        compile_plan(text, S)
    assert msg in str(e.value)


def test_server_style_sources_never_open_paths(fam):
    S = SourceSet.open({"base": fam["base"]})
    with pytest.raises(RecipeError, match="unknown source"):
        compile_plan(f"merge_method: linear\nmodels: [{{model: {fam['e1']}, parameters: {{weight: 1}}}}]", S)
    assert len(S.sources) == 1
    # its registered path is accepted
    compile_plan(f"merge_method: linear\nmodels: [{{model: {fam['base']}, parameters: {{weight: 1}}}}]", S)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints(fam, families, tmp_path):
    # pickle only
    d = tmp_path / "pickle"
    d.mkdir()
    shutil.copy(fam["base"] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle checkpoints .*pytorch_model.bin.* are refused"):
        Source.open(d)
    # no config
    d = _copy(fam["base"], tmp_path / "nocfg")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        Source.open(d)
    # corrupt header
    d = _copy(fam["base"], tmp_path / "corrupt")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Source.open(d)
    # truncated data
    d = _copy(fam["base"], tmp_path / "trunc")
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="lies outside the file"):
        Source.open(d)
    # unsupported architecture
    d = _copy(fam["base"], tmp_path / "arch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="architecture 'GPT2LMHeadModel' does not match model_type 'mistral'"):
        Source.open(d)
    cfg["model_type"] = "frobnicate"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'frobnicate' is not a transformers architecture"):
        Source.open(d)
    cfg["model_type"], cfg["architectures"] = "t5", ["T5ForConditionalGeneration"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="is not a transformers causal language model"):
        Source.open(d)
    # sharded index naming a missing shard
    sh = families["llama_sharded"]["base"]
    d = _copy(sh, tmp_path / "shard")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} named in the index is missing"):
        Source.open(d)


def test_incompatible_sources_name_source_and_tensor(fam, families):
    with pytest.raises(CheckpointError, match="source 'b' is LlamaForCausalLM, but 'a' is MistralForCausalLM"):
        SourceSet.open({"a": fam["base"], "b": families["llama_sharded"]["base"]})


def test_shape_mismatch_names_tensor(tmp_path):
    from lazymerge.engine.toy import make_family

    a = make_family(tmp_path / "a", "mistral", 0, seed=0)
    b = make_family(tmp_path / "b", "mistral", 0, seed=0, intermediate=48)
    with pytest.raises(CheckpointError, match="config intermediate_size=48 differs"):
        SourceSet.open({"a": a["base"], "b": b["base"]})


def test_vocab_may_differ_and_is_cropped(tmp_path):
    from lazymerge.engine.toy import make_family, make_model, make_tokenizer, save, tiny_config

    a = make_family(tmp_path / "a", "mistral", 1, seed=0)
    tok = make_tokenizer()
    big = save(make_model(tiny_config("mistral", vocab_size=len(tok) + 8), 5), tok, tmp_path / "big")
    S = SourceSet.open({"base": a["base"], "big": big})
    plan = compile_plan("merge_method: task_arithmetic\nbase_model: base\n"
                        "models: [{model: big, parameters: {weight: 0.5}}]", S)
    p = plan.tensors["model.embed_tokens.weight"]
    assert p.shape[0] == len(tok) and p.inputs[0].rows == len(tok)
    from lazymerge.engine.merger import Merger

    assert Merger(S).merge(p).shape == S["base"].shape("model.embed_tokens.weight")
    # a smaller vocabulary than the reference model's is an error
    with pytest.raises(RecipeError, match="has a vocabulary of .* < .* of the reference model"):
        compile_plan("merge_method: task_arithmetic\nbase_model: big\n"
                     "models: [{model: base, parameters: {weight: 0.5}}]", S)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lazymerge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_errors_are_one_line_without_traceback(fam, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nbase_model: base\nmodels: [{model: e1, parameters: {weight: 1, density: 2}}]")
    r = run_cli("merge", bad, tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: invalid recipe: models[0].parameters.density: density 2.0 outside (0, 1]"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("merge_method: linear\nmodels: [{model: ./nowhere, parameters: {weight: 1}}]")
    r = run_cli("merge", unknown, tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "models[0].model: unknown source './nowhere'" in r.stderr
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"merge_method: linear\nmodels: [{{model: {fam['e1']}, parameters: {{weight: 1}}}}]")
    r = run_cli("generate", ok, "the cat", "--temperature", "-1")
    assert r.returncode == 2 and r.stderr.strip() == "error: temperature must be >= 0, got -1.0"
    r = run_cli("score", tmp_path / "missing.yaml", "hello")
    assert r.returncode == 2 and r.stderr.startswith("error: cannot read recipe file")
    r = run_cli("score", ok, "")  # the toy tokenizer adds no BOS: no token to score
    assert r.returncode == 2 and r.stderr.strip() == "error: empty text: nothing to score", r.stderr[-500:]


def test_an_exports_recipe_runs_from_anywhere(fam, tmp_path, monkeypatch):
    """An export writes its recipe with the sources by absolute folder: a recipe whose paths were relative to its own
    folder (as the CLI reads them) plans the same tensors from the export's folder as the original did."""
    import os

    from lazymerge.engine.export import export
    from lazymerge.engine.plan import SourceSet, compile_plan

    rdir = tmp_path / "recipes"
    rdir.mkdir()
    rel = lambda p: os.path.relpath(p, rdir)  # noqa: E731
    recipe = rdir / "ties.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {rel(fam['base'])}\nmodels:\n"
                      f"  - {{model: {rel(fam['e1'])}, parameters: {{weight: 0.7, density: 0.5}}}}\n"
                      f"  - {{model: {rel(fam['e2'])}, parameters: {{weight: 0.5, density: 0.4}}}}\n")
    monkeypatch.chdir(tmp_path)
    plan = compile_plan(recipe, SourceSet(allow_open=True))  # the CLI's way: relative to the recipe's folder
    export(plan, tmp_path / "out")
    saved = tmp_path / "out" / "lazymerge_recipe.yaml"
    assert str(Path(fam["e1"]).resolve()) in saved.read_text()
    monkeypatch.chdir(tmp_path / "out")
    again = compile_plan(saved, SourceSet(allow_open=True))
    assert again.digest() == plan.digest() and list(again.tensors) == list(plan.tensors)
