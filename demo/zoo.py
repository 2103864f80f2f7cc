"""The toy model zoo: a tiny Mistral base, a foreign-language expert and an English math expert.

Contract: `build_zoo(out_dir, seed, size, threads)` is deterministic in (seed, size, ZOO_VERSION, threads: the torch
threads training runs on, default TRAIN_THREADS; the ATen kernel set the process runs, which the `zoo build` and `demo`
commands pin to AVX2 on x86: demo/numerics.py) and cached:
it writes, under `out_dir`,
    base/ foreign/ math/        standard HF checkpoints (config.json, model.safetensors, tokenizer files)
    data/<split>.jsonl          one {"prompt": str, "answer": str} per line; answers are digits
    manifest.json               written last; its presence with the same seed/size/version means "done"
and returns `out_dir`. The target task (`target_search`, `target_test`, disjoint prompts) is English
word-problem arithmetic written in the foreign language: no source model was trained on it; the foreign
expert reads the language, the math expert does the arithmetic. A model answers by greedy generation
after the prompt; the answer is the last integer of the generated text (a correct model emits the
number token then `</s>`). The `zoo build` command (demo/cli.py) calls `_cmd_build`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lazymerge.demo import corpus
from lazymerge.demo.numerics import VAR, cpu_kernels, machine_default
from lazymerge.demo.progress import StepProgress
from lazymerge.demo.train import ModelSpec, make_model, make_tokenizer, train
from lazymerge.engine.threads import available_cpus

ZOO_VERSION = 5  # 4: the foreign expert adapts the foreign vocabulary, the math expert its body; 5: math replays
MODELS = ("base", "foreign", "math")

# What each model trains (zoo v4). The foreign expert is a vocabulary adaptation: only the foreign words' rows of the
# embeddings and LM head train, the transformer body stays the base's (the recipe Artetxe et al., 2020, used to move a
# pretrained model to a new language). The math expert is a body fine-tune that leaves the embeddings alone, as
# adapter fine-tunes do. Both choices came from measurements on zoo v3 (BENCHMARKS.md): a math expert that also
# trains its number-word embeddings keeps part of its arithmetic in them (foreign numbers given the *base's* English
# number embeddings: 36% of its English accuracy), and a foreign expert that trains shared rows (markers, digits,
# English words) breaks the math expert's reading of the prompt (English problems 97% -> 14-30% in a merge).
# v5: half of the math expert's fine-tuning text replays the base's pretraining mix (`corpus.math_text`), 600 steps
# (300 of them word problems, as in v4).
FROZEN = {"base": (), "foreign": ("layers", "norm"), "math": ("embed_tokens",)}
# Training's torch thread count can change a zoo: a kernel may split a reduction by thread, and 1500 steps amplify
# the difference (measured on an AVX2 EPYC: 1, 2, 4 and 8 threads train bit-identical weights, 3 threads others). So
# it is fixed rather than taken from the machine, and recorded; `--zoo-threads` builds with another count.
TRAIN_THREADS = 2


@dataclass(frozen=True)
class Recipe:
    """Sizes and training budget of one zoo size."""

    spec: ModelSpec
    steps: dict[str, int]
    lr: dict[str, float]
    batch_size: int
    n_eval: dict[str, int]


RECIPES = {
    "full": Recipe(
        spec=ModelSpec(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512),
        steps={"base": 1500, "foreign": 1000, "math": 600},
        lr={"base": 2e-3, "foreign": 3e-3, "math": 1e-3},
        batch_size=64,
        n_eval={"target_search": 400, "target_test": 600, "foreign_test": 300, "math_test": 300},
    ),
    "small": Recipe(
        spec=ModelSpec(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64),
        steps={"base": 20, "foreign": 8, "math": 16},
        lr={"base": 3e-3, "foreign": 3e-3, "math": 1e-3},
        batch_size=16,
        n_eval={"target_search": 40, "target_test": 40, "foreign_test": 20, "math_test": 20},
    ),
}


def _stream(world: corpus.World, make: Callable, rng: random.Random, exclude: set[str]) -> Callable[[], str]:
    """A text generator that never yields a held-out example."""

    def next_text() -> str:
        while True:
            text = make(world, rng)
            if text not in exclude:
                return text

    return next_text


def make_datasets(world: corpus.World, seed: int, n: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    rng = random.Random(f"eval-{seed}")
    n_target = n["target_search"] + n["target_test"]
    english = corpus.unique_examples(corpus.word_problem, rng, n_target)
    target = [(world.translate(p), a) for p, a in english]
    math_test = corpus.unique_examples(corpus.word_problem, rng, n["math_test"], {p for p, _ in english})
    lookups = corpus.unique_examples(corpus.lookup_qa, rng, n["foreign_test"])
    foreign_test = [(world.translate(p), a) for p, a in lookups]
    return {
        "target_search": target[: n["target_search"]],
        "target_test": target[n["target_search"] :],
        "foreign_test": foreign_test,
        "math_test": math_test,
        "_english_target": english,
    }


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for prompt, answer in rows:
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")


def _content_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def build_zoo(out_dir: str | Path, seed: int = 0, size: str = "full", force: bool = False, stream=None,
              threads: int | None = None, parallel: bool | None = None) -> Path:
    """Build (or reuse) the zoo for `seed`, `size` and training `threads` (None: TRAIN_THREADS) under `out_dir`;
    returns `out_dir` as a Path.
    A zoo built on another thread count is rebuilt (its weights differ). Raises ValueError for an unknown size or
    threads < 1, RuntimeError if an expert's training process fails.

    The base trains on `threads` torch threads; then the two experts, each from the saved base on
    `expert_threads(threads)` threads: in two processes at once when `parallel` (None: for the full size when the
    CPUs this process may use hold both), else one after the other here; the same bits either way
    (`tests/test_zoo.py`). Training shows its progress on `stream` (default stderr): a bar with ETA on a terminal, a
    line per phase and every 20 s otherwise (demo/progress.py); a reused zoo prints nothing."""
    if size not in RECIPES:
        raise ValueError(f"size must be one of {sorted(RECIPES)}, got {size!r}")
    threads = TRAIN_THREADS if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    out = Path(out_dir)
    old = _read_manifest(out)
    kernels = cpu_kernels()
    if not force and old and (old.get("seed"), old.get("size"), old.get("version"),
                              old.get("train_threads", TRAIN_THREADS),
                              old.get("cpu_kernels", machine_default())) == (seed, size, ZOO_VERSION, threads, kernels):
        return out
    recipe = RECIPES[size]
    (out / "manifest.json").unlink(missing_ok=True)
    for name in (*MODELS, "data"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        world = corpus.World(seed)
        data = make_datasets(world, seed, recipe.n_eval)
        data.pop("_english_target")
        for split, rows in data.items():
            _write_jsonl(out / "data" / f"{split}.jsonl", rows)
        job = _Job(str(out), seed, size)
        base = make_model(recipe.spec, job.tokenizer(), seed)
        progress = StepProgress(f"zoo seed {seed}: training base", recipe.steps["base"], stream=stream)
        stats = {"base": job.train(base, "base", progress.update)}
        progress.close(f", loss {stats['base']['final_loss']:.3f}")
        experts = [m for m in MODELS if m != "base"]
        each = expert_threads(threads)
        if parallel is None:
            parallel = size == "full" and available_cpus() >= len(experts) * each
        if parallel:
            stats.update(_train_in_processes(job, experts, each, stream))
        else:
            torch.set_num_threads(each)
            for name in experts:
                model = copy.deepcopy(base)
                progress = StepProgress(f"zoo seed {seed}: training {name}", recipe.steps[name], stream=stream)
                stats[name] = job.train(model, name, progress.update)
                progress.close(f", loss {stats[name]['final_loss']:.3f}")
    finally:
        torch.set_num_threads(was)

    manifest = {
        "version": ZOO_VERSION,
        "seed": seed,
        "size": size,
        "train_threads": threads,
        "cpu_kernels": kernels,
        "models": {name: name for name in MODELS},
        "base": "base",
        "datasets": {split: f"data/{split}.jsonl" for split in data},
        "train": stats,
        "content_hash": _content_hash(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def expert_threads(threads: int) -> int:
    """Torch threads each expert trains on when the base trained on `threads`: half of them, at least 1 (the two
    experts train at once). Measured on the 2-core machines: 1 and 2 threads train the same bits (so do 4 and 8; 3
    does not), and a 1-thread step takes 1.26x a 2-thread one, so two 1-thread experts at once take 105 s where one
    after the other on 2 threads took 151 s (zoo v5, seed 0, AVX-512 EPYC, AVX2 kernels)."""
    return max(1, threads // 2)


@dataclass(frozen=True)
class _Job:
    """What training one model of a zoo needs, rebuilt from (out, seed, size) alone (a training process gets only
    this): the world, the held-out texts every model's training stream excludes, the tokenizer."""

    out: str
    seed: int
    size: str

    def world(self) -> corpus.World:
        return corpus.World(self.seed)

    def tokenizer(self):
        return make_tokenizer(self.world().vocab)

    def train(self, model, name: str, on_step: Callable[[int], None] | None = None) -> dict:
        """Train `model` as zoo model `name` in place, save it (and the tokenizer) under out/name; its stats."""
        recipe, world = RECIPES[self.size], self.world()
        data = make_datasets(world, self.seed, recipe.n_eval)
        held_out = {
            "base": set(),
            "foreign": {corpus.as_text(p, a) for p, a in data["foreign_test"]},
            "math": {corpus.as_text(p, a) for p, a in data["math_test"] + data["_english_target"]},
        }
        mixes = {"base": corpus.base_text, "foreign": corpus.foreign_text, "math": corpus.math_text}
        tokenizer = self.tokenizer()
        foreign_rows = tokenizer.convert_tokens_to_ids(sorted(world.foreign.values()))
        stats = train(
            model,
            tokenizer,
            _stream(world, mixes[name], random.Random(f"{name}-{self.seed}"), held_out[name]),
            steps=recipe.steps[name],
            batch_size=recipe.batch_size,
            lr=recipe.lr[name],
            weight_decay=0.01 if name == "base" else 0.0,
            seed=self.seed,
            frozen=FROZEN[name],
            rows=foreign_rows if name == "foreign" else None,
            on_step=on_step,
        )
        _save_quietly(model, Path(self.out) / name)
        tokenizer.save_pretrained(Path(self.out) / name)
        return stats


