"""A merged linear layer's forward: pick the fused merge-matmul or merge-into-buffer + matmul by token count.

    merged_linear(x, base, sources, spec, aux=None, bias=None, out_buffer=None) -> y = x @ merge(...).T (+ bias)

x: (..., K); base, sources[i], aux[i]: (N, K); y: (..., N) in x's dtype, the merged weight rounded to x's dtype
(`merge_matmul.merge_matmul_reference` is the oracle of both paths).

* M (tokens) <= FUSED_MAX_TOKENS, on the Triton backend: `merge_matmul_triton`; the weights are streamed once and
  the merged tile lives only in registers (decode: time = reading the n + 1 weights).
* a merge for which no fused tile fits the GPU's shared memory (`merge_matmul.NoFittingConfig`: e.g. float32 with
  many sources on a GPU with less than Hopper's 227 KiB) takes the buffer path below at any M; so does a launch the
  GPU refuses (triton's OutOfResources, raised before anything runs), with a warning.
* otherwise: `merge.merge` writes the merged weight in x's dtype into `out_buffer` (an (N, K) tensor reused across
  layers of one shape; allocated if None), then one cuBLAS matmul (prefill: the merge is amortized over M rows).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from . import dispatch
from .merge import MergeSpec, merge
from .merge_matmul import NoFittingConfig, merge_matmul_reference, merge_matmul_triton

# Crossover token count between the two paths, set from a GPU measurement (`bash kernels/gpu_check.sh crossover`,
# BENCHMARKS.md "GPU, first run"): on an H200 (torch 2.11, triton 3.6, 2026-11-30) the fused kernel was slower than
# merge-into-buffer + cuBLAS at every M measured (1..64) for TIES and DARE-TIES on all three 7B layer shapes
# (fused / buffer 1.01-1.30 at M <= 16, 1.21-1.76 above), and for a linear merge at M = 1 its eager call costs
# more (187 vs 88 us + the GEMV: the host's launch cost; graphed, fused wins for linear, 31 vs 32 + 18 us). So 0: the
# buffer path at every token count; the fused path stays for callers that ask for it (`merge_matmul_triton`).
FUSED_MAX_TOKENS = 0


def use_fused(x: torch.Tensor) -> bool:
    """True when `merged_linear` takes the fused path for this input."""
    m = x.numel() // max(x.shape[-1], 1)
    return m <= FUSED_MAX_TOKENS and dispatch.use_triton(x)


def merged_linear(x: torch.Tensor, base: torch.Tensor | None, sources: list[torch.Tensor], spec: MergeSpec,
                  aux: list[torch.Tensor] | None = None, bias: torch.Tensor | None = None,
                  out_buffer: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ merge(base, sources; spec).T (+ bias), by the cheaper path for x's token count."""
    if use_fused(x):
        try:
            return merge_matmul_triton(x, base, sources, spec, aux=aux, bias=bias)
        except NoFittingConfig:
            pass  # nothing launched: the buffer path below
        except OutOfResources as e:  # the estimate missed (another Triton's layout): refused at launch, not run
            warnings.warn(f"fused merge-matmul refused by the GPU ({e}); merging into a buffer instead", stacklevel=2)
    if not dispatch.use_triton(x):
        return merge_matmul_reference(x, base, sources, spec, aux=aux, bias=bias)
    shape = sources[0].shape  # (N, K)
    if out_buffer is None or out_buffer.dtype != x.dtype or out_buffer.shape != shape:
        out_buffer = torch.empty(shape, dtype=x.dtype, device=x.device)
    w = merge(base, sources, spec, aux=aux, out=out_buffer)  # (N, K) in x's dtype, one pass
    if x.dtype == torch.float32:
        return F.linear(x, w, bias)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
