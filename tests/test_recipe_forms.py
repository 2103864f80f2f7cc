"""Recipe forms mergekit 0.1.5 accepts, with its meaning: empty slices (`layer_range: [n, n]`), per-slice
`base_model`, `residual_weight`, `name`, `out_dtype` and `chat_template`. Each is checked against mergekit's own output
for the same YAML (tensors, config dtype, the written tokenizer's chat template), and the lazy model against
transformers' forward of the export.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lazymerge.engine import Engine
from lazymerge.engine.export import export
from lazymerge.engine.plan import SourceSet, compile_plan
from lazymerge.engine.recipe import RecipeError, load_recipe

mergekit = pytest.importorskip("mergekit", reason="mergekit not installed: equality with its output not checked")

CASES = {
    # embeddings from the first slice (empty: E2), layers from E1, final norm and LM head from the last (empty: E2)
    "empty_first_and_last_slice": """
merge_method: passthrough
slices:
  - sources: [{model: E2, layer_range: [0, 0]}]
  - sources: [{model: E1, layer_range: [0, 3]}]
  - sources: [{model: E2, layer_range: [3, 3]}]
""",
    # mergekit takes the head from as many of the last slice's sources as the first slice has: here E2 alone
    "empty_last_slice_more_sources": """
merge_method: linear
slices:
  - sources: [{model: E1, layer_range: [0, 3], parameters: {weight: 1.0}}]
  - sources: [{model: E2, layer_range: [3, 3], parameters: {weight: 0.7}}, {model: E1, layer_range: [3, 3], parameters: {weight: 0.3}}]
""",
    # each slice its own base; residual_weight and name have no effect in mergekit 0.1.5
    "slice_base_model_out_dtype": """
name: my-merge
merge_method: task_arithmetic
slices:
  - base_model: BASE
    residual_weight: 0.5
    sources:
      - {model: BASE, layer_range: [0, 2]}
      - {model: E1, layer_range: [0, 2], parameters: {weight: 0.7}}
  - base_model: E2
    sources:
      - {model: E2, layer_range: [1, 3]}
      - {model: E1, layer_range: [1, 3], parameters: {weight: [0.2, 0.9]}}
out_dtype: bfloat16
""",
    # numbers YAML 1.1 reads as strings (no dot: `5e-1`), in a scalar, a gradient and a condition; mergekit's
    # pydantic fields convert them
    "exponent_numbers": """
merge_method: ties
base_model: BASE
models:
  - {model: E1, parameters: {weight: 7e-1, density: [5e-1, 1e0]}}
  - {model: E2, parameters: {weight: [{filter: mlp, value: 3E-1}, {value: 4e-1}], density: 6e-1}}
