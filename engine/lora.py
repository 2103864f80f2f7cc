"""LoRA inputs: a base checkpoint plus a PEFT LoRA adapter, presented as one source without merging them on disk.

A recipe names a LoRA input as mergekit does (mergekit/common.py `ModelReference`): `model: BASE+ADAPTER`, two
folders joined by one `+`. `ADAPTER` is a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
`LoraSource` offers the interface of `checkpoint.Source` (path, config, tensors/shape, get, fingerprint, nbytes,
close): tensors the adapter does not touch are read from the base's files as they are; a targeted weight is computed
when asked for, never stored (the adapter file is read and identity-checked like base weights, engine/reader.py):

    Linear:     W' = W + scale * (B @ A)          B: (out, r), A: (r, in), W: (out, in)  [transposed if fan_in_fan_out]
    Embedding:  W' = W + scale * (B @ A)^T        B: (dim, r), A: (r, vocab), W: (vocab, dim)
    lora_bias:  b' = b + scale * b_B
    scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per module through rank/alpha patterns)

Tensors the adapter saves whole (`modules_to_save` copies, an embedding's `base_layer` saved with
`save_embedding_layers`) replace the base's. Which modules are targeted, their scale and every key's meaning come from
PEFT itself: its config class reads `adapter_config.json`, its injection code wraps a `meta`-device copy of the
base architecture (no weights), and the wrapped tree says which tensors the adapter file holds and what each does.
The arithmetic is PEFT's `merge_and_unload` (peft/tuners/lora/layer.py: `get_delta_weight`, `merge`): adapter
weights in float32 (PEFT's `autocast_adapter_dtype`), the delta added to the base weight in float32 and the sum
rounded to the base tensor's dtype, so a LoRA input equals, bit for bit, the PEFT-merged checkpoint that mergekit
would have written to its LoRA cache first.

Refused with `CheckpointError` (naming the adapter and what is wrong): a non-LoRA PEFT method, LoRA variants that are
not a low-rank sum (DoRA, aLoRA, ...), trainable-token adapters, `layer_replication`, `target_parameters`, pickle
adapter files, adapter tensors whose shapes do not fit the base, and LoRA on an LM head tied to the embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, Source, SourceUnavailable, TensorInfo, read_header
from .reader import FileReader, SourceChanged

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel nests the wrapped model as `base_model.model`; saved adapter keys carry that prefix
# (peft/utils/save_and_load.py, set_peft_model_state_dict).
PEFT_PREFIX = "base_model.model."


def split_reference(ref: str) -> tuple[str, str | None]:
    """`"base+adapter"` -> ("base", "adapter"); `"base"` -> ("base", None). More than one `+` is an error
    (ValueError), as in mergekit's `ModelReference`."""
    chunks = ref.split("+")
    if len(chunks) == 1:
        return ref, None
    if len(chunks) == 2 and all(c.strip() for c in chunks):
        return chunks[0], chunks[1]
    raise ValueError(f"cannot parse model reference {ref!r}: expected PATH or BASE_PATH+LORA_PATH")


@dataclass(frozen=True)
class LoraDelta:
    """One targeted weight: `weight` += scale * delta(A, B); `a` / `b` are adapter-file tensor keys."""

    a: str
    b: str
    scale: float
    embedding: bool = False  # delta = (B @ A)^T
    fan_in_fan_out: bool = False  # Linear weight stored (in, out): delta = (B @ A)^T
    bias: str | None = None  # the lora_B bias key (lora_bias), added to `<module>.bias`


