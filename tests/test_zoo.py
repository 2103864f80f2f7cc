"""The toy zoo: loadable HF checkpoints, well-formed disjoint datasets, determinism, caching, CLI."""

import argparse
import io
import json
import random
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralForCausalLM

from lazymerge.demo import corpus, zoo

SPLITS = ("target_search", "target_test", "foreign_test", "math_test")


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    return zoo.build_zoo(tmp_path_factory.mktemp("zoo") / "z", seed=0, size="small")


def _rows(root, split):
    return [json.loads(line) for line in (root / "data" / f"{split}.jsonl").read_text().splitlines()]


def test_manifest_lists_models_and_datasets(small_zoo):
    m = json.loads((small_zoo / "manifest.json").read_text())
    assert (m["seed"], m["size"], m["version"]) == (0, "small", zoo.ZOO_VERSION)
    assert set(m["models"]) == {"base", "foreign", "math"}
    assert set(m["datasets"]) == set(SPLITS)
    assert all((small_zoo / rel).is_file() for rel in m["datasets"].values())
    assert re.fullmatch(r"[0-9a-f]{64}", m["content_hash"])
    assert m["train"]["base"]["steps"] == zoo.RECIPES["small"].steps["base"]


@pytest.mark.parametrize("name", ["base", "foreign", "math"])
def test_checkpoint_loads_with_auto_classes(small_zoo, name):
    model = AutoModelForCausalLM.from_pretrained(small_zoo / name)
    tok = AutoTokenizer.from_pretrained(small_zoo / name)
    assert isinstance(model, MistralForCausalLM)
    assert not model.config.tie_word_embeddings
    assert (small_zoo / name / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    prompt = _rows(small_zoo, "target_test")[0]["prompt"]
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert len(ids) == 1 + len(prompt.split())
    assert tok.decode(ids, skip_special_tokens=True) == prompt
    chat = tok.apply_chat_template([{"role": "user", "content": "tom has five apples ."}], tokenize=False)
    assert chat == "Q : tom has five apples . A :"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))


def test_math_mix_replays_the_base_mix():
    """Zoo v5: half of the math expert's text is the base's pretraining mix, drawn from the same rng stream."""
    world = corpus.World(0)
    texts = [corpus.math_text(world, random.Random(i)) for i in range(2000)]
    marks = (" more ", " do they have ", " gives ", " loses ")  # only word problems ask questions about these
    problems = [t for t in texts if t.startswith("Q : ") and any(k in t for k in marks)]
    assert 0.35 < len(problems) / len(texts) < 0.65
    rng_a, rng_b = random.Random(7), random.Random(7)
    rng_b.random()  # the replay coin
    assert corpus.math_text(world, rng_a, replay=0.0) == corpus.as_text(*corpus.word_problem(rng_b))
    rng_a, rng_b = random.Random(3), random.Random(3)
    rng_b.random()
    assert corpus.math_text(world, rng_a, replay=1.0) == corpus.base_text(world, rng_b)


