"""The search configuration: typed at the edge (pydantic), checked before any model is loaded.

`load_config(path_or_dict)` returns a frozen `SearchConfig` or raises `SearchConfigError` whose message names the
offending field (`sources.ja`, `tasks[1].data`, `budget.evaluations`, ...). Relative paths (sources, datasets, the
PS recipe of a ps+dfs space) resolve against the config file's folder. Example::

    sources: {base: ckpt/base, ja: ckpt/ja, math1: ckpt/math1, math2: ckpt/math2}
    base_model: base
    space: {kind: ps, method: dare_ties, models: [ja, math1, math2]}     # kind: ps | dfs | ps+dfs
    tasks:
      - {name: ja_math, type: generate_exact_match, data: ja_math_train.jsonl, test_data: ja_math_test.jsonl}
      - {name: ja_ppl, type: answer_loglik, data: ja_text.jsonl, weight: 0.1}
    budget: {evaluations: 200, seed: 0}
    cma: {popsize: null, sigma0: 0.1667}      # optional overrides of the paper's defaults
    runtime: {workers: 1, threads: 1}         # optional

Only file existence, emptiness and field consistency are checked here; a dataset's content is validated when it is
read (`tasks.load_task`), a source's content when the engine opens it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lazymerge.engine.methods import get_method

# Methods a weight (and density) genome drives: the task-arithmetic family, linear, and the spherical methods with
# per-model weights (nuslerp: two models, t = w_1 / (w_0 + w_1); multislerp). The other mergekit methods have no
# per-model number to search (karcher, model_stock, sce, arcee_fusion, nearswap, ram, ramplus_tl).
PS_METHODS = ("dare_ties", "ties", "task_arithmetic", "linear", "dare_linear", "della", "breadcrumbs_ties", "nuslerp",
              "multislerp")
TASK_TYPES = ("generate_exact_match", "multiple_choice", "answer_loglik")
EXTRACTORS = ("last_number", "exact", "first_line")


class SearchConfigError(ValueError):
    """A search config that cannot run; the message names the offending field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OutputCheck(_Frozen):
    """The paper's language check, generalized: an output only counts as correct if it passes."""

    regex: str | None = Field(None, description="the output must contain a match (re.search)")
    script: str | None = Field(None, description="a regex character class of the target script, e.g. "
                                  "'[\\u3040-\\u30ff\\u4e00-\\u9fff]'")
    min_fraction: float = Field(0.5, description="fraction of letters (not digits, spaces, punctuation) that must "
                                "match `script`")


class TaskConfig(_Frozen):
    name: str
    type: Literal["generate_exact_match", "multiple_choice", "answer_loglik", "lm_eval"]
    data: str | None = Field(None, description="JSONL used for fitness: {prompt, answer[, choices]} per line")
    test_data: str | None = Field(None, description="held-out JSONL, only for the final summary")
    weight: float = 1.0
    limit: int | None = Field(None, description="use only the first N examples")
    # generate_exact_match
    max_tokens: int = 16
    stop: list[str] = Field(default_factory=list)
    extract: Literal["last_number", "exact", "first_line"] = "last_number"
    check: OutputCheck | None = None
    # answer_loglik
    per_token: bool = Field(True, description="mean per-token log-likelihood (else per answer)")
    # multiple_choice
    length_normalize: bool = Field(False, description="compare choices by log-likelihood per character")
    # lm-evaluation-harness task (search/lm_eval_tasks.py): `{lm_eval: TASK, metric: acc, limit: N, weight: W}`
    lm_eval: str | None = Field(None, description="an lm-eval task name; its first `limit` documents are the "
                                "search split, the next `test_limit` the held-out split")
    metric: str = Field("acc", description="lm_eval: the metric ('acc', or with its filter: 'exact_match,strip')")
    include_path: str | None = Field(None, description="lm_eval: a folder of task YAMLs (relative to the config)")
    test_limit: int | None = Field(None, description="lm_eval: held-out documents after the first `limit` "
                                   "(default: as many as `limit`)")

    @model_validator(mode="before")
    @classmethod
    def _lm_eval_defaults(cls, v):
        if isinstance(v, dict) and v.get("lm_eval") is not None:
            v = {"name": v["lm_eval"], "type": "lm_eval", **v}
        return v

    @model_validator(mode="after")
    def _kind(self):
        if self.type == "lm_eval":
            if self.lm_eval is None:
                raise ValueError("type lm_eval needs `lm_eval: TASK_NAME`")
            if self.data is not None or self.test_data is not None:
                raise ValueError(f"lm_eval task {self.lm_eval!r}: data/test_data do not apply (lm-eval loads the "
                                 "task's dataset; the held-out split is the documents after `limit`)")
        elif self.data is None:
            raise ValueError(f"task {self.name!r}: `data` (a JSONL file) is required")
        elif self.lm_eval is not None:
            raise ValueError(f"task {self.name!r}: lm_eval tasks have type lm_eval, not {self.type}")
        return self

    @field_validator("limit", "max_tokens", "test_limit")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v


