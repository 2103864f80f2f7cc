"""This machine as a benchmark records it: CPU model, the ATen kernel set, usable CPUs, torch and Python versions.

The sessions that measured BENCHMARKS.md ran on two 2-core machines that `platform.processor()` (empty on Linux) and
`os.cpu_count()` do not tell apart: an AMD EPYC with AVX2 and one with AVX-512, whose ATen kernels sum in different
orders and run at different speeds. A benchmark's header and JSON name both, from here.
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

from .threads import available_cpus


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (/proc/cpuinfo's "model name"; `platform.processor()` or the architecture elsewhere)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """{"cpu", "cpu_kernels" (ATen's set: "AVX512", "AVX2", "DEFAULT", ...), "cpus" (this process's affinity
    mask), "torch", "python", "platform", "date" (ISO)}. Imports torch."""
    import torch

    return {"cpu": cpu_model(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "cpus": available_cpus(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.date.today().isoformat()}


def line(info: dict | None = None) -> str:
    """One line for a table's header: "AMD EPYC (AVX512 kernels), 2 CPUs, torch 2.13.0+cpu, 2026-12-01"."""
    info = info or describe()
    return f"{info['cpu']} ({info['cpu_kernels']} kernels), {info['cpus']} CPUs, torch {info['torch']}, {info['date']}"
