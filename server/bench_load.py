"""Load benchmark of the merge server: requests/s, tokens/s, p50/p99 latency and time to first token for one recipe
vs ten recipes mixed, with the merged-layer cache on and off.

    python -m lazymerge.server.bench_load [--json out.json] [--requests 40] [--concurrency 8] [--max-tokens 8]

Bounded and loopback only: it writes a small local model family (Mistral, hidden 256, 4 layers, base + 2 experts),
starts `lazymerge serve` itself on a free 127.0.0.1 port (once with the cache on, once off, ten recipes registered
each time), drives it with concurrent streaming clients (greedy completions; every scenario starts with one warm-up
request per recipe it uses) and stops it. Prints a fixed table; `--json` writes the same numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {  # ten distinct recipes over base + e1 + e2 (distinct content: no two share merged tensors)
    "ta_a": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
            "  - {model: e1, parameters: {weight: 0.5}}\n  - {model: e2, parameters: {weight: 0.5}}\n",
    "ta_b": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
            "  - {model: e1, parameters: {weight: 1.0}}\n  - {model: e2, parameters: {weight: 0.3}}\n",
    "ties_a": "merge_method: ties\nbase_model: base\nmodels:\n"
              "  - {model: e1, parameters: {weight: 1.0, density: 0.5}}\n"
              "  - {model: e2, parameters: {weight: 1.0, density: 0.5}}\n",
    "ties_b": "merge_method: ties\nbase_model: base\nmodels:\n"
              "  - {model: e1, parameters: {weight: 0.7, density: 0.3}}\n"
              "  - {model: e2, parameters: {weight: 1.2, density: 0.7}}\n",
    "dare_a": "merge_method: dare_ties\nbase_model: base\nrandom_seed: 1\nmodels:\n"
              "  - {model: e1, parameters: {weight: 1.0, density: 0.5}}\n  - {model: e2, parameters: {weight: 1.0, "
              "density: 0.5}}\n",
    "dare_b": "merge_method: dare_linear\nbase_model: base\nrandom_seed: 2\nmodels:\n"
              "  - {model: e1, parameters: {weight: 0.6, density: 0.6}}\n  - {model: e2, parameters: {weight: 0.6, "
              "density: 0.6}}\n",
    "linear_a": "merge_method: linear\nmodels:\n  - {model: e1, parameters: {weight: 0.5}}\n"
                "  - {model: e2, parameters: {weight: 0.5}}\n",
    "linear_b": "merge_method: linear\nmodels:\n  - {model: base, parameters: {weight: 0.2}}\n"
                "  - {model: e1, parameters: {weight: 0.8}}\n",
    "slerp_a": "merge_method: slerp\nbase_model: e1\nmodels:\n  - {model: e1}\n  - {model: e2}\nparameters: {t: 0.3}\n",
    "slerp_b": "merge_method: slerp\nbase_model: base\nmodels:\n  - {model: base}\n  - {model: e2}\n"
               "parameters: {t: [0.0, 0.5, 1.0]}\n",
}
MODEL = {"arch": "mistral", "hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 512}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Server:
    """`lazymerge serve` as a subprocess on a free loopback port."""

    def __init__(self, root: Path, sources: dict, cache_mb: float, threads: int | None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "lazymerge.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--cache-mb", str(cache_mb), "--db", ":memory:", "--max-queue", "4096"]
        if threads:
            args += ["--threads", str(threads)]
        for name, path in sources.items():
            args += ["--source", f"{name}={path}"]
        for name, text in RECIPES.items():
            f = root / f"{name}.yaml"
            f.write_text(text)
            args += ["--recipe", str(f)]
        self.log = open(root / f"server-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        env.pop("LAZYMERGE_API_KEY", None)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 180.0) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": ttft if ttft is not None else float("nan"),
            "tokens": tokens}


async def _load(url: str, models: list[str], n_requests: int, concurrency: int, max_tokens: int, seed: int) -> dict:
    import httpx

    from lazymerge.engine.toy import WORDS

    rng = random.Random(seed)
    jobs = [(models[i % len(models)], " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))))
            for i in range(n_requests)]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for m in models:  # warm-up: one request per recipe (cache on: fills it; off: pages the sources in)
            await _one(client, url, m, "the cat sees", max_tokens)
        queue: asyncio.Queue = asyncio.Queue()
        for j in jobs:
            queue.put_nowait(j)
        results: list[dict] = []

        async def worker():
            while not queue.empty():
                m, p = queue.get_nowait()
                results.append(await _one(client, url, m, p, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    toks = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": round(wall, 3), "req_per_s": round(len(results) / wall, 3),
            "tok_per_s": round(toks / wall, 2), "tokens": toks,
            "p50_latency_s": round(_pct(lat, 0.5), 4), "p99_latency_s": round(_pct(lat, 0.99), 4),
            "p50_ttft_s": round(_pct(ttft, 0.5), 4), "p99_ttft_s": round(_pct(ttft, 0.99), 4)}


def _table(rows: list[dict]) -> str:
    head = (f"{'scenario':<12} {'cache':<6} {'reqs':>5} {'req/s':>7} {'tok/s':>8} {'p50 lat':>8} {'p99 lat':>8} "
            f"{'p50 TTFT':>9} {'p99 TTFT':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['scenario']:<12} {r['cache']:<6} {r['requests']:>5} {r['req_per_s']:>7.2f} "
                     f"{r['tok_per_s']:>8.1f} {r['p50_latency_s']:>7.3f}s {r['p99_latency_s']:>7.3f}s "
                     f"{r['p50_ttft_s']:>8.3f}s {r['p99_ttft_s']:>8.3f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lazymerge.server.bench_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40, help="timed requests per scenario (default 40)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="server's torch threads (default 1; 0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    from lazymerge.engine.toy import make_family

    rows = []
    with tempfile.TemporaryDirectory(prefix="lazymerge-bench-") as tmp:
        root = Path(tmp)
        cfg = {k: v for k, v in MODEL.items() if k != "arch"}
        fam = make_family(root / "family", MODEL["arch"], 2, seed=0, **cfg)
        sources = {k: str(v) for k, v in fam.items()}
        for cache, cache_mb in (("on", 1024.0), ("off", 0.0)):
            server = Server(root, sources, cache_mb, args.threads or None)
            try:
                server.wait()
                for scenario, models in (("1 recipe", ["ties_a"]), ("10 recipes", list(RECIPES))):
                    res = asyncio.run(_load(server.url, models, args.requests, args.concurrency, args.max_tokens,
                                            args.seed))
                    rows.append({"scenario": scenario, "cache": cache, **res})
                    print(f"  done: {scenario}, cache {cache}", file=sys.stderr, flush=True)
            finally:
                server.stop()
    header = (f"lazymerge server load benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
              f"{os.cpu_count()} CPUs, model {MODEL}, {args.requests} streamed requests x {args.max_tokens} tokens "
              f"per scenario, {args.concurrency} concurrent clients, greedy")
    print(header)
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "config": vars(args), "model": MODEL,
                                               "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
