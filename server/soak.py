"""Soak test of a real server process on 127.0.0.1 (a script that prints a table, never a timed test).

    python -m lazymerge.server.soak [--seconds 120] [--clients 6] [--json out.json]

Starts `lazymerge serve` on a tiny local family, takes each (recipe, prompt) pair's greedy output alone (the solo
run), then for `--seconds` runs `--clients` threads of mixed traffic: registered and inline recipes, streaming and
non-streaming completions and chat, a fifth of them hanging up early, plus one thread that registers, uses and deletes
recipes. It samples the server's RSS twice a second. Pass criteria (exit status 1 otherwise): zero 5xx, RSS flat
(mean of the last 10% of samples within 10% of the first 10%'s), and every completed request's output equal to its
solo run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

RECIPES = {
    "ta_e1": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: e1\n    parameters: {weight: 3.0}\n",
    "ties": ("merge_method: ties\nbase_model: base\nmodels:\n"
             "  - model: e1\n    parameters: {weight: 2.0, density: 0.5}\n"
             "  - model: e2\n    parameters: {weight: 2.0, density: 0.5}\n"),
}
INLINE = {"merge_method": "dare_ties", "base_model": "base", "random_seed": 3,
          "models": [{"model": "e2", "parameters": {"weight": 2.0, "density": 0.6}}]}
PROMPTS = ["the cat", "a dog sees", "the red bird and", "one two"]


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _body(model: str, prompt: str, chat: bool, stream: bool, max_tokens: int) -> dict:
    b = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if model == "inline":
        b["recipe"] = INLINE
    if chat:
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    return b


def _request(c: httpx.Client, body: dict, chat: bool, hang_up: bool) -> tuple[int, str | None]:
    """(status, text or None if the client left before the end)."""
    route = "/v1/chat/completions" if chat else "/v1/completions"
    if body["stream"]:
        text = ""
        with c.stream("POST", route, json=body) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, None
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return 500 if ev["error"].get("type") == "internal_error" else 400, None
                ch = ev["choices"][0] if ev.get("choices") else None
                if ch is not None:
                    text += (ch["delta"].get("content") or "") if chat else ch["text"]
                if hang_up:
                    return 200, None  # leave mid-stream: closing the response hangs up
        return 200, text
    try:
        r = c.post(route, json=body, timeout=0.05 if hang_up else 120)
    except httpx.TimeoutException:
        return 0, None
    if r.status_code != 200:
        return r.status_code, None
    ch = r.json()["choices"][0]
    return 200, ch["message"]["content"] if chat else ch["text"]


def run(seconds: float, clients: int, max_tokens: int = 12) -> dict:
    from lazymerge.engine.toy import make_family

    root = Path(tempfile.mkdtemp(prefix="lazymerge_soak_"))
    fam = make_family(root / "fam", "mistral", 2, seed=0)
    args = [sys.executable, "-m", "lazymerge.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--db", ":memory:",
            "--threads", "1", "--max-tokens", "64", "--max-recipes", "16"]
    for k, v in fam.items():
        args += ["--source", f"{k}={v}"]
    for k, v in RECIPES.items():
        (root / f"{k}.yaml").write_text(v)
        args += ["--recipe", str(root / f"{k}.yaml")]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        base = None
        t0 = time.time()
        while base is None:
            if proc.poll() is not None or time.time() - t0 > 600:
                raise RuntimeError("server did not start:\n" + (root / "server.log").read_text()[-3000:])
            m = re.search(r"listening on port (\d+)", (root / "server.log").read_text())
            base = f"http://127.0.0.1:{m.group(1)}" if m else None
            time.sleep(0.1)
        c0 = httpx.Client(base_url=base, timeout=120)
        while True:
            try:
                if c0.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        models = ["base", "ta_e1", "ties", "inline"]
        solo = {}
        for m in models:
            for p in PROMPTS:
                for chat in (False, True):
                    st, text = _request(c0, _body(m, p, chat, False, max_tokens), chat, False)
                    assert st == 200, (m, p, st)
                    solo[(m, p, chat)] = text
        stats = {"requests": 0, "completed": 0, "hung_up": 0, "status": {}, "mismatches": [], "registrations": 0}
        lock = threading.Lock()
        stop = time.time() + seconds
        rss: list[tuple[float, int]] = []

        def note(status):
            with lock:
                stats["requests"] += 1
                stats["status"][status] = stats["status"].get(status, 0) + 1

        def client(seed):
            rng = random.Random(seed)
            with httpx.Client(base_url=base, timeout=120) as c:
                while time.time() < stop:
                    m, p, chat = rng.choice(models), rng.choice(PROMPTS), rng.random() < 0.4
                    stream, hang = rng.random() < 0.5, rng.random() < 0.2
                    st, text = _request(c, _body(m, p, chat, stream, max_tokens), chat, hang)
                    note(st)
                    with lock:
                        if text is None and st in (0, 200):
                            stats["hung_up"] += 1
                        elif text is not None:
                            stats["completed"] += 1
                            if text != solo[(m, p, chat)]:
                                stats["mismatches"].append((m, p, chat, text, solo[(m, p, chat)]))

        def registrar():
            rng = random.Random(99)
            with httpx.Client(base_url=base, timeout=120) as c:
                i = 0
                while time.time() < stop:
                    name = f"tmp{i % 5}"
                    w = round(rng.uniform(0.5, 3.0), 2)
                    rec = {"merge_method": "task_arithmetic", "base_model": "base",
                           "models": [{"model": "e2", "parameters": {"weight": w}}]}
                    for r in (c.post("/v1/recipes", json={"name": name, "recipe": rec}),
                              c.post("/v1/completions", json={"model": name, "prompt": "the cat", "max_tokens": 4,
                                                              "temperature": 0}),
                              c.delete(f"/v1/recipes/{name}")):
                        note(r.status_code)
                    with lock:
                        stats["registrations"] += 1
                    i += 1

        def sampler():
            while time.time() < stop:
                rss.append((time.time(), _rss_kb(proc.pid)))
                time.sleep(0.5)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        threads += [threading.Thread(target=registrar), threading.Thread(target=sampler)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        k = max(1, len(rss) // 10)
        first = sum(v for _, v in rss[:k]) / k
        last = sum(v for _, v in rss[-k:]) / k
        n5xx = sum(n for s, n in stats["status"].items() if s >= 500)
        alive = proc.poll() is None
        return {"seconds": seconds, "clients": clients, **stats, "status": dict(sorted(stats["status"].items())),
                "mismatches": stats["mismatches"][:5], "n_mismatches": len(stats["mismatches"]), "5xx": n5xx,
                "rss_first_mb": round(first / 1024, 1), "rss_last_mb": round(last / 1024, 1),
                "rss_ratio": round(last / first, 3) if first else None, "server_alive": alive,
                "traceback_in_log": "Traceback" in (root / "server.log").read_text()}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = run(args.seconds, args.clients)
    print("| seconds | clients | requests | completed | hung up | registrations | 5xx | mismatches | RSS first 10% "
          "(MB) | RSS last 10% (MB) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {res['seconds']:.0f} | {res['clients']} | {res['requests']} | {res['completed']} | {res['hung_up']} | "
          f"{res['registrations']} | {res['5xx']} | {res['n_mismatches']} | {res['rss_first_mb']} | "
          f"{res['rss_last_mb']} | {res['rss_ratio']} |")
    print("status counts:", res["status"], "| server alive:", res["server_alive"], "| traceback in log:",
          res["traceback_in_log"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    ok = (res["5xx"] == 0 and res["n_mismatches"] == 0 and res["server_alive"] and res["rss_ratio"] is not None
          and abs(res["rss_ratio"] - 1) <= 0.10)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
