"""engine/host.py: what a benchmark records of the machine (the CPU model and ATen's kernel set tell apart the two
2-core machines BENCHMARKS.md was measured on)."""

from __future__ import annotations

import torch

from lazymerge.engine import host


def test_cpu_model_reads_the_model_name(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2\n")
    assert host.cpu_model(f) == "AMD EPYC 9B14"
    assert host.cpu_model(tmp_path / "missing") != ""  # no /proc: platform's name for it


def test_describe_names_the_kernel_set_and_usable_cpus():
    info = host.describe()
    assert info["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpus"] >= 1 and info["torch"] == torch.__version__
    text = host.line(info)
    assert text.startswith(f"{info['cpu']} ({info['cpu_kernels']} kernels), {info['cpus']} CPUs") and info["date"] in text
