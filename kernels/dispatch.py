"""Backend choice: CUDA tensors run the Triton kernels, CPU tensors the PyTorch references.

`LAZYMERGE_FORCE_REFERENCE=1` (or `force_reference(True)`) forces the PyTorch reference on the GPU too, for
debugging. `LAZYMERGE_TRITON_ON_CPU=1` runs the Triton kernels on CPU tensors (with TRITON_INTERPRET=1; tests).
"""

from __future__ import annotations

import os

_FORCE_REFERENCE = os.environ.get("LAZYMERGE_FORCE_REFERENCE", "") == "1"


def force_reference(on: bool) -> None:
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = on


def use_triton(t) -> bool:
    if _FORCE_REFERENCE:
        return False
    if t.is_cuda:
        return True
    return os.environ.get("LAZYMERGE_TRITON_ON_CPU", "") == "1"
