"""The Python API the CLI, the server and the search share.

    from lazymerge.engine import Engine
    eng = Engine({"base": "ckpt/base", "math": "ckpt/math", "ja": "ckpt/ja"}, policy="cached")
    model = eng.compile(RECIPE_YAML_OR_DICT)                     # validates; reads no tensor yet
    model.generate(["2 plus 3 is"], max_tokens=8)                # -> [Completion(text=..., ...)]
    model.loglikelihood([("2 plus 3 is", " 5")])                 # -> [(sum logprob, is_greedy)]
    model.token_logprobs("the cat sees the dog")                 # -> (tokens, [None, lp, ...])

An `Engine` holds the sources once (memory-mapped), the merge statistics and the merged-weight cache shared by all
recipes. `compile` is cheap (a plan and a module tree on `meta`); a compiled `LazyModel` holds no weights.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import torch

from .checkpoint import SourceUnavailable
from .generate import Completion, SamplingParams, UsageError
from .generate import generate as _generate
from .generate import stream as _stream
from .lazy import build_lazy_module
from .merger import Merger
from .plan import ModelPlan, SourceSet, compile_plan
from .recipe import Recipe
from .safety import check_logits
from .score import TokenScores, score_tokens
from .score import loglikelihood as _loglikelihood
from .weights import WeightProvider

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    def __init__(self, sources: dict[str, str | Path] | SourceSet | None = None, *, device: str = "cpu",
                 policy: str = "cached", cache_bytes: int = 1 << 30, dtype: str | None = None,
                 allow_open: bool = True, stats_bytes: int = 4 << 30, cpu_fused: bool | None = None):
        if isinstance(sources, SourceSet):
            self.sources = sources
        else:
            self.sources = SourceSet.open(sources or {}, allow_open=allow_open)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {device!r}: CUDA is not available on this machine")
        if dtype is None:
            dtype = "float32" if self.device.type == "cpu" else "bfloat16"
        self.dtype = DTYPES[dtype]
        self.merger = Merger(self.sources, self.device, stats_budget=stats_bytes, cpu_fused=cpu_fused)
        self.provider = WeightProvider(self.merger, policy, cache_bytes, self.dtype)
        self._tokenizers: dict[str, object] = {}
        self.lock = threading.RLock()  # one forward at a time per engine

    def plan(self, recipe: str | dict | Path | Recipe) -> ModelPlan:
        return compile_plan(recipe, self.sources)

    def compile(self, recipe: str | dict | Path | Recipe | ModelPlan) -> "LazyModel":
        plan = recipe if isinstance(recipe, ModelPlan) else self.plan(recipe)
        return LazyModel(self, plan)

    def tokenizer(self, source_name: str):
        tok = self._tokenizers.get(source_name)
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(self.sources[source_name].path))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            self._tokenizers[source_name] = tok
        return tok

    def check_sources(self, names) -> None:
        """Raise SourceUnavailable if a weights file of a source in `names` changed since it was opened; the first
        time, every cached merged weight and statistic is dropped (engine/reader.py: nothing computed from old content
        outlives it)."""
        try:
            for n in names:
                self.sources[n].check()
        except SourceUnavailable:
            self.invalidate()
            raise

    def invalidate(self) -> None:
        """Drop every merged weight, merge statistic and resident source copy (all recipes)."""
        self.provider.cache.clear()
        self.provider.forget_checks()
        self.merger.stats.clear()
        self.merger.specs.clear()
        self.merger.store.clear()

    def stats(self) -> dict:
        return {**self.provider.stats(), "stats_bytes": self.merger.stats.bytes,
                "resident_source_bytes": self.merger.store.resident_bytes()}


class _Session:
    """One batch's KV-cache state during generation (left-padded prompts)."""

    def __init__(self, model: "LazyModel", prompts: list[list[int]]):
        self.m = model
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, T), model.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, p in enumerate(prompts):
            if not p:
                raise UsageError("empty prompt: nothing to condition on")
            ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, T - len(p):] = 1
        self.ids, self.mask = ids.to(model.device), mask.to(model.device)
        from transformers import DynamicCache

        self.cache = DynamicCache(config=model.module.config)

    def prefill(self) -> torch.Tensor:
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        return self.m._forward(self.ids, self.mask, pos, self.cache, last_only=True)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.m.device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        pos = self.mask.sum(-1, keepdim=True) - 1
        return self.m._forward(tokens[:, None], self.mask, pos, self.cache, last_only=True)


class LazyModel:
    """A compiled recipe: a transformers module tree whose weights come from the engine's WeightProvider."""

    def __init__(self, engine: Engine, plan: ModelPlan):
        self.engine, self.plan = engine, plan
        self.module = build_lazy_module(plan, engine.provider)
        self.tokenizer = engine.tokenizer(plan.tokenizer_source)
        self.device = engine.device
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.tokenizer.eos_token_id
        cfg_eos = plan.config.get("eos_token_id")
        ids = {eos} if eos is not None else set()
        ids |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
        self.eos_ids = ids
        params = inspect.signature(self.module.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.source_names = sorted({r.source for p in plan.tensors.values() for r in p.refs()})

    @property
    def digest(self) -> str:
        return self.plan.digest()

    # -- forward ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, ids, mask, pos, cache=None, last_only=False) -> torch.Tensor:
        kw = {self._cache_kw: cache, "use_cache": cache is not None}
        if last_only:
            kw["logits_to_keep"] = 1
        with self.engine.lock:
            self.engine.check_sources(self.source_names)  # before any cached weight is used (engine/reader.py)
            try:
                out = self.module(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
            except SourceUnavailable:
                self.engine.invalidate()
                raise
        logits = out.logits
        logits = logits[:, -1] if last_only else logits
        check_logits(self, logits, None if last_only else mask)  # NaN/Inf: NonFiniteError naming the cause
        return logits

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids (+ mask, 1 = real token; right or left padding) -> (B, T, V) logits."""
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(ids, mask, pos)

    def session(self, prompts: list[list[int]]) -> _Session:
        return _Session(self, prompts)

    # -- text in, text out -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _params(self, n, params, kw) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams(**kw)
        return params if isinstance(params, list) else [params] * n

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list | None = None,
                 **kw) -> list[Completion]:
        ids = [p if isinstance(p, list) else self.encode(p) for p in prompts]
        return _generate(self, ids, self._params(len(ids), params, kw))

    def stream(self, prompts, params=None, **kw):
        ids = [p if isinstance(p, list) else self.encode(p) for p in prompts]
        return _stream(self, ids, self._params(len(ids), params, kw))

    def score(self, seqs: list[list[int]], top_k: int = 0) -> list[TokenScores]:
        return score_tokens(self, seqs, top_k=top_k)

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return _loglikelihood(self, pairs)

    def token_logprobs(self, text: str) -> tuple[list[str], list[float | None]]:
        ids = self.encode(text)
        s = score_tokens(self, [ids])[0]
        return self.tokenizer.convert_ids_to_tokens(ids), s.logprobs
