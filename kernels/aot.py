"""Ahead-of-time compilation of the kernel variants the dispatcher launches, for a GPU target, without a GPU.

    variants(tier) -> list[Variant]          # what the launchers would compile, recorded from the launchers
    compile_variant(v, arch=90) -> dict      # shared bytes, registers, stack / spill bytes, seconds (sm_90)
    python -m lazymerge.kernels.aot [--tier quick|worst|full] [--jobs N] [--json PATH]

How variants are found: the real launchers (`merge_triton.merge_triton`, `merge_matmul.merge_matmul_triton`) are
called on `meta` tensors (shapes and dtypes, no memory) with their kernel objects swapped for a recorder, once
with autotuning on and once off (LAZYMERGE_AUTOTUNE=0). A fixed-config launch is one variant; an autotuned launch
gives one variant per config the autotuner keeps after its own `early_config_prune` (off a GPU, the shared-memory
limit assumed there is the H200's, `merge_matmul.H200_SHARED_LIMIT`). So the constexpr flags, tile configs and
argument types are the dispatcher's, not a copy: a new merge mode or config is compiled here without edits.
The signature, attributes and options come from the JIT's own binder (`_specialize`), so a binary compiled here
for the device's target is the one a launch there finds in Triton's cache (`--arch` of the GPU: a warm-up).

What is compiled, per tier (the merge specs come from the `KEEP_CODES` table: every keep rule x consensus x
normalize, and combine with and without a divisor; compute dtype x storage dtype over float32/bfloat16/float16):
* quick: the fixed configs (LAZYMERGE_AUTOTUNE=0) at the heaviest spec (DELLA with consensus: 2n + 2 loaded tiles)
  and MAX_SOURCES sources, for (float32, float32) and (bfloat16, bfloat16), merging into float32: 4 binaries,
  ~2 min on 2 busy cores with a cold Triton cache, seconds with a warm one.
* worst: every config of both launchers (autotuned and fixed), at the heaviest spec and MAX_SOURCES, for every
  (compute, storage) dtype pair, the elementwise merge also with gathered rows (`index`). Shared memory only
  grows with the tiles loaded, so this bounds every lighter spec (registers: see `full`).
* full: worst + every spec at MAX_SOURCES (and 1 source) with the fixed decode config, bfloat16 and float32.

Compiling needs only Triton's bundled CUDA tools (backends/nvidia/bin: ptxas, cuobjdump); `missing_tools()` names
what is absent. Registers and spills are read from the cubin with the bundled cuobjdump (`--dump-resource-usage`:
REG, STACK = local memory per thread, which ptxas fills with spills: the kernels use no local arrays).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from .merge import MergeSpec

H200_SHARED_LIMIT = 232448  # bytes per block, opt-in (Hopper); = merge_matmul.H200_SHARED_LIMIT
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Variant:
    """One binary: kernel (module:function), Triton signature, constexprs, attrs and compile options."""
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    label: str = ""  # what chose it (launcher, spec, dtypes, path)
    meta: dict = field(default_factory=dict)  # data for checks (flags, element sizes, tile config)

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, sorted(self.constexprs.items(), key=str),
                           sorted((str(k), v) for k, v in self.attrs.items()),
                           sorted((k, str(v)) for k, v in self.options.items())],
                          default=str)


# -- recording the launchers -------------------------------------------------------------------------------------
class _Launch(Exception):
    def __init__(self, kernel, args, kwargs):
        super().__init__("recorded")
        self.kernel, self.args, self.kwargs = kernel, args, kwargs


class _Recorder:
    """Stands in for a JITFunction or an Autotuner: `k[grid](*args, **kw)` raises `_Launch` instead of running."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise _Launch(self.real, args, kwargs)
        return launch


