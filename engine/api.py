"""The Python API the CLI, the server and the search share.

    from lazymerge.engine import Engine
    eng = Engine({"base": "ckpt/base", "math": "ckpt/math", "ja": "ckpt/ja"}, policy="cached")
    model = eng.compile(RECIPE_YAML_OR_DICT)                     # validates; reads no tensor yet
    model.generate(["2 plus 3 is"], max_tokens=8)                # -> [Completion(text=..., ...)]
    model.loglikelihood([("2 plus 3 is", " 5")])                 # -> [(sum logprob, is_greedy)]
    model.token_logprobs("the cat sees the dog")                 # -> (tokens, [None, lp, ...])

An `Engine` holds the sources once (files open for `pread` reads; on the CPU under `on_the_fly`, their tensors stay
resident after a first read while they fit: engine/resident.py), the merge statistics and the merged-weight cache
shared by all recipes. `compile` is cheap (a plan and a module tree on `meta`); a compiled `LazyModel` holds no weights.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import torch

from . import alloc as _alloc
from . import resident as _resident
from . import threads as _threads
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
from .vocab import OutputVocab
from .weights import WeightProvider

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    def __init__(self, sources: dict[str, str | Path] | SourceSet | None = None, *, device: str = "cpu",
                 policy: str = "cached", cache_bytes: int = 1 << 30, dtype: str | None = None,
                 allow_open: bool = True, stats_bytes: int = 4 << 30, cpu_fused: bool | None = None,
                 threads: int | None = None, resident_bytes: int | None = None):
        # torch threads: `threads` if given, else (once per process) the CPUs this process may use (engine/threads.py)
        if threads is not None or _threads.configured() is None:
            _threads.configure(threads)
        if isinstance(sources, SourceSet):
            self.sources = sources
        else:
            self.sources = SourceSet.open(sources or {}, allow_open=allow_open)
        self.device = torch.device(device)
        if self.device.type == "cpu" and policy == "on_the_fly":
            # transient merge tensors reuse heap memory instead of faulting fresh pages (engine/alloc.py); under the
            # cached policy merged weights stay in the cache instead, and the kept free heap only raised peak RSS
            # (a 267M DELLA search candidate: 4.61 GiB against 4.18 without)
            _alloc.tune()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {device!r}: CUDA is not available on this machine")
        if dtype is None:
            dtype = "float32" if self.device.type == "cpu" else "bfloat16"
        self.dtype = DTYPES[dtype]
        if resident_bytes is None:  # source tensors kept in memory on the CPU (engine/resident.py)
            resident_bytes = _resident.default_limit(policy, self.device.type)
        self.merger = Merger(self.sources, self.device, stats_budget=stats_bytes, cpu_fused=cpu_fused,
                             resident_limit=resident_bytes)
        self.provider = WeightProvider(self.merger, policy, cache_bytes, self.dtype)
        self._tokenizers: dict = {}
        self._generation_eos: dict[str, set[int]] = {}
        self.lock = threading.RLock()  # one forward at a time per engine

    def plan(self, recipe: str | dict | Path | Recipe) -> ModelPlan:
        return compile_plan(recipe, self.sources)

    def compile(self, recipe: str | dict | Path | Recipe | ModelPlan) -> "LazyModel":
        plan = recipe if isinstance(recipe, ModelPlan) else self.plan(recipe)
        return LazyModel(self, plan)

    def tokenizer(self, source_name: str, vocab: OutputVocab | None = None):
        """The tokenizer of source `source_name`, or the merged tokenizer of `vocab` when it built one; loaded once."""
        built = vocab.tokenizer if vocab is not None else None
        key = source_name if built is None else ("vocab", vocab.key)
        tok = self._tokenizers.get(key)
        if tok is None:
            if built is not None:
                import copy

                tok = copy.deepcopy(built)  # the pad token set below must not leak into the plan's tokenizer
            else:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(self.sources[source_name].path))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            self._tokenizers[key] = tok
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
    def generation_eos(self, source_name: str) -> set[int]:
        """`eos_token_id` (an id or a list) of source `source_name`'s generation_config.json (empty without one):
        e.g. Llama-3-Instruct's end-of-turn token is only there."""
        ids = self._generation_eos.get(source_name)
        if ids is None:
            ids = set()
            path = self.sources[source_name].path
            if (path / "generation_config.json").exists():
                from transformers import GenerationConfig

                try:
                    eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
                except (OSError, ValueError) as e:
                    raise UsageError(f"{path / 'generation_config.json'}: cannot be read ({e})") from None
                ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            self._generation_eos[source_name] = ids
        return ids

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

    def select(self, rows: list[int]) -> None:
        """Keep only these rows of the batch (indices into the current rows, in order): the KV cache and the mask
        shrink, so the next steps compute nothing for rows that have finished."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, idx)
        self.cache.batch_select_indices(idx)

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
        self.tokenizer = engine.tokenizer(plan.tokenizer_source, plan.vocab)
        self.device = engine.device
        emb = self.module.get_input_embeddings()
        self.vocab_rows = int(getattr(emb, "num_embeddings", None) or plan.config["vocab_size"])  # embedding rows
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.tokenizer.eos_token_id
        cfg_eos = plan.config.get("eos_token_id")
        ids = {eos} if eos is not None else set()
        ids |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
        ids |= engine.generation_eos(plan.tokenizer_source)  # generation_config.json: as transformers' generate
        self.eos_ids = {i for i in ids if 0 <= i < self.vocab_rows}
        params = inspect.signature(self.module.base_model.forward).parameters
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
        self.check_ids(input_ids if attention_mask is None else input_ids * attention_mask.to(input_ids.device))
        ids = input_ids.to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(ids, mask, pos)

    def session(self, prompts: list[list[int]]) -> _Session:
        self.check_ids(prompts)
        return _Session(self, prompts)

    def check_ids(self, seqs) -> None:
        """Raise UsageError naming the first token id that has no embedding row (a tokenizer with more ids than the
        model's embedding has rows: transformers' forward would fail with an IndexError)."""
        for seq in seqs:
            t = seq if torch.is_tensor(seq) else torch.tensor(seq, dtype=torch.long)
            bad = t[(t < 0) | (t >= self.vocab_rows)].tolist()
            if bad:
                tok = self.tokenizer.convert_ids_to_tokens(bad[0]) if bad[0] >= 0 else None
                raise UsageError(f"token {tok!r} (id {bad[0]}) has no embedding row: the model's vocabulary has "
                                 f"{self.vocab_rows} rows but the tokenizer of {self.plan.tokenizer_source!r} has "
                                 f"{len(self.tokenizer)} ids; resize the checkpoint's embeddings, or merge its "
                                 "vocabulary with tokenizer_source")

    # -- text in, text out -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  chat_template=self.plan.chat_template)  # None: the tokenizer's
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