def test_experts_train_only_their_parts(small_zoo):
    """Zoo v4: the foreign expert changes only the foreign words' rows of the embeddings and LM head (body frozen),
    the math expert leaves the embeddings exactly as the base has them."""
    sd = {m: AutoModelForCausalLM.from_pretrained(small_zoo / m).state_dict() for m in ("base", "foreign", "math")}
    tok = AutoTokenizer.from_pretrained(small_zoo / "base")
    foreign_ids = tok.convert_tokens_to_ids(sorted(corpus.World(0).foreign.values()))
    other = torch.ones(len(tok), dtype=torch.bool)
    other[foreign_ids] = False
    for name, base in sd["base"].items():
        f, m = sd["foreign"][name], sd["math"][name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(f[other], base[other]), name
            assert not torch.equal(f[foreign_ids], base[foreign_ids]), name
        else:
            assert torch.equal(f, base), name
        if name == "model.embed_tokens.weight":
            assert torch.equal(m, base)
        elif "layers.0.mlp" in name or name == "lm_head.weight":
            assert not torch.equal(m, base), name


def test_train_rejects_rows_with_weight_decay():
    from lazymerge.demo.train import ModelSpec, make_model, make_tokenizer, train

    tok = make_tokenizer(corpus.World(0).vocab)
    model = make_model(ModelSpec(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32), tok, 0)
    with pytest.raises(ValueError, match="weight_decay=0"):
        train(model, tok, lambda: "tom has five apples .", steps=1, batch_size=2, lr=1e-3, weight_decay=0.01,
              seed=0, rows=[5])


def test_datasets_are_well_formed_and_disjoint(small_zoo):
    tok = AutoTokenizer.from_pretrained(small_zoo / "base")
    vocab = tok.get_vocab()
    rows = {s: _rows(small_zoo, s) for s in SPLITS}
    for split, rs in rows.items():
        assert len(rs) == zoo.RECIPES["small"].n_eval[split]
        for r in rs:
            assert set(r) == {"prompt", "answer"}
            assert r["answer"].isdigit() and r["answer"] in vocab
            assert r["prompt"].startswith("Q : ") and r["prompt"].endswith(" ? A :")
            assert all(w in vocab for w in r["prompt"].split())
    search = {r["prompt"] for r in rows["target_search"]}
    test = {r["prompt"] for r in rows["target_test"]}
    assert len(search) == len(rows["target_search"]) and len(test) == len(rows["target_test"])
    assert not search & test
    # target prompts are foreign: no English content word appears in them
    english_words = set(corpus.ENGLISH)
    assert not any(w in english_words for p in search | test for w in p.split())
    assert any(w in english_words for r in rows["math_test"] for w in r["prompt"].split())


def test_world_is_a_bijective_relabeling():
    world = corpus.World(3)
    forms = list(world.foreign.values())
    assert len(set(forms)) == len(corpus.ENGLISH)
    assert not set(forms) & set(corpus.ENGLISH)
    assert len(world.vocab) == len(set(world.vocab))
    assert world.foreign != corpus.World(4).foreign
    f = world.foreign
    assert world.translate("Q : tom has 3 apples . A :").split() == [
        "Q", ":", f["tom"], f["has"], "3", f["apples"], ".", "A", ":"
    ]


def test_word_problem_answers_are_the_arithmetic():
    rng = random.Random(0)
    value = {w: i + 1 for i, w in enumerate(corpus.NUMBER_WORDS)}
    for _ in range(200):
        prompt, answer = corpus.word_problem(rng)
        a, b = (value[w] for w in prompt.split() if w in value)
        expected = a + b if (" more " in prompt or " they " in prompt) else a - b
        assert int(answer) == expected and 0 < expected <= corpus.MAX_VALUE


def test_same_seed_same_bytes_other_seed_differs(small_zoo, tmp_path):
    log = io.StringIO()  # not a terminal: one line per phase start and end (and every 20 s), no carriage returns
    again = zoo.build_zoo(tmp_path / "again", seed=0, size="small", stream=log)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    for name in ("base", "foreign", "math"):
        assert any(x.startswith(f"zoo seed 0: training {name}: ") and x.endswith(" steps ...") for x in lines)
        assert any(x.startswith(f"zoo seed 0: training {name}: done in ") and "loss" in x for x in lines)
    for name in ("base", "foreign", "math"):
        a = (small_zoo / name / "model.safetensors").read_bytes()
        assert a == (again / name / "model.safetensors").read_bytes()
    hash_of = lambda p: json.loads((p / "manifest.json").read_text())["content_hash"]  # noqa: E731
    assert hash_of(again) == hash_of(small_zoo)
    other = zoo.build_zoo(tmp_path / "other", seed=1, size="small")
    assert hash_of(other) != hash_of(small_zoo)


def test_cached_build_does_not_retrain(small_zoo, tmp_path, monkeypatch):
    root = shutil.copytree(small_zoo, tmp_path / "copy")

    def no_training(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(zoo, "train", no_training)
    before = (root / "math" / "model.safetensors").stat().st_mtime_ns
    assert zoo.build_zoo(root, seed=0, size="small") == root
    assert (root / "math" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(AssertionError, match="retrained"):
        zoo.build_zoo(root, seed=0, size="small", force=True)
    assert not (root / "manifest.json").exists()  # a failed rebuild leaves no stale manifest


def test_cli_build_handler(tmp_path, capsys):
    from lazymerge.demo import cli

    parser = argparse.ArgumentParser(prog="lazymerge")
    cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli_zoo"
    args = parser.parse_args(["zoo", "build", str(out), "--small", "--seed", "2"])
    assert args.func(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["seed"], manifest["size"]) == (2, "small")
    assert str(out.resolve()) in capsys.readouterr().out
    defaults = parser.parse_args(["zoo", "build"])
    assert (defaults.dir, defaults.seed, defaults.small, defaults.force) == ("./zoo", 0, False, False)


def test_step_progress_lines_with_eta_off_a_terminal():
    from lazymerge.demo.progress import StepProgress

    log = io.StringIO()
    p = StepProgress("train x", 4, stream=log, every_s=0.0)
    for k in range(1, 5):
        p.update(k)
    p.close(", loss 1.0")
    lines = log.getvalue().splitlines()
    assert lines[0] == "train x: 4 steps ..." and lines[-1].startswith("train x: done in ")
    assert [x.split(",")[0] for x in lines[1:-1]] == [f"train x: step {k}/4" for k in (1, 2, 3)]
    assert all("ETA" in x for x in lines[1:-1])


def test_expert_search_splits_are_disjoint_from_the_held_out_files(small_zoo, tmp_path):
    from lazymerge.demo.experiment import TASK_FILES, expert_search_splits

    a = expert_search_splits(small_zoo, 0, tmp_path / "a", n=30)
    b = expert_search_splits(small_zoo, 0, tmp_path / "b", n=30)
    for name, path in a.items():
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        assert len(rows) == 30 and len({r["prompt"] for r in rows}) == 30
        assert path.read_bytes() == b[name].read_bytes()  # deterministic in the seed
        held = {json.loads(x)["prompt"] for x in (small_zoo / "data" / TASK_FILES[name][1]).read_text().splitlines()}
        assert not held & {r["prompt"] for r in rows}
        assert all(r["answer"].isdigit() for r in rows)


def test_training_threads_are_part_of_the_zoo(small_zoo, tmp_path, monkeypatch):
    assert json.loads((small_zoo / "manifest.json").read_text())["train_threads"] == zoo.TRAIN_THREADS
    with pytest.raises(ValueError, match="threads must be >= 1"):
        zoo.build_zoo(tmp_path / "none", seed=0, size="small", threads=0)
    root = shutil.copytree(small_zoo, tmp_path / "copy")
    trained = []
    real_train = zoo.train
    monkeypatch.setattr(zoo, "train", lambda *a, **k: trained.append(torch.get_num_threads()) or real_train(*a, **k))
    zoo.build_zoo(root, seed=0, size="small", threads=1)  # another thread count: another zoo, rebuilt
    assert trained == [1, 1, 1]
    assert json.loads((root / "manifest.json").read_text())["train_threads"] == 1


def test_experts_trained_at_once_in_processes_equal_those_trained_in_turn(small_zoo, tmp_path, monkeypatch):
    """The full zoo trains its two experts at once, one spawned process each, from the saved base (`build_zoo`,
    parallel=None on 2+ CPUs): the same bytes as training them one after the other in this process. The children
    run this process's ATen kernel set even when the environment names another one now (set after torch was
    imported here, it would otherwise pin the children alone)."""
    from lazymerge.demo.numerics import VAR

    monkeypatch.setenv(VAR, "default")
    log = io.StringIO()
    par = zoo.build_zoo(tmp_path / "par", seed=0, size="small", parallel=True, stream=log)
    lines = log.getvalue().splitlines()
    assert any(x.startswith("zoo seed 0: training foreign + math (one process each): done in ") for x in lines)
    for name in ("base", "foreign", "math"):
        assert (par / name / "model.safetensors").read_bytes() == (small_zoo / name / "model.safetensors").read_bytes()
    hash_of = lambda p: json.loads((p / "manifest.json").read_text())["content_hash"]  # noqa: E731
    assert hash_of(par) == hash_of(small_zoo)
