"""`POST /v1/compare`: two or more recipes answer the same prompts with the same sampling settings, side by side.

`Comparison(serving).compare(req)` resolves every recipe (registered name or inline), validates every prompt for
every recipe, then queues all the generations at once: either all of them fit in the queue or none is queued (429),
so a refused comparison never leaves orphan jobs behind. The recipes run interleaved, step by step, in the scheduler.
Each result carries its outputs, latency, tokens/s and, given `references`, the mean log-likelihood of each reference
(null, with a reason in `reference_notes`, for a reference that adds no token to the prompt or only unknown tokens:
never a perfect 0.0) and exact-match scores. If any recipe's run fails (or the client goes away), the other runs are
cancelled and the error is raised.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from . import protocol as P
from .errors import bad_request
from .faults import check_context
from .scheduler import Job


class Comparison:
    def __init__(self, serving):
        self.s = serving

    async def _resolve_spec(self, spec) -> tuple[str, object]:
        s = self.s
        if isinstance(spec, str) and (spec in s.registry or ("\n" not in spec and ":" not in spec)):
            e = s.registry.get(spec)
            return e.name, e.model
        _, model = await s.resolve("inline", spec)
        return f"inline-{model.digest}", model

    async def compare(self, req: P.CompareRequest) -> P.CompareResponse:
        s = self.s
        if req.references is not None and len(req.references) != len(req.prompts):
            raise bad_request(f"references has {len(req.references)} items for {len(req.prompts)} prompts",
                              param="references")
        resolved = [await self._resolve_spec(spec) for spec in req.recipes]
        runs = []
        for label, model in resolved:
            ids = [s.check_prompt(model, model.encode(p), param="prompts") for p in req.prompts]
            params = s.sampling(req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, len(ids))
            check_context(model, ids, req.max_tokens, param="prompts")
            runs.append((label, model, ids, params))
        t0 = time.perf_counter()
        jobs = s.submit_all([Job("generate", label, model, ids, params=params) for label, model, ids, params in runs])
        tasks = [asyncio.ensure_future(self._one(req, run, job, t0)) for run, job in zip(runs, jobs)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:  # one run failed, or this request was cancelled: stop the others
            for t in tasks:
                t.cancel()
            for j in jobs:
                j.cancelled = True
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return P.CompareResponse(id=f"cmp-{uuid.uuid4().hex}", results=list(results))

    async def _one(self, req: P.CompareRequest, run, job: Job, t0: float) -> P.CompareResult:
        from lazymerge.engine.score import encode_pair

        s = self.s
        label, model, ids, _ = run
        outs, ttft = await s.collect(job, t0)
        latency = time.perf_counter() - t0
        n_gen = sum(len(o.token_ids) for o in outs)
        s.record(label, "compare", t0, ttft, sum(map(len, ids)), n_gen)
        res = P.CompareResult(recipe=label, digest=model.digest, outputs=[o.text for o in outs],
                              finish_reasons=[o.finish_reason for o in outs], latency_s=round(latency, 4),
                              completion_tokens=n_gen, tokens_per_s=round(n_gen / max(latency, 1e-9), 2))
        if req.references is not None:
            pairs = [encode_pair(model.tokenizer, p, r) for p, r in zip(req.prompts, req.references)]
            scores = await s.score(label, model, [c + x for c, x in pairs], 0)
            means: list[float | None] = []
            notes: list[str | None] = []
            unk = model.tokenizer.unk_token_id
            for (c, x), sc in zip(pairs, scores):
                lps = [lp for lp in sc.logprobs[len(c):] if lp is not None]
                note = ("the reference adds no token to the prompt" if not x else
                        "the reference tokenizes only to unknown tokens" if unk is not None and set(x) == {unk} else
                        None if lps else "the reference has no scorable token")
                means.append(None if note else sum(lps) / len(lps))
                notes.append(note)
            known = [m for m in means if m is not None]
            res.reference_logprob, res.reference_notes = means, notes
            res.mean_reference_logprob = sum(known) / len(known) if known else None
            em = [o.text.strip() == r.strip() for o, r in zip(outs, req.references)]
            res.exact_match, res.exact_match_rate = em, sum(em) / len(em)
        return res
