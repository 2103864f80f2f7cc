"""lazymerge: evaluate and serve merged language models without materializing them."""

import os

# Idle OpenMP threads sleep instead of spinning, so that two processes on one machine do not steal each other's
# cores (engine/threads.py). Only effective when set before torch is imported; the environment may override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