@contextlib.contextmanager
def _recording(autotune: bool):
    from . import merge_matmul, merge_triton

    saved_env = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "LAZYMERGE_AUTOTUNE")}
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["LAZYMERGE_AUTOTUNE"] = "1" if autotune else "0"
    names = [(merge_matmul, "_merge_matmul_kernel"), (merge_matmul, "_merge_matmul_kernel_tuned"),
             (merge_triton, "_merge_kernel"), (merge_triton, "_merge_kernel_tuned")]
    saved = [(mod, n, getattr(mod, n)) for mod, n in names]
    try:
        for mod, n, real in saved:
            setattr(mod, n, _Recorder(real))
        yield
    finally:
        for mod, n, real in saved:
            setattr(mod, n, real)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _specialize(fn, args: tuple, kwargs: dict, target):
    """(signature, constexprs, attrs, options) of a launch, by the JIT's own binder and `_pack_args` (as
    `JITFunction.run` does), so that `triton.compile` gets the launch's exact source key: a binary compiled here
    for the device's target is the one the launch later finds in Triton's cache."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what this Triton's run() adds
        if hasattr(knobs.compilation, name):
            kw[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def _variants_of(launch: _Launch, label: str, target, meta: dict) -> list[Variant]:
    """Every binary a recorded launch can compile: one, or one per autotune config the autotuner keeps."""
    import triton

    real = launch.kernel
    fn = real.fn if isinstance(real, triton.runtime.Autotuner) else real
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1: run the compile check in a process "
                           "that imported triton without it (python -m lazymerge.kernels.aot)")
    names = fn.arg_names
    bound = dict(zip(names, launch.args))
    kwargs = dict(launch.kwargs)
    if isinstance(real, triton.runtime.Autotuner):
        configs = real.configs
        if real.early_config_prune:
            configs = real.early_config_prune(configs, bound, **kwargs)
        cfgs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
        path = "autotune"
    else:
        cfgs = [{}]
        path = "fixed"
    out = []
    for cfg in cfgs:
        kw = dict(kwargs, **cfg)
        full = dict(bound, **{k: v for k, v in kw.items() if k in names})
        sig, consts, attrs, options = _specialize(fn, launch.args, kw, target)
        tile = {k: full[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "BLOCK") if k in full}
        tile.update(num_warps=options["num_warps"], num_stages=options["num_stages"])
        flags = {k: full[k] for k in ("N_SOURCES", "MODE", "KEEP", "CONSENSUS", "NORMALIZE", "DIVIDE") if k in full}
        out.append(Variant(f"{fn.fn.__module__}:{fn.fn.__name__}", sig, consts, attrs, options,
                           label=f"{label} {path} {tile}", meta=dict(meta, tile=tile, flags=flags)))
    return out


# -- which launches ---------------------------------------------------------------------------------------------
def flag_specs(n: int) -> list[MergeSpec]:
    """One MergeSpec of n sources per distinct set of the kernels' constexpr flags: combine (plain, divided), and
    delta x every keep rule of `merge_triton.KEEP_CODES` x consensus x normalize. Tuple fields are filled with
    placeholders of the right length (the compiled code depends on the flags, not on the numbers)."""
    from .merge_triton import KEEP_CODES

    specs = [MergeSpec("combine", coeffs=(0.5,) * n), MergeSpec("combine", coeffs=(0.5,) * n, divisor=2.0)]
    fill = {}
    for f in dataclasses.fields(MergeSpec):
        if f.name == "keys":
            fill[f.name] = ((1, 2),) * n
        elif f.name in ("c_in", "c_out"):
            fill[f.name] = (7,) * n
        elif str(f.type).startswith("tuple") and f.name != "coeffs":
            fill[f.name] = (0.5,) * n
    no_outer = dict(fill, t_out=(math.inf,) * n, c_out=(-1,) * n)  # TIES' top-k alone (KEEP 1; with: KEEP_BAND)
    for keep in KEEP_CODES:
        for f in (fill, no_outer) if keep == "topk" else (fill,):
            for cons in (False, True):
                for norm in (False, True):
                    specs.append(MergeSpec("delta", keep=keep, consensus=cons, normalize=norm, **f))
    return specs


def heaviest_spec(n: int) -> MergeSpec:
    """The spec whose tiles load the most tensors (then: consensus, which keeps the most accumulators)."""
    from .merge_matmul import tile_tensor_bytes
    from .merge_triton import spec_flags

    def weight(s):
        f = spec_flags(s)
        return (len(tile_tensor_bytes(f, 4, 4)), f["CONSENSUS"], f["NORMALIZE"])
    return max(flag_specs(n), key=weight)


def _record(call, autotune: bool) -> _Launch:
    with _recording(autotune):
        try:
            call()
        except _Launch as launch:
            return launch
    raise RuntimeError("the launcher returned without launching a kernel")


def _launches(spec: MergeSpec, x_dtype, w_dtype, paths, ms, with_index=False, outs=None):
    """Recorded launches of both launchers for one spec and dtype pair (meta tensors of a 7B-like 4096 x 4096)."""
    from .merge_matmul import merge_matmul_triton
    from .merge_triton import merge_triton

    n, N, K = spec.n, 4096, 4096
    dev = "meta"
    base = torch.empty((N, K), dtype=w_dtype, device=dev)
    xs = [torch.empty((N, K), dtype=w_dtype, device=dev) for _ in range(n)]
    aux = [torch.empty((N, K), dtype=torch.float32, device=dev) for _ in range(n)]
    index = torch.empty((N, K), dtype=torch.int64, device=dev)
    b = base if spec.mode == "delta" else None
    a = aux if spec.keep == "della" else None
    tag = f"{spec.mode}/{spec.keep}/c{int(spec.consensus)}n{int(spec.normalize)} n={n}"
    out = []
    for autotune in paths:
        for out_dtype in outs or sorted({torch.float32, x_dtype}, key=str):  # into float32 or the compute dtype
            o = torch.empty((N, K), dtype=out_dtype, device=dev)
            for idx in (None, index) if with_index else (None,):  # embedding rows: gathered, with flat indices
                launch = _record(lambda: merge_triton(b, xs, spec, aux=a, index=idx, out=o), autotune)
                out.append((launch, f"merge {tag} w={w_dtype} out={out_dtype}{' index' if idx is not None else ''}"))
        for m in ms:
            x = torch.empty((m, K), dtype=x_dtype, device=dev)
            launch = _record(lambda: merge_matmul_triton(x, b, xs, spec, aux=a), autotune)
            out.append((launch, f"merge_matmul {tag} x={x_dtype} w={w_dtype} M={m}"))
    return out


def variants(tier: str = "quick", arch: int = 90) -> list[Variant]:
    """The distinct binaries of a tier (see the module docstring), deduplicated."""
    from triton.backends.compiler import GPUTarget

    from .merge_matmul import tile_tensor_bytes
    from .merge_triton import MAX_SOURCES, spec_flags

    target = GPUTarget("cuda", arch, 32)
    worst = heaviest_spec(MAX_SOURCES)
    plan = []  # (spec, x dtype, storage dtype, autotune paths, token counts, gathered rows too)
    outs = None  # merge output dtypes: float32 and the compute dtype
    if tier == "quick":
        plan += [(worst, torch.float32, torch.float32, (False,), (1,), False),
                 (worst, torch.bfloat16, torch.bfloat16, (False,), (1,), False)]
        outs = (torch.float32,)
    elif tier in ("worst", "full"):
        pairs = [(d, d) for d in DTYPES.values()] + [(torch.float32, torch.bfloat16)]  # the common ones first
        pairs += [(xd, wd) for xd in DTYPES.values() for wd in DTYPES.values() if (xd, wd) not in pairs]
        for xd, wd in pairs:
            plan.append((worst, xd, wd, (True, False), (1, 64), True))
        if tier == "full":
            for d in (torch.bfloat16, torch.float32):
                for n in (1, MAX_SOURCES):
                    plan += [(s, d, d, (False,), (1,), False) for s in flag_specs(n)]
    else:
        raise ValueError(f"unknown tier {tier!r}; known: quick, worst, full")
    seen, out = set(), []
    for spec, xd, wd, paths, ms, with_index in plan:
        for launch, label in _launches(spec, xd, wd, paths, ms, with_index, outs):
            f = spec_flags(spec)
            meta = dict(x_bytes=xd.itemsize, w_bytes=wd.itemsize, loads=len(tile_tensor_bytes(f, 4, 4)))
            for v in _variants_of(launch, label, target, meta):
                k = v.key()
                if k not in seen:
                    seen.add(k)
                    out.append(v)
    return out


# -- compiling ----------------------------------------------------------------------------------------------------
def tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def missing_tools(arch: int = 90) -> list[str]:
    """Paths of the CUDA tools compiling for `arch` needs that are absent (empty: all there)."""
    from triton.backends.nvidia.compiler import get_ptxas

    need = [get_ptxas(arch).path, os.path.join(tools_dir(), "cuobjdump")]
    return [p for p in need if not (p and os.path.isfile(p) and os.access(p, os.X_OK))]


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        rep = subprocess.run([os.path.join(tools_dir(), "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", rep)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource line:\n{rep}")
    reg, stack, static_shared, local = map(int, m.groups())
    return dict(regs=reg, stack=stack, local=local, static_shared=static_shared)


def compile_variant(v: Variant, arch: int = 90) -> dict:
    """Compile `v` for sm_`arch`; returns v's fields with shared (bytes, Triton's metadata: dynamic shared memory
    per program), regs (per thread), stack (local bytes per thread: spills), seconds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, name = v.kernel.split(":")
    fn = getattr(importlib.import_module(mod), name)
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    t0 = time.perf_counter()
    src = ASTSource(fn, v.signature, v.constexprs, v.attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v.options))
    res = _resources(k.asm["cubin"])
    res.update(shared=int(k.metadata.shared), seconds=round(time.perf_counter() - t0, 2))
    return dict(label=v.label, kernel=v.kernel, options=v.options, meta=v.meta, **res)


