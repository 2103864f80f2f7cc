"""Counter-based random numbers for DARE and DELLA masks: a pure function of (seed, tensor, source, element).

    key1, key2 = mask_keys(seed, tensor_name, source_index)      # host, Python ints (uint32)
    u[j]       = (mix32(mix32(j ^ key1) ^ key2) >> 8) * 2**-24   # float32 in [0, 1), exact
    kept[j]    = u[j] < p                                         # p: density (DARE) or per-element (DELLA)

`mix32` is a 32-bit integer finalizer (xorshift-multiply, two rounds) that needs only 32-bit wrap-around
multiplication, xor and logical shifts, so a Triton kernel reproduces it bit for bit (`uniform_tl`). The element
index j is the flat index in the whole tensor (< 2**32). Same recipe, same mask: every run, every backend, any
order of evaluation.
"""

from __future__ import annotations

import zlib

import torch

M32 = 0xFFFFFFFF
C1 = 0x21F0AAAD
C2 = 0x735A2D97
SCALE24 = 2.0**-24
MAX_INDEX = 2**32


def mix32_int(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * C1) & M32
    x ^= x >> 15
    x = (x * C2) & M32
    x ^= x >> 15
    return x


def mask_keys(seed: int, tensor_name: str, source_index: int) -> tuple[int, int]:
    """The two uint32 keys of the mask of source `source_index` (0-based, base excluded) on `tensor_name`."""
    base = mix32_int(zlib.crc32(tensor_name.encode()) ^ mix32_int(seed & M32) ^ ((seed >> 32) & M32))
    k1 = mix32_int(base ^ (((source_index + 1) * 0x85EBCA6B) & M32))
    k2 = mix32_int(k1 ^ 0xC2B2AE35)
    return k1, k2


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # x: int64 holding uint32 values; every product stays below 2**63, so no overflow.
    x = x ^ (x >> 16)
    x = (x * C1) & M32
    x = x ^ (x >> 15)
    x = (x * C2) & M32
    x = x ^ (x >> 15)
    return x


def uniform(index: torch.Tensor, keys: tuple[int, int]) -> torch.Tensor:
    """float32 uniforms in [0, 1) for flat element indices `index` (int64, any shape) under `keys`."""
    h = _mix32(_mix32(index ^ keys[0]) ^ keys[1])
    return (h >> 8).to(torch.float32) * SCALE24


def sample_indices(keys: tuple[int, int], count: int, numel: int) -> torch.Tensor:
    """`count` flat indices drawn uniformly from [0, numel) with replacement (int64, CPU), a pure function of
    `keys`: index s of the sample is (h(s) * numel) >> 32 with h the 32-bit hash of s under `keys`."""
    s = torch.arange(count, dtype=torch.int64)
    h = _mix32(_mix32(s ^ keys[0]) ^ keys[1])
    return (h * numel) >> 32


try:  # the Triton twin; optional so the CPU path imports without Triton
    import triton
    import triton.language as tl

    @triton.jit
    def _mix32_tl(x):
        x = x ^ (x >> 16)
        x = x * 0x21F0AAAD
        x = x ^ (x >> 15)
        x = x * 0x735A2D97
        x = x ^ (x >> 15)
        return x

    @triton.jit
    def uniform_tl(index, key1, key2):
        """`index`: uint32 block of flat indices; `key1`, `key2`: uint32 scalars. float32 in [0, 1)."""
        h = _mix32_tl(_mix32_tl(index ^ key1) ^ key2)
        return (h >> 8).to(tl.float32) * 5.9604644775390625e-08

except ImportError:  # pragma: no cover
    triton = None
