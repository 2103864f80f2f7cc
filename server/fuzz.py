"""Property-based fuzzing of the server's edge (hypothesis): recipes (YAML text and JSON objects), requests and
checkpoint headers. The properties, for every input: no 5xx, no traceback, error bodies under `MAX_ERROR_BYTES`,
bounded RSS growth; recipes and headers raise only their own error kinds.

    python -m lazymerge.server.fuzz [--examples 300] [--json out.json]     # the long run (BENCHMARKS.md)

`tests/test_fuzz.py` runs the same properties briefly in CI. Needs the dev extra (hypothesis).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

MAX_ERROR_BYTES = 4096
PHASES = (Phase.explicit, Phase.generate)  # no shrinking: bounded time; a failure is reported as found
WORDS = ["merge_method", "linear", "ties", "dare_ties", "slerp", "path", "passthrough", "task_arithmetic", "models",
         "slices", "model", "base", "e1", "e2", "parameters", "weight", "density", "layer_range", "layer", "scale",
         "definitions", "base_model", "random_seed", "dtype", "t", "filter", "value", "sources", "tokenizer_source"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(WORDS),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.one_of(st.sampled_from(WORDS), st.text(max_size=6)), inner,
                                                 max_size=6)), max_leaves=40)
recipe_objects = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(WORDS[1:8])},
    optional={"base_model": st.sampled_from(["base", "e1", "nope", "a\x00b"]),
              "models": st.lists(st.fixed_dictionaries({"model": st.sampled_from(["base", "e1", "e2", "zz"])},
                                                       optional={"parameters": json_values}), max_size=4),
              "slices": json_values, "path": st.lists(st.fixed_dictionaries(
                  {"model": st.sampled_from(["base", "e1"])},
                  optional={"layer": st.integers(-5, 2**40), "layer_range": st.lists(st.integers(-5, 2**40),
                                                                                        max_size=3),
                            "scale": st.floats()}), max_size=4),
              "parameters": json_values, "random_seed": st.integers(-2**65, 2**65), "definitions": json_values})
yaml_texts = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(
    WORDS + [":", " ", "\n", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "<<: ", "!!python/object ", "'", '"', "0",
             "1.5", "-1", "1e400", ".nan"]), max_size=80).map("".join))
requests = st.fixed_dictionaries(
    {"model": st.sampled_from(["base", "ta_e1", "nope", "", "a\x00b"])},
    optional={"prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-2**66, 2**66), max_size=8),
                                  st.lists(st.text(max_size=8), max_size=3), json_values),
              "max_tokens": st.one_of(st.integers(-3, 2**66), scalars), "n": st.one_of(st.integers(-2, 2**66), scalars),
              "temperature": st.one_of(st.floats(), scalars), "top_p": st.one_of(st.floats(), scalars),
              "seed": st.one_of(st.integers(-2**66, 2**66), scalars), "stop": st.one_of(scalars, st.lists(
                  st.text(max_size=4), max_size=20)), "logprobs": st.one_of(st.integers(-2, 2**40), scalars),
              "echo": scalars, "stream": st.booleans(), "best_of": scalars, "logit_bias": json_values,
              "recipe": st.one_of(recipe_objects, yaml_texts, json_values),
              "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
                  {"role": st.sampled_from(["user", "system", "assistant", "tool", "\x00"]),
                   "content": st.one_of(st.text(max_size=30), json_values)}), max_size=3))})


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Stats:
    def __init__(self):
        self.examples = 0
        self.status: dict[int, int] = {}
        self.max_error_bytes = 0
        self.failures: list[str] = []

    def response(self, what: str, r) -> None:
        self.examples += 1
        self.status[r.status_code] = self.status.get(r.status_code, 0) + 1
        if r.status_code >= 400:
            self.max_error_bytes = max(self.max_error_bytes, len(r.content))
        if r.status_code >= 500 or "Traceback" in r.text or (r.status_code >= 400 and
                                                             len(r.content) > MAX_ERROR_BYTES):
            self.failures.append(f"{what}: {r.status_code} {r.text[:300]}")


REPLAY_KEEP = 500  # requests the fuzz remembers for the replay


def fuzz_server(client, examples: int, stats: Stats, sent: list | None = None) -> None:
    """Completions, chat, recipe registration and inline recipes with arbitrary bodies through `client`; the first
    REPLAY_KEEP (route, body) pairs are appended to `sent` (for `replay`)."""
    sent = [] if sent is None else sent

    def remember(route, body):
        if len(sent) < REPLAY_KEEP:
            sent.append((route, body))
    cfg = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck),
                   phases=PHASES)

    @cfg
    @given(body=requests, route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def requests_prop(body, route):
        remember(route, body)
        stats.response(route, _post(client, route, body))

    @cfg
    @given(recipe=st.one_of(recipe_objects, yaml_texts, json_values), name=st.sampled_from(["r1", "bad name", "r2"]))
    def recipes_prop(recipe, name):
        remember("/v1/recipes", {"name": name, "recipe": recipe})
        r = _post(client, "/v1/recipes", {"name": name, "recipe": recipe})
        stats.response("/v1/recipes", r)
        if r.status_code in (200, 201):
            stats.response("delete", client.delete(f"/v1/recipes/{name}"))

    requests_prop()
    recipes_prop()


def replay(client, sent: list, requests: int, stats: Stats) -> None:
    """Send the remembered fuzz requests again, in order and round after round, `requests` in all (without
    hypothesis' own bookkeeping, whose memory grows with every example it explores): what the server itself keeps
    per request. A registered recipe is deleted again, as in the fuzz."""
    for i in range(requests):
        route, body = sent[i % len(sent)]
        r = _post(client, route, body)
        stats.response(f"replay {route}", r)
        if route == "/v1/recipes" and r.status_code in (200, 201):
            client.delete(f"/v1/recipes/{body['name']}")


def _post(client, route: str, body):
    """POST `body` as JSON, NaN and Infinity included (Python's json parser, and so the server, accepts them)."""
    return client.post(route, content=json.dumps(body, allow_nan=True),
                       headers={"content-type": "application/json"})


def fuzz_recipes(sources, examples: int, stats: Stats) -> None:
    """load_recipe + compile on YAML text and JSON objects: RecipeError/CheckpointError only, bounded messages."""
    from lazymerge.engine import CheckpointError, RecipeError

    cfg = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck),
                   phases=PHASES)

    @cfg
    @given(recipe=st.one_of(recipe_objects, yaml_texts, json_values))
    def prop(recipe):
        stats.examples += 1
        try:
            sources.compile(recipe)
        except (RecipeError, CheckpointError) as e:
            if len(str(e)) > MAX_ERROR_BYTES:
                stats.failures.append(f"recipe error of {len(str(e))} characters")

    prop()


