"""lm-evaluation-harness (the `lm-eval` package) three ways on one recipe over the demo zoo (`lazymerge.demo.zoo`,
built at its test size: the demo's Mistral checkpoints and word-level tokenizer, trained in seconds), with a local
multiple-choice task and a local generation task (task YAMLs under an `include_path`, JSONL data files, nothing
downloaded): `--model lazymerge` on the recipe, `--model hf` on its `lazymerge merge` export, and `--model
local-completions` against `lazymerge serve` with the server's own tokenizer (`tokenizer_backend=auto` finds
/tokenizer_info and /tokenize). Same metrics, and the same per-choice log-likelihoods.

The zoo's tokenizer adds BOS. lm-eval's RemoteTokenizer encodes with `add_special_tokens: false` (lm_eval/utils.py),
so `local-completions` scores without BOS whatever the server does (vLLM behaves the same); it equals `hf` and
`lazymerge` run with `add_bos_token=False`, and those two also agree with each other at their default (with BOS).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
httpx = pytest.importorskip("httpx")

RECIPE = ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
          "  - model: {e2}\n    parameters: {{weight: 1.0, density: 0.5}}\n")
MC_TASK = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 2
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
"""


def write_tasks(root, model, prompts: list[str], seed: int = 0):
    """Local task YAMLs + JSONL data over `prompts`: half the answers are `model`'s own greedy outputs (so neither
    metric is 0); the other choices and answers are other numbers."""
    rng = random.Random(seed)
    outs = [o.text.strip() for o in model.generate(prompts, max_tokens=2)]
    other = lambda o: next(x for x in map(str, rng.sample(range(30), 5)) if x != o)  # noqa: E731
    gen = [{"prompt": p, "answer": o if i % 2 == 0 else other(o)} for i, (p, o) in enumerate(zip(prompts, outs))]
    mc = [{"prompt": p, "choices": [o, f"{other(o)} {other(o)}", other(o)], "answer": i % 2}
          for i, (p, o) in enumerate(zip(prompts, outs))]
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, rows, template in (("toy_mc", mc, MC_TASK), ("toy_gen", gen, GEN_TASK)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(template.format(data=root / f"{name}.jsonl"))
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lazymerge.demo.zoo import build_zoo
    from lazymerge.engine import Engine

    root = tmp_path_factory.mktemp("lm_eval")
    zoo = build_zoo(root / "zoo", seed=0, size="small")
    fam = {"base": str(zoo / "base"), "e1": str(zoo / "foreign"), "e2": str(zoo / "math")}
    (root / "recipe.yaml").write_text(RECIPE.format(**fam))
    (root / "served.yaml").write_text(RECIPE.format(base="base", e1="e1", e2="e2"))
    model = Engine().compile(root / "recipe.yaml")
    rows = (zoo / "data" / "target_test.jsonl").read_text().splitlines()[:8]
    tasks = write_tasks(root, model, [json.loads(r)["prompt"] for r in rows])
    r = subprocess.run([sys.executable, "-m", "lazymerge.cli", "merge", str(root / "recipe.yaml"), str(root / "export")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return root, fam, tasks


def _evaluate(model, model_args, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    out = simple_evaluate(model=model, model_args=model_args, tasks=["toy_mc", "toy_gen"],
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    metrics = {t: {k: float(v) for k, v in out["results"][t].items() if k in ("acc,none", "exact_match,strip")}
               for t in ("toy_mc", "toy_gen")}
    lls = [r[0] for s in out["samples"]["toy_mc"] for r in s["filtered_resps"]]
    gens = [s["filtered_resps"] for s in out["samples"]["toy_gen"]]
    return metrics, lls, gens


def _start_server(root, fam):
    args = [sys.executable, "-m", "lazymerge.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--threads", "1",
            "--recipe", str(root / "served.yaml"), "--db", str(root / "votes.sqlite")]
    for name, path in fam.items():
        args += ["--source", f"{name}={path}"]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed by the caller's process teardown
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _wait_for_server(proc, root, limit_s: float = 180):
    t0 = time.time()
    while True:
        assert proc.poll() is None, (root / "server.log").read_text()
        assert time.time() - t0 < limit_s, "server did not start:\n" + (root / "server.log").read_text()
        m = re.search(r"lazymerge: listening on port (\d+)", (root / "server.log").read_text())
        if m:
            base = f"http://127.0.0.1:{m.group(1)}"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
        time.sleep(0.2)


def test_same_metrics_three_ways(setup):
    import lazymerge.engine.harness  # noqa: F401 - registers "lazymerge" (the CLI finds it through the entry point)

    root, fam, tasks = setup
    proc = _start_server(root, fam)  # bound: terminated below, whatever happens
    try:
        ours = _evaluate("lazymerge", f"recipe={root / 'recipe.yaml'},batch_size=8", tasks)
        hf = _evaluate("hf", f"pretrained={root / 'export'},device=cpu,dtype=float32,batch_size=8", tasks)
        ours_nobos = _evaluate("lazymerge", f"recipe={root / 'recipe.yaml'},batch_size=8,add_bos_token=False", tasks)
        hf_nobos = _evaluate("hf", f"pretrained={root / 'export'},device=cpu,dtype=float32,batch_size=8,"
                                   "add_bos_token=False", tasks)
        base = _wait_for_server(proc, root)
        remote = _evaluate("local-completions", f"model=served,base_url={base}/v1/completions,tokenizer_backend=auto,"
                                                "max_retries=1,timeout=60", tasks)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # the tokenizer's default (BOS): lazymerge on the recipe == hf on the export
    assert ours[0] == hf[0], (ours[0], hf[0])
    assert 0 < ours[0]["toy_gen"]["exact_match,strip"] < 1  # a real comparison, not two zeros
    assert ours[1] == pytest.approx(hf[1], abs=1e-4)
    assert ours[2] == hf[2]
    # without special tokens (the remote tokenizer's way): all three agree
    assert ours_nobos[0] == hf_nobos[0] == remote[0], (ours_nobos[0], hf_nobos[0], remote[0])
    assert ours_nobos[1] == pytest.approx(hf_nobos[1], abs=1e-4) and remote[1] == pytest.approx(hf_nobos[1], abs=1e-4)
    assert ours_nobos[2] == hf_nobos[2] == remote[2]
    # and BOS does change the scores here, so the two conventions are told apart (add_bos_token is not ignored)
    assert max(abs(a - b) for a, b in zip(ours[1], ours_nobos[1])) > 1e-3


def test_lm_eval_resolves_the_model_name_in_a_fresh_interpreter():
    """What `lm_eval --model lazymerge` does first: resolve the name in lm-eval's registry, with nothing of lazymerge
    imported beforehand (the `lm_eval.models` entry point, bridged for lm-eval 0.4.13 by lazymerge-lm_eval.pth)."""
    code = ("import sys; from lm_eval.api.registry import get_model; cls = get_model('lazymerge'); "
            "print(cls.__module__, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[0] == "lazymerge.engine.harness", (
        "lm-eval does not find lazymerge: install it with `make install` (an editable install needs "
        f"`python -c 'from lazymerge.lm_eval_plugin import write_pth; write_pth()'`)\n{r.stderr[-1500:]}")


def test_the_pth_hook_is_silent_when_lazymerge_is_gone(tmp_path):
    """The `.pth` line runs at every interpreter start; after lazymerge is uninstalled or its editable checkout moved
    (the `.pth`, written by `make install`, stays), it must do nothing rather than print a traceback."""
    line = (Path(__file__).parents[1] / "lazymerge" / "lazymerge-lm_eval.pth").read_text()
    # -I -S: no site-packages and no working directory on sys.path, so `lazymerge` cannot be found
    r = subprocess.run([sys.executable, "-I", "-S", "-c", line], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_add_bos_token_as_hf_takes_it(setup):
    from lazymerge.engine import Engine
    from lazymerge.engine.generate import UsageError
    from lazymerge.engine.harness import LazymergeLM

    root, _, _ = setup
    m = Engine().compile(root / "recipe.yaml")  # the demo zoo's tokenizer adds BOS
    text = "Q : mibo natu"
    default, on, off = (LazymergeLM(model=m, add_bos_token=v).tok_encode(text) for v in (None, "True", False))
    assert off == m.tokenizer.encode(text, add_special_tokens=False)
    assert on == m.tokenizer.encode(text, add_special_tokens=True) and default == on and on != off
    with pytest.raises(UsageError, match="add_bos_token must be True or False"):
        LazymergeLM(model=m, add_bos_token="maybe")