class SpaceConfig(_Frozen):
    kind: Literal["ps", "dfs", "ps+dfs"] = "ps"
    models: list[str] = Field(description="ps: the sources to merge; dfs: [A, B] (A gives embeddings and head); "
                              "ps+dfs: [B] or ['ps', B]")
    # parameter space
    method: str = "dare_ties"
    layer_groups: int = Field(1, description="one (weight, density) pair per group of layers")
    filters: list[str] = Field(default_factory=list, description="separate values for tensors whose name contains "
                               "each filter (e.g. [self_attn, mlp]); other tensors take a last value")
    shared_filters: list[str] = Field(default_factory=list, description="like filters, but one value for all layer "
                                      "groups: for tensors outside the layers (e.g. [embed_tokens, lm_head])")
    weight_range: tuple[float, float] = (0.0, 2.0)
    density_range: tuple[float, float] = (0.1, 1.0)
    normalize: bool | None = Field(False, description="null: the method's default")
    random_seed: int = 0
    # data-flow space
    repeats: int = Field(3, description="r: the layers of both models are laid out r times")
    layout: Literal["sequential", "interleaved"] = "sequential"
    scales: Literal["matrix", "ones"] = Field("matrix", description="matrix: one factor per (from, to) layer pair")
    scale_range: tuple[float, float] = (0.0, 2.0)
    # ps+dfs: the parameter merge that plays model A (a recipe file, e.g. an earlier run's best.yaml, or inline)
    ps_recipe: Any | None = None

    @model_validator(mode="after")
    def _check(self):
        if not self.models:
            raise ValueError("models: empty list")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a model is listed twice")
        if self.method not in PS_METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(PS_METHODS)}")
        if self.layer_groups < 1:
            raise ValueError("layer_groups: must be >= 1")
        if self.kind == "ps" and self.method == "nuslerp" and len(self.models) != 2:
            raise ValueError(f"models: nuslerp merges exactly two models (besides the base), got {len(self.models)}")
        if set(self.filters) & set(self.shared_filters):
            raise ValueError(f"shared_filters: {sorted(set(self.filters) & set(self.shared_filters))} also in filters")
        if self.repeats < 1:
            raise ValueError("repeats: must be >= 1")
        for f, (lo, hi) in (("weight_range", self.weight_range), ("density_range", self.density_range),
                            ("scale_range", self.scale_range)):
            if not lo < hi:
                raise ValueError(f"{f}: [{lo}, {hi}] is empty")
        if not (0 < self.density_range[0] and self.density_range[1] <= 1):
            raise ValueError(f"density_range: {list(self.density_range)} must lie in (0, 1]")
        if self.kind == "dfs" and len(self.models) != 2:
            raise ValueError(f"models: a dfs space takes two models [A, B], got {len(self.models)}")
        if self.kind == "ps+dfs":
            if self.ps_recipe is None:
                raise ValueError("ps_recipe: a ps+dfs space needs the parameter merge that plays model A")
            if len(self.models) == 2 and self.models[0] != "ps":
                raise ValueError("models: a ps+dfs space takes [B] or ['ps', B]")
            if len(self.models) > 2:
                raise ValueError("models: a ps+dfs space takes [B] or ['ps', B]")
        return self


class BudgetConfig(_Frozen):
    evaluations: int | None = Field(None, description="stop after this many candidates (whole generations)")
    generations: int | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.evaluations is None and self.generations is None:
            raise ValueError("evaluations: give `evaluations` or `generations`")
        for f in ("evaluations", "generations"):
            v = getattr(self, f)
            if v is not None and v < 1:
                raise ValueError(f"{f}: must be >= 1, got {v}")
        return self


class CMAConfig(_Frozen):
    popsize: int | None = Field(None, description="default 4 + floor(3 ln n)")
    sigma0: float = Field(1 / 6, description="initial step size in [0, 1]-scaled coordinates")
    x0: float = 0.5
    options: dict[str, Any] = Field(default_factory=dict, description="extra options passed to cma as is")

    @model_validator(mode="after")
    def _check(self):
        if self.popsize is not None and self.popsize < 2:
            raise ValueError("popsize: must be >= 2")
        if not self.sigma0 > 0:
            raise ValueError("sigma0: must be > 0")
        if not 0 <= self.x0 <= 1:
            raise ValueError("x0: must lie in [0, 1]")
        return self


