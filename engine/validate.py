"""Is a checkpoint folder self-consistent? Checked when a source is opened, before anything is built from it.

* `check_config(where, config)`: `config.json` is a JSON object whose numbers are numbers (a positive integer layer
  count, hidden size, head count, vocabulary size; a `model_type` and `architectures` list of strings).
* `check_shapes(where, config, shapes)`: every tensor of the safetensors headers that the architecture declares has
  the shape the config implies. The expected shapes come from transformers: the architecture's own class built on
  the `meta` device from this config (no weight allocated; cached per config), so a header that disagrees with its
  own config is refused here, not when another source happens to differ or deep inside a forward pass.

Both raise `CheckpointError` (engine/errors.py) naming the folder, the field or tensor, and both numbers. The core
fields are required of a plain decoder config only; a composite config (one with a `text_config`) keeps them there,
and engine/arch.py's analysis (run after these checks) covers it.
"""

from __future__ import annotations

import functools
import json

from .errors import CheckpointError
from .limits import clip

REQUIRED_INTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
OPTIONAL_INTS = ("intermediate_size", "num_key_value_heads", "max_position_embeddings", "head_dim")
MAX_LAYERS = 10_000


def check_config(where, config) -> None:
    """Raise CheckpointError unless `config` (parsed config.json) is an object with well-typed core fields."""
    if not isinstance(config, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(config), "null")
        raise CheckpointError(f"{where}: config.json is a JSON {kind}, not an object")
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{where}: config.json: `architectures` must be a list of class names")
    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{where}: config.json has no `model_type`")
    for key in REQUIRED_INTS + OPTIONAL_INTS:
        if key not in config or (key in OPTIONAL_INTS and config[key] is None):
            if key in REQUIRED_INTS and "text_config" not in config:
                raise CheckpointError(f"{where}: config.json has no `{key}`")
            continue
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CheckpointError(clip(f"{where}: config.json: `{key}` must be a positive integer, got {v!r}", 500))
    if config.get("num_hidden_layers", 0) > MAX_LAYERS:
        raise CheckpointError(f"{where}: config.json: num_hidden_layers {config['num_hidden_layers']} is over "
                              f"{MAX_LAYERS}")


@functools.lru_cache(maxsize=64)
def _expected_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    from .arch import meta_model  # the class transformers' from_pretrained would build

    model = meta_model(json.loads(config_json))
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}


def check_shapes(where, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError if a header tensor's shape differs from the one `config` implies (see module doc)."""
    try:
        expected = _expected_shapes(json.dumps(config, sort_keys=True))
    except Exception as e:  # noqa: BLE001 - transformers refuses this config: say why, in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(clip(f"{where}: config.json is not a valid {config.get('model_type')} config: {msg}",
                                   600)) from None
    for name, shape in shapes.items():
        want = expected.get(name)
        if want is not None and tuple(shape) != want:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(shape)}, but config.json implies "
                                  f"{list(want)}")
