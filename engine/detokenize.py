"""Incremental detokenization: the text of generated tokens *in context*, at a cost linear in the output length.

A token's text depends on its neighbours: SentencePiece/Metaspace tokenizers (Llama, Mistral) drop the leading
space of the first token of a decode, byte-level BPE tokens may be pieces of one multi-byte character, and a
tokenizer's clean-up rules look at adjacent tokens. So the text of the new tokens is what decoding prompt + new
tokens adds to decoding the prompt alone, never the decode of the new tokens by themselves (`' 1 plus'`, not
`'1 plus'`, after the prompt "the cat sees").

Re-decoding the whole row at every step costs O(n) per step, O(n^2) per row. `IncrementalDetokenizer` decodes a
short window instead (the algorithm of Hugging Face TGI and vLLM's `detokenize_incrementally`): the text of
`ids[prefix:]` minus the text of `ids[prefix:read]`, where `read` is where the text is known and `prefix` a few
tokens before it, so that each step decodes O(1) tokens whatever the length. Text that ends in an incomplete UTF-8
character (U+FFFD at the end) waits for the next token. The concatenation of everything `push` and `flush` return
equals `decode(prompt + generated)[len(decode(prompt)):]` for the tokenizers of the tests (Metaspace, byte-level
BPE, word-level).
"""

from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens kept as left context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class IncrementalDetokenizer:
    """Text of a growing token sequence after `prompt` (token ids), one token at a time.

    `push(token)` -> the new text that token makes certain (may be "" while a character is incomplete);
    `flush()` -> whatever is still held back (at the end of the row). Memory and per-step cost are O(1) in the
    number of tokens pushed: only the window `ids[prefix:]` is kept.
    """

    def __init__(self, tokenizer, prompt: list[int], context: int = CONTEXT_TOKENS, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = list(prompt[-context:]) if context > 0 else []
        self.read = len(self.ids)  # ids[:read] have been turned into text
        self.prefix_text = self._decode(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True) if len(self.ids) > self.read else ""

    def _advance(self, final: bool) -> str:
        text = self._decode(self.ids)
        if not final and (len(text) <= len(self.prefix_text) or text.endswith("\ufffd")):
            return ""  # nothing certain yet: a skipped/empty token, or a character cut in the middle
        new = text[len(self.prefix_text):]
        # the window slides: the tokens just read become the left context of the next step
        self.ids = self.ids[self.read:]
        self.read = len(self.ids)
        self.prefix_text = self._decode(self.ids)
        return new
