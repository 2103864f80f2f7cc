"""Where the server's errors come from and what leaves it: exceptions to OpenAI error JSON, hang-ups, context limits.

* `as_serving_error(exc)`: a client's mistake is a 4xx naming the field; a source that changed on disk is a 503
  naming the source; non-finite weights are a 422 naming the tensor; anything else is the server's own fault: a 500
  with an id, and the traceback goes to the server's log under that id (never to the client).
* `with_cancellation(handler)`: a non-streaming route handler that is cancelled when its client hangs up, as the
  streaming path already is, so a generation nobody waits for stops at its next step.
* `check_context(model, prompts, max_tokens)`: prompt and prompt + max_tokens against the model's context
  (`max_position_embeddings` of its config), a 400 naming both numbers.

This module does not import FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid

from .errors import ServingError, bad_request

log = logging.getLogger("lazymerge.server")


def internal_error(exc: BaseException) -> ServingError:
    """A 500 for the server's own fault: an id the client can quote; the traceback is logged under it."""
    eid = uuid.uuid4().hex[:12]
    log.error("internal error %s", eid, exc_info=(type(exc), exc, exc.__traceback__))
    return ServingError(500, f"internal error (id {eid}); the server's log has the details", code="internal_error")


def as_serving_error(exc: BaseException) -> ServingError:
    """The ServingError a request that raised `exc` is answered with."""
    if isinstance(exc, ServingError):
        return exc
    from lazymerge.engine.checkpoint import CheckpointError, SourceUnavailable
    from lazymerge.engine.generate import UsageError
    from lazymerge.engine.recipe import RecipeError
    from lazymerge.engine.safety import NonFiniteError

    if isinstance(exc, SourceUnavailable):
        return ServingError(503, str(exc), code="source_unavailable")
    if isinstance(exc, NonFiniteError):
        return ServingError(422, str(exc), param="model", code="non_finite_weights")
    if isinstance(exc, RecipeError):
        return ServingError(422, str(exc), param="recipe", code="invalid_recipe")
    if isinstance(exc, UsageError):
        return bad_request(str(exc))
    if isinstance(exc, CheckpointError):
        return ServingError(503, f"a source cannot be used: {exc}", code="source_unavailable")
    return internal_error(exc)


CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by the (gone) client


async def _disconnected(request) -> None:
    """Return when the client hangs up (the body was already read, so the next message is the disconnect)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def with_cancellation(handler):
    """Decorate a route handler taking `request: Request`: the handler task is cancelled when the client hangs up
    (its jobs see the cancellation through `MergeServing.events` and stop at their next step)."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        from starlette.responses import Response

        request = kwargs["request"]
        work = asyncio.ensure_future(handler(*args, **kwargs))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # CancelledError inside MergeServing.events: the job is marked cancelled
        if not work.done() or work.cancelled():
            with contextlib.suppress(BaseException):
                await work  # let the handler's own cleanup (job cancellation) run before answering
            return Response(status_code=CLIENT_CLOSED)
        return work.result()  # done, even if the client also left: a stream notices on its own

    return wrapper


def context_length(model) -> int | None:
    """The model's context in tokens (`max_position_embeddings`), or None if its config does not say."""
    n = model.plan.config.get("max_position_embeddings")
    return n if isinstance(n, int) and n > 0 else None


def check_context(model, prompts: list[list[int]], max_tokens: int, param: str = "prompt") -> None:
    """400 if a prompt, or a prompt plus max_tokens, exceeds the model's context (both numbers in the message)."""
    ctx = context_length(model)
    if ctx is None or not prompts:
        return
    n = max(len(p) for p in prompts)
    if n > ctx:
        raise bad_request(f"this model's maximum context length is {ctx} tokens; the prompt has {n} tokens",
                          param=param, code="context_length_exceeded")
    if n + max_tokens > ctx:
        raise bad_request(f"this model's maximum context length is {ctx} tokens; the prompt has {n} tokens and "
                          f"max_tokens is {max_tokens} ({n + max_tokens} in all): lower max_tokens to at most "
                          f"{ctx - n}", param="max_tokens", code="context_length_exceeded")
