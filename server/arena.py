"""Blind A/B battles for the web page: two recipes answer one prompt side by side, a person votes, the names are
revealed only in the vote's response.

`Arena.battle(req)` picks the two recipes (given, or two distinct models at random), shuffles them into sides A and
B, submits both generations at once (they run interleaved, step by step, in the scheduler) and returns the stream of
server-sent events the page renders::

    {"type": "battle", "battle_id": ...}
    {"type": "delta", "side": "A", "text": ...}                   (many, both sides interleaved)
    {"type": "done", "side": "A", "finish_reason": ..., "completion_tokens": ..., "latency_s": ..., "tokens_per_s": ...}
    {"type": "error", "side": "B", "error": {...}}                 (instead of "done", if that side failed)
    [DONE]

`Arena.vote(req)` records the winner once per battle in the `VoteStore` and returns the names and the leaderboard.

Blindness: before the vote, nothing the page's credentials can read names a side: the stream carries no names or
digests, a side's error carries only its kind, and the battle's jobs are labelled `arena` in /metrics (never by
recipe), so no per-recipe series moves while a battle runs; /metrics leaves out the per-recipe cache gauge while a
battle streams.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from . import protocol as P
from .errors import ServingError, bad_request
from .faults import as_serving_error, check_context
from .scheduler import Job, Sink

MAX_BATTLES = 10_000
ARENA_LABEL = "arena"


def _blind(exc: BaseException) -> ServingError:
    """A side's error without anything that names its recipe or sources (the kind of failure only)."""
    err = as_serving_error(exc)
    return ServingError(err.status, f"this side's model failed ({err.code or err.type}); the names are revealed "
                        "after the vote", code=err.code, type=err.type)


@dataclass
class Battle:
    id: str
    names: dict[str, str]  # side -> recipe name
    digests: dict[str, str]
    prompt: str


class Arena:
    def __init__(self, serving):
        self.s = serving
        self._battles: OrderedDict[str, Battle] = OrderedDict()
        self._rng = random.Random()
        self.active = 0  # battle streams in flight (server/serving.py hides per-recipe gauges meanwhile)

    def _pick(self, names: list[str] | None) -> list[str]:
        if names is None:
            pool = [e.name for e in self.s.registry.entries()]
            if len(pool) < 2:
                raise bad_request("a battle needs at least two models on this server", param="recipes")
            return self._rng.sample(pool, 2)
        if len(names) != 2 or names[0] == names[1]:
            raise bad_request("a battle takes exactly two distinct recipe names", param="recipes")
        return list(names)

    async def battle(self, req: P.BattleRequest):
        names = self._pick(req.recipes)
        self._rng.shuffle(names)
        entries = {side: self.s.registry.get(n) for side, n in zip("AB", names)}
        prompts = {}
        for side, e in entries.items():
            m = e.model
            ids = m.chat_prompt([{"role": "user", "content": req.prompt}]) if req.chat else m.encode(req.prompt)
            prompts[side] = self.s.check_prompt(m, ids)
        queue: asyncio.Queue = asyncio.Queue()
        t0 = time.perf_counter()
        params = {side: self.s.sampling(req.max_tokens, req.temperature, req.top_p, req.seed, None, 1)
                  for side in entries}
        sides = list(entries)  # both sides are queued, or neither (429)
        for side, e in entries.items():
            check_context(e.model, [prompts[side]], req.max_tokens)
        # metrics see battles under one label, "arena": no series tells which recipe is behind which side
        jobs = dict(zip(sides, self.s.submit_all(
            [Job("generate", ARENA_LABEL, entries[s].model, [prompts[s]], params=params[s]) for s in sides],
            [Sink(queue, tag=s) for s in sides])))
        b = Battle(uuid.uuid4().hex, {s: e.name for s, e in entries.items()},
                   {s: e.digest for s, e in entries.items()}, req.prompt)
        self._battles[b.id] = b
        while len(self._battles) > MAX_BATTLES:
            self._battles.popitem(last=False)
        return self._stream(b, jobs, t0)

    async def _stream(self, b: Battle, jobs: dict[str, Job], t0: float):
        self.active += 1
        try:
            async for line in self._events(b, jobs, t0):
                yield line
        finally:
            self.active -= 1

    async def _events(self, b: Battle, jobs: dict[str, Job], t0: float):
        yield f"data: {json.dumps({'type': 'battle', 'battle_id': b.id})}\n\n"
        queue = jobs["A"].sink.queue
        open_sides = set(jobs)
        tokens = {s: 0 for s in jobs}
        ttft: dict[str, float] = {}
        try:
            while open_sides:
                side, kind, value = await queue.get()
                if side not in open_sides:
                    continue
                if kind == "deltas":
                    for _, d in value:
                        tokens[side] += len(d.token_ids)
                        if d.token_ids and side not in ttft:
                            ttft[side] = time.perf_counter() - t0
                        if d.text:
                            yield f"data: {json.dumps({'type': 'delta', 'side': side, 'text': d.text})}\n\n"
                        if d.finish_reason:
                            lat = time.perf_counter() - t0
                            ev = {"type": "done", "side": side, "finish_reason": d.finish_reason,
                                  "completion_tokens": tokens[side], "latency_s": round(lat, 4),
                                  "tokens_per_s": round(tokens[side] / max(lat, 1e-9), 2)}
                            yield f"data: {json.dumps(ev)}\n\n"
                            self.s.record(ARENA_LABEL, "arena", t0, ttft.get(side), len(jobs[side].prompts[0]),
                                          tokens[side])
                elif kind == "end":
                    open_sides.discard(side)
                elif kind == "error":
                    open_sides.discard(side)
                    yield f"data: {json.dumps({'type': 'error', 'side': side, **_blind(value).body()})}\n\n"
        finally:
            for s in open_sides:
                jobs[s].cancelled = True
        yield "data: [DONE]\n\n"

    def vote(self, req: P.VoteRequest) -> P.VoteResponse:
        b = self._battles.get(req.battle_id)
        if b is None:
            raise ServingError(404, f"no battle {req.battle_id!r} (unknown or expired)", param="battle_id")
        ok = self.s.votes.record(b.id, b.names["A"], b.names["B"], b.digests["A"], b.digests["B"], req.winner,
                                 b.prompt)
        if not ok:
            raise bad_request("this battle already has a vote", param="battle_id", code="already_voted")
        return P.VoteResponse(battle_id=b.id, winner=req.winner, recipes=dict(b.names),
                              leaderboard=self.leaderboard().data)

    def config(self) -> P.ArenaConfig:
        c = self.s.config
        names = {e.name for e in self.s.registry.entries()}
        featured = list(c.featured) if c.featured and all(n in names for n in c.featured) else None
        return P.ArenaConfig(examples=list(c.examples), featured=featured)

    def leaderboard(self) -> P.Leaderboard:
        return P.Leaderboard(data=[P.LeaderboardEntry(**r) for r in self.s.votes.leaderboard()])