@dataclass
class LoraSource(Source):
    """A base `Source` with a PEFT LoRA adapter applied on read. `path`, `config` and `tensors` are the base's
    (the tokenizer and config of a LoRA input are its base's, as in mergekit); `adapter_path` is the adapter folder."""

    adapter_path: Path = Path()
    deltas: dict[str, LoraDelta] = field(default_factory=dict)  # base tensor name -> its LoRA
    bias_of: dict[str, str] = field(default_factory=dict)  # base bias name -> base weight name whose LoRA has it
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key saved whole
    adapter_tensors: dict[str, TensorInfo] = field(default_factory=dict)  # adapter file key -> where it lies

    @classmethod
    def open(cls, base_path, adapter_path=None) -> "LoraSource":  # type: ignore[override]
        """Open `base_path` (a checkpoint folder) with the adapter folder `adapter_path` applied lazily."""
        if adapter_path is None:
            raise CheckpointError(f"{base_path}: a LoRA source needs an adapter folder")
        base = Source.open(base_path)
        apath = Path(adapter_path).expanduser().resolve()
        try:
            reader, header = _open_adapter(apath)
        except CheckpointError:
            base.close()
            raise
        # the adapter file is read like base weights (engine/reader.py): one descriptor held open, pread copies,
        # identity checked before and after each read, so a truncated or replaced adapter is refused by name
        base._readers.add(reader)
        try:
            spec = _read_adapter(apath, base, {k: i.shape for k, i in header.items()})
            fingerprint = _fingerprint(base.fingerprint, apath, reader)
        except CheckpointError:
            base.close()
            raise
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Source)}
        src = cls(**fields, adapter_path=apath, **spec, adapter_tensors=header)
        src.fingerprint = fingerprint
        return src

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` with the adapter applied: the base's view when untouched, else a new tensor of the base's
        dtype (`W + scale * B @ A`, computed in float32 as PEFT's merge does)."""
        if name in self.replaced:
            w = self._adapter_tensor(self.replaced[name]).to(self.tensors[name].dtype)
        else:
            w = super().get(name)
        d = self.deltas.get(name)
        if d is not None:
            a = self._adapter_tensor(d.a).float()
            b = self._adapter_tensor(d.b).float()
            delta = b @ a  # (out, r) @ (r, in)
            if d.embedding or d.fan_in_fan_out:
                delta = delta.T.contiguous()
            # PEFT's order: (B @ A) * scale, then + W (float addition commutes exactly); in place, one buffer
            w = delta.mul_(d.scale).add_(w).to(w.dtype)
        owner = self.bias_of.get(name)
        if owner is not None:
            lb = self._adapter_tensor(self.deltas[owner].bias).float()
            w = (w.float() + lb * self.deltas[owner].scale).to(w.dtype)
        return w

    def get_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of `get(name)`: a targeted tensor is formed whole (W + scale B @ A), then sliced."""
        return self.get(name)[lo:hi]

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        info = self.adapter_tensors[key]
        try:
            return self._readers.files[info.file].read(info.start, info.end, info.dtype, info.shape)
        except SourceChanged as e:
            raise SourceUnavailable(self.label, str(e)) from None

    def nbytes(self) -> int:
        return super().nbytes() + sum(i.end - i.start for i in self.adapter_tensors.values())


def open_source(ref: str | Path) -> Source:
    """A checkpoint folder, or `BASE+ADAPTER` (a LoRA source); raises CheckpointError."""
    try:
        base, lora = split_reference(str(ref))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return Source.open(base) if lora is None else LoraSource.open(base, lora)


def source_identity(src: Source) -> tuple[Path, ...]:
    """What a reference denotes: (base folder,) or (base folder, adapter folder)."""
    return (src.path, src.adapter_path) if isinstance(src, LoraSource) else (src.path,)


# -- reading the adapter ---------------------------------------------------------------------------------------
def _fingerprint(base_fp: str, apath: Path, reader: FileReader) -> str:
    """The base's fingerprint, the adapter config and the adapter file's content as `reader` opened it."""
    h = hashlib.sha256(base_fp.encode())
    try:
        h.update((apath / ADAPTER_CONFIG).read_bytes())
    except OSError as e:
        raise CheckpointError(f"{apath}/{ADAPTER_CONFIG}: cannot read ({e.strerror})") from None
    offset = 0
    while chunk := reader.pread(1 << 24, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()[:16]


def _open_adapter(apath: Path) -> tuple[FileReader, dict[str, TensorInfo]]:
    """The adapter folder's weights file, open, and its header. Raises CheckpointError (no folder, no PEFT config,
    pickle-only or missing weights, a malformed safetensors file)."""
    if not apath.is_dir():
        raise CheckpointError(f"{apath}: not a LoRA adapter folder")
    if not (apath / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{apath}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    if not (apath / ADAPTER_WEIGHTS).exists():
        pickles = sorted(p.name for p in apath.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise CheckpointError(f"{apath}: pickle adapter files ({', '.join(pickles)}) are refused; "
                                  f"save the adapter as {ADAPTER_WEIGHTS}")
        raise CheckpointError(f"{apath}: no {ADAPTER_WEIGHTS}")
    path = apath / ADAPTER_WEIGHTS
    try:
        reader = FileReader.open(path, f"adapter {ADAPTER_WEIGHTS}")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return reader, read_header(path, reader)
    except CheckpointError:
        reader.close()
        raise


def _read_adapter(apath: Path, base: Source, file_keys: dict[str, tuple[int, ...]]) -> dict:
    """The LoRA's effect on `base`: {deltas, bias_of, replaced} (see LoraSource), given the adapter file's
    {key: shape}. Raises CheckpointError."""
    try:
        from peft import PeftConfig, PeftType
    except ImportError:
        raise CheckpointError(f"{apath}: LoRA inputs need the `peft` package (pip install peft)") from None
    try:
        config = PeftConfig.from_pretrained(str(apath))
    except Exception as e:  # noqa: BLE001  (peft raises ValueError/TypeError/KeyError for a bad config)
        raise CheckpointError(f"{apath}/{ADAPTER_CONFIG}: not a valid PEFT config ({e})") from None
    if config.peft_type != PeftType.LORA:
        raise CheckpointError(f"{apath}: PEFT method {config.peft_type.value} is not supported; only LORA adapters")
    for key in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if getattr(config, key, None):
            raise CheckpointError(f"{apath}: adapter_config `{key}` is not supported for LoRA inputs")
    tree = _inject_on_meta(apath, base, config)
    return _map_keys(apath, base, tree, file_keys)


def _inject_on_meta(apath: Path, base: Source, config):
    """The base architecture on the `meta` device (no weights) with PEFT's LoRA layers injected per `config`."""
    from peft import inject_adapter_in_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(base.path))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
        try:
            return inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
        except (ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{apath}: PEFT cannot apply this adapter to {base.path} ({e})") from None


def _map_keys(apath: Path, base: Source, tree, file_keys: dict[str, tuple[int, ...]]) -> dict:
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = list(get_peft_model_state_dict(tree))  # the keys PEFT saves for this config, without prefix
    have = {k.removeprefix(PEFT_PREFIX): k for k in file_keys}

    def fkey(k: str) -> str | None:
        return have.get(k)

    def tensor(name: str, why: str) -> str:
        if name not in base.tensors:
            tied = name == "lm_head.weight" and base.tied_embeddings
            raise CheckpointError(f"{apath}: {why} targets {name!r}, which the base "
                                  + ("ties to its embeddings (not supported)" if tied else "does not have"))
        return name

    deltas: dict[str, LoraDelta] = {}
    bias_of: dict[str, str] = {}
    replaced: dict[str, str] = {}
    modules = dict(tree.named_modules())
    for mname, mod in modules.items():
        if isinstance(mod, AuxiliaryTrainingWrapper) and not isinstance(mod, ModulesToSaveWrapper):
            raise CheckpointError(f"{apath}: module {mname!r} uses {type(mod).__name__}, which is not supported")
        if not isinstance(mod, LoraLayer) or "default" not in mod.scaling:
            continue
        if mod.lora_variant.get("default") is not None or getattr(mod, "use_dora", {}).get("default"):
            raise CheckpointError(f"{apath}: module {mname!r} is a LoRA variant "
                                  f"({type(mod.lora_variant.get('default')).__name__ if mod.lora_variant else 'DoRA'}) "
                                  "that is not a plain low-rank sum; not supported")
        embedding = "default" in mod.lora_embedding_A
        if embedding:
            ka, kb = f"{mname}.lora_embedding_A", f"{mname}.lora_embedding_B"
        elif "default" in mod.lora_A:
            ka, kb = f"{mname}.lora_A.weight", f"{mname}.lora_B.weight"
        else:
            raise CheckpointError(f"{apath}: module {mname!r} is a {type(mod).__name__} LoRA layer; only Linear and "
                                  "Embedding layers are supported")
        fa, fb = fkey(ka), fkey(kb)
        if fa is None or fb is None:
            raise CheckpointError(f"{apath}: its config targets {mname!r}, but {ADAPTER_WEIGHTS} lacks "
                                  f"{PEFT_PREFIX}{ka if fa is None else kb}")
        wname = tensor(f"{mname}.weight", f"LoRA on {mname!r}")
        fifo = bool(getattr(mod, "fan_in_fan_out", False))
        _check_shapes(apath, mname, base.shape(wname), file_keys[fa], file_keys[fb], embedding, fifo)
        bias = None
        if mod.lora_bias.get("default"):
            bias = fkey(f"{mname}.lora_B.bias")
            bname = tensor(f"{mname}.bias", f"lora_bias on {mname!r}")
            if bias is None:
                raise CheckpointError(f"{apath}: lora_bias is set, but {ADAPTER_WEIGHTS} lacks the bias of {mname!r}")
            bias_of[bname] = wname
        deltas[wname] = LoraDelta(fa, fb, float(mod.scaling["default"]), embedding, fifo, bias)

    adapter_keys = {d.a for d in deltas.values()} | {d.b for d in deltas.values()} | {
        d.bias for d in deltas.values() if d.bias}
    for k in expected:
        fk = fkey(k)
        if fk is None or fk in adapter_keys:
            continue  # not saved: PEFT keeps the base's (modules_to_save starts as a copy of it)
        owner, _, param = k.rpartition(".")
        mod = modules.get(owner)
        if owner.endswith(".base_layer") and isinstance(modules.get(owner.removesuffix(".base_layer")), LoraLayer):
            target = f"{owner.removesuffix('.base_layer')}.{param}"
        elif isinstance(mod, ModulesToSaveWrapper):
            target = k
        else:
            raise CheckpointError(f"{apath}: adapter tensor {fk!r} is neither a LoRA weight nor a saved module")
        tensor(target, f"saved tensor {fk!r}")
        if tuple(base.shape(target)) != file_keys[fk]:
            raise CheckpointError(f"{apath}: saved tensor {fk!r} has shape {list(file_keys[fk])}, the base's "
                                  f"{target!r} has {list(base.shape(target))} (resized vocabularies are not supported)")
        replaced[target] = fk
    return {"deltas": deltas, "bias_of": bias_of, "replaced": replaced}


def _check_shapes(apath, mname, w, a, b, embedding, fifo) -> None:
    r = a[0]
    out, inp = (w[1], w[0]) if (embedding or fifo) else (w[0], w[1])
    if len(a) != 2 or len(b) != 2 or b[1] != r or a[1] != inp or b[0] != out:
        raise CheckpointError(f"{apath}: LoRA of {mname!r} has A {list(a)} and B {list(b)}, which do not fit the base "
                              f"weight {list(w)}")


__all__ = ["LoraSource", "LoraDelta", "open_source", "source_identity", "split_reference"]
