"""glibc's allocator, kept from handing every transient weight back to the OS (CPU merging inside the forward pass),
or told to hand freed weights back at once (`release`, a search's candidate change).

A merge on the CPU allocates and frees tensors of several MB per layer on every forward: the source tensors read
with `pread` (engine/reader.py) and the merged weight. glibc serves such sizes with a fresh `mmap` (its dynamic
mmap threshold starts at 128 KiB) or trims them off the heap top when freed, so every forward pays the kernel for
zeroed pages again: one page fault per 4 KiB of every read and every merged weight. Measured (BENCHMARKS.md, issue
15): an on-the-fly 1-token forward of an 8-layer, hidden-1024 TIES merge spent 60% of its time in those faults
(`preadv` into fresh pages, the merge kernel's first writes).

`tune()` (called by an `Engine` of the on-the-fly policy on the CPU; a cached engine keeps its merged weights and
gains nothing from it but a higher peak) sets, once per process, glibc's `M_MMAP_THRESHOLD` to 32 MiB (glibc's upper
bound for it, HEAP_MAX_SIZE/2 on 64-bit) and `M_TRIM_THRESHOLD` to 256 MiB, with `mallopt(3)`: blocks up to 32 MiB
come from the heap and a freed block is reused by the next forward instead of being returned and faulted in again;
at most 256 MiB of free heap top is kept before trimming. Tensors above 32 MiB (an LM head of a 32k vocabulary) are
still mapped per use. The cost is free heap the process keeps (the trim threshold, plus fragmentation): on a cached
search engine with resident sources it raised a 267M DELLA candidate's peak RSS by ~0.4 GiB (BENCHMARKS.md).

Not on other C libraries (musl, macOS: `mallopt` absent, nothing done), and not when the environment already tunes
glibc (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`) or sets `LAZYMERGE_MALLOC_TUNE=0`.

`release()` is the other direction: `malloc_trim(0)`, which returns the pages of every free heap chunk to the OS
(not only the heap's top). A search frees its previous candidate's merged weights all at once
(`WeightProvider.retain`) and calls it: glibc serves weights below its dynamic mmap threshold from the heap, and
small allocations made between them keep the freed blocks from being reused whole, so without it the heap's free
part grew by ~0.5 GiB per candidate in some runs (267M task arithmetic: peak RSS 3.5 -> 5.3 GiB over 7 candidates;
BENCHMARKS.md, session 13). The next candidate then faults its pages in again, as a fresh `mmap` would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_state: bool | None = None  # None: not tried yet; else whether the thresholds were set
_trim = None  # glibc's malloc_trim, once looked up (False: not available)


def _libc():
    """glibc's handle, or None on another C library (other libcs' mallopt mean other things)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def release() -> bool:
    """Return the pages of glibc's free heap chunks to the OS (`malloc_trim(0)`); False where there is no glibc."""
    global _trim
    if _trim is None:
        libc = _libc()
        _trim = getattr(libc, "malloc_trim", None) or False
        if _trim:
            _trim.argtypes, _trim.restype = (ctypes.c_size_t,), ctypes.c_int
    if not _trim:
        return False
    _trim(0)
    return True


def tune() -> bool:
    """Set the two thresholds once per process (see the module text); True if they are set now."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if os.environ.get("LAZYMERGE_MALLOC_TUNE", "1") == "0" or any(k in os.environ for k in _ENV):
        return _state
    libc = _libc()
    if libc is None:
        return _state
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _state = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _state
