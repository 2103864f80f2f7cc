"""The merge server as a real process (`lazymerge serve --port 0`: uvicorn on a free 127.0.0.1 port it binds and
prints): the `openai` client over real HTTP, concurrent clients, the API key, and the A/B page in a real headless
Chromium (Debian's /usr/bin/chromium driven by Playwright for Python; skipped, saying why, where either is missing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

KEY = "live-key"
CHROMIUM = os.environ.get("LAZYMERGE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def live(server_sources, server_recipes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    args = [sys.executable, "-m", "lazymerge.cli", "serve", "--host", "127.0.0.1", "--port", "0",
            "--db", str(tmp / "votes.sqlite"), "--threads", "1", "--max-tokens", "64"]
    for name, path in server_sources.items():
        args += ["--source", f"{name}={path}"]
    for name, text in server_recipes.items():
        (tmp / f"{name}.yaml").write_text(text)
        args += ["--recipe", str(tmp / f"{name}.yaml")]
    env = {**os.environ, "LAZYMERGE_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = None
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()}")
            assert time.time() - t0 < 90, "server did not start:\n" + (tmp / "server.log").read_text()
            if base is None:  # --port 0: the server binds a free port itself and prints it (no race)
                m = re.search(r"lazymerge: listening on port (\d+)", (tmp / "server.log").read_text())
                if m is None:
                    time.sleep(0.1)
                    continue
                base = f"http://127.0.0.1:{m.group(1)}"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp / "server.log").read_text()
    assert "A/B page: http://127.0.0.1" in out and "Traceback" not in out, out
    assert "?api_key=YOUR_KEY" in out and KEY not in out, out  # the key is never printed


@pytest.fixture(scope="module")
def oracle(server_sources):
    from conftest import SERVER_RECIPES

    from lazymerge.engine import Engine

    eng = Engine(server_sources, allow_open=False)
    return {name: eng.compile(r) for name, r in SERVER_RECIPES.items()}


def test_openai_client_over_real_http(live, oracle):
    oai = openai.OpenAI(base_url=live + "/v1", api_key=KEY, max_retries=0)
    assert {"ta_e1", "ta_e2", "ties", "base", "e1", "e2"} == {m.id for m in oai.models.list().data}
    prompts = ["the cat sees", "hello"]
    r = oai.completions.create(model="ties", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == [c.text for c in oracle["ties"].generate(prompts, max_tokens=6)]
    msgs = [{"role": "user", "content": "one two three"}]
    m = oracle["ta_e1"]
    want = m.generate([m.chat_prompt(msgs)], max_tokens=6)[0].text
    r = oai.chat.completions.create(model="ta_e1", messages=msgs, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == want
    stream = oai.chat.completions.create(model="ta_e1", messages=msgs, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(live + "/health").status_code == 200


def test_concurrent_clients_real_process(live, oracle):
    prompts = ["the cat sees", "one plus two is the", "hello", "red blue green sky day night"]
    jobs = [(m, p) for p in prompts for m in ("ta_e1", "ta_e2", "ties")]
    want = {(m, p): oracle[m].generate([p], max_tokens=5)[0].text for m, p in jobs}

    def one(job):
        m, p = job
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            r = c.post(live + "/v1/completions", json={"model": m, "prompt": p, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    assert got == [want[j] for j in jobs]
    metrics = httpx.get(live + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "lazymerge_batch_requests_count" in metrics


def _playwright_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright); the A/B page test needs it")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium); the A/B page test needs it")
    return sync_playwright


def test_ab_page_in_headless_chromium(live, oracle):
    sync_playwright = _playwright_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{live}/?api_key={KEY}")  # sets the cookie the page's own requests then carry
            page.wait_for_selector("#status:has-text('Ready.')", timeout=30_000)
            page.select_option("#recipe-1", "ta_e1")
            page.select_option("#recipe-2", "ta_e2")
            page.fill("#max-tokens", "6")
            page.fill("#temperature", "0")
            page.fill("#prompt", "the cat sees")
            page.click("#run")
            page.wait_for_selector("#vote-A:enabled", timeout=60_000)
            outs = {s: page.text_content(f"#out-{s}") for s in "AB"}
            assert all(outs.values()) and "tokens" in page.text_content("#stats-A")
            assert page.text_content("#name-A") == "" and page.text_content("#name-B") == ""  # blind
            page.click("#vote-A")
            page.wait_for_selector("#name-A:not(:empty)", timeout=30_000)
            names = {s: page.text_content(f"#name-{s}") for s in "AB"}
            assert sorted(names.values()) == ["ta_e1", "ta_e2"]
            for s in "AB":  # each side streamed exactly the greedy output of the recipe behind it
                assert outs[s] == oracle[names[s]].generate(["the cat sees"], max_tokens=6)[0].text
            page.wait_for_selector(f"#leaderboard tbody tr[data-recipe='{names['A']}']", timeout=30_000)
            row = page.locator(f"#leaderboard tbody tr[data-recipe='{names['A']}'] td").all_text_contents()
            assert row[1] == names["A"] and row[4] == "1"  # one win
            assert page.locator("#leaderboard tbody tr").first.get_attribute("data-recipe") == names["A"]
            assert not errors, errors
        finally:
            browser.close()
    board = httpx.get(live + "/v1/leaderboard", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert board[0]["recipe"] == names["A"] and board[0]["wins"] == 1
