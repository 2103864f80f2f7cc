"""`create_app(config)`: the FastAPI application over a `MergeServing`.

The lifespan hook builds the serving layer (opens the sources, compiles the start-up recipes, starts the scheduler
thread) and closes it on shutdown; routes find it on `app.state.serving`. One ASGI middleware guards every request:
the API key (every route but `/health`; `Authorization: Bearer KEY`, `X-API-Key: KEY`, or the cookie the page at
`/?api_key=KEY` sets), the body size cap (413) and the HTTP metrics. Every error leaves as OpenAI's error JSON.
"""

from __future__ import annotations

import contextlib
import hmac
import time
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import _TYPES, ServingError
from .faults import as_serving_error
from .routes import STATIC, router
from .serving import MergeServing, ServerConfig

COOKIE = "lazymerge_key"


def _json_error(err: ServingError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class GuardMiddleware:
    """API key, body size cap and HTTP metrics, as plain ASGI (streams pass through untouched)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body = max_body_bytes

    def _authorized(self, scope) -> tuple[bool, bool]:
        """(authorized, set the cookie)."""
        if not self.api_key:
            return True, False
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        if "x-api-key" in headers:
            given.append(headers["x-api-key"].strip())
        if "cookie" in headers:
            c = SimpleCookie()
            with contextlib.suppress(Exception):  # a malformed cookie header is just no credential
                c.load(headers["cookie"])
            if COOKIE in c:
                given.append(c[COOKIE].value)
        ok = any(hmac.compare_digest(g.encode(), self.api_key.encode()) for g in given)
        if not ok and scope["path"] == "/":
            q = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key", [])
            if q and hmac.compare_digest(q[0].encode(), self.api_key.encode()):
                return True, True
        return ok, False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        serving = getattr(scope["app"].state, "serving", None) if "app" in scope else None
        authorized, set_cookie = self._authorized(scope) if scope["path"] != "/health" else (True, False)

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                if set_cookie:
                    cookie = f"{COOKIE}={self.api_key}; HttpOnly; SameSite=Strict; Path=/"
                    msg = {**msg, "headers": list(msg.get("headers", [])) + [(b"set-cookie", cookie.encode())]}
                if serving is not None:
                    route = scope.get("route")
                    label = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/")
                                                             else "unmatched")
                    status = msg["status"]
                    serving.metrics.http_requests.inc(scope["method"], label, str(status))
                    serving.metrics.http_latency.observe(label, value=time.perf_counter() - t0)
                    if status >= 400:
                        serving.metrics.errors.inc(str(status), _TYPES.get(status, "error"))
            await send(msg)

        if not authorized:
            err = ServingError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            return await _json_error(err)(scope, receive, send_wrapped)
        length = dict(scope.get("headers", [])).get(b"content-length")
        too_big = ServingError(413, f"request body larger than {self.max_body} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _json_error(too_big)(scope, receive, send_wrapped)
        seen = 0

        async def receive_limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise StarletteHTTPException(413, too_big.message)
            return msg

        await self.app(scope, receive_limited, send_wrapped)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in exc.errors():
        if e.get("type") == "json_invalid":  # FastAPI's loc is ("body", character offset): not a parameter
            at = [x for x in e.get("loc", ()) if isinstance(x, int)]
            why = (e.get("ctx") or {}).get("error") or e.get("msg")
            return "invalid JSON in the request body" + (f" at character {at[0]}" if at else "") + f": {why}", None
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc)}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts), param


def create_app(config: ServerConfig | None = None, serving: MergeServing | None = None) -> FastAPI:
    """The app for `config`; or over an already built `serving` (its config is used), which it then owns."""
    if config is None and serving is None:
        raise ValueError("create_app needs a config or a serving layer")
    config = serving.config if serving is not None else config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        s = serving or MergeServing(config)
        s.start()
        app.state.serving = s
        try:
            yield
        finally:
            s.close()

    app = FastAPI(title="lazymerge", description="Serve merge recipes, OpenAI-compatible.", lifespan=lifespan)
    app.state.config = config
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes)

    @app.exception_handler(ServingError)
    async def _serving_error(_request, exc: ServingError):
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return _json_error(ServingError(400, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return _json_error(ServingError(exc.status_code, msg))

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):
        return _json_error(as_serving_error(exc))  # engine errors by kind; else a 500 with an id, no internals

    return app
