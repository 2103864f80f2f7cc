"""Export a recipe as a standalone Hugging Face checkpoint, streaming tensor by tensor.

`export(plan, out_dir)` writes config.json, sharded `model-XXXXX-of-YYYYY.safetensors` with an index (or one
`model.safetensors` when it fits one shard), and the tokenizer: the files of the recipe's tokenizer source, or the
merged tokenizer (engine/vocab.py) saved by transformers, with `vocab_size` in config.json set to the output
vocabulary's rows; when the recipe gives a `chat_template`, the tokenizer written is re-saved with it.
`generation_config.json` comes from the same source as the tokenizer, so that its token ids (`eos_token_id`...)
refer to the tokenizer written beside it. At most one shard's worth of merged tensors is held in memory at a time,
never the whole model. Layer paths whose hops scale the hidden state cannot be expressed as a plain checkpoint and
are refused (scales of 1 export as layer stacking).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from .merger import Merger
from .plan import ModelPlan
from .recipe import RecipeError
from .refs import rename_models

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def export(plan: ModelPlan, out_dir: str | Path, merger: Merger | None = None, shard_bytes: int = 2 << 30,
           progress=None) -> Path:
    if any(s != 1.0 for s in plan.layer_scales):
        raise RecipeError("path: hops with scale != 1 change the residual stream and cannot be written as a plain "
                          "checkpoint; serve or evaluate this recipe lazily instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merger = merger or Merger(plan.sources)
    dtype = DTYPES[plan.dtype]
    names = list(plan.tensors)
    # group tensors into shards by size, in order
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = torch.Size(plan.tensors[n].shape).numel() * dtype.itemsize
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    weight_map = {}
    total = 0
    for si, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in group:
            tensors[n] = merger.merge(plan.tensors[n]).to(device="cpu", dtype=dtype).contiguous()  # a GPU merger's too
            total += tensors[n].numel() * dtype.itemsize
            weight_map[n] = fname
            if progress:
                progress(n)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = dict(plan.config)  # the planner sets tie_word_embeddings: tied iff no output head tensor is written
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok_dir = plan.sources[plan.tokenizer_source].path
    tok = plan.vocab.tokenizer if plan.vocab is not None else None  # the merged tokenizer, when one was built
    if tok is None and plan.chat_template is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if tok is None:
        for f in TOKENIZER_FILES:
            if (tok_dir / f).exists():
                shutil.copy(tok_dir / f, out / f)
    else:
        if plan.chat_template is not None:
            # the recipe's chat_template set on the tokenizer written, as mergekit does (merge.py _copy_tokenizer)
            tok.chat_template = plan.chat_template
        tok.save_pretrained(str(out))
    if (tok_dir / "generation_config.json").exists():
        shutil.copy(tok_dir / "generation_config.json", out / "generation_config.json")
    # the recipe that made it, naming its sources by absolute folder: it runs from any directory (a path relative to
    # the original recipe's folder would not resolve beside the export)
    portable = rename_models(plan.recipe.to_dict(), plan.sources.absolute)
    (out / "lazymerge_recipe.yaml").write_text(yaml.safe_dump(portable, sort_keys=False))
    return out
