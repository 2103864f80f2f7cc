"""The merge's fused CPU path, the default on the CPU: `merge_reference`'s delta arithmetic compiled into one loop.

Same contract and same float32 operations, element by element, as `kernels.merge.merge_reference` (the oracle: tests
check equality); the eager reference makes ~30 passes over memory for a TIES merge, this makes one. Every number of
the spec enters as a tensor and the element count is a dynamic dimension, so one compiled program serves every recipe
and tensor with the same *structure* (keep rule, consensus, normalize, number of sources, storage dtypes, torch
threads).

Compiled once per machine: each structure is exported (`torch.export`) and compiled ahead of time by Inductor
(AOTInductor) into a package under the cache directory (`LAZYMERGE_CACHE_DIR`, default `~/.cache/lazymerge`), keyed
by the torch version, the source of what it compiles and the Inductor settings (`INDUCTOR_CONFIGS`). A process loads
a package in milliseconds; a missing one costs one compilation (about a minute per structure on a 2-core machine,
announced by one line on stderr), then never again on this machine. Concurrent processes may both compile a missing
package; the last atomic rename wins. A tensor of at most COMPILE_FROM elements never starts a compilation (it runs a
package already there, else the reference: the same bits), so a toy model compiles nothing.

Switches: `LAZYMERGE_CPU_FUSED=0` runs the eager reference (the oracle, a debug switch; also `Engine(...,
cpu_fused=False)`); if a package cannot be compiled (no C++ compiler), the reference runs, with one warning.
Each package is loaded once in a separate process first (`_probe`): where loading crashes the process (it did on
the GPU image, torch 2.11.0+cu130), the reference runs instead, with one warning, and the process lives.
DELLA's per-row ranks are computed per block of whole rows (`merge.row_ranks`) and passed to the compiled loop, so
no O(numel) statistic exists at any time beyond one block.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

from .cache import root as cache_root
from .merge import ROUND_DTYPES, della_step, row_ranks, unit_ranks
from .rng import C1, C2, M32

_ENABLED = os.environ.get("LAZYMERGE_CPU_FUSED", "1") != "0"
_LOADED: dict = {}
_FAILED: set = set()
_ABSENT: set = set()  # structures a small tensor found no package for (COMPILE_FROM): not looked for again here
_LOCK = threading.Lock()
_TAILS: dict = {}
TAILS_MAX = 8192  # memoized spec tensors (~1 KB each)
DELLA_BLOCK = 1 << 18  # elements per compiled call on DELLA (whole rank rows; the ranks' temporaries stay small)
# A tensor of at most COMPILE_FROM elements never starts a compilation: its merge runs a program already loaded or
# on disk, else the reference (the same bits), and its L1 sums always run the reference (so that they do not depend on
# which packages the machine holds). A model whose tensors are all this small (the demo's zoo: 65,536 at most)
# compiles nothing: a structure's compilation (5-20 s on a 2-core CPU) costs more than the fused loop saves on such
# tensors in a whole search (measured, one thread: a 2-source TIES merge of 65,536 float32 elements 0.09 ms fused,
# 1.2 ms eager; the demo's PS candidate merges in 86 ms fused, 105 ms eager; `make demo` compiled five structures,
# ~70 s of its wall time). Real checkpoints' matrices are larger and compile as before.
COMPILE_FROM = 1 << 16


def enabled() -> bool:
    """The process default: on unless LAZYMERGE_CPU_FUSED=0."""
    return _ENABLED


def cache_dir() -> Path:
    """Where compiled packages live: `kernels.cache.root()`, one subdirectory per torch version (a package's name
    carries the hash of its own source: `package_path`)."""
    return cache_root() / f"merge_cpu-torch{torch.__version__}"


# Inductor settings of every compiled program. Inductor's CPU code vectorizes a loop that reads bfloat16/float16 with
# 16 lanes (whole 256-bit loads) only when every fused node reads that dtype; by default it stores a subexpression
# read more than 4 times (TIES' and DARE-TIES' per-source sign masks, read by the sum and the divisor) as a buffer of
# its own, whose node then reads no bfloat16, and the whole loop falls back to 8 lanes with a partial load (a copy
# through the stack) per input: TIES' and DARE-TIES' merges ran 1.7-1.9x slower on bf16 sources, DARE's L1 pass 1.6x
# (the masked delta, over 30 operations with its hash, was realized by `realize_opcount_threshold`), same bits
# (`python -m lazymerge.kernels.bench_inductor`). Kept inline, each subexpression is still computed once (CSE).
INDUCTOR_CONFIGS = {"realize_reads_threshold": 1 << 10, "realize_opcount_threshold": 1 << 10}
# A program that rounds its result to the output checkpoint's dtype (`.to(bfloat16).to(float32)`): by default Inductor
# drops such a round trip as a no-op and stores the unrounded value (seen: TIES, bf16 sources); this keeps the cast.
ROUNDING_CONFIGS = {"emulate_precision_casts": True}


_HASHES: dict = {}


def _code_hash(module, configs: dict | None = None) -> str:
    """Hash of what a package compiles (the module's class, the functions it calls, the Inductor settings: the
    common ones and the program's own `configs`), not of the loading code: a package stays valid until that changes,
    and changing one program recompiles that one alone. Memoized per (class, functions, settings): reading the source
    took ~10 ms, and a small tensor asks for its package on every merge (COMPILE_FROM)."""
    import inspect

    parts = tuple([type(module), *getattr(module, "USES", ())] if module is not None else [])
    memo = (parts, repr(sorted(INDUCTOR_CONFIGS.items())) + (repr(sorted(configs.items())) if configs else ""))
    got = _HASHES.get(memo)
    if got is None:
        src = "".join(inspect.getsource(f) for f in parts) + memo[1]
        got = _HASHES[memo] = hashlib.sha1(src.encode()).hexdigest()[:12]
    return got


def package_path(key: tuple, module, configs: dict | None = None) -> Path:
    """The package file of structure `key` compiled from `module` (with Inductor settings `configs` beyond
    INDUCTOR_CONFIGS): the key's fields and the code hash."""
    return cache_dir() / ("-".join(str(k) for k in key) + f"-{_code_hash(module, configs)}.pt2")


def _open(path: str):
    """AOTInductor's C++ package loader (milliseconds, no Inductor import), else torch._inductor's loader."""
    try:
        return torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    except (AttributeError, RuntimeError, TypeError):
        return torch._inductor.aoti_load_package(path)


# What the probe process runs: this file's `_open` (torch only, no lazymerge import) on argv[1].
_PROBE = "import sys, torch\n{src}\n_open(sys.argv[1])"
PROBE_TIMEOUT = 300.0  # seconds; loading takes milliseconds to seconds


def _probe(path: Path) -> None:
    """Load `path` once in a separate process before this one does, once per machine: on the GPU image (torch
    2.11.0+cu130, 2026-11-30) loading any of these packages killed the process with a segmentation fault, which no
    `except` can catch. A package that loaded there gets a `.ok` marker beside it; one that did not gets a `.bad`
    marker with the reason (later processes read it instead of probing again; delete it to retry). Only a crash
    (a signal other than SIGKILL) is recorded: a timeout, an out-of-memory kill or an error exit fails this process's
    fast path alone, and the next process probes again. A marker that cannot be written (a read-only cache) is
    skipped. Runs under the caller's lock: a first load waits for the probe (seconds).

    Raises RuntimeError naming the exit status and the probe's last lines of stderr when the package cannot be
    loaded."""
    ok, bad = path.with_suffix(".ok"), path.with_suffix(".bad")
    if ok.exists():
        return
    if bad.exists():
        raise RuntimeError(bad.read_text())
    import inspect
    import signal

    code = _PROBE.format(src=inspect.getsource(_open))
    try:
        p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                           errors="replace", timeout=PROBE_TIMEOUT)
        rc, tail = p.returncode, " | ".join(p.stderr.strip().splitlines()[-3:])
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", f"no answer in {PROBE_TIMEOUT:.0f} s"
    if rc != 0:
        crashed = isinstance(rc, int) and rc < 0 and rc != -signal.SIGKILL
        why = (f"loading {path.name} in a probe process failed (exit {rc}{': ' + tail if tail else ''}); "
               + (f"this torch/compiler cannot run the compiled package here (delete {bad} to retry)" if crashed
                  else "the next process tries again"))
        if crashed:
            _write_marker(bad, why)
        raise RuntimeError(why)
    _write_marker(ok, "")