def fuzz_headers(folder: Path, examples: int, stats: Stats) -> None:
    """Arbitrary safetensors headers in a copy of a checkpoint: Source.open raises only CheckpointError."""
    from lazymerge.engine.checkpoint import CheckpointError, Source

    f = folder / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    cfg = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck),
                   phases=PHASES)
    entry = st.fixed_dictionaries({}, optional={"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F8", "X"]),
                                                "shape": st.lists(st.integers(-3, 2**40), max_size=3),
                                                "data_offsets": st.lists(st.integers(-3, 2**40), max_size=3)})

    @cfg
    @given(edits=st.dictionaries(st.sampled_from(names), st.one_of(entry, json_values), max_size=3),
           raw=st.one_of(st.none(), st.binary(max_size=40)), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    def prop(edits, raw, length):
        stats.examples += 1
        h = dict(header)
        h.update(edits)
        hb = raw if raw is not None else json.dumps(h).encode()
        f.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + body)
        try:
            Source.open(folder).close()
        except CheckpointError as e:
            if len(str(e)) > MAX_ERROR_BYTES:
                stats.failures.append(f"header error of {len(str(e))} characters")

    try:
        prop()
    finally:
        f.write_bytes(data)


def run(examples: int) -> dict:
    """Every fuzz target with `examples` examples each; a dict of figures (and `failures`)."""
    import shutil

    from fastapi.testclient import TestClient

    from lazymerge.engine import Engine
    from lazymerge.engine.toy import make_family

    from .app import create_app
    from .serving import ServerConfig

    root = Path(tempfile.mkdtemp(prefix="lazymerge_fuzz_"))
    try:
        fam = {k: str(v) for k, v in make_family(root / "fam", "mistral", 1, seed=0).items()}
        recipes = {"ta_e1": {"merge_method": "task_arithmetic", "base_model": "base",
                             "models": [{"model": "e1", "parameters": {"weight": 2.0}}]}}
        out = {}
        t0 = time.perf_counter()
        s = Stats()
        fuzz_recipes(Engine(fam, allow_open=False), examples, s)
        out["recipes"] = {"examples": s.examples, "failures": s.failures, "seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        s = Stats()
        shutil.copytree(fam["e1"], root / "hdr")
        fuzz_headers(root / "hdr", examples, s)
        out["headers"] = {"examples": s.examples, "failures": s.failures, "seconds": time.perf_counter() - t0}
        app = create_app(ServerConfig(sources=fam, recipes=recipes, num_threads=1, max_tokens=8, max_recipes=4))
        with TestClient(app, raise_server_exceptions=False) as c:
            c.post("/v1/completions", json={"model": "ta_e1", "prompt": "warm up", "max_tokens": 2})
            rss0, t0 = _rss_kb(), time.perf_counter()
            s, sent = Stats(), []
            fuzz_server(c, examples, s, sent)
            rss1 = _rss_kb()
            out["server"] = {"examples": s.examples, "failures": s.failures, "seconds": time.perf_counter() - t0,
                             "status_counts": dict(sorted(s.status.items())), "max_error_bytes": s.max_error_bytes,
                             "rss_growth_kb": rss1 - rss0,
                             "rss_growth_kb_per_request": round((rss1 - rss0) / max(1, s.examples), 2)}
            # the same requests again, twice over (the first round warms whatever caches they fill), then measured
            n = max(len(sent), 2 * examples)
            r0 = Stats()
            replay(c, sent, n, r0)
            rss2, t0 = _rss_kb(), time.perf_counter()
            r = Stats()
            replay(c, sent, n, r)
            rss3 = _rss_kb()
            out["replay"] = {"examples": r.examples, "failures": r0.failures + r.failures,
                             "seconds": time.perf_counter() - t0, "status_counts": dict(sorted(r.status.items())),
                             "rss_growth_kb": rss3 - rss2,
                             "rss_growth_kb_per_request": round((rss3 - rss2) / max(1, r.examples), 2)}
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=300, help="examples per property (default 300)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = run(args.examples)
    print("| target | examples | failures | seconds | notes |")
    print("|---|---:|---:|---:|---|")
    for k, v in res.items():
        notes = ""
        if k == "server":
            notes = (f"status {v['status_counts']}; largest error body {v['max_error_bytes']} B; RSS growth "
                     f"{v['rss_growth_kb']} KB ({v['rss_growth_kb_per_request']} KB/request, hypothesis' own "
                     "bookkeeping included)")
        elif k == "replay":
            notes = (f"the fuzz's first {REPLAY_KEEP} requests sent again after a warm round: status "
                     f"{v['status_counts']}; RSS growth {v['rss_growth_kb']} KB "
                     f"({v['rss_growth_kb_per_request']} KB/request)")
        print(f"| {k} | {v['examples']} | {len(v['failures'])} | {v['seconds']:.1f} | {notes} |")
    for k, v in res.items():
        for f in v["failures"][:5]:
            print(f"FAIL {k}: {f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 1 if any(v["failures"] for v in res.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
