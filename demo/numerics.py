"""The demo's floating-point paths, pinned so that a zoo (and a search over it) gives the same bits on x86 CPUs of
different vector widths.

ATen chooses its vectorized CPU kernels by the CPU (AVX2 or AVX-512 builds of the same kernel); their reductions
(softmax and norm sums, the optimizer's updates) accumulate in lanes of the vector's width, so the last bits differ
between the two, and 1500 training steps amplify the difference into another model. Measured on 2026-12-01: seed 0's
zoo trained by `make demo` on a 2-core AVX-512 AMD EPYC had content `bf089cd15cf0e5a2`, not the `9256948661ffcd74` of
the AVX2 EPYC behind the README's table, and the claim failed there (+8.8 points over the best source). With ATen
pinned to its AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`) the AVX-512 machine trained `9256948661ffcd74` bit for bit
and printed the AVX2 machines' table row for row, at no measurable cost (zoo 324 s against 329 s unpinned;
BENCHMARKS.md, session 14). torch reads the variable once, at its first kernel dispatch, so it is set
before torch is imported; child processes (search workers) inherit it.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

VAR = "ATEN_CPU_CAPABILITY"
PINNED = "avx2"


def _flags(cpuinfo: Path) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where the file is missing (e.g. macOS), so that
    nothing is pinned there."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _torch_imported() -> bool:
    """Whether torch is imported in this process (then the variable would no longer take effect)."""
    return "torch" in sys.modules


def machine_default(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The kernel set torch picks on this CPU when nothing is pinned, as `cpu_kernels` names it: "AVX512" where the
    CPU has AVX-512 F/BW/VL/DQ (what ATen's AVX-512 kernels need), "AVX2" with AVX2 and FMA, else "DEFAULT". What a
    zoo whose manifest predates the `cpu_kernels` field was trained with."""
    flags = _flags(cpuinfo)
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "AVX512"
    return "AVX2" if {"avx2", "fma"} <= flags else "DEFAULT"


def pin_cpu_kernels(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """Pin ATen's CPU kernels to their AVX2 versions for this process and its children: sets `ATEN_CPU_CAPABILITY`
    to "avx2" on an x86-64 CPU with AVX2 and FMA, if torch is not imported yet and the environment does not set it.

    Returns the capability in force by the environment ("avx2", or the user's own value, which is kept), or None when
    nothing is pinned (torch already imported: too late to take effect; another architecture; no AVX2)."""
    if VAR in os.environ:
        return os.environ[VAR]
    if _torch_imported() or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if not {"avx2", "fma"} <= _flags(cpuinfo):
        return None
    os.environ[VAR] = PINNED
    return PINNED


def cpu_kernels() -> str:
    """The ATen kernel set this process runs ("AVX2", "AVX512", "DEFAULT", ...), as torch reports it."""
    import torch

    return torch.backends.cpu.get_cpu_capability()
