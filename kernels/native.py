"""C helpers compiled once per machine by the system's C compiler, loaded with ctypes, run on this process's threads.

    load(name, source, flags)      -> ctypes.CDLL  (built into the cache first when missing or not whole)
    isa_flags()                    -> the compiler flags of the vector instructions ATen itself uses here
    run_parts(fn, count, threads)  -> [fn(lo, hi) for each of `threads` parts of range(count)], in parallel

A library lives at `kernels.cache.root()/native/{name}-{machine}-{hash}.so`, the hash being that of the source and
the flags, so a changed source or another instruction set is a new file. It is compiled beside its final name and
renamed into place, so concurrent builders never load half a file, and its SHA-1 is recorded beside it: a file that
does not match (truncated by a full disk or a killed copy) is rebuilt, never loaded. The compiler is $CC (with any
arguments it carries), else cc / gcc / clang.
ctypes releases the GIL for the call, so the parts of `run_parts` run on as many cores as the process's torch threads.
Used by kernels/rank_cpu.py (DELLA's row ranks) and kernels/merge_native.py (the delta merge loop).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .cache import root as cache_root

_LOCK = threading.Lock()
_POOL: dict = {}  # "pool": (ThreadPoolExecutor, its size, the pid that made it)

# x86-64 flags per ATen CPU capability (torch.backends.cpu.get_cpu_capability(): what ATen checked this CPU has;
# F16C comes with every AVX2 CPU). Elsewhere, and for ATen's "DEFAULT", the compiler's baseline.
_ISA = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
}


def isa_flags() -> tuple[str, ...]:
    """The vector instruction set flags for this CPU, from ATen's own capability check (never -march=native, so a
    cache shared by two CPUs of the same capability holds code both run)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ()
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return ()
    return _ISA.get(str(cap).upper(), ())


def compiler() -> list[str] | None:
    """The compiler command: $CC (a name on PATH or a path, with any arguments it carries), else the first of cc, gcc,
    clang on PATH; None if there is none."""
    cc = os.environ.get("CC")
    if cc:
        words = shlex.split(cc)
        if not words:
            return None
        found = shutil.which(words[0]) or (words[0] if os.path.isfile(words[0]) else None)
        return [found, *words[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def library_path(name: str, source: str, flags: tuple[str, ...]) -> Path:
    """Where the library of `source` compiled with `flags` lives in the cache (named by their hash)."""
    tag = hashlib.sha1((source + " ".join(flags)).encode()).hexdigest()[:12]
    return cache_root() / "native" / f"{name}-{platform.machine()}-{tag}.so"


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha1")


def intact(path: Path) -> bool:
    """Whether `path` is the whole library its build wrote: its SHA-1 is the one recorded beside it. A truncated or
    foreign file is not loaded (loading a half-written ELF can kill the process with SIGBUS)."""
    try:
        return _sidecar(path).read_text().strip() == _digest(path)
    except OSError:
        return False


def build(path: Path, source: str, flags: tuple[str, ...]) -> None:
    """Compile `source` into the shared library `path` and record its SHA-1 beside it (both written under temporary
    names and renamed into place). Raises OSError (no compiler, an unwritable cache) or subprocess.CalledProcessError
    (the compiler's message in `stderr`)."""
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found ($CC, cc, gcc, clang)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    src, sha = tmp.with_name(tmp.name + ".c"), tmp.with_name(tmp.name + ".sha1")
    src.write_text(source)
    try:
        subprocess.run([*cc, *flags, "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True, capture_output=True,
                       text=True, timeout=120)
        sha.write_text(_digest(tmp) + "\n")
        os.replace(tmp, path)
        os.replace(sha, _sidecar(path))
    finally:
        for f in (src, tmp, sha):
            f.unlink(missing_ok=True)


def load(name: str, source: str, flags: tuple[str, ...], may_build: bool = True) -> ctypes.CDLL | None:
    """The library of `source` compiled with `flags`, built first if the cache lacks it whole (`intact`); None if it
    is not there whole and `may_build` is False. Raises as `build`, or OSError when the file cannot be loaded."""
    path = library_path(name, source, flags)
    if not intact(path):
        if not may_build:
            return None
        build(path, source, flags)
    return ctypes.CDLL(str(path))


def pool(n: int) -> ThreadPoolExecutor:
    """One shared pool of `n` worker threads (rebuilt when n changes, and in a forked child: the parent's threads do
    not exist there, and work handed to them would never run)."""
    pid = os.getpid()
    got = _POOL.get("pool")
    if got is None or got[1:] != (n, pid):
        with _LOCK:
            got = _POOL.get("pool")
            if got is None or got[1:] != (n, pid):
                got = _POOL["pool"] = (ThreadPoolExecutor(n, thread_name_prefix="lazymerge-native"), n, pid)
    return got[0]


def run_parts(fn, count: int, threads: int, align: int = 1) -> list:
    """fn(lo, hi) over `threads` consecutive parts of range(count) (bounds multiples of `align`), the first on the
    calling thread and the others on the shared pool; their results in order."""
    threads = max(1, min(threads, count // max(align, 1)))
    if threads == 1:
        return [fn(0, count)]
    bounds = [min(count, (count * k // threads) // align * align) for k in range(threads)] + [count]
    futures = [pool(threads - 1).submit(fn, bounds[k], bounds[k + 1]) for k in range(1, threads)]
    first = fn(bounds[0], bounds[1])
    return [first] + [f.result() for f in futures]