parameters: {normalize: true}
""",
}


def _sub(text: str, fam) -> str:
    return text.replace("BASE", str(fam["base"])).replace("E1", str(fam["e1"])).replace("E2", str(fam["e2"]))


def _mergekit(text: str, out, copy_tokenizer=False) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=copy_tokenizer, quiet=True))


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_form_equals_mergekit(fam, tmp_path, case):
    text = _sub(CASES[case], fam) + "dtype: float32\n"
    _mergekit(text, tmp_path / "mk")
    S = SourceSet(allow_open=True)
    plan = compile_plan(text, S)
    export(plan, tmp_path / "lm")
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = load_file(tmp_path / "lm" / "model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for name in theirs:
        assert theirs[name].dtype == ours[name].dtype, name
        diff = (theirs[name].float() - ours[name].float()).abs().max().item()
        assert diff <= 1e-6, f"{case}: {name} differs from mergekit by {diff}"
    cfg_mk = json.loads((tmp_path / "mk" / "config.json").read_text())
    cfg_lm = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert cfg_lm["num_hidden_layers"] == cfg_mk["num_hidden_layers"]
    assert cfg_lm["dtype"] == (cfg_mk.get("dtype") or cfg_mk.get("torch_dtype"))
    if case == "empty_first_and_last_slice":  # the lazy model == transformers' forward of the export
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([[1, 4, 9, 16, 25, 36, 49]])
        with torch.no_grad():
            want = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm")).eval()(ids).logits
        got = Engine(S).compile(plan).logits(ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def templated(fam, tmp_path_factory):
    """E1 and E2 copies whose tokenizers carry another chat template (2 votes against the base's 1 for `auto`)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("templated")
    other = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    out = {"base": fam["base"]}
    for k in ("e1", "e2"):
        shutil.copytree(fam[k], root / k)
        tok = AutoTokenizer.from_pretrained(str(root / k))
        tok.chat_template = other
        tok.save_pretrained(str(root / k))
        out[k] = root / k
    return out, other


TEMPLATES = {
    "builtin": "chatml",
    "auto": "auto",
    "jinja": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}",
}


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_chat_template_equals_mergekit(templated, tmp_path, kind):
    from transformers import AutoTokenizer

    fam, other = templated
    text = _sub("""
merge_method: task_arithmetic
base_model: BASE
models:
  - {model: E1, parameters: {weight: 0.5}}
  - {model: E2, parameters: {weight: 0.5}}
dtype: float32
""", fam) + f"chat_template: {json.dumps(TEMPLATES[kind])}\n"
    _mergekit(text, tmp_path / "mk", copy_tokenizer=True)
    S = SourceSet(allow_open=True)
    plan = compile_plan(text, S)
    export(plan, tmp_path / "lm")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "mk"))
    ours = AutoTokenizer.from_pretrained(str(tmp_path / "lm"))
    assert ours.chat_template == theirs.chat_template
    if kind == "auto":
        assert ours.chat_template == other
    msgs = [{"role": "user", "content": "two plus three"}, {"role": "assistant", "content": "five"},
            {"role": "user", "content": "what is one"}]
    want = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    # the lazy model (chat completions) renders with the recipe's template too
    lazy = Engine(S).compile(plan)
    assert lazy.chat_prompt(msgs) == theirs.encode(want, add_special_tokens=False)


ERRORS = [
    ("modules: {text_decoder: {models: [{model: a}]}}", r"modules: mergekit's per-module merges"),
    ("chat_template: nonsense", r"chat_template: 'nonsense' is neither 'auto', a built-in template \(alpaca, chatml"),
    ("chat_template: '{{ x }}'", r"chat_template: not a Jinja template"),
    ("chat_template: '{% for m in messages %}{{ m }}'", r"chat_template: not a valid Jinja template"),
    ("out_dtype: int8", r"out_dtype: 'int8' is not one of float32, float16, bfloat16"),
]


@pytest.mark.parametrize("extra,match", ERRORS)
def test_recipe_form_errors(extra, match):
    text = "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1.0}}]\n" + extra
    if extra.startswith("modules"):
        text = "merge_method: linear\n" + extra
    with pytest.raises(RecipeError, match=match):
        load_recipe(text)


def test_multi_document_yaml_is_refused():
    with pytest.raises(RecipeError, match="one YAML document, this text has several"):
        load_recipe("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\nname: b\n")


def test_reversed_layer_range_is_refused():
    with pytest.raises(RecipeError, match=r"slices\.0\.sources\.0\.layer_range: .*0 <= start <= end"):
        load_recipe("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [3, 1]}]}]")


def test_slice_base_model_is_a_model_reference():
    """Search records rewrite every model reference to a folder; a slice's own base_model is one."""
    from lazymerge.engine.refs import model_names, rename_models

    r = yaml.safe_load(_sub(CASES["slice_base_model_out_dtype"], {"base": "b", "e1": "x", "e2": "y"}))
    assert model_names(r) == {"b", "x", "y"}
    out = rename_models(r, {"b": "/m/b", "y": "/m/y"})
    assert [s["base_model"] for s in out["slices"]] == ["/m/b", "/m/y"]
