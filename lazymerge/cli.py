"""The `lazymerge` command: one parser, each package registers its own subcommands.

Errors a user can cause (a bad recipe, config, checkpoint or request) print one line `error: ...` and exit 2, with
no traceback. Subcommand modules import their heavy dependencies lazily, inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("lazymerge.engine.cli", "lazymerge.server.cli", "lazymerge.search.cli", "lazymerge.demo.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymerge", description="Evaluate and serve merged LLMs without "
                                     "materializing them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # not written yet / not installed
                continue
            raise
        m.register(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    from lazymerge.engine.checkpoint import CheckpointError
    from lazymerge.engine.generate import UsageError
    from lazymerge.engine.recipe import RecipeError
    from lazymerge.engine.safety import NonFiniteError

    errs: list[type[BaseException]] = [RecipeError, CheckpointError, UsageError, NonFiniteError, FileNotFoundError]
    try:
        from lazymerge.search.config import SearchConfigError

        errs.append(SearchConfigError)
    except ImportError:
        pass
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