def _write_marker(path: Path, text: str) -> None:
    """A probe's verdict beside its package; skipped where the cache cannot be written (the verdict still holds
    for this process)."""
    try:
        path.write_text(text)
    except OSError:
        pass


def _load(path: Path):
    """A callable over a compiled package, after `_probe` showed that loading it does not crash."""
    _probe(path)
    loader = _open(str(path))
    if not hasattr(loader, "run"):  # torch._inductor's loader: already a callable
        return loader

    def run(*args):
        out = loader.run(list(args))
        return out[0] if len(out) == 1 else tuple(out)

    return run


def _mix(x):
    # `kernels.rng.mix32` on int32 lanes holding uint32 bit patterns: wrap-around products, logical shifts as an
    # arithmetic shift and a mask. Bit for bit the int64 reference's value; 8 lanes per AVX2 vector instead of 4, and
    # no emulated 64-bit multiply: the DARE/DELLA pass runs ~3x faster.
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * C1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * C2
    return x ^ ((x >> 15) & 0x1FFFF)


def _index(n: int, start, keep: str, device):
    """Flat element indices start .. start + n - 1: int64 for the top-k tie rule (compared against an int64 tie
    index), the uint32 bit pattern in int32 for the random masks (indices are < 2**32, kernels/rng.py)."""
    if keep in ("topk", "band"):
        return torch.arange(n, dtype=torch.int64, device=device) + start
    return torch.arange(n, dtype=torch.int32, device=device) + (start & M32).to(torch.int32)