def _compile_one(args):
    v, arch = args
    try:
        return compile_variant(v, arch)
    except Exception as e:  # noqa: BLE001  (reported per variant; the checker fails on it)
        return dict(label=v.label, kernel=v.kernel, options=v.options, meta=v.meta, error=f"{type(e).__name__}: {e}")


def compile_all(vs: list[Variant], arch: int = 90, jobs: int = 1, progress=None) -> list[dict]:
    """compile_variant over `vs`, in `jobs` processes; errors are returned as {"error": ...} rows."""
    if jobs <= 1:
        rows = []
        for v in vs:
            rows.append(_compile_one((v, arch)))
            if progress:
                progress(rows[-1])
        return rows
    # fork is cheap (no re-import); after CUDA was initialized only spawn is safe
    method = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method)) as ex:
        rows = []
        for r in ex.map(_compile_one, [(v, arch) for v in vs]):
            rows.append(r)
            if progress:
                progress(r)
        return rows


def warm(calls, autotune: bool = True, arch: int | None = None, jobs: int | None = None) -> list[dict]:
    """Compile in parallel, into Triton's cache, every binary that the launcher calls `calls` would compile: each a
    zero-argument callable running `merge_triton` / `merge_matmul_triton` on meta tensors of the real shapes and
    dtypes. The real launches then find their binaries in the cache instead of compiling them one after another
    (the autotuner compiles its configs serially). `arch`: the current GPU's by default. Returns compile rows."""
    from triton.backends.compiler import GPUTarget

    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    target = GPUTarget("cuda", arch, 32)
    seen, vs = set(), []
    for call in calls:
        for v in _variants_of(_record(call, autotune), "warm", target, {}):
            if v.key() not in seen:
                seen.add(v.key())
                vs.append(v)
    return compile_all(vs, arch, jobs or len(os.sched_getaffinity(0)))


