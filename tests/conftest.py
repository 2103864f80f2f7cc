"""Shared fixtures: tiny checkpoint families built locally once per test session (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
