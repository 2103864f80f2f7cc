"""The demo pins ATen's CPU kernels (demo/numerics.py) so that a zoo trains to the same bits on AVX2 and AVX-512 CPUs;
the zoo records the kernel set it was trained with and is rebuilt under another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazymerge.demo import numerics

PROBE = ("from lazymerge.demo.numerics import pin_cpu_kernels\n"
         "got = pin_cpu_kernels()\n"
         "import torch\n"
         "print(got, torch.backends.cpu.get_cpu_capability())")


def _run(env_extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != numerics.VAR}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_fresh_process_runs_the_avx2_kernels_where_the_cpu_has_them():
    got = _run({})
    if {"avx2", "fma"} <= numerics._flags(Path("/proc/cpuinfo")):
        assert got == ["avx2", "AVX2"]
    else:  # nothing pinned: torch's own choice
        assert got[0] == "None"


def test_the_users_own_setting_is_kept():
    assert _run({numerics.VAR: "default"}) == ["default", "DEFAULT"]


def test_nothing_is_pinned_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401 - imported: too late for the variable to take effect

    monkeypatch.delenv(numerics.VAR, raising=False)
    assert numerics.pin_cpu_kernels() is None
    assert numerics.VAR not in os.environ


@pytest.mark.parametrize("flags,default,pinned", [
    ("fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512dq", "AVX512", "avx2"),
    ("fpu sse2 avx avx2 fma", "AVX2", "avx2"),
    ("fpu sse2 avx avx2", "DEFAULT", None),  # no FMA: ATen's AVX2 kernels need it
    ("fpu sse2 sse4_2", "DEFAULT", None),
])
def test_the_cpu_flags_decide(tmp_path, monkeypatch, flags, default, pinned):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\n")
    assert numerics.machine_default(info) == default
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what the pin sets stays in this test (not the suite's env)
    monkeypatch.delenv(numerics.VAR, raising=False)
    monkeypatch.setattr(numerics, "_torch_imported", lambda: False)  # as in a fresh process
    monkeypatch.setattr(numerics.platform, "machine", lambda: "x86_64")
    assert numerics.pin_cpu_kernels(info) == pinned
    assert os.environ.get(numerics.VAR) == pinned
    monkeypatch.delenv(numerics.VAR, raising=False)
    assert numerics.machine_default(tmp_path / "missing") == "DEFAULT"


def test_a_zoo_trained_with_other_kernels_is_rebuilt(tmp_path):
    from lazymerge.demo.zoo import build_zoo

    out = build_zoo(tmp_path / "z", seed=3, size="small")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cpu_kernels"] == numerics.cpu_kernels()
    stamp = (out / "base" / "model.safetensors").stat().st_mtime_ns
    build_zoo(tmp_path / "z", seed=3, size="small")  # same kernels: reused
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    del manifest["cpu_kernels"]  # a zoo from before the field: taken as trained with this machine's default
    (out / "manifest.json").write_text(json.dumps(manifest))
    build_zoo(tmp_path / "z", seed=3, size="small")
    reused = numerics.machine_default() == numerics.cpu_kernels()
    assert ((out / "base" / "model.safetensors").stat().st_mtime_ns == stamp) == reused
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["cpu_kernels"] = "SOMETHING_ELSE"
    (out / "manifest.json").write_text(json.dumps(manifest))
    build_zoo(tmp_path / "z", seed=3, size="small")
    again = json.loads((out / "manifest.json").read_text())
    assert again["cpu_kernels"] == numerics.cpu_kernels() and again["content_hash"] == manifest["content_hash"]