def _keep(d, idx, aux_i, t_in, c_in, t_out, c_out, dens, eps, k1, k2, keep: str):
    # keep "topk": the inner cut alone (TIES); "band": minus the outer cut (breadcrumbs). Two compiled structures:
    # the outer cut's compares cost TIES ~30% of its pass when they exclude nothing.
    if keep in ("topk", "band"):
        a = d.abs()
        k = (a > t_in) | ((a == t_in) & (idx <= c_in))
        if keep == "topk":
            return k
        return k & ~((a > t_out) | ((a == t_out) & (idx <= c_out)))
    h = _mix(_mix(idx ^ k1.to(torch.int32)) ^ k2.to(torch.int32))
    u = ((h >> 8) & 0xFFFFFF).to(torch.float32) * (2.0**-24)
    return u < (dens if keep == "random" else (dens - eps) + aux_i.float() * (2.0 * eps))


def _delta(b, xs, aux, w, sc, t_in, c_in, t_out, c_out, dens, eps, k1, k2, lam, div_all, start, *,
           keep: str, consensus: bool, normalize: bool):
    b = b.float()
    idx = _index(b.numel(), start, keep, b.device) if keep != "all" else None
    parts = []
    for i, x in enumerate(xs):
        d = x.float() - b
        if keep != "all":
            d = d * _keep(d, idx, None if aux is None else aux[i], t_in[i], c_in[i], t_out[i], c_out[i], dens[i],
                          eps[i], k1[i], k2[i], keep)
        d = d * sc[i]
        parts.append(d * w[i])
    if consensus:
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        pos = total >= 0
        mixed = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for i, p in enumerate(parts):
            c = torch.where(pos, p > 0, p < 0)
            mixed = mixed + p * c
            div = div + c * w[i]
        div = torch.where(div == 0, 1.0, div)
    else:
        mixed = parts[0]
        for p in parts[1:]:
            mixed = mixed + p
        div = div_all
    if normalize:
        mixed = mixed / div
    return b + mixed * lam


