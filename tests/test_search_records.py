"""Recipes a search writes run anywhere: best.yaml and history.jsonl name sources by absolute folder, and
best.yaml exports to the same tensors with `lazymerge merge` and with mergekit's `mergekit-yaml`, run from another
working directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lazymerge.engine.refs import mergekit_note, model_names, rename_models
from lazymerge.search import run_search


def test_rename_models_reaches_every_reference():
    recipe = {"merge_method": "path", "base_model": "ps",
              "definitions": {"ps": {"merge_method": "ties", "base_model": "base", "tokenizer_source": "union",
                                     "models": [{"model": "a", "parameters": {"weight": 1.0}}]}},
              "path": [{"model": "ps", "layer": 0}, {"model": "b+lora", "layer": 1, "scale": 0.5}],
              "tokenizer_source": "a"}
    out = rename_models(recipe, {"a": "/m/a", "b": "/m/b", "base": "/m/base", "lora": "/m/lora"})
    assert out["base_model"] == "ps" and out["path"][0]["model"] == "ps"  # a definition, not a source
    assert out["path"][1]["model"] == "/m/b+/m/lora"
    assert out["definitions"]["ps"]["base_model"] == "/m/base"
    assert out["definitions"]["ps"]["models"][0]["model"] == "/m/a"
    assert out["definitions"]["ps"]["tokenizer_source"] == "union" and out["tokenizer_source"] == "/m/a"
    assert recipe["tokenizer_source"] == "a"  # the input is not modified
    assert {"a", "b", "lora", "base"} <= model_names(recipe)
    assert "cannot run" in mergekit_note(recipe)
    assert mergekit_note({"merge_method": "ties"}) is None


@pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit not installed")
def test_best_yaml_runs_anywhere(search_toy, tmp_path):
    cfg = {"sources": search_toy["paths"], "base_model": "base",
           "space": {"kind": "ps", "method": "ties", "models": ["e1", "e2"]},
           "tasks": [{"name": "em", "type": "generate_exact_match", "data": search_toy["data"], "extract": "exact",
                      "max_tokens": 4, "limit": 20}],
           "budget": {"evaluations": 6, "seed": 0}}
    run = tmp_path / "run"
    res = run_search(cfg, run, quiet=True, summary=False, plots=False)
    folders = {str(Path(p).resolve()) for p in search_toy["paths"].values()}
    assert model_names(res.best_recipe) <= folders
    for line in (run / "history.jsonl").read_text().splitlines():
        assert model_names(json.loads(line)["recipe"]) <= folders
    best = run / "best.yaml"
    assert model_names(yaml.safe_load(best.read_text())) <= folders
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "lazymerge.cli", "merge", str(best), "ours"], cwd=elsewhere, check=True,
                   capture_output=True)
    subprocess.run(["mergekit-yaml", str(best), "theirs"], cwd=elsewhere, check=True, capture_output=True)
    ours = load_file(elsewhere / "ours" / "model.safetensors")
    theirs = load_file(elsewhere / "theirs" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        diff = (ours[name].float() - theirs[name].float()).abs().max().item()
        assert diff <= 1e-6, f"{name} differs from mergekit by {diff}"
