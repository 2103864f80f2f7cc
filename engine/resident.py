"""How many bytes of source tensors an engine on the CPU keeps in memory (`TensorStore`'s resident copies).

Under the on-the-fly policy every forward pass merges every weight from its sources. Reading the sources with `pread`
at every use (engine/reader.py) costs a copy per tensor per forward; measured (BENCHMARKS.md, issue 15) that copy was
half of a 1-token forward on the CPU (11.4x a plain model with pread copies, 5.9x reading mapped pages). Source tensors
that stay resident after their first read cost that copy once, and nothing is memory-mapped: a file changed under
the process is still refused at the next forward (`Engine.check_sources`), never a SIGBUS.

`default_limit(policy, device)`: on the CPU under `on_the_fly`, half of the memory the system has available when the
engine starts (`MemAvailable`); the sources that fit stay resident, the rest are read at each use as before. Peak RSS
then grows by at most the sources' bytes (issue 15's memory goal: sources + merged-cache budget + 1 GiB). 0 (nothing
resident) under `cached` (merged weights are cached instead), with LAZYMERGE_UNSAFE_MMAP=1 (mapped views already cost
no copy), and where the available memory cannot be read. A GPU keeps every source resident (not this module).
"""

from __future__ import annotations

from .reader import unsafe_mmap

SHARE = 0.5  # of MemAvailable at engine start


def available_memory() -> int | None:
    """Bytes the system can give without swapping (`MemAvailable` of /proc/meminfo; None where it is not known)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_limit(policy: str, device: str) -> int:
    """Resident source bytes for an engine of `policy` on `device` (see the module's text)."""
    if device != "cpu" or policy != "on_the_fly" or unsafe_mmap():
        return 0
    avail = available_memory()
    return int(SHARE * avail) if avail else 0
