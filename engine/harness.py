"""lazymerge as an lm-evaluation-harness model: `lm_eval --model lazymerge --model_args recipe=RECIPE.yaml`.

`LazymergeLM` is a `lm_eval.api.model.TemplateLM` over a compiled recipe (a `LazyModel`): lm-eval's own
tokenization of (context, continuation) pairs (`TemplateLM._encode_pair`, `tok_encode` as its `hf` model does it:
the tokenizer's default special tokens, none added to a string that already starts with BOS), then

- `loglikelihood`: sum of the continuation's token log-probs and whether it is the greedy one, scored in batches of
  `batch_size` requests (longest first), the input left-truncated to `max_length + 1` tokens as `hf` does;
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows (`utils.get_rolling_token_windows`, context 1) scored
  the same way and summed;
- `generate_until`: the engine's batched KV-cache generation (greedy unless the task samples), stopping at the
  task's `until` strings and EOS; the text is the decode of the new tokens in context (`engine.detokenize`);
- `apply_chat_template` / `tokenizer_name` / `chat_template`: the recipe's tokenizer's chat template, so
  `--apply_chat_template` works.

Registered under "lazymerge" in lm-eval's model registry when this module is imported, and declared as the entry
point `lazymerge` of group `lm_eval.models` in pyproject.toml (README "lm-evaluation-harness" says how lm-eval 0.4.13,
which does not read that group yet, finds it). The engine never imports this module: it is the only one that needs
`lm_eval` (the GPU image lacks it).

Python: `simple_evaluate(model=LazymergeLM(engine=eng, recipe=RECIPE), tasks=[...])`, or `LazymergeLM(model=lazy)`
with an already compiled `LazyModel`.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256


def _as_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        from .generate import UsageError

        raise UsageError(f"lazymerge model_args: {name} must be an integer, got {value!r}") from None


@register_model("lazymerge")
class LazymergeLM(TemplateLM):
    """An lm-eval model backed by the lazy engine.

    Args (all optional but one of `recipe` / `model`): `recipe` a mergekit YAML file (its `model:` entries are
    checkpoint folders, relative to the file) or a recipe dict/text; `engine` an `Engine` to compile it with (else
    one is opened: `device`, `dtype`, `policy`, `cache_mb`); `model` an already compiled `LazyModel`;
    `batch_size` requests per forward pass (int, or "auto" = 16); `max_length` context limit in tokens (default: the
    config's `max_position_embeddings`); `max_gen_toks` default generation length (256, as `hf`); `add_bos_token`
    as `hf`'s: None keeps the tokenizer's default special tokens, True/False forces them on/off (False is what
    `local-completions` with the server's remote tokenizer does: lm-eval's RemoteTokenizer encodes without them).
    Raises RecipeError / CheckpointError / UsageError for a bad recipe, checkpoint or argument.
    """

    def __init__(self, recipe=None, *, engine=None, model=None, device: str = "cpu", dtype: str | None = None,
                 policy: str = "cached", cache_mb: float = 1024, batch_size: int | str = 1,
                 max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | str | None = None, **unused):
        super().__init__()
        if model is None:
            if recipe is None:
                from .generate import UsageError

                raise UsageError("lazymerge model_args: give recipe=RECIPE.yaml")
            if engine is None:
                from .api import Engine

                engine = Engine(device=str(device or "cpu"), dtype=None if dtype in (None, "auto") else str(dtype),
                                policy=policy, cache_bytes=int(float(cache_mb) * (1 << 20)))
            if isinstance(recipe, str) and "\n" not in recipe and recipe.endswith((".yaml", ".yml")):
                recipe = Path(recipe)
            model = engine.compile(recipe)
        self.lazy = model
        self.tokenizer = model.tokenizer
        bs = str(batch_size)
        self._batch_size = (16 if bs.startswith("auto") else _as_int(batch_size, "batch_size"))
        if max_batch_size is not None and bs.startswith("auto"):
            self._batch_size = min(self._batch_size, _as_int(max_batch_size, "max_batch_size"))
        cfg_len = model.module.config.to_dict().get("max_position_embeddings")
        self._max_length = _as_int(max_length, "max_length") if max_length else (cfg_len or DEFAULT_MAX_LENGTH)
        self._max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        self.add_bos_token = None if add_bos_token is None else lm_utils.handle_arg_string(str(add_bos_token))
        if self.add_bos_token is not None and not isinstance(self.add_bos_token, bool):
            from .generate import UsageError

            raise UsageError(f"lazymerge model_args: add_bos_token must be True or False, got {add_bos_token!r}")

    # -- what lm-eval asks of a model ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.lazy.device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "lazymerge")).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_name": "lazymerge", "recipe_digest": self.lazy.digest}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """Token ids of `string` as lm-eval's `hf` model encodes them (tokenizer defaults unless `add_bos_token` or
        the caller says otherwise; no second BOS)."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        kw = {} if special is None else {"add_special_tokens": special}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- scoring ------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context ids, continuation ids)] -> [(sum logprob, is greedy)]."""
        from .score import score_tokens

        seqs = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[tuple[float, bool] | None] = [None] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            scores = score_tokens(self.lazy, [seqs[i] for i in idx])
            for i, s in zip(idx, scores):
                n = len(requests[i][2])
                lps, greedy = s.logprobs[len(s.logprobs) - n:], s.greedy[len(s.greedy) - n:]
                if n and lps[0] is None:
                    raise ValueError("lazymerge: a continuation has no context to be scored against")
                out[i] = (float(sum(lps)), bool(all(greedy)))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: lm-eval's disjoint rolling windows of `max_length` tokens, summed."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) generation until a stop string, EOS or `max_gen_toks`."""
        from .generate import SamplingParams

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0
            params = SamplingParams(max_tokens=max_gen, temperature=temperature,
                                    top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                                    seed=kwargs.get("seed"), stop=tuple(until))
            prompts = {i: self.tok_encode(requests[i].args[0],
                                          left_truncate_len=max(1, self.max_length - max_gen)) for i in idx}
            ordered = sorted(idx, key=lambda i: -len(prompts[i]))
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start:start + self.batch_size]
                for i, c in zip(chunk, self.lazy.generate([prompts[i] for i in chunk], params)):
                    out[i] = postprocess_generated_text(c.text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]
