"""`lazymerge search CONFIG.yaml [--out RUN_DIR] [--workers N] [--quiet]`: run or resume an evolutionary merge search.

Without `--out`, the run directory is `runs/<config stem>` next to the config. Running the same command again
resumes the run from its checkpoint. Config errors print `error: <message naming the field>` and exit 2 (the main
CLI catches `SearchConfigError`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run import run_search

    cfg = load_config(Path(args.config))
    out = Path(args.out) if args.out else Path(args.config).resolve().parent / "runs" / Path(args.config).stem
    res = run_search(cfg, out, workers=args.workers, quiet=args.quiet)
    if not args.quiet:
        print(f"best fitness {res.best_fitness:.4f} after {res.evaluations} evaluations ({res.generations} "
              f"generations); recipe: {out / 'best.yaml'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="evolutionary merge search (CMA-ES over merge recipes)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="search config (YAML)")
    p.add_argument("--out", help="run directory (default: runs/<config stem> next to the config)")
    p.add_argument("--workers", type=int, default=None, help="evaluation workers (default: the config's)")
    p.add_argument("--quiet", action="store_true", help="no progress line or summary table")
    p.set_defaults(func=_run)