def _l1(b, x, aux_i, t_in, c_in, t_out, c_out, dens, eps, k1, k2, start, *, keep: str):
    """(sum |d|, sum |d * keep|) of one source's delta in float64: the L1 rescale factor's two norms."""
    d = x.float() - b.float()
    idx = _index(b.numel(), start, keep, b.device)
    k = _keep(d, idx, aux_i, t_in, c_in, t_out, c_out, dens, eps, k1, k2, keep)
    return d.abs().sum(dtype=torch.float64), (d * k).abs().sum(dtype=torch.float64)


def _l1_kept(b, x, aux_i, t_in, c_in, t_out, c_out, dens, eps, k1, k2, start, *, keep: str):
    """sum |d * keep| alone: `_l1`'s second norm, for a caller that knows the first (it does not depend on the
    recipe's numbers). Its float64 sum is the same reduction as `_l1`'s, so the same bits."""
    d = x.float() - b.float()
    idx = _index(b.numel(), start, keep, b.device)
    k = _keep(d, idx, aux_i, t_in, c_in, t_out, c_out, dens, eps, k1, k2, keep)
    return (d * k).abs().sum(dtype=torch.float64)


class _DeltaModule(torch.nn.Module):
    USES = (_mix, _index, _keep, _delta)

    def __init__(self, n: int, has_aux: bool, round_to: str = "", **kw):
        super().__init__()
        self.n, self.has_aux, self.round_to, self.kw = n, has_aux, round_to, kw

    def forward(self, out, b, *rest):
        # the merged tensor is written into `out` (float32, b's numel): AOTInductor stores the loop's result there
        # directly, so that a caller can hand it a buffer to reuse (a search's previous candidate's weight)
        xs, rest = list(rest[: self.n]), rest[self.n:]
        aux = None
        if self.has_aux:
            aux, rest = list(rest[: self.n]), rest[self.n:]
        v = _delta(b, xs, aux, *rest, **self.kw)
        if self.round_to:  # the output checkpoint's dtype (`kernels.merge.rounded`), in the same loop
            v = v.to(ROUND_DTYPES[self.round_to]).to(torch.float32)
        return out.copy_(v)


class _L1Module(torch.nn.Module):
    USES = (_mix, _index, _keep, _l1)

    def __init__(self, has_aux: bool, keep: str):
        super().__init__()
        self.has_aux, self.keep = has_aux, keep

    def forward(self, b, x, *rest):
        aux = None
        if self.has_aux:
            aux, rest = rest[0], rest[1:]
        return _l1(b, x, aux, *rest, keep=self.keep)


class _L1KeptModule(_L1Module):
    USES = (_mix, _index, _keep, _l1_kept)

    def forward(self, b, x, *rest):
        aux = None
        if self.has_aux:
            aux, rest = rest[0], rest[1:]
        return _l1_kept(b, x, aux, *rest, keep=self.keep)


class _BucketModule(torch.nn.Module):
    def forward(self, b, x, *rest):
        digit, shift = rest
        # the elements of one radix bucket of |x - b| (kernels/select.py): the cut's collecting pass in one loop
        bits = (x.float() - b.float()).abs().view(torch.int32)
        # int8, not bool: Inductor's CPU code stores a bool mask ~3x slower than this select (17 vs 5 ms a 4M block)
        return torch.where((bits >> shift) == digit, 1, 0).to(torch.int8)