class RuntimeConfig(_Frozen):
    workers: int = 1
    threads: int | None = Field(None, description="torch threads per worker (default: the CPUs this process may "
                                "use divided by workers; never more than fit)")
    backend: Literal["local", "ray"] = "local"
    start_method: Literal["spawn", "forkserver", "fork"] = Field("spawn", description="how local worker processes "
                                                                 "start (fork is faster, spawn the safest)")
    ray_address: str | None = None
    gpus_per_worker: float = 0.0
    device: str = "cpu"
    cache_factor: float = Field(1.3, description="merged-weight cache per worker, in units of one model's size")
    batch_size: int = Field(128, description="prompts per generate call")
    cpu_fused: bool | None = Field(None, description="the fused compiled CPU merge (kernels/merge_cpu.py; default: "
                                   "on, compiled once per machine); false: the eager reference (debugging)")

    @model_validator(mode="after")
    def _check(self):
        if self.workers < 1:
            raise ValueError("workers: must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads: must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        return self


class SearchConfig(_Frozen):
    sources: dict[str, str]
    base_model: str | None = None
    space: SpaceConfig
    tasks: list[TaskConfig]
    budget: BudgetConfig
    cma: CMAConfig = Field(default_factory=CMAConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    base_dir: str | None = Field(None, description="folder relative paths resolve against (the config's)")

    @model_validator(mode="after")
    def _check(self):
        if not self.sources:
            raise ValueError("sources: empty")
        if self.base_model is not None and self.base_model not in self.sources:
            raise ValueError(f"base_model: unknown source {self.base_model!r}; sources: {', '.join(self.sources)}")
        for i, m in enumerate(self.space.models):
            if m not in self.sources and not (self.space.kind == "ps+dfs" and m == "ps"):
                raise ValueError(f"space.models[{i}]: unknown source {m!r}; sources: {', '.join(self.sources)}")
        if self.space.kind == "ps" and get_method(self.space.method).needs_base and self.base_model is None:
            raise ValueError(f"base_model: method {self.space.method!r} needs a base model")
        if not self.tasks:
            raise ValueError("tasks: empty list")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("tasks: two tasks have the same name")
        return self

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() or self.base_dir is None else Path(self.base_dir) / q

    def source_paths(self) -> dict[str, str]:
        # a LoRA source BASE+ADAPTER (mergekit's syntax): each folder relative to this file
        return {k: "+".join(str(self.path(p)) for p in v.split("+")) for k, v in self.sources.items()}

    def digest(self) -> str:
        """Identity of what the search computes (runtime settings excluded): a resumed run must match it."""
        d = self.model_dump(mode="json", exclude={"runtime", "base_dir"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _fmt(e: ValidationError) -> str:
    out = []
    for err in e.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        # a model validator's message already starts with the field name: prefix the location of the model
        out.append(f"{loc}.{msg}" if loc and ":" in msg.split(" ")[0] else (f"{loc}: {msg}" if loc else msg))
    return "invalid search config: " + "; ".join(out)


def _check_files(cfg: SearchConfig) -> None:
    for name, p in cfg.sources.items():
        q = cfg.path(p)
        if not (q / "config.json").is_file():
            raise SearchConfigError(f"sources.{name}: no checkpoint at {q} (config.json not found)")
    for i, t in enumerate(cfg.tasks):
        if t.include_path is not None and not cfg.path(t.include_path).is_dir():
            raise SearchConfigError(f"tasks[{i}].include_path: folder {cfg.path(t.include_path)} not found")
        for f in ("data", "test_data"):
            p = getattr(t, f)
            if p is None:
                continue
            q = cfg.path(p)
            if not q.is_file():
                raise SearchConfigError(f"tasks[{i}].{f}: dataset file {q} not found")
            if not any(line.strip() for line in q.open(encoding="utf-8")):
                raise SearchConfigError(f"tasks[{i}].{f}: dataset file {q} is empty")
    if cfg.space.kind == "ps+dfs" and isinstance(cfg.space.ps_recipe, str):
        q = cfg.path(cfg.space.ps_recipe)
        if not q.is_file():
            raise SearchConfigError(f"space.ps_recipe: recipe file {q} not found")


def load_config(src: str | Path | dict | SearchConfig, base_dir: str | Path | None = None) -> SearchConfig:
    """Parse, validate and check the files of a search config (a YAML file, YAML text or a dict)."""
    if isinstance(src, SearchConfig):
        cfg = src
    else:
        if isinstance(src, Path) or (isinstance(src, str) and "\n" not in src and src.endswith((".yaml", ".yml"))):
            p = Path(src)
            try:
                text = p.read_text(encoding="utf-8")
            except OSError as e:
                raise SearchConfigError(f"cannot read config file {p}: {e.strerror}") from None
            base_dir = base_dir or p.resolve().parent
            src = text
        if isinstance(src, str):
            try:
                src = yaml.safe_load(src)
            except yaml.YAMLError as e:
                raise SearchConfigError(f"config is not valid YAML: {e}") from None
        if not isinstance(src, dict):
            raise SearchConfigError("a search config is a mapping with sources, space, tasks and budget")
        data = dict(src)
        if base_dir is not None and data.get("base_dir") is None:
            data["base_dir"] = str(base_dir)
        try:
            cfg = SearchConfig.model_validate(data)
        except ValidationError as e:
            raise SearchConfigError(_fmt(e)) from None
    _check_files(cfg)
    return cfg
