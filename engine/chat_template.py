"""A recipe's `chat_template`, with mergekit 0.1.5's meaning (mergekit/merge.py `_set_chat_template`).

    chat_template: auto            # the most common template among the merge's sources (stripped)
    chat_template: chatml          # a built-in name: one of mergekit's templates (mergekit/_data/chat_templates)
    chat_template: "{% for m in messages %}..."   # a Jinja template, used verbatim

`check_chat_template(value)` classifies and checks it when the recipe is read (RecipeError-ready ValueError
messages); `resolve_chat_template(value, tokenizer_dirs)` gives the template text once the sources are known. Built-in
names are read from the installed mergekit package's data files (located, not imported), so the set is exactly the
installed mergekit's; without mergekit a built-in name is refused with a message saying so. Rules, as mergekit's: a
value under 256 characters with no newline and no `{` is a name; any other value under 20 characters or without a
`{` is invalid; the rest is a template. Unlike mergekit, a template that is not valid Jinja is refused here (mergekit
writes it and the tokenizer fails when a chat is rendered), and `auto` breaks ties towards the first source in
recipe order (mergekit's order is a Python set's).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from functools import lru_cache
from pathlib import Path


def builtin_templates() -> dict[str, Path]:
    """mergekit's built-in chat templates, name -> file ({} without mergekit installed)."""
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "_data" / "chat_templates"
    return {p.stem: p for p in sorted(folder.glob("*.jinja"))}


def _is_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: str) -> None:
    """Raise ValueError (message without the field name) if `value` is not `auto`, a built-in name or a template."""
    if value == "auto":
        return
    if _is_name(value):
        names = builtin_templates()
        if value in names:
            return
        if not names:
            raise ValueError(f"{value!r} would be one of mergekit's built-in templates, but mergekit is not installed "
                             "(pip install mergekit), so the set is unknown; give the Jinja text instead")
        raise ValueError(f"{value!r} is neither 'auto', a built-in template ({', '.join(names)}) nor a Jinja template")
    if len(value) < 20 or "{" not in value:
        raise ValueError("not a Jinja template (mergekit takes one of 20 characters or more containing '{')")
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover  (transformers moved it: the tokenizer checks it when used)
        return
    try:
        _compile_jinja_template(value)
    except Exception as e:  # noqa: BLE001  (jinja2's TemplateSyntaxError and friends)
        raise ValueError(f"not a valid Jinja template ({e})") from None


@lru_cache(maxsize=64)
def _template_of(tokenizer_dir: str) -> str | None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception:  # noqa: BLE001  (mergekit skips sources whose tokenizer does not load)
        return None
    t = tok.chat_template
    if isinstance(t, dict):
        t = t.get("default")
    return t.strip() if t else None


def resolve_chat_template(value: str | None, tokenizer_dirs: list[Path]) -> str | None:
    """The template text `value` denotes (None: keep the tokenizer source's own). `tokenizer_dirs`: one folder per
    source of the merge, in recipe order, for `auto` (None when none of them has a template)."""
    if value is None:
        return None
    if value == "auto":
        found = [t for t in (_template_of(str(d)) for d in tokenizer_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None  # ties: first in order (Counter keeps it)
    names = builtin_templates()
    if _is_name(value) and value in names:
        return names[value].read_text()
    return value
