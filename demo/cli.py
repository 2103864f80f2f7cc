"""`lazymerge demo`: build (or reuse) the toy zoo, evolve a merge, print the paper-style table, serve the A/B page."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def _cmd_demo(args) -> int:
    from .numerics import pin_cpu_kernels

    pin_cpu_kernels()  # before torch is imported: the same zoo and searches on AVX2 and AVX-512 CPUs
    from .experiment import claim, format_table, run_experiment
    from .zoo import build_zoo

    size = "small" if args.small else "full"
    seeds = list(range(args.seed, args.seed + args.seeds))
    out = Path(args.out)
    tables = []
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    for s in seeds:
        t0 = time.time()
        zoo = build_zoo(Path(args.zoo) / f"seed{s}", seed=s, size=size, threads=args.zoo_threads)
        say(f"zoo seed {s}: {zoo} ({time.time() - t0:.0f} s)")
        spaces = tuple(x.strip() for x in args.spaces.split(",") if x.strip())
        table = run_experiment(zoo, out / f"seed{s}", evaluations=args.evaluations, layer_groups=args.layer_groups,
                               seed=s, quiet=args.json, spaces=spaces, say=say, workers=args.workers)
        c = claim(table)
        table["claim"] = c
        tables.append(table)
        chosen = {k: v["chosen"] for k, v in table["validation"].items()}
        say(f"\nseed {s} — held-out accuracy (%), searches and scoring took {table['seconds']:.0f} s; best evolved "
            f"on the validation split: {table['best_space']} (validation % of each search's chosen candidate: "
            f"{chosen}; best search-split fitness %: {table['search_fitness']})")
        pf = table["platform"]
        say(f"zoo v{pf['zoo_version']} content {pf['zoo_content_hash']} (trained on {pf['zoo_train_threads']} "
            f"threads, {pf['zoo_cpu_kernels']} kernels), {pf['cpu']}, torch {pf['torch']}, {pf['cpu_kernels']} kernels")
        say(format_table(table))
        say(f"evolved vs best source {c['vs_sources']:+.1f}, vs best baseline {c['vs_baselines']:+.1f}, "
            f"vs control {c['vs_control']:+.1f} points -> claim {'holds' if c['holds'] else 'does NOT hold'}")
    result = tables[0] if len(tables) == 1 else _mean(tables)
    if len(tables) > 1:
        say("\nmean over seeds " + ", ".join(map(str, seeds)))
        say(format_table(result))
        c = claim(result)
        per_seed = [claim(t, 7.5, 2.5)["holds"] for t in tables]
        result["claim"] = {**c, "every_seed_half_margins": all(per_seed)}
        say(f"mean: evolved vs best source {c['vs_sources']:+.1f}, vs control {c['vs_control']:+.1f} -> "
            f"{'holds' if c['holds'] else 'does NOT hold'}; every seed at half the margins: {all(per_seed)}")
    (out / "results.json").write_text(json.dumps(result if len(tables) == 1 else {"mean": result, "seeds": tables},
                                                 indent=2))
    say(f"plots and records: {out}/seed*/ (results.png, search_ps/fitness.png, search_ps/params.png)")
    if args.json:
        print(json.dumps({"target_task": result["target_task"], "rows": result["rows"]}))
    if args.no_serve:
        return 0
    from lazymerge.server.cli import serve_blocking

    from .experiment import baselines

    zoo = Path(args.zoo) / f"seed{seeds[0]}"
    recipes = {f"{k}-default": r for k, r in baselines().items()}
    recipes["evolved"] = (out / f"seed{seeds[0]}" / "evolved.yaml").read_text()
    for f in sorted((out / f"seed{seeds[0]}").glob("evolved_*.yaml")):
        recipes[f.stem.replace("_", "-")] = f.read_text()
    recipes["control-math-alone"] = (out / f"seed{seeds[0]}" / "control.yaml").read_text()
    port = _free_port(args.host, args.port, say)
    serve_blocking({m: str(zoo / m) for m in ("base", "foreign", "math")}, recipes, args.host, port,
                   db=str(out / "votes.sqlite"), examples=example_prompts(zoo),
                   featured=("evolved", best_baseline(tables[0])))
    return 0


def example_prompts(zoo: Path, n: int = 4) -> list[str]:
    """The first `n` prompts of the held-out target split: the form of prompt the zoo's models understand."""
    from .experiment import TARGET, TASK_FILES

    lines = (zoo / "data" / TASK_FILES[TARGET][1]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines[:n] if line.strip()]


