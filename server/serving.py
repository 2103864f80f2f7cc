"""The serving layer: everything the HTTP routes do, without HTTP (this module does not import FastAPI).

`MergeServing(config)` owns the engine (sources opened once, `allow_open=False`), the recipe registry, the
batching scheduler (one worker thread, see `scheduler`), the vote store and the metrics. Its request methods take
`protocol` models and return `protocol` models, or, for `stream: true`, an async iterator of server-sent-event
lines; they raise `ServingError` for a request they refuse. Everything a request must be refused for (unknown
model, caps, a full queue) is checked before a stream starts, so that a refused stream is still a plain error
response with the right status. The endpoints' own logic lives beside it: `completions` (OpenAI completions and
chat), `compare` (A/B comparison) and `arena` (blind battles and votes); this module keeps what they share (recipe
resolution, validation, submitting jobs and collecting their events, metrics).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from . import protocol as P
from .errors import ServingError, bad_request
from .faults import as_serving_error
from .metrics import Metrics
from .registry import RecipeRegistry, parse_recipe
from .scheduler import Job, QueueFull, Scheduler, Sink
from .votes import VoteStore

FIXED_LABELS = ("inline", "arena", "other")  # metrics model labels besides registered names


@dataclass
class ServerConfig:
    sources: dict[str, str]  # name -> checkpoint folder
    recipes: dict[str, str | dict] = field(default_factory=dict)  # registered at start
    api_key: str | None = None
    cache_mb: float = 1024.0  # merged-weight cache budget (0: merge on the fly)
    device: str = "cpu"
    db_path: str | None = None  # votes database (None: in memory)
    max_tokens: int = 512  # cap on max_tokens per request
    max_prompt_tokens: int = 2048
    max_batch_size: int = 32  # rows per forward pass, and per request (prompts x n)
    max_body_bytes: int = 1 << 20
    max_recipes: int = 64
    max_queue: int = 256  # rows waiting for a batch; beyond: 429
    max_logprobs: int = 20
    default_chat_max_tokens: int = 128
    batch_window_s: float = 0.002  # an idle worker waits this long for simultaneous requests to batch
    num_threads: int | None = None  # torch intra-op threads (None: the CPUs this process may use, engine/threads.py)
    cpu_fused: bool | None = None  # the compiled CPU merge (kernels/merge_cpu.py); None: the engine's default
    examples: list[str] = field(default_factory=list)  # example prompts the A/B page offers (the demo's held-out)
    featured: tuple[str, str] | None = None  # the two recipes the A/B page opens on


@dataclass
class RowOutput:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    eos_token: int | None = None  # the EOS token that ended the row (scored with `logprobs`, as vLLM does)


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 16:
        raise bad_request("at most 16 stop sequences", param="stop")
    return stops


class MergeServing:
    def __init__(self, config: ServerConfig, engine=None):
        from lazymerge.engine import Engine

        self.config = config
        policy = "cached" if config.cache_mb > 0 else "on_the_fly"
        self.engine = engine or Engine(config.sources, policy=policy, cache_bytes=int(config.cache_mb * (1 << 20)),
                                       allow_open=False, device=config.device, cpu_fused=config.cpu_fused)
        self.metrics = Metrics(model_label=self.model_label)
        self.metrics.set_scrape(self._scrape_metrics)
        self.registry = RecipeRegistry(self.engine, config.max_recipes)
        for name, rec in config.recipes.items():
            self.registry.register(name, rec)
        self.scheduler = Scheduler(self.metrics, self.engine.provider.cache, max_batch_rows=config.max_batch_size,
                                   max_queued_rows=config.max_queue, batch_window_s=config.batch_window_s)
        self.votes = VoteStore(config.db_path)
        self._inline: OrderedDict[str, object] = OrderedDict()  # inline recipe text -> LazyModel
        from .arena import Arena
        from .compare import Comparison
        from .completions import OpenAIEndpoints
        from .tokenizer import TokenizerEndpoints

        self.arena = Arena(self)
        self.tokenizers = TokenizerEndpoints(self)
        self.comparison = Comparison(self)
        self.openai = OpenAIEndpoints(self)

    def start(self) -> None:
        from lazymerge.engine.threads import configure

        configure(self.config.num_threads)  # None: the CPUs this process may use (engine/threads.py)
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.stop()
        self.votes.close()

    # -- models and recipes ------------------------------------------------------------------------------------
    def list_models(self) -> P.ModelList:
        return P.ModelList(data=[self._card(e) for e in self.registry.entries()])

    def get_model(self, name: str) -> P.ModelCard:
        return self._card(self.registry.get(name))

    @staticmethod
    def _card(e) -> P.ModelCard:
        return P.ModelCard(id=e.name, created=e.created, kind=e.kind, digest=e.digest)

    @staticmethod
    def _info(e) -> P.RecipeInfo:
        return P.RecipeInfo(id=e.name, created=e.created, kind=e.kind, digest=e.digest,
                            num_layers=e.model.plan.num_layers, recipe=e.recipe)

    async def register_recipe(self, req: P.RecipeRegisterRequest) -> tuple[P.RecipeInfo, bool]:
        from lazymerge.engine import RecipeError

        try:
            entry, created = await asyncio.to_thread(self.registry.register, req.name, req.recipe)
        except RecipeError as e:
            raise ServingError(422, str(e), param="recipe", code="invalid_recipe") from None
        return self._info(entry), created

    def list_recipes(self) -> P.RecipeList:
        return P.RecipeList(data=[self._info(e) for e in self.registry.entries()])

    def get_recipe(self, name: str) -> P.RecipeInfo:
        return self._info(self.registry.get(name))

    def delete_recipe(self, name: str) -> P.DeletedResponse:
        self.registry.delete(name)
        self.metrics.forget_model(name)  # bounded /metrics: a deleted recipe's series go with it
        return P.DeletedResponse(id=name)

    def model_label(self, name: str) -> str:
        """The metrics label of a job's model: registered names stay, anything else folds into a fixed few."""
        if name in FIXED_LABELS or name in self.registry:
            return name
        return "inline" if name.startswith("inline") else "other"

    async def resolve(self, name: str, inline) -> tuple[str, object]:
        """(metrics label, LazyModel) of a request's `model` / inline `recipe`."""
        from lazymerge.engine import RecipeError

        if inline is None:
            e = self.registry.get(name)
            return e.name, e.model
        key = inline if isinstance(inline, str) else json.dumps(inline, sort_keys=True)
        model = self._inline.get(key)
        if model is None:
            try:
                _, model = await asyncio.to_thread(parse_recipe, self.engine, inline)
            except RecipeError as e:
                raise ServingError(422, str(e), param="recipe", code="invalid_recipe") from None
            self._inline[key] = model
            while len(self._inline) > 32:
                self._inline.popitem(last=False)
        return "inline", model

    # -- validation --------------------------------------------------------------------------------------------
    def check_prompt(self, model, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise bad_request("the prompt is empty (no tokens)", param=param)
        if len(ids) > self.config.max_prompt_tokens:
            raise bad_request(f"the prompt has {len(ids)} tokens; this server's limit is "
                              f"{self.config.max_prompt_tokens}", param=param, code="context_length_exceeded")
        vocab = model.module.config.vocab_size
        if any(not (0 <= t < vocab) for t in ids):
            raise bad_request(f"token ids must be in [0, {vocab})", param=param)
        return ids

    def sampling(self, max_tokens: int, temperature: float, top_p: float, seed, stop, rows: int,
                 logprobs: int | None = None) -> list:
        from lazymerge.engine import SamplingParams

        if max_tokens > self.config.max_tokens:
            raise bad_request(f"max_tokens {max_tokens} exceeds this server's limit of {self.config.max_tokens}",
                              param="max_tokens")
        if rows > self.config.max_batch_size:
            raise bad_request(f"this request asks for {rows} sequences (prompts x n); the limit is "
                              f"{self.config.max_batch_size}", param="n")
        stops = _stops(stop)
        return [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               seed=None if seed is None else seed + i, stop=stops, logprobs=logprobs)
                for i in range(rows)]

    @staticmethod
    def unsupported(req) -> None:
        if getattr(req, "best_of", None) not in (None, req.n):
            raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
        if req.frequency_penalty or req.presence_penalty:
            raise bad_request("frequency_penalty and presence_penalty are not supported", param="frequency_penalty")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")
        if getattr(req, "suffix", None):
            raise bad_request("suffix is not supported", param="suffix")

    # -- running jobs ------------------------------------------------------------------------------------------
    def submit(self, job: Job, sink: Sink | None = None) -> Job:
        return self.submit_all([job], [sink])[0]

    def submit_all(self, jobs: list[Job], sinks: list[Sink | None] | None = None) -> list[Job]:
        """Queue all the jobs of one request, or none of them (429 when they do not all fit)."""
        for job, sink in zip(jobs, sinks or [None] * len(jobs)):
            job.sink = sink or Sink()
        try:
            self.scheduler.submit_all(jobs)
        except QueueFull as e:
            raise ServingError(429, str(e), code="queue_full") from None
        return jobs

    async def events(self, job: Job) -> AsyncIterator[tuple[str, object]]:
        """The job's events until its end; an error event is raised. Leaving early cancels the job."""
        finished = False
        try:
            while True:
                _, kind, value = await job.sink.queue.get()
                if kind == "error":
                    finished = True
                    raise as_serving_error(value)
                if kind == "end":
                    finished = True
                    return
                yield kind, value
        finally:
            if not finished:
                job.cancelled = True

    async def collect(self, job: Job, t0: float) -> tuple[list[RowOutput], float | None]:
        """Run a generate job to its end -> (row outputs, seconds to the first token)."""
        out = [RowOutput() for _ in job.prompts]
        ttft = None
        async for kind, value in self.events(job):
            if kind != "deltas":
                continue
            for row, d in value:
                if ttft is None and d.token_ids:
                    ttft = time.perf_counter() - t0
                o = out[row]
                o.text += d.text
                o.token_ids += d.token_ids
                if d.finish_reason:
                    o.finish_reason = d.finish_reason
                if d.eos_token is not None:
                    o.eos_token = d.eos_token
        return out, ttft

    async def score(self, label: str, model, seqs: list[list[int]], top_k: int) -> list:
        job = self.submit(Job("score", label, model, seqs, top_k=top_k))
        async for kind, value in self.events(job):
            if kind == "scores":
                return value
        raise ServingError(500, "scoring produced no result")

    def record(self, label: str, endpoint: str, t0: float, ttft, prompt_tokens: int, gen_tokens: int) -> None:
        m = self.metrics
        m.requests.inc(label, endpoint, "ok")
        m.latency.observe(label, endpoint, value=time.perf_counter() - t0)
        if ttft is not None:
            m.ttft.observe(label, value=ttft)
        m.prompt_tokens.inc(label, by=prompt_tokens)
        m.generation_tokens.inc(label, by=gen_tokens)

    # -- OpenAI completions and chat (see `completions`) ------------------------------------------------------
    async def create_completion(self, req: P.CompletionRequest):
        return await self.openai.create_completion(req)

    async def create_chat_completion(self, req: P.ChatCompletionRequest):
        return await self.openai.create_chat_completion(req)

    # -- compare (see `compare`) -----------------------------------------------------------------------------
    async def compare(self, req: P.CompareRequest) -> P.CompareResponse:
        return await self.comparison.compare(req)

    # -- health and metrics ------------------------------------------------------------------------------------
    def health(self) -> P.HealthResponse:
        return P.HealthResponse(models=len(self.registry.entries()), queued=self.scheduler.depth()[0])

    def render_metrics(self) -> str:
        return self.metrics.render()

    def _scrape_metrics(self):
        """Gauges computed at scrape time (prometheus_client metric families)."""
        from prometheus_client.core import GaugeMetricFamily

        cache = self.engine.provider.cache
        if not self.arena.active:  # while a battle streams, no per-recipe series may move (server/arena.py)
            with cache.lock:
                sizes = {k[0]: cache.size(v) for k, v in cache.data.items()}
            per_model = GaugeMetricFamily("lazymerge_cache_bytes", "Bytes of this model's merged tensors resident in "
                                          "the shared merged-weight cache (a tensor shared by two recipes counts for "
                                          "both; left out while an arena battle streams).", labels=["model"])
            for e in self.registry.entries():
                keys = {p.key for p in e.model.plan.tensors.values()}
                per_model.add_metric([e.name], sum(sizes.get(k, 0) for k in keys))
            yield per_model
        st = self.engine.stats()
        glob = GaugeMetricFamily("lazymerge_engine", "Engine-wide cache state (all recipes).", labels=["stat"])
        for k in ("cache_bytes", "cache_budget", "cache_entries", "cache_hits", "cache_misses", "merges"):
            glob.add_metric([k], st[k])
        yield glob
        queued, active = self.scheduler.depth()
        sched = GaugeMetricFamily("lazymerge_scheduler", "Scheduler state.", labels=["stat"])
        sched.add_metric(["queued_rows"], queued)
        sched.add_metric(["running_batches"], active)
        sched.add_metric(["batches_started"], self.scheduler.batches)
        sched.add_metric(["recipes"], sum(e.kind == "recipe" for e in self.registry.entries()))
        yield sched
