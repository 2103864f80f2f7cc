"""Fitness tasks: datasets and the scores a model gets on them.

A dataset is a local JSONL file, one object per line:

    {"prompt": "Q: 2 plus 3 is", "answer": "5"}                                    # generate_exact_match
    {"prompt": "The sky is", "answer": " blue"}                                     # answer_loglik
    {"prompt": "The sky is", "choices": [" red", " blue"], "answer": 1}            # multiple_choice (index or
                                                                                    #  the choice's text)

Task types (each a score where higher is better):
* `generate_exact_match`: greedy generation (`max_tokens`, `stop`), an answer extracted from the output and compared
  with the reference extracted the same way. `last_number` (GSM8K-style: the number after a `#### ` marker if there
  is one, else the last number; commas dropped, `3.50` == `3.5`), `exact` (stripped text) or `first_line`. An
  optional `check` (the paper's language check) makes an output that fails it count as wrong. Score: accuracy.
* `multiple_choice`: the choice with the highest log-likelihood given the prompt (optionally per character).
  Score: accuracy.
* `answer_loglik`: mean log-likelihood of the reference answers given the prompts, per token (or per answer).
* `lm_eval` (`{lm_eval: TASK, metric: acc, limit: N}`): an lm-evaluation-harness task's metric
  (search/lm_eval_tasks.py: built once per run; held out = the documents after the first `limit`).

`score_task(model, task)` needs of the model only `generate(list[token ids], max_tokens=, stop=)`,
`loglikelihood(pairs)`, `encode(text)` and `tokenizer`: a `LazyModel`, or an adapter over a loaded transformers
model. Every task batches its examples through the model (chunks of `batch_size` prompts per call).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .config import SearchConfig, SearchConfigError, TaskConfig

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
MARKER = re.compile(r"####\s*(-?\d[\d,]*(?:\.\d+)?)")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    label: int | None = None  # multiple choice: index of the right choice


@dataclass
class Task:
    name: str
    type: str
    examples: list[Example]
    weight: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    extract: str = "last_number"
    check_regex: str | None = None
    check_script: str | None = None
    check_min_fraction: float = 0.5
    per_token: bool = True
    length_normalize: bool = False
    lm: object = None  # lm_eval tasks: the built `lm_eval_tasks.LmEvalTask`
    _ids: dict = field(default_factory=dict, repr=False, compare=False)  # tokenizer id -> encoded prompts

    def prompt_ids(self, model) -> list[list[int]]:
        key = id(model.tokenizer)
        if key not in self._ids:
            self._ids = {key: [model.encode(e.prompt) for e in self.examples]}
        return self._ids[key]


# -- answers -----------------------------------------------------------------------------------------------------
def _norm_number(s: str) -> str:
    s = s.replace(",", "")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return s
    if d == d.to_integral_value():
        return str(d.to_integral_value())
    return format(d.normalize(), "f")


def extract_answer(text: str, how: str = "last_number") -> str | None:
    if how == "last_number":
        m = MARKER.search(text)
        if m:
            return _norm_number(m.group(1))
        nums = NUMBER.findall(text)
        return _norm_number(nums[-1]) if nums else None
    if how == "first_line":
        lines = [ln.strip() for ln in text.strip().splitlines()]
        return lines[0] if lines else ""
    return text.strip()


def passes_check(text: str, regex: str | None, script: str | None, min_fraction: float) -> bool:
    if regex is not None and not re.search(regex, text):
        return False
    if script is not None:
        letters = [c for c in text if c.isalpha()]
        if not letters:
            return False
        pat = re.compile(script)
        if sum(1 for c in letters if pat.fullmatch(c)) < min_fraction * len(letters):
            return False
    return True


# -- datasets ----------------------------------------------------------------------------------------------------
def read_examples(path: Path, task_type: str, where: str, limit: int | None = None) -> list[Example]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            at = f"{where}: {path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SearchConfigError(f"{at}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise SearchConfigError(f"{at}: each line is an object with a non-empty string `prompt`")
            if "answer" not in obj:
                raise SearchConfigError(f"{at}: missing `answer`")
            ans = obj["answer"]
            if task_type == "multiple_choice":
                ch = obj.get("choices")
                if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                    raise SearchConfigError(f"{at}: `choices` must be a list of at least two non-empty strings")
                if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(ch):
                    label = ans
                elif isinstance(ans, str) and ans in ch:
                    label = ch.index(ans)
                else:
                    raise SearchConfigError(f"{at}: `answer` must be a choice's index or text, got {ans!r}")
                out.append(Example(obj["prompt"], ch[label], tuple(ch), label))
            else:
                if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
                    raise SearchConfigError(f"{at}: `answer` must be a string or a number")
                out.append(Example(obj["prompt"], str(ans)))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise SearchConfigError(f"{where}: dataset file {path} is empty")
    return out


def make_task(tc: TaskConfig, path: Path, where: str) -> Task:
    ck = tc.check
    return Task(tc.name, tc.type, read_examples(path, tc.type, where, tc.limit), tc.weight, tc.max_tokens,
                tuple(tc.stop), tc.extract, ck.regex if ck else None, ck.script if ck else None,
                ck.min_fraction if ck else 0.5, tc.per_token, tc.length_normalize)


def load_task(spec: dict | TaskConfig, split: str = "data", base_dir: str | Path | None = None) -> Task:
    """One task from a config-style mapping, e.g. {name, type, data, test_data, ...}, on `split`."""
    from pydantic import ValidationError

    try:
        tc = spec if isinstance(spec, TaskConfig) else TaskConfig.model_validate(spec)
    except ValidationError as e:
        raise SearchConfigError(f"invalid task: {e}") from None
    p = getattr(tc, split)
    if p is None:
        raise SearchConfigError(f"{split}: task {tc.name!r} has no {split}")
    q = Path(p) if base_dir is None or Path(p).is_absolute() else Path(base_dir) / p
    if not q.is_file():
        raise SearchConfigError(f"{split}: dataset file {q} not found")
    return make_task(tc, q, f"{tc.name}.{split}")


def _lm_eval_task(tc: TaskConfig, cfg: SearchConfig, split: str, where: str) -> Task | None:
    from .lm_eval_tasks import LmEvalTaskError, build

    inc = str(cfg.path(tc.include_path)) if tc.include_path else None
    try:
        lm = build(tc.lm_eval, tc.metric, inc, split, tc.limit, tc.test_limit)
    except LmEvalTaskError as e:
        raise SearchConfigError(f"{where}: {e}") from None
    return None if lm is None else Task(tc.name, "lm_eval", [], tc.weight, lm=lm)


def load_tasks(cfg: SearchConfig, split: str = "data") -> list[Task]:
    """The config's tasks on `split` ("data": the search split; "test_data": held out, tasks without one skipped)."""
    out = []
    for i, tc in enumerate(cfg.tasks):
        if tc.type == "lm_eval":
            t = _lm_eval_task(tc, cfg, split, f"tasks[{i}]")
            if t is not None:
                out.append(t)
            continue
        p = getattr(tc, split)
        if p is not None:
            out.append(make_task(tc, cfg.path(p), f"tasks[{i}].{split}"))
    return out


