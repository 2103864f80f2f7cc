"""Reading source tensors from files that may change under a running process.

The contract (README, "Sources that change on disk"): a source *is* the content its files had when it was opened —
its fingerprint names that content (size, mtime_ns, inode of every weights file, plus the config). lazymerge keeps
one descriptor per weights file, open from the moment its header is read, and reads tensors with `os.preadv` into
fresh buffers; nothing is memory-mapped, so a file truncated under the process gives a short read, never a SIGBUS.
Each file's identity (size, mtime_ns, ctime_ns, inode, device) is compared with the one recorded at open:

* by `check()`: the descriptor (`fstat`: truncated or overwritten in place) and the path (`stat`: replaced by a
  rename, or deleted), at the start of every forward pass and before every read;
* after every read, by `fstat` again, so a read that raced with a writer is discarded.

The first difference marks the file changed for good and raises `SourceChanged`; the engine then drops every
cached merged weight and statistic (`engine/api.py`), so nothing computed from the old content outlives it. The
source stays refused until the process opens it again (a restart): its fingerprint, its cached plans and every
compiled recipe that uses it name the old content.

`LAZYMERGE_UNSAFE_MMAP=1` restores zero-copy memory-mapped views (for benchmarks, or files known never to change
while the process runs): a file truncated under such a mapping kills the process with SIGBUS.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch


def unsafe_mmap() -> bool:
    return os.environ.get("LAZYMERGE_UNSAFE_MMAP", "") not in ("", "0")


class SourceChanged(OSError):
    """A source's weights file no longer holds the content the source was opened with. `file` is the file's name
    inside the checkpoint folder (never a full path); the caller names the source."""

    def __init__(self, file: str, what: str):
        super().__init__(f"{file} {what}")
        self.file = file
        self.what = what


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _describe(old: tuple, new: tuple | None) -> str:
    if new is None:
        return "was deleted or moved"
    if new[3:] != old[3:]:
        return "was replaced by another file"
    if new[0] != old[0]:
        return f"changed size ({old[0]} -> {new[0]} bytes)"
    return "was modified"


@dataclass
class FileReader:
    """One weights file, open for reading; `read` returns a fresh tensor (or, with LAZYMERGE_UNSAFE_MMAP, a view)."""

    path: Path
    name: str  # relative to the checkpoint folder, for messages
    fd: int
    ident: tuple
    use_mmap: bool = False
    changed: str | None = None
    _mm: mmap.mmap | None = None

    @classmethod
    def open(cls, path: Path, name: str) -> "FileReader":
        """Open `path` for reading (raises OSError); `name` is how messages call it."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return cls(path, name, fd, _identity(os.fstat(fd)), use_mmap=unsafe_mmap())

    def pread(self, n: int, offset: int) -> bytes:
        """n bytes at `offset` (header reading); fewer if the file is shorter."""
        return os.pread(self.fd, n, offset)

    def check(self) -> None:
        """Raise SourceChanged if the descriptor or the path no longer show the file as opened."""
        if self.changed is not None:
            raise SourceChanged(self.name, self.changed)
        try:
            now = _identity(os.fstat(self.fd))
        except OSError:
            now = None
        if now == self.ident:
            try:
                now = _identity(os.stat(self.path))
            except OSError:
                now = None
        if now != self.ident:
            self.changed = _describe(self.ident, now)
            raise SourceChanged(self.name, self.changed)

    def read(self, start: int, end: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Bytes [start, end) as a tensor of `dtype` and `shape`; raises SourceChanged."""
        self.check()
        if self.use_mmap:
            return self._view(start, end, dtype, shape)
        buf = torch.empty(end - start, dtype=torch.uint8)
        mv = memoryview(buf.numpy())
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], start + done)
            if n <= 0:
                break
            done += n
        self.check()  # a write that raced with this read: discard what was read
        if done < len(mv):
            self.changed = "is shorter than its header says"
            raise SourceChanged(self.name, self.changed)
        return buf.view(dtype).view(shape)

    def _view(self, start, end, dtype, shape) -> torch.Tensor:
        if self._mm is None:
            self._mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
        numel = (end - start) // dtype.itemsize
        return torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=start).view(shape)

    def __del__(self):  # a source dropped without close() must not leak its descriptors
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # tensor views still alive; the mapping goes with them
            self._mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ReaderSet:
    """The open files of one source (thread-safe opening)."""

    def __init__(self):
        self.files: dict[Path, FileReader] = {}
        self.lock = threading.Lock()

    def add(self, reader: FileReader) -> None:
        with self.lock:
            self.files[reader.path] = reader

    def check(self) -> None:
        for r in list(self.files.values()):
            r.check()

    def close(self) -> None:
        with self.lock:
            for r in self.files.values():
                r.close()
            self.files.clear()
