"""vLLM's tokenizer routes over the serving layer: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.

lm-evaluation-harness 0.4.13's `local-completions` probes them (`tokenizer_backend=auto`, or `remote`) to use the
server's own tokenizer instead of a local copy: `GET /tokenizer_info` must be a JSON object with `eos_token`;
`POST /tokenize {"prompt": str, "add_special_tokens": false}` -> `{"tokens": [int, ...]}` (vLLM adds `count`,
`max_model_len`, optionally `token_strs`); `POST /detokenize {"tokens": [...]}` -> `{"prompt": str}` (no special token
is skipped: the decode is lossless). Each request may name a `model` (recipe or source); the default model is the
first recipe registered at start (else the first source), and `/tokenizer_info` names it.
"""

from __future__ import annotations

from . import protocol as P
from .errors import bad_request


class TokenizerEndpoints:
    def __init__(self, serving):
        self.s = serving

    def _model(self, name: str | None):
        if name is not None:
            e = self.s.registry.get(name)
            return e.name, e.model
        entries = self.s.registry.entries()
        if not entries:
            raise bad_request("no model is registered", param="model")
        e = next((x for x in entries if x.kind == "recipe"), entries[0])
        return e.name, e.model

    @staticmethod
    def _max_len(model) -> int:
        return int(model.module.config.to_dict().get("max_position_embeddings") or 0)

    def tokenize(self, req: P.TokenizeRequest) -> P.TokenizeResponse:
        _, model = self._model(req.model)
        tok = model.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            from .completions import OpenAIEndpoints

            msgs = OpenAIEndpoints._messages(req)
            try:
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=req.add_generation_prompt)
            except Exception as e:  # noqa: BLE001 - a template that rejects these messages
                raise bad_request(f"cannot apply the chat template: {e}", param="messages") from None
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return P.TokenizeResponse(count=len(ids), max_model_len=self._max_len(model), tokens=ids, token_strs=strs)

    def detokenize(self, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        _, model = self._model(req.model)
        vocab = model.module.config.vocab_size
        if any(not (0 <= t < vocab) for t in req.tokens):
            raise bad_request(f"token ids must be in [0, {vocab})", param="tokens")
        return P.DetokenizeResponse(prompt=model.tokenizer.decode(req.tokens, skip_special_tokens=False))

    def info(self, name: str | None = None) -> P.TokenizerInfoResponse:
        label, model = self._model(name)
        tok = model.tokenizer
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        return P.TokenizerInfoResponse(model=label, tokenizer_class=type(tok).__name__, eos_token=tok.eos_token,
                                       bos_token=tok.bos_token, pad_token=tok.pad_token, unk_token=tok.unk_token,
                                       chat_template=template, model_max_length=self._max_len(model),
                                       vocab_size=len(tok))
