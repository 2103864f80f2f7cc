"""The one exception the serving layer raises for a request it refuses; the app renders it as OpenAI's error JSON
(`{"error": {"message", "type", "param", "code"}}`) with its HTTP status."""

from __future__ import annotations

from lazymerge.engine.limits import clip

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 422: "invalid_recipe_error", 429: "rate_limit_error",
          500: "internal_error", 503: "service_unavailable"}


class ServingError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        message = clip(str(message))  # bounded, whatever user input it quotes
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ServingError:
    return ServingError(400, message, param=param, code=code)
