"""Merged vocabularies (engine/vocab.py, engine/rowmap.py): `tokenizer_source` and mergekit's `tokenizer:` section.

The oracle is mergekit 0.1.5's output for the same YAML. mergekit numbers the union's new tokens in an order that
changes from run to run (Python set and hash-map iteration), so its tensors are compared with ours row by row *by
token string*; the set of tokens and every other tensor must be equal.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import assert_close
from safetensors.torch import load_file

from lazymerge.engine import Engine, toy
from lazymerge.engine.export import export
from lazymerge.engine.plan import SourceSet, compile_plan
from lazymerge.engine.recipe import RecipeError

NEW_FT = ("zebra", "quux", "wombat", "yak")  # the fine-tune: 4 appended tokens
NEW_FT2 = ("quux", "koala")  # shares one new token with ft, plus a special token
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def vfam(tmp_path_factory):
    """base (72 tokens), e1 (same tokenizer), ft (+4 words), ft2 (+2 words, +<|eot|> special), all fine-tunes of base, float32."""
    root = tmp_path_factory.mktemp("vocab")
    fam = toy.make_family(root, "mistral", 1, seed=5)
    fam["ft"] = toy.make_finetune_with_tokens(fam["base"], root / "ft", NEW_FT, seed=6)
    fam["ft2"] = toy.make_finetune_with_tokens(fam["base"], root / "ft2", NEW_FT2, seed=7, special=("<|eot|>",))
    # a word-level vocabulary with one more *plain* token in the middle: every later token has another id
    from transformers import AutoModelForCausalLM

    tok = toy.make_tokenizer(("giraffe",))
    model = AutoModelForCausalLM.from_pretrained(str(fam["base"]), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    fam["perm"] = toy.save(toy.perturb(model, 11), tok, root / "perm")
    return {k: str(v) for k, v in fam.items()}


@pytest.fixture(scope="module")
def vfam_tied(tmp_path_factory):
    """The same family as `vfam` (without e1) on a Qwen2 base with tied embeddings (the fine-tunes stay tied)."""
    root = tmp_path_factory.mktemp("vocab_tied")
    tok = toy.make_tokenizer()
    base = toy.save(toy.make_model(toy.tiny_config("qwen2", vocab_size=len(tok), tie=True), 8), tok, root / "base")
    return {"base": str(base),
            "ft": str(toy.make_finetune_with_tokens(base, root / "ft", NEW_FT, seed=9)),
            "ft2": str(toy.make_finetune_with_tokens(base, root / "ft2", NEW_FT2, seed=10, special=("<|eot|>",)))}


def _text(recipe: str, fam) -> str:
    for k in ("ft2", "ft", "base", "e1", "perm"):  # longest name first
        recipe = recipe.replace(k.upper(), fam[k]) if k in fam else recipe
    return recipe + "dtype: float32\n"


CASES = {
    "union_task_arithmetic": """
merge_method: task_arithmetic
base_model: BASE
models:
  - {model: FT, parameters: {weight: 0.7}}
  - {model: FT2, parameters: {weight: 0.5}}
tokenizer_source: union
""",
    # no base: a token two models have and the base lacks is their mean; one only the base has is its row
    "union_linear_no_base": """
merge_method: linear
models:
  - {model: FT, parameters: {weight: 0.7}}
  - {model: FT2, parameters: {weight: 0.5}}
  - {model: BASE, parameters: {weight: 0.2}}
tokenizer_source: union
""",
    # shared tokens at other ids, a plain (not added) new token, the mean of two rows where the base lacks a token
    "union_permuted_ties": """
merge_method: ties
base_model: BASE
models:
  - {model: PERM, parameters: {weight: 0.6, density: 0.7}}
  - {model: FT2, parameters: {weight: 0.5, density: 0.5}}
  - {model: FT, parameters: {weight: 0.4, density: 0.6}}
tokenizer_source: union
""",
    "tokens_force_pad_ties": """
