"""Hugging Face checkpoint folders: a tensor is read when asked for, never before.

`Source.open(path)` reads `config.json` and the safetensors headers (`model.safetensors` if present, else the shards
of `model.safetensors.index.json`: the precedence of transformers' `from_pretrained`) and nothing else, and keeps each
weights file open. It checks the config's core fields and the header shapes against the config (engine/validate.py),
then asks transformers (engine/arch.py) how the architecture turns those tensors into model parameters, so a tensor no
parameter takes, or a parameter no tensor feeds, is a `CheckpointError` at open time. `Source.get(name)` reads the
tensor from its file (`engine/reader.py`: `pread` into a fresh buffer, after checking that the file still is the one
the source was opened with; `SourceUnavailable` otherwise). Pickle checkpoints (`*.bin`, `*.pt`) are refused.
`check_compatible` compares sources with each other (architecture, layer count, tensor names and shapes; the
vocabulary dimension of embeddings and LM head may differ and is cropped by the planner; a tied and an untied output
head may be mixed).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import validate
from .arch import Architecture, analyze
from .errors import CheckpointError
from .reader import FileReader, ReaderSet, SourceChanged

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SourceUnavailable(CheckpointError):
    """A source whose weights files changed on disk after it was opened (see engine/reader.py); `source` is its
    name (or its folder, for a source opened without one). The message names the source, not a path."""

    def __init__(self, source: str, detail: str):
        super().__init__(f"source {source} changed on disk since it was opened ({detail}); it is not served until "
                         "it is opened again (restart)")
        self.source = source


@dataclass
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path, f: FileReader) -> dict[str, TensorInfo]:
    """The tensors a safetensors file's header lists, read through `f` (its open reader); `path` names the file in
    errors. Raises CheckpointError for a truncated, oversized, non-JSON or inconsistent header."""
    try:
        size = f.ident[0]
        raw = f.pread(8, 0)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
        header = json.loads(f.pread(n, 8))
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    out: dict[str, TensorInfo] = {}
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(x) for x in info["shape"])
            s, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if e - s != nbytes or base + e > size or s < 0:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong size")
        out[name] = TensorInfo(path, dtype, shape, base + s, base + e)
    return out


@dataclass
class Source:
    """One checkpoint folder: its config, its tensors' places in its safetensors files, and those files held open
    for pread reads (engine/reader.py)."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    fingerprint: str
    name: str = ""  # the name a SourceSet registered it under ("" until then)
    _readers: ReaderSet = field(default_factory=ReaderSet, repr=False)
    _layout: Architecture | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Source":
        path = Path(path).expanduser().resolve()
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint folder")
        cfg_path = path / "config.json"
        try:
            config = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: config.json is not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: config.json is not UTF-8 text") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read config.json ({e.strerror})") from None
        validate.check_config(path, config)  # an object, with a model_type and well-typed core fields
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if single.exists():  # transformers' precedence: the single file wins over an index
            weight_map, files = None, ["model.safetensors"]
        elif index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, OSError):
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: not a valid safetensors index (weight_map is not names to files)")
            files = sorted(set(weight_map.values()))
        else:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise CheckpointError(f"{path}: pickle checkpoints ({', '.join(pickles)}) are refused; "
                                      "convert them to safetensors")
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
        tensors: dict[str, TensorInfo] = {}
        h = hashlib.sha256()
        readers = ReaderSet()
        for fname in files:
            fpath = path / fname
            if not fpath.exists():
                readers.close()
                raise CheckpointError(f"{path}: shard {fname} named in the index is missing")
            try:
                reader = FileReader.open(fpath, fname)  # held open: the header and every tensor come from this file
            except OSError as e:
                readers.close()
                raise CheckpointError(f"{fpath}: cannot read ({e.strerror})") from None
            readers.add(reader)
            try:
                header = read_header(fpath, reader)
            except CheckpointError:
                readers.close()
                raise
            size, mtime_ns, _, ino, _ = reader.ident
            h.update(f"{fname}:{size}:{mtime_ns}:{ino}".encode())
            for name, info in header.items():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue
                tensors[name] = info
        if weight_map is not None:
            missing = [n for n in weight_map if n not in tensors]
            if missing:
                readers.close()
                raise CheckpointError(f"{path}: tensor {missing[0]!r} is in the index but not in its shard")
        h.update(json.dumps(config, sort_keys=True).encode())
        src = cls(path, config, tensors, h.hexdigest()[:16], _readers=readers)
        try:
            validate.check_shapes(path, config, {n: i.shape for n, i in tensors.items()})  # headers vs config
            src._check_layout()  # every tensor feeds a parameter and every parameter has one (engine/arch.py)
        except CheckpointError:
            readers.close()
            raise
        return src

    # -- facts ------------------------------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return (self.config.get("architectures") or [self.config["model_type"]])[0]

    @property
    def layout(self) -> Architecture:
        """How transformers builds this checkpoint's model (engine/arch.py): layers, embeddings, head, conversions."""
        if self._layout is None:
            self._layout = analyze(self.config, {n: i.shape for n, i in self.tensors.items()}, str(self.path))
        return self._layout

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def embed_name(self) -> str:
        return self.layout.embed_key

    @property
    def head_name(self) -> str:
        """The tensor this checkpoint's output head reads: its own head, or its embedding when tied."""
        lay = self.layout
        return lay.head_key if lay.head_key is not None else lay.embed_key

    @property
    def vocab_size(self) -> int:
        return self.tensors[self.embed_name].shape[0]

    @property
    def tied_embeddings(self) -> bool:
        return self.layout.head_key is None

    def _check_layout(self) -> None:
        lay = self.layout  # raises CheckpointError naming an unused tensor or a parameter without one
        if lay.embed_key is None:
            raise CheckpointError(f"{self.path}: {lay.class_name} has no input embedding matrix")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    @property
    def label(self) -> str:
        """How messages name this source: its registered name, else its folder."""
        return repr(self.name) if self.name else str(self.path)

    def check(self) -> None:
        """Raise SourceUnavailable if any weights file changed since open (engine/reader.py)."""
        try:
            self._readers.check()
        except SourceChanged as e:
            raise SourceUnavailable(self.label, str(e)) from None

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, read from its file now (a fresh tensor; raises SourceUnavailable if the file changed)."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None
        try:
            return self._readers.files[info.file].read(info.start, info.end, info.dtype, info.shape)
        except SourceChanged as e:
            raise SourceUnavailable(self.label, str(e)) from None

    def get_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of tensor `name` (first dimension), reading only their bytes (embedding lookups)."""
        info = self.tensors.get(name)
        if info is None or not info.shape or not (0 <= lo <= hi <= info.shape[0]):
            return self.get(name)[lo:hi]
        row = (info.end - info.start) // info.shape[0] if info.shape[0] else 0
        try:
            return self._readers.files[info.file].read(info.start + lo * row, info.start + hi * row, info.dtype,
                                                       (hi - lo,) + tuple(info.shape[1:]))
        except SourceChanged as e:
            raise SourceUnavailable(self.label, str(e)) from None

    def nbytes(self) -> int:
        return sum(i.end - i.start for i in self.tensors.values())

    def close(self) -> None:
        self._readers.close()


def check_compatible(sources: dict[str, Source]) -> None:
    """Raise CheckpointError naming the source and tensor where `sources` cannot be merged with each other."""
    items = list(sources.items())
    if not items:
        return
    ref_name, ref = items[0]
    for name, src in items[1:]:
        if src.arch != ref.arch:
            raise CheckpointError(f"source {name!r} is {src.arch}, but {ref_name!r} is {ref.arch}")
        if src.num_layers != ref.num_layers:
            raise CheckpointError(f"source {name!r} has {src.num_layers} layers, but {ref_name!r} has {ref.num_layers}")
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if src.config.get(key) != ref.config.get(key):
                raise CheckpointError(f"source {name!r}: config {key}={src.config.get(key)} differs from "
                                      f"{ref_name!r} ({ref.config.get(key)})")
        vocab = set(ref.layout.vocab_keys) | set(src.layout.vocab_keys)
        heads = {k for k in (ref.layout.head_key, src.layout.head_key) if k is not None}
        for t, info in ref.tensors.items():
            if t in heads and src.tied_embeddings:
                continue
            other = src.tensors.get(t)
            if other is None:
                raise CheckpointError(f"source {name!r}: tensor {t!r} is missing (present in {ref_name!r})")
            if t in vocab:
                if other.shape[1:] != info.shape[1:]:
                    raise CheckpointError(f"source {name!r}: tensor {t!r} has shape {list(other.shape)}, "
                                          f"{ref_name!r} has {list(info.shape)}")
            elif other.shape != info.shape:
                raise CheckpointError(f"source {name!r}: tensor {t!r} has shape {list(other.shape)}, "
                                      f"{ref_name!r} has {list(info.shape)}")
        extra = [t for t in src.tensors if t not in ref.tensors and t not in heads]
        if extra:
            raise CheckpointError(f"source {name!r}: tensor {extra[0]!r} is not in {ref_name!r}")
