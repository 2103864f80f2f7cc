"""Fused merge-matmul: y = x @ merge(base, sources; spec).T (+ bias), the merged weight never written to memory.

    merge_matmul_triton(x, base, sources, spec, aux=None, bias=None) -> y      # Triton kernel
    merge_matmul_reference(x, base, sources, spec, aux=None, bias=None) -> y   # PyTorch reference, same signature
    merge_matmul(...)                                                          # dispatch (kernels.dispatch)

x: (..., K); base, sources[i], aux[i]: (N, K) (the `nn.Linear` weight layout); bias: (N,); y: (..., N) in x's dtype.
Numerics: the merged weight is rounded to x's dtype (as `F.linear(x, W.to(x.dtype))` would see it), products are
accumulated in float32, the bias is added in float32, the result is rounded to x's dtype once.

Design (decode, small M): reading the n + 1 weight tensors dominates, so each program owns a (BLOCK_N, K / SPLIT_K)
strip of W, merges each (BLOCK_N, BLOCK_K) tile in registers (`merge_triton._merge_tile`, the elementwise merge's
own code) right before `tl.dot`, and writes a float32 partial (BLOCK_M, BLOCK_N) to a split-K workspace; the
partials are summed in a fixed order (deterministic: no atomics; the autotuned launch reads the SPLIT_K it used
from the autotuner's `best_config`, which assumes one launching thread per process). M is padded to
BLOCK_M >= 16 (tl.dot's minimum);
at M <= 16 that waste costs no memory traffic. For large M each M-tile re-merges W: `kernels.linear` switches to
merge-into-buffer + cuBLAS there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from .merge import MergeSpec, merge_reference
from .merge_triton import (
    KEEP_CODES,
    MAX_SOURCES,
    _merge_tile,
    _round_bf16,
    autotuning,
    interpreting,
    pointer_args,
    prepared,
    uses_aux,
)


def merge_matmul_reference(x: torch.Tensor, base: torch.Tensor | None, sources: list[torch.Tensor],
                           spec: MergeSpec, aux: list[torch.Tensor] | None = None,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, merge_reference(...).to(x.dtype), bias), accumulated in float32, returned in x's dtype."""
    w = merge_reference(base, sources, spec, aux=aux).to(x.dtype)  # (N, K)
    y = F.linear(x.float(), w.float(), None if bias is None else bias.float())  # (..., N) float32
    return y.to(x.dtype)


@triton.jit
def _merge_matmul_kernel(
    # pointers: activations, base, sources, aux (DELLA ranks), scalar tables, split-K workspace
    Xin, B, X0, X1, X2, X3, X4, X5, X6, X7, A0, A1, A2, A3, A4, A5, A6, A7, F, I, WS,
    # sizes
    M, N, K,
    # strides (weights and aux are contiguous (N, K); workspace is contiguous (SPLIT_K, M, N))
    stride_xm, stride_xk,
    # scalars of the merge, and the autotune bucket of M
    div, lam, row_width, div_min, m_bucket,
    # meta-parameters: the spec's switches
    N_SOURCES: tl.constexpr, MODE: tl.constexpr, KEEP: tl.constexpr, CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr, DIVIDE: tl.constexpr, ROWS: tl.constexpr, CONSENSUS_RAW: tl.constexpr,
    DIV_FLOOR: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    # meta-parameters: tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m  # M fastest: the M-tiles of one weight strip run together (L2 reuse)
    pid_n = pid // num_pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * per_split
    k_hi = tl.minimum(k_lo + per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_lo, k_hi):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(Xin + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
        w_offs = offs_n[:, None] * K + offs_k[None, :]  # (BLOCK_N, BLOCK_K) int64 flat index into W
        w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = _merge_tile(B, X0, X1, X2, X3, X4, X5, X6, X7, A0, A1, A2, A3, A4, A5, A6, A7,
                        F, I, w_offs, w_offs, w_mask, div, lam, row_width, div_min,
                        N_SOURCES, MODE, KEEP, CONSENSUS, NORMALIZE, DIVIDE, ROWS, CONSENSUS_RAW,
                        DIV_FLOOR)  # (BLOCK_N, BLOCK_K) float32
        if UPCAST_DOT:  # interpreter: its bf16 tl.dot and bf16 cast are broken; float32 dot of the same values
            if x.dtype == tl.bfloat16:
                w = _round_bf16(w)
            else:
                w = w.to(x.dtype).to(tl.float32)
            x = x.to(tl.float32)
        else:
            w = w.to(x.dtype)  # the weight as F.linear would see it
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    ws = WS + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ws, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# -- tile configs, and the shared-memory estimate that keeps them inside the GPU ------------------------------------
# Hopper (H100 / H200) opt-in shared memory per block; other GPUs report theirs (`device_shared_limit`).
H200_SHARED_LIMIT = 232448


def _matmul_configs():
    """Autotune space (tutorial 03 style). Every tile holds <= 8 elements per thread and per loaded tensor
    (BLOCK_N * BLOCK_K <= 8 * 32 * num_warps): the merge keeps up to 8 sources, their DELLA ranks and five float32
    accumulators of the tile in registers; at 16 elements per thread the 8-source DELLA tile spills 1.5-2.4 KB per
    thread, at 64 (the former 64 x 128 tiles on 4 warps) 5-8 KB (ptxas, sm_90: `kernels/aot.py`). Decode
    (BLOCK_M = 16): split-K so that N / BLOCK_N strips x SPLIT_K programs fill the GPU; the weight tiles are
    pipelined through shared memory (num_stages), which `_prune` bounds by `shared_bytes`; the one-stage configs
    use no pipeline buffers and fit any GPU. Prefill (BLOCK_M 64) for callers that fuse at larger M."""
    cfgs = []
    for bn, bk, sk, w, s in ((32, 64, 1, 8, 3), (32, 64, 4, 8, 3), (16, 64, 4, 4, 3), (32, 32, 4, 4, 3),
                             (64, 32, 2, 8, 3), (32, 64, 8, 8, 2), (32, 64, 4, 8, 1), (32, 32, 4, 4, 1)):
        cfgs.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk},
                                  num_warps=w, num_stages=s))
    for bm, bn, bk, w, s in ((64, 64, 32, 8, 3), (64, 32, 64, 8, 3), (64, 64, 32, 8, 1)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1},
                                  num_warps=w, num_stages=s))
    return cfgs


MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in _matmul_configs())


def tile_tensor_bytes(flags: dict, x_bytes: int, w_bytes: int, aux_bytes: int = 4) -> list[int]:
    """Element sizes of the tensors one K-step loads, in `_merge_tile`'s order: x, then base (delta modes), the
    N_SOURCES sources, their DELLA ranks (KEEP == 3). Bytes per element of each."""
    n = flags["N_SOURCES"]
    sizes = [x_bytes] + ([w_bytes] if flags["MODE"] != 0 else []) + [w_bytes] * n
    if flags["MODE"] != 0 and flags["KEEP"] == KEEP_CODES["della"]:
        sizes += [aux_bytes] * n
    return sizes


def shared_bytes(cfg: dict, flags: dict, x_bytes: int, w_bytes: int, aux_bytes: int = 4) -> int:
    """Upper estimate of the shared memory (bytes) of one program of `_merge_matmul_kernel` with tile config `cfg`
    (BLOCK_M, BLOCK_N, BLOCK_K, num_stages) for a spec's constexpr `flags`.

    Triton's software pipeliner keeps num_stages - 1 copies of every tile the K loop loads (x: BLOCK_M x BLOCK_K,
    each weight-shaped tensor: BLOCK_N x BLOCK_K) in shared memory, plus a scratch of the dot operands for the
    layout change, counted at 4 bytes per element (bf16 one-stage tiles use that much). Read off the sm_90
    compiler's reports (triton 3.9 and 3.6); `kernels/aot.check` (tests/test_kernel_compile.py) checks it against
    the compiled binaries (estimate >= actual)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sizes = tile_tensor_bytes(flags, x_bytes, w_bytes, aux_bytes)
    per_stage = bm * bk * sizes[0] + sum(bn * bk * b for b in sizes[1:])
    return max(cfg.get("num_stages", 1) - 1, 0) * per_stage + (bm + bn) * bk * max(x_bytes, 4)


_LIMITS: dict = {}


def device_shared_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of `device` (bytes), from the Triton driver; the H200's off a GPU."""
    if device.type != "cuda":
        return H200_SHARED_LIMIT
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _LIMITS:
        _LIMITS[idx] = triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"]
    return _LIMITS[idx]


def _config_dict(c) -> dict:
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _fits(named_args: dict, kwargs: dict, cfg: dict) -> bool:
    """True when `cfg` fits the shared memory of the GPU holding the launch's tensors."""
    flags = {k: kwargs[k] for k in ("N_SOURCES", "MODE", "KEEP")}
    x, w = named_args["Xin"], named_args["X0"]
    aux_bytes = named_args["A0"].element_size()
    need = shared_bytes(cfg, flags, x.element_size(), w.element_size(), aux_bytes)
    return need <= device_shared_limit(x.device)


def _prune(configs, named_args, **kwargs):
    """Decode configs for M <= 16, prefill configs above; then only the configs whose shared memory fits the
    device (`shared_bytes`). May return an empty list: `merge_matmul_triton` checks before launching."""
    small = named_args["M"] <= 16
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == small]
    return [c for c in kept if _fits(named_args, kwargs, _config_dict(c))]