def on_fresh_stack(fn):
    """fn() run in a new thread (joined; its exception re-raised here), so that its Python frames start on an empty
    frame stack whatever the caller's depth.

    Why (measured; the mechanism read off `perf`, whose faults sat under `_PyThreadState_BumpFramePointerSlow`):
    CPython 3.11 keeps frames in 16 KiB chunks, mapped when a call needs a new one and unmapped when that call
    returns. Inductor's code generation makes millions of calls; from a caller whose depth put them at a chunk's edge
    (a pytest test), every crossing mapped and faulted in a fresh chunk: the 3-source DARE-TIES structure took
    96-103 s to compile there (70 s of it system time, 10.8M page faults) against 21-24 s (0.87M faults) from a
    shallow caller. A fresh thread's depth is the same for every caller. The thread takes this thread's torch
    intra-op thread count (the compiled program's `t` key) and its inference and grad modes (thread-local in
    torch). It is a daemon: Ctrl-C during a compilation ends the process without waiting for it (its temporary file
    is left behind).

    Raises whatever fn raises."""
    got: dict = {}
    threads, inference, grad = torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run():
        torch.set_num_threads(threads)
        try:
            # the caller's autograd modes are thread-local: under `torch.inference_mode` (score, generate, serve)
            # the example inputs are inference tensors, which export may only update in inference mode
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                got["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            got["error"] = e

    t = threading.Thread(target=run, name="lazymerge-compile", daemon=True)
    t.start()
    t.join()
    if "error" in got:
        raise got["error"]
    return got.get("value")


def _program(key: tuple, module: torch.nn.Module, args: tuple, n_elementwise: int, what: str, n_named: int,
             may_compile: bool = True, configs: dict | None = None):
    """The loaded AOTInductor package of `key` (compiled and saved first if missing, when `may_compile`); None if it
    cannot be built, or is missing and may not be. `configs`: Inductor settings beyond INDUCTOR_CONFIGS for this
    program (in its package's code hash; one `key` always comes with the same `configs`)."""
    fn = _LOADED.get(key)
    if fn is not None or key in _FAILED:
        return fn
    with _LOCK:
        fn = _LOADED.get(key)
        if fn is not None:
            return fn
        path = package_path(key, module, configs)
        if not may_compile and not path.exists():
            _ABSENT.add(key)
            return None
        try:
            if not path.exists():
                import time

                print(f"lazymerge: compiling the fused CPU merge for {what} (once per machine; cache {path.parent})",
                      file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                path.parent.mkdir(parents=True, exist_ok=True)
                n_dim = torch.export.Dim("numel", min=2, max=2**32 - 1)
                shapes = tuple({0: n_dim} for _ in range(n_elementwise)) + (None,) * (len(args) - n_elementwise)
                shapes = shapes[:n_named] + (shapes[n_named:],)  # forward(named..., *rest)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.pt2")

                def compile_package():
                    ep = torch.export.export(module, args, dynamic_shapes=shapes)
                    # a copy: torch adds its own keys to the dict it is given, which would change the code hash
                    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp),
                                                             inductor_configs={**INDUCTOR_CONFIGS, **(configs or {})})

                with warnings.catch_warnings():  # torch's own deprecation notices (e.g. LeafSpec) are not the user's
                    warnings.simplefilter("ignore", FutureWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    on_fresh_stack(compile_package)
                for marker in (".ok", ".bad"):  # a new package is probed anew
                    path.with_suffix(marker).unlink(missing_ok=True)
                os.replace(tmp, path)
                print(f"lazymerge: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            fn = _load(path)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the eager reference
            warnings.warn(f"lazymerge: the fused CPU merge could not be compiled or loaded ({type(e).__name__}: "
                          f"{e}); using the eager reference", stacklevel=3)
            _FAILED.add(key)
            return None
        _LOADED[key] = fn
        return fn


def _scalars(spec, n: int, dev):
    f32 = lambda v, default=0.0: torch.tensor(list(v) if v else [default] * n, dtype=torch.float32, device=dev)  # noqa: E731
    i64 = lambda v: torch.tensor(list(v) if v else [-1] * n, dtype=torch.int64, device=dev)  # noqa: E731
    keys = spec.keys or ((0, 0),) * n
    return (f32(spec.t_in), i64(spec.c_in), f32(spec.t_out), i64(spec.c_out), f32(spec.densities), f32(spec.eps),
            i64(k[0] for k in keys), i64(k[1] for k in keys))


def _tail(spec, n: int, dev) -> tuple:
    """The spec's numbers as the tensors the compiled delta program takes after its inputs. Memoized per (spec,
    device): a forward on the fly merges every weight with the same specs again, and building these ~12 small
    tensors per call cost ~2% of a 1-token TIES forward (267M parameters). Keyed by the spec object itself (the
    merger keeps one per tensor and recipe; the entry holds it, so its id cannot be reused while cached): equal specs
    that differ in a zero's sign get their own tensors."""
    key = (id(spec), n, str(dev))
    hit = _TAILS.get(key)
    got = hit[1] if hit is not None and hit[0] is spec else None
    if got is None:
        div_all = spec.weight_sum
        t_in, c_in, t_out, c_out, dens, eps, k1, k2 = _scalars(spec, n, dev)
        w = torch.tensor(list(spec.weights), dtype=torch.float32, device=dev)
        sc = torch.tensor(list(spec.scales) if spec.scales else [1.0] * n, dtype=torch.float32, device=dev)
        got = (w, sc, t_in, c_in, t_out, c_out, dens, eps, k1, k2, torch.tensor(spec.lam, device=dev),
               torch.tensor(div_all, device=dev))
        if len(_TAILS) >= TAILS_MAX:  # a search's old candidates' specs: dropped wholesale, rebuilt on demand
            _TAILS.clear()
        _TAILS[key] = (spec, got)
    return got


FUSED_KEEPS = ("all", "topk", "random", "della")


def structure_keep(spec) -> str:
    """The keep rule the compiled loop specializes on: "band" for a top-k cut with an outer cut
    (`MergeSpec.has_outer_cut`), else `spec.keep`."""
    return "band" if spec.has_outer_cut else spec.keep


def fusable(spec) -> bool:
    """Whether the fused loop implements `spec`: the task-arithmetic family's keep rules, whole-tensor layout."""
    return (spec.mode == "delta" and spec.keep in FUSED_KEEPS and not spec.row_layout and not spec.consensus_raw
            and not spec.div_min)


def merge_delta_fused(base, sources, spec, aux=None, out=None, round_to: str = "") -> torch.Tensor | None:
    """Fused delta-mode merge of whole tensors (no row `index`); float32 of the inputs' shape (written into `out`, a
    contiguous float32 tensor of as many elements, when given), or None when the structure could not be compiled (the
    caller then runs the reference). DELLA without `aux`: ranks per row block. Specs of the newer methods' keep
    rules (sce, arcee_fusion, ram: kernels/merge.py) are left to the reference. A tensor of at most COMPILE_FROM
    elements runs a package already compiled, never compiles one (None if there is none)."""
    if not fusable(spec):
        return None
    if out is not None and (out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != base.numel()
                            or out.device != base.device):
        return None
    n = len(sources)
    has_aux = spec.keep == "della"
    keep = structure_keep(spec)
    round_to = round_to if round_to in ROUND_DTYPES else ""
    key = ("delta", keep, int(spec.consensus), int(spec.normalize), n, str(base.dtype).split(".")[-1],
           "_".join(str(s.dtype).split(".")[-1] for s in sources), f"t{torch.get_num_threads()}") + (
        (f"r{round_to}",) if round_to else ())
    if key in _ABSENT and key not in _LOADED and base.numel() <= COMPILE_FROM:
        return None  # the reference, as on the first look (same bits either way)
    dev = base.device
    tail = _tail(spec, n, dev)
    fb = base.reshape(-1)
    fx = [s.reshape(-1) for s in sources]
    numel = fb.numel()
    step, width = della_step(base.shape, DELLA_BLOCK) if has_aux else (max(numel, 2), 0)
    kw = dict(keep=keep, consensus=spec.consensus, normalize=spec.normalize)
    res = out if out is not None else torch.empty(base.shape, dtype=torch.float32, device=dev)  # not a view: reusable
    flat = res.view(-1)
    fn = None
    for s in range(0, numel, step):
        e = min(numel, s + step)
        if e - s < 2:  # the exported program's dynamic size starts at 2
            return None
        b, xs = fb[s:e], [x[s:e] for x in fx]
        auxs = []
        if has_aux and aux is not None:
            auxs = [unit_ranks(aux[i].reshape(-1)[s:e], width) for i in range(n)]
        elif has_aux:  # x - bf promotes to float32 (exact, as x.float() - bf) without a float copy of x
            bf = b.float()
            auxs = [row_ranks((x - bf).abs_().view(-1, width)).view(-1) for x in xs]
        args = (flat[s:e], b, *xs, *auxs, *tail, torch.tensor(s, dtype=torch.int64, device=dev))
        if fn is None:
            rounding = f", rounded to {round_to}" if round_to else ""
            fn = _program(key, _DeltaModule(n, has_aux, round_to, **kw), args, 2 + n + len(auxs),
                          f"{keep} x {n} sources ({'consensus, ' if spec.consensus else ''}"
                          f"{'normalize, ' if spec.normalize else ''}{key[6]}{rounding})", 2,
                          may_compile=numel > COMPILE_FROM, configs=ROUNDING_CONFIGS if round_to else None)
            if fn is None:
                return None
        fn(*args)
    return res


def l1_sums_fused(base, x, spec, i: int, aux_i=None, before: float | None = None) -> tuple[float, float] | None:
    """Fused `kernels.merge.l1_sums` for source i of `spec`: (sum |d|, sum |d * keep|), or None if not compiled.
    With `before` (sum |d| of an earlier call on the same tensors, which no recipe number changes) only the second
    norm is computed, by a program without the first sum: ~25% less time for the pass, a 267M DARE-TIES candidate's
    merge 1.10 -> 1.00 s (BENCHMARKS.md, session 14). None for a tensor of at most COMPILE_FROM elements: its sums
    always run the reference (the routes sum in their own orders; the choice must not depend on what is compiled)."""
    if not fusable(spec) or base.numel() <= COMPILE_FROM:
        return None
    has_aux = spec.keep == "della"
    keep = structure_keep(spec)
    key = ("l1" if before is None else "l1kept", keep, str(base.dtype).split(".")[-1], str(x.dtype).split(".")[-1],
           f"t{torch.get_num_threads()}")
    module = _L1Module(has_aux, keep) if before is None else _L1KeptModule(has_aux, keep)
    dev = base.device
    sc = [t[i:i + 1].reshape(()) for t in _scalars(spec, spec.n, dev)]
    fb, fx = base.reshape(-1), x.reshape(-1)
    numel = fb.numel()
    step, width = della_step(base.shape, DELLA_BLOCK) if has_aux else (max(numel, 2), 0)
    total = after = 0.0
    fn = None
    for s in range(0, numel, step):
        e = min(numel, s + step)
        if e - s < 2:
            return None
        b, xx = fb[s:e], fx[s:e]
        extra = []
        if has_aux:
            extra = [unit_ranks(aux_i.reshape(-1)[s:e], width) if aux_i is not None else
                     row_ranks((xx.float() - b.float()).abs_().view(-1, width)).view(-1)]
        args = (b, xx, *extra, *sc, torch.tensor(s, dtype=torch.int64, device=dev))
        if fn is None:
            fn = _program(key, module, args, 2 + len(extra), f"L1 norms of {keep}", 2)
            if fn is None:
                return None
        if before is None:
            bb, aa = fn(*args)
            total += float(bb)
        else:
            aa = fn(*args)
        after += float(aa)
    return (total if before is None else before), after


BUCKET_BLOCK = 1 << 22  # elements per compiled call of `bucket_blocks` (a 4 MiB mask at a time)
NTH_BLOCK = 1 << 19  # elements per compiled call of `nth_equal` (it stops at the block holding the element)


def _bucket_program(fb: torch.Tensor, fx: torch.Tensor):
    """The loaded bucket-mask program for flat dense `fb`, `fx` (compiled once per machine), or None."""
    key = ("bucket", str(fb.dtype).split(".")[-1], str(fx.dtype).split(".")[-1], f"t{torch.get_num_threads()}")
    fn = _LOADED.get(key)
    if fn is None and fb.numel() >= 2:
        e = min(fb.numel(), BUCKET_BLOCK)
        d, sh = torch.tensor(0, dtype=torch.int32), torch.tensor(16, dtype=torch.int32)
        fn = _program(key, _BucketModule(), (fb[:e], fx[:e], d, sh), 2, "the top-k cut's bucket pass", 2)
    return fn


def _block_mask(fn, fb: torch.Tensor, fx: torch.Tensor, d: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """The program's int8 mask of one block (the eager formula for a block of one element: the program's dynamic
    dimension starts at 2)."""
    if fb.numel() < 2:
        bits = (fx.float() - fb.float()).abs().view(torch.int32)
        return ((bits >> int(sh)) == int(d)).to(torch.int8)
    return fn(fb, fx, d, sh)


def bucket_blocks(base: torch.Tensor, x: torch.Tensor, digit: int, shift: int):
    """The flat indices of the elements whose |x - base| bit pattern (float32 arithmetic) has `bits >> shift ==
    digit`, as an iterator of int64 tensors (ascending, one per block of BUCKET_BLOCK elements): the pass of
    `kernels.select`'s cut collecting one radix bucket (or, with shift 0, the elements equal to a value), as one
    compiled loop per block writing an int8 mask, then its nonzero. ~3x the chunked PyTorch pass on the 2-core CPU.
    None when the structure cannot be compiled or loaded (the caller runs its PyTorch pass). For finite buckets
    (`digit << shift` below +inf's pattern): a NaN's payload here may differ from `select.abs_delta_bits`'."""
    fb, fx = base.reshape(-1).contiguous(), x.reshape(-1).contiguous()  # the program reads dense memory
    fn = _bucket_program(fb, fx)
    if fn is None and fb.numel() >= 2:
        return None
    d, sh = torch.tensor(digit, dtype=torch.int32), torch.tensor(shift, dtype=torch.int32)

    def blocks():
        for s in range(0, fb.numel(), BUCKET_BLOCK):
            e = min(fb.numel(), s + BUCKET_BLOCK)
            yield _block_mask(fn, fb[s:e], fx[s:e], d, sh).nonzero().reshape(-1) + s

    return blocks()


def nth_equal(base: torch.Tensor | None, x: torch.Tensor, bits: int, m: int, total: int | None = None) -> int | None:
    """Flat index of the m-th (1-based, in index order) element whose |x - base| bit pattern is `bits` (finite, below
    +inf's pattern): the compiled mask of NTH_BLOCK elements at a time, counted, until the block holding it, then that
    block's nonzero. With `total` (how many elements equal `bits`) it counts from whichever end is nearer: on average
    a quarter of a pass over the tensor. `kernels.select.table_cuts`' tie index. None when it cannot run here (no
    base, a non-finite value, the program not compiled): the caller counts in PyTorch.
    Raises ValueError if fewer than m elements equal `bits`."""
    if base is None or bits >= 0x7F800000:
        return None
    fb, fx = base.reshape(-1).contiguous(), x.reshape(-1).contiguous()
    fn = _bucket_program(fb, fx)
    if fn is None and fb.numel() >= 2:
        return None
    d, sh = torch.tensor(bits, dtype=torch.int32), torch.tensor(0, dtype=torch.int32)
    starts = range(0, fb.numel(), NTH_BLOCK)
    backward = total is not None and m > total - m + 1
    r = total - m + 1 if backward else m  # the wanted element is the r-th met from the end the count starts at
    seen = 0
    for s in reversed(starts) if backward else starts:
        e = min(fb.numel(), s + NTH_BLOCK)
        mask = _block_mask(fn, fb[s:e], fx[s:e], d, sh)
        n = int(torch.count_nonzero(mask))  # 3x `sum` of an int8 mask
        if seen + n >= r:
            pos = mask.nonzero().reshape(-1)
            return s + int(pos[n - (r - seen)] if backward else pos[r - seen - 1])
        seen += n
    raise ValueError(f"fewer than {m} elements equal the cut value")


__all__ = ["bucket_blocks", "nth_equal", "cache_dir", "enabled", "l1_sums_fused", "merge_delta_fused"]