def check(rows: list[dict], limit: int = H200_SHARED_LIMIT, max_stack: int = 0) -> list[str]:
    """Problems of compiled rows: compile errors, shared memory over `limit`, stack (spill) bytes over
    `max_stack`, and fused-kernel shared memory above `merge_matmul.shared_bytes`' estimate."""
    from .merge_matmul import shared_bytes

    bad = []
    for r in rows:
        if "error" in r:
            bad.append(f"{r['label']}: {r['error'][:300]}")
            continue
        if r["shared"] > limit:
            bad.append(f"{r['label']}: {r['shared']} bytes of shared memory > {limit}")
        if r["stack"] > max_stack:
            bad.append(f"{r['label']}: {r['stack']} bytes of stack (spills) per thread > {max_stack}")
        if r["kernel"].endswith("_merge_matmul_kernel") and "tile" in r["meta"] and "x_bytes" in r["meta"]:
            m = r["meta"]
            est = shared_bytes(m["tile"], m["flags"], m["x_bytes"], m["w_bytes"])
            if r["shared"] > est:
                bad.append(f"{r['label']}: {r['shared']} bytes of shared memory > the estimate {est}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tier", default="quick", choices=["quick", "worst", "full"])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--max-stack", type=int, default=int(os.environ.get("LAZYMERGE_AOT_MAX_STACK", "64")),
                    help="spill bound: local (stack) bytes per thread allowed")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--only", help="compile only the kernels whose name contains this (e.g. merge_matmul)")
    ap.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    a = ap.parse_args(argv)
    vs = variants(a.tier, a.arch)
    if a.only:
        vs = [v for v in vs if a.only in v.kernel.split(":")[1]]
    if a.list:
        for v in vs:
            print(v.label)
        print(f"{len(vs)} variants")
        return 0
    miss = missing_tools(a.arch)
    if miss:
        print(f"missing CUDA tools: {miss}")
        return 3
    print(f"compiling {len(vs)} variants for sm_{a.arch} with {a.jobs} jobs", flush=True)

    def progress(r):
        if "error" in r:
            print(f"ERROR {r['label']}: {r['error'][:200]}", flush=True)
        else:
            print(f"{r['shared']:>7} {r['regs']:>4} {r['stack']:>6} {r['seconds']:>7.1f}s  {r['label']}", flush=True)
    print(f"{'shared':>7} {'regs':>4} {'stack':>6} {'time':>8}  variant")
    rows = compile_all(vs, a.arch, a.jobs, progress)
    bad = check(rows, max_stack=a.max_stack)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(tier=a.tier, arch=a.arch, limit=H200_SHARED_LIMIT, max_stack=a.max_stack, rows=rows,
                           problems=bad), f, indent=1, default=str)
    print(f"{len(rows)} binaries, {len(bad)} problems (shared limit {H200_SHARED_LIMIT}, stack bound {a.max_stack})")
    for b in bad:
        print("  " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
