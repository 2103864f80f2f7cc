"""OpenAI's `POST /v1/completions` and `POST /v1/chat/completions` over the serving layer: prompts to token ids,
one scheduler job per request (prompts x n rows), the response (or its server-sent events for `stream: true`), and
`logprobs` / `echo` through a scoring job. Everything a request is refused for is checked before its stream starts.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from . import protocol as P
from .errors import ServingError, bad_request
from .faults import check_context
from .logprobs import chat_logprobs, completion_logprobs, echo_text, stream_chat_logprobs, stream_completion_logprobs
from .scheduler import Job
from .serving import RowOutput


def _sse(obj) -> str:
    data = obj if isinstance(obj, str) else obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") \
        else json.dumps(obj)
    return f"data: {data}\n\n"


class OpenAIEndpoints:
    def __init__(self, serving):
        self.s = serving

    def _completion_prompts(self, model, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and all(isinstance(x, int) for x in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise bad_request("prompt is an empty list", param="prompt")
        return [self.s.check_prompt(model, model.encode(p) if isinstance(p, str) else list(p)) for p in items]

    async def create_completion(self, req: P.CompletionRequest):
        self.s.unsupported(req)
        if req.logprobs is not None and req.logprobs > self.s.config.max_logprobs:
            raise bad_request(f"logprobs must be <= {self.s.config.max_logprobs}", param="logprobs")
        if req.stream and req.logprobs is not None and req.echo:
            raise bad_request("logprobs with echo and stream is not supported; use stream: false", param="echo")
        label, model = await self.s.resolve(req.model, req.recipe)
        prompts = self._completion_prompts(model, req.prompt)
        rows = [p for p in prompts for _ in range(req.n)]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        check_context(model, rows, max_tokens)
        params = self.s.sampling(max_tokens, req.temperature, req.top_p, req.seed, req.stop, len(rows),
                                 logprobs=req.logprobs if req.stream else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        job = self.s.submit(Job("generate", label, model, rows, params=params)) if max_tokens > 0 else None
        tok = model.tokenizer
        if req.stream:
            return self._stream_completion(req, rid, label, model, rows, job, t0)
        if job is not None:
            outs, ttft = await self.s.collect(job, t0)
        else:
            outs, ttft = [RowOutput() for _ in rows], None
        choices = [P.CompletionChoice(index=i, text=echo_text(tok, p) + o.text if req.echo else o.text,
                                      finish_reason=o.finish_reason) for i, (p, o) in enumerate(zip(rows, outs))]
        if req.logprobs is not None:
            # the EOS token that ended a row is scored too (vLLM does): lm-eval's echo parsing drops the last token
            seqs = [p + o.token_ids + ([o.eos_token] if o.eos_token is not None else []) for p, o in zip(rows, outs)]
            scores = await self.s.score(label, model, seqs, req.logprobs)
            for c, p, s in zip(choices, rows, scores):
                start = 0 if req.echo else len(p)
                c.logprobs = completion_logprobs(model.tokenizer, s.token_ids, s, start, req.logprobs)
        n_prompt, n_gen = sum(len(p) for p in rows), sum(len(o.token_ids) for o in outs)
        self.s.record(label, "completions", t0, ttft, n_prompt, n_gen)
        return P.CompletionResponse(id=rid, model=req.model, choices=choices, system_fingerprint=model.digest,
                                    usage=P.Usage(prompt_tokens=n_prompt, completion_tokens=n_gen,
                                                  total_tokens=n_prompt + n_gen))

    def _stream_completion(self, req, rid, label, model, rows, job, t0) -> AsyncIterator[str]:
        created = int(time.time())

        # text offsets count from the prompt's start, as OpenAI's do (the echoed prompt's chunk advances them itself)
        offsets = [0 if req.echo else len(echo_text(model.tokenizer, p)) for p in rows]

        def chunk(i, text, reason=None, delta=None):
            lp = None
            if req.logprobs is not None and delta is not None and delta.logprobs:
                lp = stream_completion_logprobs(model.tokenizer, delta.token_ids, delta.logprobs, req.logprobs,
                                                offsets[i])
            offsets[i] += len(text)
            return P.CompletionResponse(id=rid, created=created, model=req.model, system_fingerprint=model.digest,
                                        choices=[P.CompletionChoice(index=i, text=text, finish_reason=reason,
                                                                    logprobs=lp)])

        def usage(u):
            return P.CompletionResponse(id=rid, created=created, model=req.model, choices=[], usage=u)

        opening = ([chunk(i, echo_text(model.tokenizer, p)) for i, p in enumerate(rows)]
                   if req.echo else [])
        return self._stream(req, label, "completions", rows, job, t0, opening, chunk, usage)

    async def _stream(self, req, label, endpoint, rows, job, t0, opening, chunk, usage) -> AsyncIterator[str]:
        """The SSE stream shared by both endpoints: `opening` chunks, one `chunk(row, text, finish_reason)` per
        decoded delta (or a "length" finish per row when nothing is generated), the `usage(Usage)` chunk if asked,
        then [DONE]; a serving error becomes an error event and the stream still ends with [DONE]."""
        ttft, n_gen = None, 0
        try:
            for c in opening:
                yield _sse(c)
            if job is None:
                for i in range(len(rows)):
                    yield _sse(chunk(i, "", "length"))
            else:
                async for kind, value in self.s.events(job):
                    if kind != "deltas":
                        continue
                    for row, d in value:
                        n_gen += len(d.token_ids)
                        if ttft is None and d.token_ids:
                            ttft = time.perf_counter() - t0
                        if d.text or d.finish_reason or d.logprobs:
                            yield _sse(chunk(row, d.text, d.finish_reason, d))
            n_prompt = sum(len(p) for p in rows)
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(usage(P.Usage(prompt_tokens=n_prompt, completion_tokens=n_gen,
                                         total_tokens=n_prompt + n_gen)))
            self.s.record(label, endpoint, t0, ttft, n_prompt, n_gen)
        except ServingError as e:
            self.s.metrics.requests.inc(label, endpoint, "error")
            yield _sse(json.dumps(e.body()))
        yield _sse("[DONE]")

    # -- chat --------------------------------------------------------------------------------------------------
    @staticmethod
    def _messages(req: P.ChatCompletionRequest) -> list[dict]:
        out = []
        for i, m in enumerate(req.messages):
            c = m.content
            if isinstance(c, list):
                parts = []
                for part in c:
                    if part.get("type") != "text":
                        raise bad_request("only text content parts are supported", param=f"messages[{i}].content")
                    parts.append(str(part.get("text", "")))
                c = "".join(parts)
            out.append({"role": m.role, "content": c or ""})
        return out

    async def create_chat_completion(self, req: P.ChatCompletionRequest):
        self.s.unsupported(req)
        k = req.top_logprobs or 0
        label, model = await self.s.resolve(req.model, req.recipe)
        try:
            ids = model.chat_prompt(self._messages(req))
        except ServingError:
            raise
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages
            raise bad_request(f"cannot apply the chat template: {e}", param="messages") from None
        self.s.check_prompt(model, ids, param="messages")
        rows = [ids] * req.n
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.s.config.default_chat_max_tokens, self.s.config.max_tokens)
        check_context(model, rows, max_tokens, param="messages")
        params = self.s.sampling(max_tokens, req.temperature, req.top_p, req.seed, req.stop, len(rows),
                                 logprobs=k if req.stream and req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        job = self.s.submit(Job("generate", label, model, rows, params=params)) if max_tokens > 0 else None
        if req.stream:
            return self._stream_chat(req, rid, label, model, rows, job, t0)
        outs, ttft = await self.s.collect(job, t0) if job is not None else ([RowOutput() for _ in rows], None)
        choices = [P.ChatChoice(index=i, message=P.AssistantMessage(content=o.text), finish_reason=o.finish_reason)
                   for i, o in enumerate(outs)]
        if req.logprobs:
            scores = await self.s.score(label, model, [ids + o.token_ids for o in outs], k)
            for c, s in zip(choices, scores):
                c.logprobs = chat_logprobs(model.tokenizer, s, len(ids), k)
        n_prompt, n_gen = len(ids) * len(rows), sum(len(o.token_ids) for o in outs)
        self.s.record(label, "chat", t0, ttft, n_prompt, n_gen)
        return P.ChatCompletionResponse(id=rid, model=req.model, choices=choices, system_fingerprint=model.digest,
                                        usage=P.Usage(prompt_tokens=n_prompt, completion_tokens=n_gen,
                                                      total_tokens=n_prompt + n_gen))

    def _stream_chat(self, req, rid, label, model, rows, job, t0) -> AsyncIterator[str]:
        created = int(time.time())

        context = [list(r) for r in rows]  # per row: the ids so far (the context of the next token's text)

        def chunk(i, text, reason=None, d=None):
            delta = P.DeltaMessage(content=text) if text else P.DeltaMessage()
            lp = None
            if req.logprobs and d is not None and d.logprobs:
                k = req.top_logprobs or 0
                lp = stream_chat_logprobs(model.tokenizer, context[i], d.token_ids, d.logprobs, k)
            if d is not None:
                context[i] = (context[i] + d.token_ids)[-8:]
            return chunk_of(i, delta, reason, lp)

        def chunk_of(i, delta, reason=None, logprobs=None):
            return P.ChatCompletionChunk(id=rid, created=created, model=req.model, system_fingerprint=model.digest,
                                         choices=[P.ChatStreamChoice(index=i, delta=delta, finish_reason=reason,
                                                                     logprobs=logprobs)])

        def usage(u):
            return P.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=u)

        opening = [chunk_of(i, P.DeltaMessage(role="assistant", content="")) for i in range(len(rows))]
        return self._stream(req, label, "chat", rows, job, t0, opening, chunk, usage)
