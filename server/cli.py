"""`lazymerge serve`: the merge server from the terminal, and `serve_blocking` for other modules (the demo).

This module imports neither FastAPI nor uvicorn at import time (images without them still get the rest of the
CLI); the handler imports them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _source(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_config(sources: dict, recipes: dict | None = None, **kw):
    from .serving import ServerConfig

    return ServerConfig(sources={k: str(v) for k, v in sources.items()}, recipes=dict(recipes or {}), **kw)


def page_address(host: str, port: int, api_key: str | None = None) -> str:
    """The A/B page's address as printed at start-up. With an API key the page is opened once with `?api_key=` and
    the key (which sets the page's cookie); the printed address says so without printing the key itself, which would
    otherwise land in every log of the server's output."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + ("?api_key=YOUR_KEY" if api_key else "")


def serve_blocking(engine_sources: dict, recipes: dict | None = None, host: str = "127.0.0.1", port: int = 8000,
                   *, api_key: str | None = None, cache_mb: float = 1024.0, db: str | None = None,
                   log_level: str = "warning", **limits) -> None:
    """Serve `recipes` ({name: YAML text or dict}) over `engine_sources` ({name: checkpoint folder}) until
    interrupted, printing the A/B page's address; `port=0` binds any free port and prints it ("lazymerge: listening on
    port N"). `limits` are further `ServerConfig` fields (max_tokens, ...).
    Bad sources or recipes raise (CheckpointError / RecipeError) before anything listens."""
    import uvicorn

    from .app import create_app
    from .serving import MergeServing

    config = build_config(engine_sources, recipes, api_key=api_key, cache_mb=cache_mb, db_path=db, **limits)
    serving = MergeServing(config)  # opens sources and compiles recipes now: errors surface before listening
    app = create_app(serving=serving)
    uconfig = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
    server = uvicorn.Server(uconfig)
    sock = uconfig.bind_socket()  # bound here, so that port 0 (any free port) prints the port actually bound
    port = sock.getsockname()[1]
    names = ", ".join(e.name for e in serving.registry.entries())
    print(f"lazymerge: serving {names}", flush=True)
    print(f"lazymerge: listening on port {port}", flush=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"lazymerge: OpenAI API at http://{shown}:{port}/v1  A/B page: {page_address(host, port, api_key)}",
          flush=True)
    server.run(sockets=[sock])


def _cmd_serve(args) -> int:
    from lazymerge.engine import load_recipe

    recipes = {}
    for f in args.recipe or []:
        p = Path(f)
        recipes[p.stem] = load_recipe(p).to_dict()  # RecipeError / unreadable file: one-line error, exit 2
    api_key = args.api_key or os.environ.get("LAZYMERGE_API_KEY") or None
    serve_blocking(dict(args.source), recipes, args.host, args.port, api_key=api_key, cache_mb=args.cache_mb,
                   db=args.db, log_level=args.log_level, device=args.device, max_tokens=args.max_tokens,
                   max_prompt_tokens=args.max_prompt_tokens, max_batch_size=args.max_batch_size,
                   max_body_bytes=int(args.max_body_kb * 1024), max_recipes=args.max_recipes,
                   max_queue=args.max_queue, num_threads=args.threads,
                   cpu_fused=False if args.eager_merge else None)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve sources and merge recipes over an OpenAI-compatible HTTP API, with an "
                       "A/B comparison page")
    p.add_argument("--source", action="append", type=_source, required=True, metavar="NAME=PATH",
                   help="a checkpoint folder served under NAME (repeatable; recipes refer to sources by name)")
    p.add_argument("--recipe", action="append", metavar="FILE", help="a recipe YAML file registered at start, "
                   "named by its file stem (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="bind port; 0 picks a free one, printed as 'lazymerge: "
                   "listening on port N' (default 8000)")
    p.add_argument("--api-key", default=None, help="require this key on every route but /health (default: env "
                   "LAZYMERGE_API_KEY)")
    p.add_argument("--cache-mb", type=float, default=1024.0, help="merged-weight cache budget in MiB shared by all "
                   "recipes; 0 merges every weight on the fly (default 1024)")
    p.add_argument("--db", default="lazymerge_votes.sqlite", help="SQLite file for A/B votes (default "
                   "lazymerge_votes.sqlite; ':memory:' keeps none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu-fused", action="store_true", help="(the default now; kept so that old command lines work)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the CPUs this process "
                   "may use, or $LAZYMERGE_THREADS)")
    p.add_argument("--eager-merge", action="store_true", help="merge with the eager PyTorch reference instead of the "
                   "fused compiled CPU merge (debugging; also LAZYMERGE_CPU_FUSED=0)")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on max_tokens per request (default 512)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="cap on prompt length (default 2048)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per forward pass and per request "
                   "(default 32)")
    p.add_argument("--max-body-kb", type=float, default=1024, help="request body cap in KiB (default 1024)")
    p.add_argument("--max-recipes", type=int, default=64, help="cap on registered recipes (default 64)")
    p.add_argument("--max-queue", type=int, default=256, help="rows waiting for a batch before 429 (default 256)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    p.set_defaults(func=_cmd_serve)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