def best_baseline(table: dict) -> str:
    """The served name of the untuned baseline with the best held-out target score (e.g. `ties-default`)."""
    t = table["target_task"]
    rows = [r for r in table["rows"] if r["kind"] == "baseline"]
    best = max(rows, key=lambda r: r["scores"][t])
    return best["model"].removesuffix(" (default)") + "-default"


def _free_port(host: str, port: int, say) -> int:
    """`port` if it can be bound on `host`, else 0 (any free port; the server prints the one it binds)."""
    import socket

    if port == 0:
        return 0
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            say(f"port {port} on {host} is not available ({e.strerror}); serving on a free port instead "
                "(choose one with --port N, e.g. `make demo ARGS=\"--port 8080\"`)")
            return 0
    return port


def _mean(tables: list[dict]) -> dict:
    rows = []
    for i, r in enumerate(tables[0]["rows"]):
        scores = {t: round(statistics.mean(tb["rows"][i]["scores"][t] for tb in tables), 1) for t in r["scores"]}
        rows.append({"model": r["model"], "kind": r["kind"], "scores": scores})
    return {"target_task": tables[0]["target_task"], "rows": rows}


def _cmd_zoo_build(args) -> int:
    from .numerics import pin_cpu_kernels

    pin_cpu_kernels()  # before torch is imported (demo/numerics.py)
    from .zoo import _cmd_build  # torch and transformers load only when the command runs

    return _cmd_build(args)


def register(sub) -> None:
    zoo = sub.add_parser("zoo", help="toy model zoo (tiny Mistral base + foreign and math experts)")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zsub.add_parser("build", help="train and write the zoo (cached by seed/size)")
    build.add_argument("dir", nargs="?", default="./zoo", help="output directory (default ./zoo)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--small", action="store_true", help="tiny models, builds in seconds (tests)")
    build.add_argument("--force", action="store_true", help="rebuild even if a matching manifest exists")
    build.add_argument("--threads", type=int, default=None,
                       help="torch threads for training (default: the fixed TRAIN_THREADS of demo/zoo.py, 2); part of "
                            "the zoo's identity")
    build.set_defaults(func=_cmd_zoo_build)

    p = sub.add_parser("demo", help="the paper's result at toy scale: zoo, evolutionary merge, table, A/B page")
    p.add_argument("--zoo", default="zoo", help="where the zoo is built or reused (default ./zoo)")
    p.add_argument("--out", default="runs/demo", help="where run records, tables and plots go")
    p.add_argument("--seed", type=int, default=0, help="first zoo/search seed")
    p.add_argument("--seeds", type=int, default=1, help="run this many seeds and report each and the mean")
    p.add_argument("--evaluations", type=int, default=150, help="CMA-ES candidates per search")
    p.add_argument("--layer-groups", type=int, default=2, help="weight per source per group of layers")
    p.add_argument("--spaces", default="ps,dfs,dfs_w1,ps_dfs,ps_weighted",
                   help="evolved rows to search: ps (always), dfs, dfs_w1 (W fixed to 1), ps_dfs, ps_weighted (the "
                        "experts' own tasks weighted into the fitness)")
    p.add_argument("--workers", type=int, default=None,
                   help="search worker processes, one torch thread each (default: one per CPU, at most 4)")
    p.add_argument("--small", action="store_true", help="the seconds-sized zoo (tests; accuracies are meaningless)")
    p.add_argument("--zoo-threads", type=int, default=None,
                   help="torch threads the zoo trains on (default: the fixed TRAIN_THREADS of demo/zoo.py, 2; another "
                        "count builds another zoo)")
    p.add_argument("--no-serve", action="store_true", help="stop after the table")
    p.add_argument("--json", action="store_true", help="print the table as JSON on stdout's last line")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="A/B page port (default 8000; a free one if taken; 0: any)")
    p.set_defaults(func=_cmd_demo)
