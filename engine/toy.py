"""Tiny local checkpoints and tokenizers for tests, benchmarks and smoke runs (no downloads).

`make_family(dir, arch, n_experts)` writes a random base model and `n_experts` "fine-tunes" of it (the base plus
seeded perturbations of every tensor) as standard Hugging Face folders through transformers' own
`save_pretrained`, with a word-level tokenizer (and chat template), so that they go through exactly the loading code
of a user's checkpoints. `shards=True` writes sharded safetensors with an index.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a one two three four five six seven eight nine ten plus minus is what and of to in cat dog runs sees "
         "big small red blue green sun moon tree house book water fire stone bird fish road sky rain snow day night "
         "yes no I you we they hello world answer question").split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def make_tokenizer(extra_words: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + [w for w in list(WORDS) + list(extra_words) + [":", "user",
                                                                                                      "assistant"]])}
    vocab.update({str(d): len(vocab) + i for i, d in enumerate(range(10)) if str(d) not in vocab})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_metaspace_tokenizer():
    """A SentencePiece-style word-level tokenizer (Llama/Mistral's Metaspace pre-tokenizer and decoder, prepend
    scheme "first"): each word is one token "\u2581word"; decoding drops the space of a decode's first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(WORDS) + [":", "user", "assistant"] + [str(d) for d in range(10)]
    vocab = {w: i for i, w in enumerate(SPECIAL)}
    for w in words:
        vocab.setdefault("\u2581" + w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_bytelevel_tokenizer(text: str = ""):
    """A GPT-2-style byte-level BPE tokenizer: the 256 byte symbols, plus merges learned on `text` (and the toy
    words), so that multi-byte characters are split over several tokens unless a merge joins them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS), text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


TOKENIZERS = {"word": make_tokenizer, "metaspace": make_metaspace_tokenizer, "bytelevel": make_bytelevel_tokenizer}


def tiny_config(arch: str = "mistral", vocab_size: int = 80, hidden: int = 32, layers: int = 3, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 64, tie: bool = False, dtype: str = "float32", **extra):
    """A tiny config of transformers model type `arch` (any: "llama", "gemma3_text", "qwen3_moe", ...), built by the
    architecture's own config class; `extra` sets any further field (experts, multipliers, layer types...)."""
    from transformers import AutoConfig

    kw = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=256,
              head_dim=hidden // heads, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(extra)
    cfg = AutoConfig.for_model(arch, **kw)
    cfg.dtype = dtype
    return cfg


def make_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases so that merging them matters
        for n, p in model.named_parameters():
            if "norm" in n and p.dim() == 1 and not n.endswith("bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def perturb(model, seed: int, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=g) * p.detach().abs().mean().clamp_min(1e-3))
    return model


def save(model, tokenizer, path: Path, dtype: str = "float32", shards: bool = False) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    m = model.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    m.config.dtype = dtype
    m.save_pretrained(path, safe_serialization=True, max_shard_size="20KB" if shards else "50GB")
    tokenizer.save_pretrained(path)
    return path


def make_family(root: Path, arch: str = "mistral", n_experts: int = 2, seed: int = 0, dtype: str = "float32",
                shards: bool = False, tokenizer: str = "word", **cfg_kw) -> dict[str, Path]:
    """Write base + experts under `root`; returns {"base": path, "e1": path, ...}. `tokenizer`: "word" (whitespace
    word-level), "metaspace" (SentencePiece-style) or "bytelevel" (GPT-2-style byte-level BPE)."""
    import copy

    tok = TOKENIZERS[tokenizer]()
    cfg = tiny_config(arch, vocab_size=len(tok), **cfg_kw)
    base = make_model(cfg, seed)
    out = {"base": save(copy.deepcopy(base), tok, Path(root) / "base", dtype, shards)}
    for i in range(1, n_experts + 1):
        out[f"e{i}"] = save(perturb(copy.deepcopy(base), seed * 1000 + i), tok, Path(root) / f"e{i}", dtype, shards)
    return out


def make_finetune_with_tokens(base_dir: Path, out_dir: Path, words: tuple[str, ...], seed: int = 1,
                              special: tuple[str, ...] = (), scale: float = 0.05) -> Path:
    """A fine-tune of the checkpoint at `base_dir` whose tokenizer appends `words` (plain tokens) and `special`
    (added special tokens) after the base's ids, with the embeddings (and untied LM head) resized by transformers'
    `resize_token_embeddings` and every tensor perturbed; written with `save_pretrained`."""
    from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.add_tokens(list(words))
    if special:
        tok.add_tokens([AddedToken(s, special=True) for s in special], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            emb.weight[-(len(words) + len(special)):].normal_(0.0, 0.5)
    return save(perturb(model, seed, scale), tok, Path(out_dir))
