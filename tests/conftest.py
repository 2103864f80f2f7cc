"""Shared fixtures: tiny checkpoint families built locally once per test session (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite checks the eager reference (the oracle) end to end; tests/test_merge_cpu.py checks the fused CPU merge, the
# default outside tests, against it (its compiled programs are cached per machine: kernels/merge_cpu.py).
os.environ.setdefault("LAZYMERGE_CPU_FUSED", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """{"mistral": {...}, "llama_sharded": {...}, "qwen2": {...}, "mistral_bf16": {...}} of base + 2 experts."""
    from lazymerge.engine.toy import make_family

    root = tmp_path_factory.mktemp("families")
    return {
        "mistral": make_family(root / "mistral", "mistral", 2, seed=0),
        "llama_sharded": make_family(root / "llama", "llama", 2, seed=1, shards=True),
        "qwen2": make_family(root / "qwen2", "qwen2", 2, seed=2),
        "mistral_bf16": make_family(root / "mistral_bf16", "mistral", 2, seed=0, dtype="bfloat16"),
    }


@pytest.fixture(scope="session")
def fam(families):
    return families["mistral"]


def assert_close(actual, expected, atol=0.0, rtol=0.0, what=""):
    """torch.testing-style check that prints the first mismatching indices."""
    import torch

    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:8].tolist()
        pairs = [(i, float(actual[tuple(i)]), float(expected[tuple(i)])) for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(atol={atol}, rtol={rtol}); first (index, actual, expected): {pairs}")


@pytest.fixture(scope="session")
def search_toy(tmp_path_factory):
    """Search tests: base + 2 strongly perturbed experts (4 layers), a target that is a known mixture of them
    (task_arithmetic, e1 0.3, e2 1.5) and its greedy continuations as datasets (search and held-out splits)."""
    import copy
    import json
    import random

    import torch

    from lazymerge.engine import Engine, toy

    root = tmp_path_factory.mktemp("search_toy")
    tok = toy.make_tokenizer()
    cfg = toy.tiny_config(vocab_size=len(tok), hidden=32, layers=4, intermediate=64)
    base = toy.make_model(cfg, 0)
    paths = {"base": toy.save(copy.deepcopy(base), tok, root / "base")}
    for i in (1, 2):
        paths[f"e{i}"] = toy.save(toy.perturb(copy.deepcopy(base), i, scale=0.5), tok, root / f"e{i}")
    target = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "e1", "parameters": {"weight": 0.3}}, {"model": "e2", "parameters": {"weight": 1.5}}]}
    threads = torch.get_num_threads()
    model = Engine({k: str(v) for k, v in paths.items()}).compile(target)
    rng = random.Random(0)
    prompts = list(dict.fromkeys(" ".join(rng.choice(toy.WORDS) for _ in range(5)) for _ in range(400)))
    outs = model.generate(prompts, max_tokens=4)
    lines = [json.dumps({"prompt": p, "answer": o.text}) for p, o in zip(prompts, outs)]
    (root / "search.jsonl").write_text("\n".join(lines[:200]) + "\n")
    (root / "test.jsonl").write_text("\n".join(lines[200:300]) + "\n")
    torch.set_num_threads(threads)
    return {"root": root, "paths": {k: str(v) for k, v in paths.items()}, "target": target,
            "data": str(root / "search.jsonl"), "test_data": str(root / "test.jsonl")}


# -- merge server (tests/test_server_*.py) ----------------------------------------------------------------------
SERVER_RECIPES = {
    # task arithmetic with a large weight: greedy outputs clearly differ from the base's and from each other
    "ta_e1": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: e1\n    parameters: {weight: 20.0}\n",
    "ta_e2": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: e2\n    parameters: {weight: 20.0}\n",
    "ties": ("merge_method: ties\nbase_model: base\nmodels:\n  - model: e1\n    parameters: {weight: 10.0, density: 0.5}\n"
             "  - model: e2\n    parameters: {weight: 10.0, density: 0.5}\n"),
}


@pytest.fixture(scope="session")
def server_sources(tmp_path_factory):
    """{"base", "e1", "e2"} -> folder of a tiny Mistral family, for the merge server's tests."""
    from lazymerge.engine.toy import make_family

    fam = make_family(tmp_path_factory.mktemp("server_family"), "mistral", 2, seed=0)
    return {k: str(v) for k, v in fam.items()}


@pytest.fixture(scope="session")
def server_recipes():
    return dict(SERVER_RECIPES)
