"""Where lazymerge keeps what it builds once per machine (compiled CPU merge packages, native helpers):
$LAZYMERGE_CACHE_DIR, else $XDG_CACHE_HOME/lazymerge, else ~/.cache/lazymerge."""

from __future__ import annotations

import os
from pathlib import Path


def root() -> Path:
    """The cache root (not created here; each user makes its own subdirectory)."""
    return Path(os.environ.get("LAZYMERGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lazymerge"))