def _train_expert(job: _Job, name: str, threads: int, queue) -> None:
    """A training process's body: expert `name` from the saved base on `threads` threads; reports ("step", name, k)
    every few steps, then ("done", name, stats) or ("error", name, traceback text) on `queue`."""
    try:
        from transformers import MistralForCausalLM
        from transformers.utils import logging as hf_logging

        from lazymerge.search.evaluate import die_with_parent

        die_with_parent()
        hf_logging.disable_progress_bar()  # "Loading weights" bars of two processes: noise between the demo's lines
        torch.set_num_threads(threads)
        model = MistralForCausalLM.from_pretrained(Path(job.out) / "base")
        every = lambda k: queue.put(("step", name, k)) if k % 10 == 0 else None  # noqa: E731
        queue.put(("done", name, job.train(model, name, every)))
    except BaseException:  # noqa: BLE001 - the parent names the model and raises
        import traceback

        queue.put(("error", name, traceback.format_exc()))


def _train_in_processes(job: _Job, names: list[str], threads: int, stream) -> dict:
    """Train the experts `names` at once, one spawned process each on `threads` threads (a child inherits the
    parent's environment, so the pinned kernel set too: demo/numerics.py); one progress line for all of them.
    Returns {name: stats}; raises RuntimeError naming the model whose process failed."""
    import multiprocessing as mp
    import queue as queue_mod

    recipe = RECIPES[job.size]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = {n: ctx.Process(target=_train_expert, args=(job, n, threads, q), daemon=True) for n in names}
    # the children run the kernel set this process runs (the one the manifest records), whatever the environment
    # says now (set after torch was imported here, it would pin the children alone)
    was = os.environ.get(VAR)
    os.environ[VAR] = cpu_kernels().lower()
    try:
        for p in procs.values():
            p.start()
    finally:
        if was is None:
            os.environ.pop(VAR, None)
        else:
            os.environ[VAR] = was
    progress = StepProgress(f"zoo seed {job.seed}: training {' + '.join(names)} (one process each)",
                            sum(recipe.steps[n] for n in names), stream=stream)
    steps, stats = dict.fromkeys(names, 0), {}
    try:
        while len(stats) < len(names):
            try:
                kind, name, value = q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [n for n, p in procs.items() if n not in stats and not p.is_alive()]
                if dead:
                    raise RuntimeError(f"zoo seed {job.seed}: the process training {dead[0]!r} exited "
                                       f"(code {procs[dead[0]].exitcode}) before it finished") from None
                continue
            if kind == "error":
                raise RuntimeError(f"zoo seed {job.seed}: training {name!r} failed:\n{value}")
            if kind == "step":
                steps[name] = value
            else:
                steps[name], stats[name] = value["steps"], value
            progress.update(sum(steps.values()))
    finally:
        for p in procs.values():
            if p.is_alive() and not stats.keys() >= set(names):
                p.terminate()
            p.join()
    progress.close(", loss " + ", ".join(f"{n} {stats[n]['final_loss']:.3f}" for n in names))
    return stats


def _save_quietly(model, path: Path) -> None:
    """`save_pretrained` without transformers' one-shard "Writing model shards" bar (noise between our lines)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if was:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- CLI


def _cmd_build(args: argparse.Namespace) -> int:
    size = "small" if args.small else "full"
    out = build_zoo(args.dir, seed=args.seed, size=size, force=args.force, threads=args.threads)
    manifest = _read_manifest(out) or {}
    print(f"zoo ({size}, seed {args.seed}, {manifest.get('train_threads')} training threads, "
          f"{manifest.get('cpu_kernels')} kernels) at {out.resolve()}")
    for name, stat in manifest.get("train", {}).items():
        print(f"  {name:8s} steps={stat['steps']:5d} loss={stat['final_loss']:.3f} ({stat['seconds']}s)")
    for rel in manifest.get("datasets", {}).values():
        print(f"  {rel}")
    return 0
