"""Benchmark of the generation loop's text handling (a script that prints a table, never a timed test).

    python -m lazymerge.engine.bench_detokenize [--json out.json] [--lengths 256 1024 4096]

For each output length n: the seconds spent turning n generated tokens into streamed text, one token at a time, by
(a) re-decoding the whole row at every step (what generate.py did: O(n) per token, O(n^2) per row) and (b) the
incremental detokenizer (engine/detokenize.py: a window of O(1) tokens per step), with a Metaspace (SentencePiece
style) and a byte-level BPE tokenizer built locally. The two texts are checked equal. Reported per token (us) and as
the ratio (a)/(b): flat per-token cost for (b) is the linear total cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

from . import toy
from .detokenize import IncrementalDetokenizer


def _full(tok, prompt, gen) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = tok.decode(prompt, skip_special_tokens=True)
    text = ""
    for i in range(1, len(gen) + 1):
        text = tok.decode(prompt + gen[:i], skip_special_tokens=True)[len(p):]
    return text, time.perf_counter() - t0


def _incremental(tok, prompt, gen) -> tuple[str, float]:
    t0 = time.perf_counter()
    d = IncrementalDetokenizer(tok, prompt)
    text = "".join(d.push(t) for t in gen) + d.flush()
    return text, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rng = random.Random(0)
    rows = []
    for kind, make in (("metaspace", toy.make_metaspace_tokenizer), ("bytelevel", toy.make_bytelevel_tokenizer)):
        tok = make()
        prompt = tok.encode("the cat sees", add_special_tokens=False)
        for n in args.lengths:
            words = " " + " ".join(rng.choice(list(toy.WORDS) + ["数は", "です"]) for _ in range(n))
            gen = tok.encode(words, add_special_tokens=False)[:n]
            a, ta = _full(tok, prompt, gen)
            b, tb = _incremental(tok, prompt, gen)
            assert a == b, (kind, n)
            rows.append({"tokenizer": kind, "tokens": len(gen), "full_us_per_token": 1e6 * ta / len(gen),
                         "incremental_us_per_token": 1e6 * tb / len(gen), "ratio": ta / tb})
    from . import host

    print(f"machine: {host.cpu_model()}, python {platform.python_version()}")
    print("| tokenizer | tokens | re-decode (us/token) | incremental (us/token) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['tokens']} | {r['full_us_per_token']:.1f} | "
              f"{r['incremental_us_per_token']:.1f} | {r['ratio']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
