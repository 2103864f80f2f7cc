"""Issue 17, engine side: sources that change under a running process, malformed or self-inconsistent checkpoints,
non-finite weights, and recipes whose cost would explode before validation (each kind with several members)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

RECIPE = {"merge_method": "task_arithmetic", "base_model": "base",
          "models": [{"model": "e1", "parameters": {"weight": 0.8}}]}


@pytest.fixture()
def family(fam, tmp_path):
    """A private copy of the Mistral family (tests here damage it)."""
    out = {}
    for name, p in fam.items():
        shutil.copytree(p, tmp_path / name)
        out[name] = str(tmp_path / name)
    return out


def _change(path, how: str) -> None:
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    time.sleep(0.01)  # a later mtime even on coarse clocks
    if how == "truncate":  # an interrupted copy
        os.truncate(f, size // 2)
    elif how == "overwrite":  # same size, other bytes, in place
        with open(f, "r+b") as fh:
            fh.seek(size - 64)
            fh.write(os.urandom(64))
    elif how == "replace":  # another file renamed over it
        shutil.copyfile(f, f + ".new")
        os.replace(f + ".new", f)
    elif how == "delete":
        os.remove(f)


@pytest.mark.parametrize("how", ["truncate", "overwrite", "replace", "delete"])
@pytest.mark.parametrize("policy", ["cached", "on_the_fly"])
def test_changed_source_is_refused_by_name_and_its_cache_dropped(family, how, policy):
    from lazymerge.engine import Engine
    from lazymerge.engine.checkpoint import SourceUnavailable

    eng = Engine(family, policy=policy, allow_open=False)
    merged, plain = eng.compile(RECIPE), eng.compile({"merge_method": "linear", "models": [
        {"model": "base", "parameters": {"weight": 1.0}}, {"model": "e2", "parameters": {"weight": 1.0}}]})
    before = plain.generate(["the cat"], max_tokens=4)[0].text
    merged.generate(["the cat"], max_tokens=4)  # warm: under `cached` every merged weight is now in memory
    assert policy == "on_the_fly" or eng.provider.cache.bytes > 0
    _change(family["e1"], how)
    for _ in range(2):  # refused every time, not only the first
        with pytest.raises(SourceUnavailable) as ei:
            merged.generate(["the cat"], max_tokens=4)
        msg = str(ei.value)
        assert "source 'e1'" in msg and family["e1"] not in msg and "/" not in msg, msg
    assert eng.provider.cache.bytes == 0 and eng.merger.stats.bytes == 0  # nothing from the old content survives
    assert policy == "cached" or eng.merger.store.resident_limit > 0  # on the fly, sources were resident: dropped
    assert plain.generate(["the cat"], max_tokens=4)[0].text == before  # other sources are served as before


def test_truncated_source_under_a_live_reader_never_kills_the_process(family, tmp_path):
    """The SIGBUS of the issue: a memory-mapped read of a truncated file kills the process. Reads are preads now."""
    import subprocess
    import sys

    code = f"""
import os, sys
from lazymerge.engine import Engine
from lazymerge.engine.checkpoint import SourceUnavailable
eng = Engine({family!r}, policy="on_the_fly", allow_open=False)
m = eng.compile({RECIPE!r})
m.generate(["the cat"], max_tokens=2)
f = os.path.join({family['e1']!r}, "model.safetensors")
os.truncate(f, 100)
try:
    m.generate(["the cat"], max_tokens=2)
