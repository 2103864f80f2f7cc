"""`lazymerge merge | generate | score`: the engine from the terminal (no server needed)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_merge(args) -> int:
    from .export import export
    from .plan import SourceSet, compile_plan

    S = SourceSet(allow_open=True, base_dir=Path(args.recipe).resolve().parent)
    plan = compile_plan(Path(args.recipe), S)
    out = export(plan, args.out_dir, shard_bytes=int(args.shard_size * (1 << 20)))
    print(f"wrote {len(plan.tensors)} tensors ({plan.num_layers} layers, {plan.dtype}) to {out}")
    return 0


def _open_model(args):
    from .api import Engine

    eng = Engine(device=args.device, threads=args.threads)
    return eng, eng.compile(Path(args.recipe))


def _cmd_generate(args) -> int:
    eng, model = _open_model(args)
    outs = model.generate([args.prompt], max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, stop=args.stop or None)
    print(outs[0].text)
    return 0


def _cmd_score(args) -> int:
    eng, model = _open_model(args)
    tokens, lps = model.token_logprobs(args.text)
    if not tokens:
        from .generate import UsageError

        raise UsageError("empty text: nothing to score")
    if args.json:
        print(json.dumps({"tokens": tokens, "token_logprobs": lps}))
    else:
        for t, lp in zip(tokens, lps):
            print(f"{t!r:>16} {'' if lp is None else f'{lp:.4f}'}")
        known = [x for x in lps if x is not None]
        if known:
            print(f"mean log-prob {sum(known) / len(known):.4f} over {len(known)} tokens")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="export a recipe as a standalone HF checkpoint (streamed)")
    p.add_argument("recipe")
    p.add_argument("out_dir")
    p.add_argument("--shard-size", type=float, default=2048, help="shard size in MiB (default 2048)")
    p.set_defaults(func=_cmd_merge)

    for name, fn, hlp in (("generate", _cmd_generate, "complete a prompt with a recipe, lazily"),
                          ("score", _cmd_score, "log-probability of every token of TEXT under a recipe")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("recipe")
        p.add_argument("prompt" if name == "generate" else "text")
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may "
                       "use, or $LAZYMERGE_THREADS)")
        if name == "generate":
            p.add_argument("--max-tokens", type=int, default=64)
            p.add_argument("--temperature", type=float, default=0.0)
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--seed", type=int, default=None)
            p.add_argument("--stop", action="append", help="stop string (repeatable)")
        else:
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
