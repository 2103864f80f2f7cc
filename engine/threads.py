"""How many CPU threads lazymerge uses: the CPUs this process may run on, never more, unless set explicitly.

    available_cpus() -> int            len(os.sched_getaffinity(0)): the CPUs the OS lets this process use
    default_threads() -> int           $LAZYMERGE_THREADS if set, else available_cpus()
    configure(threads=None) -> int     torch intra-op threads := threads or default_threads(); inter-op := 1
    per_worker(workers, threads=None)  threads per worker process so that workers x threads <= available_cpus()

Two processes on a shared machine must not spin against each other: an OpenMP thread that finishes its share of a
parallel region busy-waits for the next one (OMP_WAIT_POLICY=ACTIVE-like spinning, libgomp's default spin count),
stealing the core from the other process's threads. `lazymerge/__init__.py` therefore sets OMP_WAIT_POLICY=PASSIVE
(idle threads sleep) before torch is imported, unless the environment already sets it; measured on the 2-core
machine under load, a 2-thread elementwise op ran ~200x slower with spinning threads than with passive ones (see
BENCHMARKS.md). The setting only takes effect if lazymerge is imported before torch (the CLI always is).
"""

from __future__ import annotations

import os
import warnings


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask; os.cpu_count() where the OS has no affinity call)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """$LAZYMERGE_THREADS (a positive integer) if set, else `available_cpus()`. Raises ValueError on a bad value."""
    env = os.environ.get("LAZYMERGE_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"LAZYMERGE_THREADS={env!r}: must be a positive integer")
        return n
    return available_cpus()


_CONFIGURED: int | None = None


def configured() -> int | None:
    """The thread count `configure` set in this process (None: never called)."""
    return _CONFIGURED


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads` (or `default_threads()`) and inter-op threads to 1 (where torch
    still allows it); returns the intra-op count. Raises ValueError if threads < 1."""
    import torch

    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads: must be >= 1, got {threads}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already started: keep it
        pass
    global _CONFIGURED
    _CONFIGURED = n
    return n


def per_worker(workers: int, threads: int | None = None) -> int:
    """Threads per worker process for `workers` workers: `threads` if given and workers x threads fits the CPUs,
    else the CPUs divided among the workers (at least 1; a warning if an explicit count had to be lowered)."""
    cpus = default_threads()
    fit = max(1, cpus // max(1, workers))
    if threads is None:
        return fit
    if workers * threads > cpus and threads > fit:
        warnings.warn(f"{workers} workers x {threads} threads exceed the {cpus} CPUs available: "
                      f"using {fit} thread(s) per worker", stacklevel=2)
        return fit
    return threads