except SourceUnavailable as e:
    print("refused:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "refused: source 'e1'" in r.stdout, r.stderr[-2000:]


def _write_config(path, cfg) -> None:
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(cfg if isinstance(cfg, str) else json.dumps(cfg))


def _config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


MALFORMED = {
    "config_is_a_list": (lambda c: [c], "config.json is a JSON list"),
    "config_is_null": (lambda c: None, "config.json is a JSON null"),
    "no_num_hidden_layers": (lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"},
                             "no `num_hidden_layers`"),
    "layers_as_string": (lambda c: {**c, "num_hidden_layers": "3"}, "`num_hidden_layers` must be a positive integer"),
    "negative_hidden": (lambda c: {**c, "hidden_size": -32}, "`hidden_size` must be a positive integer"),
    "huge_layer_count": (lambda c: {**c, "num_hidden_layers": 10**12}, "is over"),
    "hidden_disagrees_with_headers": (lambda c: {**c, "hidden_size": 64}, "but config.json implies"),
    "vocab_disagrees_with_headers": (lambda c: {**c, "vocab_size": c["vocab_size"] + 9}, "but config.json implies"),
    "heads_disagree_with_headers": (lambda c: {**c, "num_attention_heads": 8, "head_dim": 8}, "but config.json implies"),
    "not_json": (lambda c: "{not json", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_is_one_error_line_exit_2(family, tmp_path, case, capsys):
    from lazymerge.cli import main

    edit, needle = MALFORMED[case]
    cfg = _config(family["e1"])
    new = edit(cfg)
    _write_config(family["e1"], new if isinstance(new, str) else json.dumps(new))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {family['base']}\n"
                      f"models: [{{model: {family['e1']}, parameters: {{weight: 0.5}}}}]\n")
    assert main(["generate", str(recipe), "the cat", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_malformed_safetensors_headers(family):
    from lazymerge.engine.checkpoint import CheckpointError, Source

    f = os.path.join(family["e2"], "model.safetensors")
    data = open(f, "rb").read()
    n = int.from_bytes(data[:8], "little")
    for header in (b"[]", b"null", b'{"x": 1}', b'{"model.norm.weight": {"dtype": "F32", "shape": [-1], '
                                                   b'"data_offsets": [0, 4]}}'):
        with open(f, "wb") as fh:
            fh.write(len(header).to_bytes(8, "little") + header + data[8 + n:])
        with pytest.raises(CheckpointError):
            Source.open(family["e2"])


def _poison(path, tensor: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    sd[tensor][0, 0] = value
    save_file(sd, f, metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_source_is_reported_by_name(family, value):
    from lazymerge.engine import Engine
    from lazymerge.engine.safety import NonFiniteError

    _poison(family["e1"], "model.layers.1.mlp.up_proj.weight", value)
    eng = Engine(family, allow_open=False)
    with pytest.raises(NonFiniteError, match=r"source 'e1': tensor 'model.layers.1.mlp.up_proj.weight'"):
        eng.compile(RECIPE).generate(["the cat"], max_tokens=2)
    with pytest.raises(NonFiniteError, match="source 'e1'"):
        eng.compile(RECIPE).loglikelihood([("the cat", " sees")])
    assert eng.compile({**RECIPE, "models": [{"model": "e2", "parameters": {"weight": 0.8}}]}).generate(
        ["the cat"], max_tokens=2)[0].text is not None  # the other sources still serve


def test_recipe_that_overflows_is_reported_by_name(fam):
    from lazymerge.engine import Engine
    from lazymerge.engine.safety import NonFiniteError

    eng = Engine({k: str(v) for k, v in fam.items()}, allow_open=False)
    big = {**RECIPE, "models": [{"model": "e1", "parameters": {"weight": 1e300}}]}  # finite in Python, inf in float32
    with pytest.raises(NonFiniteError, match="the recipe produces NaN or infinite values in tensor"):
        eng.compile(big).generate(["the cat"], max_tokens=2)


ALIAS_BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
merge_method: linear
models: [{model: base, parameters: {weight: *g}}]
"""

EXPENSIVE = {
    "alias_bomb": (ALIAS_BOMB, "recipe too large"),
    "merge_key_bomb": ("l0: &l0 {x: 1, y: 2}\n" + "".join(  # `<<` merges plus aliases: 3**i values at level i
        f"l{i}: &l{i} {{<<: *l{i - 1}, k{i}: [*l{i - 1}, *l{i - 1}]}}\n" for i in range(1, 14))
        + "merge_method: linear\n", "recipe too large"),
    "deep_nesting": ("merge_method: linear\nparameters: {w: " + "[" * 200 + "]" * 200 + "}\n", "nests deeper"),
    "path_hop_range": ("merge_method: path\nbase_model: base\npath: [{model: base, layer_range: [0, 30000000]}]\n",
                       "the limit is 1024"),
    "many_hops": ("merge_method: path\nbase_model: base\npath: [" + ",".join(["{model: base, layer: 0}"] * 2000)
                  + "]\n", "at most 1024"),
    "slices_range": ("merge_method: passthrough\nslices: [{sources: [{model: base, layer_range: [0, 99999999]}]}]\n",
                     "the limit is 1024"),
    "many_models": ("merge_method: linear\nmodels: [" + ",".join(
        f"{{model: m{i}, parameters: {{weight: 1}}}}" for i in range(500)) + "]\n", "at most 64"),
    "many_definitions": ("merge_method: path\nbase_model: base\npath: [{model: base, layer: 0}]\ndefinitions: {" +
                         ",".join(f"d{i}: {{merge_method: linear, models: [{{model: base, parameters: {{weight: 1}}}}]}}"
                                  for i in range(100)) + "}\n", "at most 32"),
    "huge_text": ("merge_method: linear\n# " + "x" * (300 << 10) + "\n", "characters; the limit"),
    "nul_in_model_name": ("merge_method: linear\nmodels: [{model: \"ba\\0se\", parameters: {weight: 1}}]\n",
                          "control character"),
    "seed_2_64": ("merge_method: linear\nrandom_seed: 18446744073709551616\nmodels: [{model: base, parameters: "
                  "{weight: 1}}]\n", "random_seed"),
    "thousands_of_errors": ("merge_method: linear\nmodels: [" + ",".join(
        f"{{model: m{i}, bogus{i}: 1}}" for i in range(60)) + "]\n", "more errors"),
}


@pytest.mark.parametrize("case", sorted(EXPENSIVE))
def test_expensive_recipes_are_refused_cheaply(fam, case):
    import resource

    from lazymerge.engine import Engine, RecipeError

    text, needle = EXPENSIVE[case]
    eng = Engine({k: str(v) for k, v in fam.items()}, allow_open=False)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as ei:
        eng.compile(text)
    took = time.perf_counter() - t0
    msg = str(ei.value)
    assert needle in msg and len(msg) < 2000, msg[:3000]
    assert took < 5.0, took  # generous for a shared 2-core machine; the bombs took minutes / GBs before
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KB: no expansion happened


def test_json_object_recipes_are_bounded_too(fam):
    from lazymerge.engine import RecipeError, load_recipe

    shared = ["x"] * 200
    deep: list = []
    for _ in range(100):
        deep = [deep]
    for obj in ({"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": [shared] * 200}}]},
                {"merge_method": "linear", "parameters": {"w": deep}}):
        with pytest.raises(RecipeError, match="recipe too large"):
            load_recipe(obj)


@pytest.mark.parametrize("policy", ["cached", "on_the_fly"])
def test_changed_source_is_refused_under_a_merged_vocabulary(family, tmp_path, policy):
    """Rows re-indexed into a union vocabulary (engine/rowmap.py, TensorStore.raw/rows) are read through the same
    checked reader: a fine-tune with added tokens that changes on disk is refused by name."""
    from pathlib import Path

    from lazymerge.engine import Engine, toy
    from lazymerge.engine.checkpoint import SourceUnavailable

    ft = str(toy.make_finetune_with_tokens(Path(family["base"]), tmp_path / "ft", ("zebra", "quux"), seed=6))
    eng = Engine({"base": family["base"], "ft": ft}, policy=policy, allow_open=False)
    model = eng.compile({"merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "union",
                         "models": [{"model": "ft", "parameters": {"weight": 0.8}}]})
    model.generate(["the zebra"], max_tokens=2)
    _change(ft, "overwrite")
    with pytest.raises(SourceUnavailable) as ei:
        model.generate(["the zebra"], max_tokens=2)
    assert "source 'ft'" in str(ei.value) and "/" not in str(ei.value)
    assert eng.provider.cache.bytes == 0


@pytest.mark.parametrize("case", ["long_token", "many_tokens", "bad_model"])
def test_tokenizer_section_is_bounded(fam, case):
    """mergekit's `tokenizer:` section (main's merged vocabularies) is under the same limits as the rest of a recipe."""
    from lazymerge.engine.limits import MAX_TOKEN_CHARS, MAX_TOKEN_OVERRIDES
    from lazymerge.engine.plan import SourceSet, compile_plan
    from lazymerge.engine.recipe import RecipeError

    tokens, needle = {
        "long_token": ({"x" * (MAX_TOKEN_CHARS + 1): {"source": "base"}}, f"at most {MAX_TOKEN_CHARS} characters"),
        "many_tokens": ({f"t{i}": {"source": "base"} for i in range(MAX_TOKEN_OVERRIDES + 1)},
                        f"at most {MAX_TOKEN_OVERRIDES} items"),
        "bad_model": ({"a": {"source": {"kind": "model_token", "model": "ba\x00se", "token_id": 1}}},
                      "control character")}[case]
    recipe = {"merge_method": "task_arithmetic", "base_model": "base", "tokenizer": {"source": "union", "tokens": tokens},
              "models": [{"model": "e1", "parameters": {"weight": 0.5}}]}
    with pytest.raises(RecipeError) as ei:
        compile_plan(recipe, SourceSet.open(fam))
    assert len(str(ei.value)) < 4000 and needle in str(ei.value), str(ei.value)[:1000]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_finiteness_check_finds_every_nan_and_inf(dtype):
    """`safety.finite` (a min/max reduction) finds a NaN, +inf or -inf wherever it sits, in vector bodies and tails."""
    from lazymerge.engine.safety import finite

    for n in (1, 7, 33, 1000, 65_537):
        t = torch.linspace(-3, 3, n).to(dtype)
        assert finite(t)
        for pos in {0, n // 2, n - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                u = t.clone()
                u[pos] = bad
                assert not finite(u), (n, pos, bad)
    assert finite(torch.empty(0, dtype=dtype)) and finite(torch.arange(5))
