"""Thin HTTP routes: parse, call the serving layer found on `app.state.serving`, wrap the result."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from . import protocol as P
from .faults import with_cancellation
from .metrics import CONTENT_TYPE
from .serving import MergeServing

STATIC = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

router = APIRouter()


def serving(request: Request) -> MergeServing:
    return request.app.state.serving


def _maybe_stream(result):
    if hasattr(result, "__aiter__"):
        return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)
    return result


@router.get("/health", response_model=P.HealthResponse)
async def health(request: Request):
    return serving(request).health()


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    return PlainTextResponse(serving(request).render_metrics(), media_type=CONTENT_TYPE)


@router.get("/v1/models", response_model=P.ModelList)
async def list_models(request: Request):
    return serving(request).list_models()


@router.get("/v1/models/{model_id}", response_model=P.ModelCard)
async def get_model(model_id: str, request: Request):
    return serving(request).get_model(model_id)


@router.post("/v1/completions", response_model=P.CompletionResponse)
@with_cancellation  # a client that hangs up cancels its generation (server/faults.py)
async def completions(req: P.CompletionRequest, request: Request):
    return _maybe_stream(await serving(request).create_completion(req))


@router.post("/v1/chat/completions", response_model=P.ChatCompletionResponse)
@with_cancellation  # a client that hangs up cancels its generation (server/faults.py)
async def chat_completions(req: P.ChatCompletionRequest, request: Request):
    return _maybe_stream(await serving(request).create_chat_completion(req))


@router.post("/v1/recipes", response_model=P.RecipeInfo)
async def register_recipe(req: P.RecipeRegisterRequest, request: Request):
    info, created = await serving(request).register_recipe(req)
    return JSONResponse(info.model_dump(mode="json"), status_code=201 if created else 200)


@router.get("/v1/recipes", response_model=P.RecipeList)
async def list_recipes(request: Request):
    return serving(request).list_recipes()


@router.get("/v1/recipes/{name}", response_model=P.RecipeInfo)
async def get_recipe(name: str, request: Request):
    return serving(request).get_recipe(name)


@router.delete("/v1/recipes/{name}", response_model=P.DeletedResponse)
async def delete_recipe(name: str, request: Request):
    return serving(request).delete_recipe(name)


@router.post("/v1/compare", response_model=P.CompareResponse)
@with_cancellation  # a client that hangs up cancels its generation (server/faults.py)
async def compare(req: P.CompareRequest, request: Request):
    return await serving(request).compare(req)


@router.post("/v1/arena/battles")
async def battle(req: P.BattleRequest, request: Request):
    return _maybe_stream(await serving(request).arena.battle(req))


@router.post("/v1/arena/votes", response_model=P.VoteResponse)
async def vote(req: P.VoteRequest, request: Request):
    return serving(request).arena.vote(req)


@router.get("/v1/leaderboard", response_model=P.Leaderboard)
async def leaderboard(request: Request):
    return serving(request).arena.leaderboard()


@router.post("/tokenize", response_model=P.TokenizeResponse)
async def tokenize(req: P.TokenizeRequest, request: Request):
    return serving(request).tokenizers.tokenize(req)


@router.post("/detokenize", response_model=P.DetokenizeResponse)
async def detokenize(req: P.DetokenizeRequest, request: Request):
    return serving(request).tokenizers.detokenize(req)


@router.get("/tokenizer_info", response_model=P.TokenizerInfoResponse)
async def tokenizer_info(request: Request, model: str | None = None):
    return serving(request).tokenizers.info(model)


@router.get("/v1/arena/config", response_model=P.ArenaConfig)
async def arena_config(request: Request):
    return serving(request).arena.config()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html")
