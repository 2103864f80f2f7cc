"""Thread defaults fit the CPUs this process may use and never oversubscribe them."""

from __future__ import annotations

import os

import pytest

from lazymerge.engine import threads


def test_defaults_come_from_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("LAZYMERGE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert threads.available_cpus() == 3
    assert threads.default_threads() == 3
    monkeypatch.setenv("LAZYMERGE_THREADS", "2")
    assert threads.default_threads() == 2
    monkeypatch.setenv("LAZYMERGE_THREADS", "zero")
    with pytest.raises(ValueError, match="LAZYMERGE_THREADS"):
        threads.default_threads()


def test_workers_times_threads_never_exceed_the_cpus(monkeypatch):
    monkeypatch.delenv("LAZYMERGE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.per_worker(1) == 8
    assert threads.per_worker(3) == 2
    assert threads.per_worker(16) == 1  # more workers than CPUs: one thread each
    assert threads.per_worker(2, 4) == 4  # an explicit count that fits is kept
    with pytest.warns(UserWarning, match="exceed"):
        assert threads.per_worker(4, 4) == 2


def test_configure_sets_torch_threads():
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.configure(1) == 1 and torch.get_num_threads() == 1
        assert threads.configured() == 1
        with pytest.raises(ValueError):
            threads.configure(0)
    finally:
        torch.set_num_threads(before)


def test_openmp_threads_sleep_when_idle():
    """lazymerge sets OMP_WAIT_POLICY=PASSIVE (before torch loads) unless the environment chose otherwise."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", "import lazymerge, os; print(os.environ['OMP_WAIT_POLICY'])"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "PASSIVE"
