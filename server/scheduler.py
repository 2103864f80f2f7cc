"""The batching scheduler: one worker thread runs every forward pass of the server.

Contract:
* A `Job` is one request's rows (prompts as token ids) for one compiled recipe, either `generate` (with a
  `SamplingParams` per row) or `score` (log-probabilities of whole sequences).
* Jobs are queued by `key` = (model label, plan digest, kind). A batch only ever holds jobs of one key, so two
  recipes never share a forward pass; two requests for the same recipe queued at the same time share one.
* Fairness: each key has at most one running batch; running batches advance one decoding step each, round-robin,
  so a long generation of recipe A delays recipe B by one step per step, not by the whole generation. New batches
  are admitted between steps, oldest waiting request first.
* Isolation: the worker survives every exception, and one bad request fails only itself. A batch of several
  requests that fails (the engine cannot tell which row caused it) is split: each live request is re-run alone from
  its prompt, so the culprit fails on its own and the others still get their complete outputs. If the batch had
  already streamed output, each re-run replays the request's rows and delivers only what goes beyond what its client
  already received (verified token by token against it), so streaming and non-streaming clients alike see each row
  exactly once, never duplicated. Rows that had finished are not re-run. Replays are exact for greedy rows and for
  sampled ones, since the scheduler pins a seed on every unseeded sampled row at submission (the same distribution
  as an unseeded draw); should a replay still diverge from the text already sent (floating-point differences
  between a batched and a solo forward flipping a sample), that request alone fails with a clear error rather than
  send inconsistent text. A request re-run alone that fails again gets the error.
* Results travel back as events on the job's `Sink` (thread-safe, bound to the caller's asyncio loop):
  ("start", queue_seconds), ("deltas", [(row, Delta), ...]), ("scores", [TokenScores, ...]), ("end", None),
  ("error", exception), each as (tag, kind, value).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .errors import ServingError


class QueueFull(Exception):
    pass


class Sink:
    """Worker thread -> asyncio bridge: puts (tag, kind, value) on an asyncio queue (several jobs may share one,
    told apart by their tag)."""

    def __init__(self, queue: asyncio.Queue | None = None, tag=None):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = queue if queue is not None else asyncio.Queue()
        self.tag = tag

    def put(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.tag, kind, value))
        except RuntimeError:  # the loop is closed: the client is gone
            pass


class Diverged(ServingError):
    def __init__(self):
        super().__init__(500, "a batch this request shared failed mid-stream, and re-running the request alone "
                         "did not reproduce the output already sent; retry the request", code="replay_diverged")


@dataclass(eq=False)
class _RowLog:
    """What a generate row delivered to its client, and what the current run has produced (they differ only while
    a re-run replays a prefix already sent)."""

    sent_ids: list[int] = field(default_factory=list)
    sent_text: str = ""
    done: bool = False
    run_ids: list[int] = field(default_factory=list)
    run_text: str = ""

    def take(self, d):
        """The part of delta `d` (of the current run) the client has not received yet: a Delta, None (nothing new)
        or raises Diverged (the run contradicts what was sent)."""
        self.run_ids += d.token_ids
        self.run_text += d.text
        n, m = min(len(self.run_ids), len(self.sent_ids)), min(len(self.run_text), len(self.sent_text))
        if self.run_ids[:n] != self.sent_ids[:n] or self.run_text[:m] != self.sent_text[:m] or \
                (d.finish_reason and (len(self.run_ids) < len(self.sent_ids) or
                                      len(self.run_text) < len(self.sent_text))):
            raise Diverged()
        ids, text = self.run_ids[len(self.sent_ids):], self.run_text[len(self.sent_text):]
        if not (ids or text or d.finish_reason):
            return None
        self.sent_ids += ids
        self.sent_text += text
        self.done = bool(d.finish_reason)
        if ids == d.token_ids and text == d.text:
            return d
        lps = d.logprobs[len(d.logprobs) - len(ids):] if d.logprobs and ids else None
        return dataclasses.replace(d, token_ids=ids, text=text, logprobs=lps)

    def rewind(self) -> None:
        self.run_ids, self.run_text = [], ""


@dataclass(eq=False)
class Job:
    kind: str  # "generate" | "score"
    label: str  # the model name the request used (metrics label)
    model: object  # LazyModel
    prompts: list[list[int]]
    params: list | None = None  # generate: SamplingParams per row
    top_k: int = 0  # score: alternatives per position
    sink: Sink | None = None
    solo: bool = False  # retried alone after its batch failed
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    rows_left: int = 0
    log: list[_RowLog] = field(default_factory=list)  # generate: per row, what was delivered

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.label, self.model.digest, self.kind)

    @property
    def rows(self) -> int:
        return len(self.prompts)


@dataclass(eq=False)
class _Batch:
    key: tuple
    jobs: list[Job]
    gen: object = None
    owner: list[tuple[Job, int]] = field(default_factory=list)  # batch row -> (job, row in job)
    begun: bool = False
    produced: bool = False

    @property
    def kind(self) -> str:
        return self.key[2]

    @property
    def model(self):
        return self.jobs[0].model


class Scheduler:
    def __init__(self, metrics=None, cache=None, max_batch_rows: int = 32, max_queued_rows: int = 256,
                 batch_window_s: float = 0.002):
        self.metrics = metrics
        self.cache = cache  # the engine's LRU (for per-model hit/miss counts)
        self.max_batch_rows = max_batch_rows
        self.max_queued_rows = max_queued_rows
        self.batch_window_s = batch_window_s
        self._queues: OrderedDict[tuple, deque[Job]] = OrderedDict()
        self._queued_rows = 0
        self._active: deque[_Batch] = deque()
        self._running_keys: set[tuple] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lazymerge-scheduler", daemon=True)
        self.batches = 0

    # -- public ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue every job or, if they do not all fit (QueueFull) or the server is stopping, none."""
        rows = sum(j.rows for j in jobs)
        with self._cond:
            if self._stopping:
                raise ServingError(503, "the server is shutting down")
            if self._queued_rows + rows > self.max_queued_rows:
                raise QueueFull(f"the request queue is full ({self._queued_rows} rows waiting, limit "
                                f"{self.max_queued_rows}; this request needs {rows}); retry later")
            now = time.perf_counter()
            for job in jobs:
                job.enqueued = now
                job.rows_left = job.rows
                if job.kind == "generate":
                    job.log = [_RowLog() for _ in range(job.rows)]
                    job.params = [_pin_seed(p) for p in job.params]
                self._queues.setdefault(job.key, deque()).append(job)
            self._queued_rows += rows
            self._cond.notify_all()

    def depth(self) -> tuple[int, int]:
        """(rows waiting, batches running)."""
        return self._queued_rows, len(self._running_keys)

    # -- worker ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._queues and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
                if not self._active and self.batch_window_s > 0:  # idle: let simultaneous arrivals gather
                    self._cond.wait(self.batch_window_s)
                self._admit()
                batch = self._active.popleft() if self._active else None
            if batch is None:
                continue
            if self._step(batch):
                with self._cond:
                    self._active.append(batch)
            else:
                with self._cond:
                    self._running_keys.discard(batch.key)
        self._fail_all(ServingError(503, "the server is shutting down"))

    def _admit(self) -> None:
        """Start a batch for every waiting key without a running one, oldest request first."""
        order = sorted(self._queues, key=lambda k: self._queues[k][0].enqueued)
        for key in order:
            if key in self._running_keys:
                continue
            q = self._queues[key]
            jobs, rows = [], 0
            while q and (not jobs or rows + q[0].rows <= self.max_batch_rows and not q[0].solo):
                job = q.popleft()
                self._queued_rows -= job.rows
                if job.cancelled:
                    continue
                jobs.append(job)
                rows += job.rows
                if job.solo:
                    break
            if not q:
                del self._queues[key]
            if jobs:
                self._active.append(_Batch(key, jobs))
                self._running_keys.add(key)

    def _fail_all(self, err: Exception) -> None:
        with self._cond:
            jobs = [j for b in self._active for j in b.jobs] + [j for q in self._queues.values() for j in q]
            self._active.clear()
            self._queues.clear()
            self._queued_rows = 0
        for j in jobs:
            j.sink.put("error", err)

    def _begin(self, b: _Batch) -> None:
        now = time.perf_counter()
        label, kind = b.key[0], b.kind
        rows = sum(j.rows for j in b.jobs)
        if self.metrics is not None:
            self.metrics.batch_size.observe(label, kind, value=rows)
            self.metrics.batch_requests.observe(label, kind, value=len(b.jobs))
        self.batches += 1
        for j in b.jobs:
            if self.metrics is not None:
                self.metrics.queue_time.observe(label, value=now - j.enqueued)
            j.sink.put("start", now - j.enqueued)
        if kind == "generate":  # rows already finished (before a failed batch's re-run) are not run again
            prompts, params = [], []
            for j in b.jobs:
                for r in range(j.rows):
                    if not j.log[r].done:
                        j.log[r].rewind()
                        b.owner.append((j, r))
                        prompts.append(j.prompts[r])
                        params.append(j.params[r])
            b.gen = b.model.stream(prompts, params=params)

    def _step(self, b: _Batch) -> bool:
        """Advance a batch by one step; True while it has more to do."""
        if all(j.cancelled for j in b.jobs):
            if b.gen is not None:
                b.gen.close()
            return False
        c = self.cache
        h0, m0 = (c.hits, c.misses) if c is not None else (0, 0)
        t0 = time.perf_counter()
        try:
            if not b.begun:
                b.begun = True
                self._begin(b)
            if b.kind == "score":
                self._score(b)
                return False
            deltas = next(b.gen, None)
            if deltas is None:
                return False
            b.produced = True
            per_job: dict[int, tuple[Job, list]] = {}
            for d in deltas:
                job, row = b.owner[d.row]
                if job.cancelled:
                    continue
                items = per_job.setdefault(id(job), (job, []))[1]
                try:
                    new = job.log[row].take(d)
                except Diverged as e:
                    job.cancelled = True
                    job.sink.put("error", e)
                    continue
                if new is not None:
                    items.append((row, new))
                    if new.finish_reason:
                        job.rows_left -= 1
            for job, items in per_job.values():
                if not job.cancelled and items:
                    job.sink.put("deltas", items)
                    if job.rows_left == 0:
                        job.sink.put("end")
            return True
        except Exception as e:  # noqa: BLE001 - one batch's failure must not stop the worker
            self._on_failure(b, e)
            return False
        finally:
            if self.metrics is not None:
                label = b.key[0]
                self.metrics.step_seconds.inc(label, by=time.perf_counter() - t0)
                if c is not None:
                    self.metrics.cache_hits.inc(label, by=c.hits - h0)
                    self.metrics.cache_misses.inc(label, by=c.misses - m0)

    def _score(self, b: _Batch) -> None:
        seqs = [p for j in b.jobs for p in j.prompts]
        top_k = max(j.top_k for j in b.jobs)
        res = b.model.score(seqs, top_k=top_k)
        i = 0
        for j in b.jobs:
            j.sink.put("scores", res[i:i + j.rows])
            j.sink.put("end")
            i += j.rows

    def _on_failure(self, b: _Batch, err: Exception) -> None:
        """A batch raised. Alone, its request fails. Shared, the request that caused it cannot be told apart: every
        live request is re-run alone, first in line, from its prompt (see the module's docstring: output already
        streamed is replayed, not sent twice), so only the culprit fails."""
        if b.gen is not None:
            with contextlib.suppress(Exception):
                b.gen.close()
        live = [j for j in b.jobs if not j.cancelled and (j.rows_left > 0 or not b.begun)]
        if len(b.jobs) > 1:
            with self._cond:
                q = self._queues.setdefault(b.key, deque())
                for j in reversed(live):
                    j.solo = True
                    q.appendleft(j)
                    self._queued_rows += j.rows
                if not q:
                    del self._queues[b.key]
                else:
                    self._queues.move_to_end(b.key, last=False)
            return
        for j in live:
            j.sink.put("error", err)


def _pin_seed(p):
    """An unseeded sampled row gets a seed drawn now, so that a re-run (after a shared batch failed) reproduces it."""
    if p is None or getattr(p, "temperature", 0) <= 0 or p.seed is not None:
        return p
    return dataclasses.replace(p, seed=random.getrandbits(62))
