"""HTTP schemas of the merge server: pydantic request/response models only, no logic.

OpenAI-compatible models list their fields in OpenAI's order; this project's extensions come after them, grouped
under a comment, each with a `Field(description=...)`. Unknown request fields are ignored (as OpenAI's own server
does for fields it deprecates), unsupported ones that change the meaning of a request are rejected by the serving
layer with a 400.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .bounds import Count, Penalty, Seed, Temperature, TokenCount, TopP


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- errors ------------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- shared ------------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(_Request):
    include_usage: bool = False


RecipeSpec = str | dict[str, Any]  # YAML text or the same structure as a JSON object


# -- completions -------------------------------------------------------------------------------------------------
class CompletionRequest(_Request):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: Count | None = None
    echo: bool = False
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=100)
    max_tokens: TokenCount | None = 16
    n: Count = 1
    presence_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    user: str | None = None

    # -- lazymerge extensions --
    recipe: RecipeSpec | None = Field(None, description="An inline recipe (YAML text or JSON object) served "
                                         "for this request only; `model` then only labels the response.")


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: CompletionLogprobs | None = None
    text: str


class CompletionResponse(BaseModel):
    id: str
    choices: list[CompletionChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# -- chat completions --------------------------------------------------------------------------------------------
class ChatMessage(_Request):
    # OpenAI's roles; another is a 400 naming the allowed ones, as OpenAI answers (a chat template may not know it)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    max_completion_tokens: TokenCount | None = None
    max_tokens: TokenCount | None = None
    n: Count = 1
    presence_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature = 1.0
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: TopP = 1.0
    user: str | None = None

    # -- lazymerge extensions --
    recipe: RecipeSpec | None = Field(None, description="An inline recipe (YAML text or JSON object) served "
                                         "for this request only; `model` then only labels the response.")


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None = None
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    bytes: list[int] | None = None
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    content: str | None = None
    role: Literal["assistant"] = "assistant"


class ChatChoice(BaseModel):
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: ChoiceLogprobs | None = None
    message: AssistantMessage


class ChatCompletionResponse(BaseModel):
    id: str
    choices: list[ChatChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    content: str | None = None
    role: Literal["assistant"] | None = None


class ChatStreamChoice(BaseModel):
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    choices: list[ChatStreamChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# -- models ------------------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "lazymerge"

    # -- lazymerge extensions --
    kind: Literal["recipe", "source"] = Field(description="`source`: a registered checkpoint served as is "
                                              "(an identity recipe); `recipe`: a registered merge recipe.")
    digest: str = Field(description="Content hash of the compiled plan: equal digests serve equal weights.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- recipes registry --------------------------------------------------------------------------------------------
class RecipeRegisterRequest(_Request):
    name: str = Field(description="The model id the recipe is served under.")
    recipe: RecipeSpec = Field(description="The recipe: YAML text or the same structure as a JSON object.")


class RecipeInfo(BaseModel):
    id: str
    object: Literal["recipe"] = "recipe"
    created: int
    kind: Literal["recipe", "source"]
    digest: str = Field(description="Content hash of the compiled plan.")
    num_layers: int
    recipe: dict[str, Any] = Field(description="The validated recipe, normalized.")


class RecipeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RecipeInfo]


class DeletedResponse(BaseModel):
    id: str
    object: Literal["recipe"] = "recipe"
    deleted: bool = True


# -- A/B comparison ----------------------------------------------------------------------------------------------
class CompareRequest(_Request):
    prompts: list[str] = Field(min_length=1, max_length=64)
    recipes: list[RecipeSpec] = Field(min_length=2, max_length=8, description="Recipe names, or inline recipes.")
    references: list[str] | None = Field(None, description="One reference answer per prompt: scored by "
                                            "mean log-likelihood and exact match.")
    max_tokens: TokenCount = 32
    seed: Seed | None = None
    stop: str | list[str] | None = None
    temperature: Temperature = 0.0
    top_p: TopP = 1.0


class CompareResult(BaseModel):
    recipe: str = Field(description="The recipe's name (`inline-<digest>` for an inline recipe).")
    digest: str
    outputs: list[str]
    finish_reasons: list[str]
    latency_s: float = Field(description="Wall time from submission to the last token of this recipe.")
    completion_tokens: int
    tokens_per_s: float
    reference_logprob: list[float | None] | None = Field(None, description="Per prompt: the mean per-token "
                                                            "log-likelihood of its reference given the prompt; "
                                                            "null when the reference has no scorable token.")
    reference_notes: list[str | None] | None = Field(None, description="Per prompt: why its reference_logprob "
                                                     "is null (it tokenizes to nothing, or only to unknown tokens).")
    mean_reference_logprob: float | None = Field(None, description="Mean over the non-null reference_logprob "
                                                 "values; null when none is.")
    exact_match: list[bool] | None = Field(None, description="Per prompt: output == reference (stripped).")
    exact_match_rate: float | None = None


class CompareResponse(BaseModel):
    id: str
    object: Literal["compare"] = "compare"
    created: int = Field(default_factory=lambda: int(time.time()))
    results: list[CompareResult]


# -- arena: blind votes and leaderboard --------------------------------------------------------------------------
class BattleRequest(_Request):
    prompt: str = Field(min_length=1)
    recipes: list[str] | None = Field(None, max_length=2, description="Two recipe names; omitted: two distinct "
                                      "models at random. Their order is shuffled into sides A and B.")
    chat: bool = Field(False, description="Wrap the prompt in the tokenizer's chat template.")
    max_tokens: TokenCount = 32
    seed: Seed | None = None
    temperature: Temperature = 0.0
    top_p: TopP = 1.0


class VoteRequest(_Request):
    battle_id: str
    winner: Literal["A", "B", "tie"]


class LeaderboardEntry(BaseModel):
    recipe: str
    rating: float = Field(description="Elo rating (start 1000, K=32), replayed over all votes in order.")
    games: int
    wins: int
    losses: int
    ties: int
    win_rate: float = Field(description="(wins + ties / 2) / games.")


class Leaderboard(BaseModel):
    object: Literal["leaderboard"] = "leaderboard"
    data: list[LeaderboardEntry]


class ArenaConfig(BaseModel):
    object: Literal["arena.config"] = "arena.config"
    examples: list[str] = Field(description="Example prompts of the form the served models understand.")
    featured: list[str] | None = Field(None, description="The two recipes the page opens on, or null.")


class VoteResponse(BaseModel):
    battle_id: str
    winner: Literal["A", "B", "tie"]
    recipes: dict[str, str] = Field(description="The names behind sides A and B, revealed after the vote.")
    leaderboard: list[LeaderboardEntry]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    models: int
    queued: int


# -- tokenizer (vLLM's routes, at the server root; lm-eval's `tokenizer_backend=remote|auto` uses them) -----------
class TokenizeRequest(_Request):
    model: str | None = Field(None, description="Whose tokenizer (a recipe or source name); default: the "
                              "server's default model (GET /tokenizer_info says which).")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, description="Chat messages, tokenized after the chat "
                                               "template (instead of `prompt`).")
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(description="The model whose tokenizer this is (the default of /tokenize).")
    tokenizer_class: str
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    model_max_length: int
    vocab_size: int