# -- scoring -----------------------------------------------------------------------------------------------------
def _chunks(order: list[int], n: int):
    for i in range(0, len(order), n):
        yield order[i:i + n]


def score_generate(model, task: Task, batch_size: int = 128) -> float:
    ids = task.prompt_ids(model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    correct = 0
    for chunk in _chunks(order, batch_size):
        outs = model.generate([ids[i] for i in chunk], max_tokens=task.max_tokens, stop=task.stop)
        for i, c in zip(chunk, outs):
            ex = task.examples[i]
            got = extract_answer(c.text, task.extract)
            ok = got is not None and got == extract_answer(ex.answer, task.extract)
            if ok and (task.check_regex or task.check_script):
                ok = passes_check(c.text, task.check_regex, task.check_script, task.check_min_fraction)
            correct += ok
    return correct / len(task.examples)


def score_multiple_choice(model, task: Task, batch_size: int = 128) -> float:
    pairs, owner = [], []
    for i, ex in enumerate(task.examples):
        for c in ex.choices:
            pairs.append((ex.prompt, c))
            owner.append(i)
    lls = model.loglikelihood(pairs)
    best: dict[int, tuple[float, int]] = {}
    k = 0
    for i, ex in enumerate(task.examples):
        for j, c in enumerate(ex.choices):
            v = lls[k][0] / (len(c) if task.length_normalize else 1)
            if i not in best or v > best[i][0]:
                best[i] = (v, j)
            k += 1
    return sum(best[i][1] == ex.label for i, ex in enumerate(task.examples)) / len(task.examples)


def score_loglik(model, task: Task, batch_size: int = 128) -> float:
    from lazymerge.engine.score import encode_pair

    pairs = [(ex.prompt, ex.answer) for ex in task.examples]
    lls = model.loglikelihood(pairs)
    total = sum(lp for lp, _ in lls)
    if not task.per_token:
        return total / len(pairs)
    n = sum(len(encode_pair(model.tokenizer, c, x)[1]) for c, x in pairs)
    return total / max(n, 1)


def score_lm_eval(model, task: Task, batch_size: int = 128) -> float:
    from .lm_eval_tasks import score

    return score(model, task.lm, batch_size)


SCORERS = {"generate_exact_match": score_generate, "multiple_choice": score_multiple_choice,
           "answer_loglik": score_loglik, "lm_eval": score_lm_eval}


def score_task(model, task: Task, batch_size: int = 128) -> float:
    return float(SCORERS[task.type](model, task, batch_size))


def fitness(scores: dict[str, float], tasks: list[Task]) -> float:
    """The weighted sum of task scores the search maximizes."""
    return float(sum(t.weight * scores[t.name] for t in tasks))