_merge_matmul_kernel_tuned = triton.autotune(
    configs=_matmul_configs(),
    key=["m_bucket", "N", "K", "N_SOURCES", "MODE", "KEEP", "CONSENSUS", "NORMALIZE", "DIVIDE", "ROWS",
         "CONSENSUS_RAW", "DIV_FLOOR"],
    prune_configs_by={"early_config_prune": _prune},
)(_merge_matmul_kernel)


class NoFittingConfig(RuntimeError):
    """No tile config of the fused kernel fits this GPU's shared memory for this merge (callers fall back to
    merge-into-buffer + matmul: `kernels.linear.merged_linear` does)."""


def _fixed_config(M: int, named_args: dict, flags: dict) -> dict:
    """The config without autotuning (interpreter, LAZYMERGE_AUTOTUNE=0): the first of a short preference list
    that fits the device (deepest pipeline first; the one-stage tile fits any GPU)."""
    if interpreting():
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, num_warps=4)
    if M <= 16:
        prefs = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=4, num_warps=8, num_stages=s) for s in (3, 2, 1)]
    else:
        prefs = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, SPLIT_K=1, num_warps=8, num_stages=s) for s in (3, 2, 1)]
    for cfg in prefs:
        if _fits(named_args, flags, cfg):
            return cfg
    raise NoFittingConfig(f"no fused merge-matmul tile fits {device_shared_limit(named_args['Xin'].device)} bytes "
                          "of shared memory")


def merge_matmul_triton(x: torch.Tensor, base: torch.Tensor | None, sources: list[torch.Tensor],
                        spec: MergeSpec, aux: list[torch.Tensor] | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `merge_matmul_reference`; see the module docstring."""
    n = len(sources)
    if not 1 <= n <= MAX_SOURCES:
        raise ValueError(f"merge_matmul_triton takes 1..{MAX_SOURCES} sources, got {n}")
    if spec.n != n:
        raise ValueError(f"spec describes {spec.n} sources, got {n}")
    if sources[0].dim() != 2:
        raise ValueError("weights must be 2-D (N, K)")
    N, K = sources[0].shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {K}")
    if spec.mode == "delta" and base is None:
        raise ValueError("delta merges need a base")
    if N * K >= 2**32:
        raise ValueError("weights of 2**32 elements or more are not supported")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    flags, (ftab, itab, div, lam) = prepared(spec, x.device)
    b, xs, a = pointer_args(base, sources, aux if uses_aux(flags) else None)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    m_bucket = 1 if M <= 1 else (16 if M <= 16 else min(triton.next_power_of_2(M), 4096))
    args = (x2, b, *xs, *a, ftab, itab)
    named = dict(zip(("Xin", "B", *(f"X{i}" for i in range(MAX_SOURCES)), *(f"A{i}" for i in range(MAX_SOURCES))),
                     args))
    named["M"] = M
    if autotuning():
        if not _prune(_merge_matmul_kernel_tuned.configs, named, **flags):
            raise NoFittingConfig(f"no fused merge-matmul tile fits {device_shared_limit(x.device)} bytes of "
                                  "shared memory")
        ws = torch.empty((MAX_SPLIT_K, M, N), dtype=torch.float32, device=x.device)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),  # noqa: E731
                             meta["SPLIT_K"])
        kernel, cfg = _merge_matmul_kernel_tuned, {}
    else:
        cfg = _fixed_config(M, named, flags)
        ws = torch.empty((cfg["SPLIT_K"], M, N), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        kernel = _merge_matmul_kernel
    kernel[grid](*args, ws, M, N, K, x2.stride(0), x2.stride(1), div, lam, spec.row_width,
                 float(spec.div_min), m_bucket,
                 **flags, DOT_PRECISION=precision, UPCAST_DOT=interpreting(), enable_fp_fusion=False, **cfg)
    if autotuning():  # the launch just made used best_config; its slices [0, SPLIT_K) are all written
        split = _merge_matmul_kernel_tuned.best_config.kwargs["SPLIT_K"]
    else:
        split = cfg["SPLIT_K"]
    y = ws[0] if split == 1 else ws[:split].sum(0)  # (M, N) float32, fixed summation order
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, N)


def merge_matmul(x, base, sources, spec, aux=None, bias=None):
    """Dispatch: the fused Triton kernel where `dispatch.use_triton(x)`, else the reference."""
    if dispatch.use_triton(x):
        return merge_matmul_triton(x, base, sources, spec, aux=aux, bias=bias)
    return merge_matmul_reference(x, base, sources, spec, aux=aux, bias=bias)