merge_method: ties
base_model: BASE
models:
  - {model: FT, parameters: {weight: 0.7, density: 0.5}}
  - {model: FT2, parameters: {weight: 0.5, density: 0.6}}
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    zebra: {source: FT}
    quux: {source: FT2, force: true}
    "<|eot|>": {source: {kind: model_token, model: BASE, token: "</s>"}}
    brandnew: {source: {kind: zero}}
    seven: {source: {kind: model_token, model: FT, token_id: 5}, force: true}
""",
    "source_model": """
merge_method: task_arithmetic
base_model: BASE
models:
  - {model: FT, parameters: {weight: 0.7}}
  - {model: FT2, parameters: {weight: 0.5}}
tokenizer_source: FT
""",
    "source_base": """
merge_method: breadcrumbs_ties
base_model: BASE
models:
  - {model: FT, parameters: {weight: 0.8, density: 0.5, gamma: 0.05}}
  - {model: FT2, parameters: {weight: 0.5, density: 0.6, gamma: 0.1}}
tokenizer_source: base
""",
}


@pytest.mark.parametrize("case", list(CASES) + ["tied:tokens_force_pad_ties"])
def test_vocabulary_equals_mergekit(request, tmp_path, case):
    pytest.importorskip("mergekit", reason="mergekit not installed: equality with its output not checked")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoTokenizer

    tied, case = case.startswith("tied:"), case.removeprefix("tied:")
    text = _text(CASES[case], request.getfixturevalue("vfam_tied" if tied else "vfam"))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
              options=MergeOptions(quiet=True))
    export(compile_plan(text, SourceSet(allow_open=True)), tmp_path / "lm")
    theirs, ours = load_file(tmp_path / "mk" / "model.safetensors"), load_file(tmp_path / "lm" / "model.safetensors")
    tv = AutoTokenizer.from_pretrained(str(tmp_path / "mk")).get_vocab()
    ov = AutoTokenizer.from_pretrained(str(tmp_path / "lm")).get_vocab()
    assert set(tv) == set(ov), f"{case}: token sets differ: {set(tv) ^ set(ov)}"
    cfg_t, cfg_o = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("mk", "lm"))
    assert cfg_t["vocab_size"] == cfg_o["vocab_size"] == theirs["model.embed_tokens.weight"].shape[0]
    assert sorted(theirs) == sorted(ours)
    n = len(tv)
    for name in theirs:
        t, o = theirs[name], ours[name]
        if name in VOCAB_TENSORS:  # ours in mergekit's token order (padding rows stay in place)
            order = [ov[tok] for tok, _ in sorted(tv.items(), key=lambda kv: kv[1])]
            o = o[torch.tensor(order + list(range(n, o.shape[0])))]
        assert_close(o, t, atol=1e-6, what=f"{case}: {name}")


def test_union_lazy_logits_equal_export(vfam, tmp_path):
    """Row lookups stay lazy (on the fly: only the rows asked for are re-indexed and merged) and equal transformers'
    forward of the exported checkpoint, padding rows and new tokens included."""
    from transformers import AutoModelForCausalLM

    text = _text(CASES["tokens_force_pad_ties"], vfam)
    for policy in ("on_the_fly", "cached"):
        model = Engine(policy=policy).compile(text)
        if policy == "on_the_fly":
            export(model.plan, tmp_path / "out")
            ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
        n = len(model.tokenizer)
        assert model.plan.config["vocab_size"] == 80 and n == 79  # 72 + 6 new + brandnew, padded to 16
        ids = torch.tensor([[1] + list(range(n - 1, 40, -1)) + [79], [1] + list(range(4, 43))])
        with torch.no_grad():
            expected = ref(input_ids=ids).logits
        assert_close(model.logits(ids), expected, atol=1e-5, what=policy)


def test_identical_tokenizers_need_no_row_maps(vfam):
    """`tokenizer_source: base` over sources that share the base's tokenizer plans exactly what no tokenizer_source
    plans: no re-indexing, the same content keys (the merged-weight cache is shared)."""
    plain = _text("merge_method: task_arithmetic\nbase_model: BASE\nmodels: [{model: E1, parameters: {weight: 1}}]\n",
                  vfam)
    with_base = plain + "tokenizer_source: base\n"
    S = SourceSet(allow_open=True)
    a, b = compile_plan(plain, S), compile_plan(with_base, S)
    assert a.digest() == b.digest()
    assert all(r.vocab is None for p in b.tensors.values() for r in p.refs())


def test_appended_tokens_generate_through_the_cli(vfam, tmp_path, capsys):
    """The issue's example: a fine-tune with 4 appended tokens, tokenizer_source naming it, a prompt using a new
    word (this died with an IndexError traceback, exit 1)."""
    from lazymerge.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(_text("merge_method: task_arithmetic\nbase_model: BASE\n"
                            "models: [{model: FT, parameters: {weight: 0.7}}]\ntokenizer_source: FT\n", vfam))
    assert main(["generate", str(recipe), "the zebra sees the yak", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 76


def test_tokenizer_larger_than_embedding_is_one_clear_error(vfam, tmp_path, capsys):
    """A checkpoint whose tokenizer has 4 more ids than its embedding has rows (tokens added, embeddings not
    resized): transformers' forward fails with an IndexError; lazymerge refuses the prompt with one line."""
    from lazymerge.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(vfam["base"], bad)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{vfam['ft']}/{f}", bad / f)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: passthrough\nmodels: [{{model: {bad}}}]\n")
    assert main(["generate", str(recipe), "the cat sees the dog", "--max-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", str(recipe), "the zebra", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: token 'zebra' (id 72) has no embedding row")
    # merging its vocabulary: the tokens beyond its embedding count as absent from it (here: from every model)
    recipe.write_text(f"merge_method: passthrough\nmodels: [{{model: {bad}}}]\ntokenizer_source: union\n")
    model = Engine().compile(recipe.read_text())
    assert model.plan.config["vocab_size"] == 76
    ids = model.encode("the zebra")
    assert_close(model.module.model.embed_tokens(torch.tensor([ids]))[0, -1], torch.zeros(32), what="zero row")


def test_generation_config_eos_stops_generation(vfam, tmp_path):
    """An `eos_token_id` list in generation_config.json (Llama-3-Instruct's end-of-turn token lives only there)
    stops generation; export writes the tokenizer source's generation_config.json beside its tokenizer."""
    src = tmp_path / "src"
    shutil.copytree(vfam["ft2"], src)
    prompt = "the cat sees the dog"
    free = Engine().compile(f"merge_method: passthrough\nmodels: [{{model: {src}}}]\n").generate([prompt],
                                                                                               max_tokens=3)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 3
    stop_at = free.token_ids[0]
    gen = json.loads((src / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, stop_at]
    (src / "generation_config.json").write_text(json.dumps(gen))
    model = Engine().compile(f"merge_method: passthrough\nmodels: [{{model: {src}}}]\n")
    assert stop_at in model.eos_ids
    out = model.generate([prompt], max_tokens=3)[0]
    assert out.finish_reason == "stop" and out.token_ids == [] and out.text == ""
    export(model.plan, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [2, stop_at]


@pytest.mark.parametrize("recipe, message", [
    ("merge_method: linear\nmodels: [{model: FT, parameters: {weight: 1}}, {model: FT2, parameters: {weight: 1}}]\n"
     "tokenizer: {tokens: {zebra: {source: FT2}}}\n", "token 'zebra' takes its row from model .*which does not have"),
    ("merge_method: linear\nmodels: [{model: FT, parameters: {weight: 1}}, {model: FT2, parameters: {weight: 1}}]\n"
     "tokenizer: {tokens: {zebra: {force: true}}}\n", "token 'zebra' has a `tokens:` entry without a source"),
    ("merge_method: linear\nmodels: [{model: FT, parameters: {weight: 1}}]\ntokenizer_source: union\n"
     "tokenizer: {source: union}\n", "give one of them, not both"),
    ("merge_method: path\nbase_model: FT\npath: [{model: FT, layer: 0}]\ntokenizer_source: union\n",
     "a path recipe .* cannot merge vocabularies"),
])
def test_bad_vocabulary_recipes(vfam, recipe, message):
    with pytest.raises(RecipeError, match=message):
        compile_plan(_text(recipe, vfam), SourceSet(allow_open=True))
