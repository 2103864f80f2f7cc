"""The engine on CUDA (Triton merge kernel, fused merge-matmul) against the CPU reference path, end to end.
Skipped without CUDA. The engine validates recipes with pydantic, which the GPU image lacks: `kernels/gpu_check.sh`
installs it from carried wheels (`kernels/gpu_wheels.sh`); without them these tests skip and say so."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest.importorskip("pydantic", reason="the engine's recipe schema needs pydantic: carry .whl (kernels/gpu_wheels.sh)")

RECIPES = {
    "ties": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "e1", "parameters": {"weight": 0.8, "density": 0.5}}, {"model": "e2", "parameters": {"weight": 0.5, "density": 0.3}}]},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base", "random_seed": 1, "models": [
        {"model": "e1", "parameters": {"weight": 0.8, "density": 0.5}}, {"model": "e2", "parameters": {"weight": 0.5, "density": 0.6}}]},
    "della": {"merge_method": "della", "base_model": "base", "random_seed": 3, "models": [
        {"model": "e1", "parameters": {"weight": 0.7, "density": 0.5}}, {"model": "e2", "parameters": {"weight": 0.6, "density": 0.4}}]},
    "slerp": {"merge_method": "slerp", "base_model": "e1", "parameters": {"t": 0.4}, "models": [{"model": "e1"}, {"model": "e2"}]},
}


@pytest.mark.parametrize("policy", ["on_the_fly", "cached"])
@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("T", [1, 40])  # fused merge-matmul (few tokens) and merge-to-buffer
def test_cuda_logits_match_cpu_reference(fam, name, policy, T):
    from lazymerge.engine import Engine

    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    cpu = Engine(fam, policy=policy).compile(RECIPES[name])
    gpu = Engine(fam, policy=policy, device="cuda", dtype="float32").compile(RECIPES[name])
    ids = torch.randint(4, 60, (2, T))
    want = cpu.logits(ids)
    got = gpu.logits(ids).cpu()
    # identical merged weights (the kernels match the reference bit for bit); the rest is cuBLAS vs CPU float32
    assert (got - want).abs().max().item() < 2e-4
    assert gpu.generate(["the cat sees"], max_tokens=6)[0].token_ids == cpu.generate(["the cat sees"], max_tokens=6)[0].token_ids
