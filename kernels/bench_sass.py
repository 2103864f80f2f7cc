"""Instructions per merged element of the elementwise merge kernel, read off its sm_90 machine code without a GPU.

    python -m lazymerge.kernels.bench_sass [--json out.json] [--methods ties dare_ties ...]

For each method (base + 3 bf16 sources, bf16 out, the fixed config: BLOCK 2048 on 8 warps, so 8 elements a thread)
the kernel is compiled for sm_90 with Triton's bundled ptxas (`kernels/aot.py`), disassembled with its cuobjdump,
and the static instructions of the whole kernel are counted by opcode. On the H200 the TIES and DARE-TIES merges
are bound by instructions, not bytes (BENCHMARKS.md "GPU, first run": 27-37% of the copy bandwidth), so this count
is what a change to `_merge_tile` can be judged by before a GPU is lent: fewer instructions per element, less time,
until the memory floor (task arithmetic, 96-97% of copy, is the reference point). Static counts, not a timing.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import tempfile

METHODS = ["task_arithmetic", "ties", "breadcrumbs", "dare_ties"]
ELEMENTS_PER_THREAD = 8  # BLOCK 2048 / (8 warps x 32 lanes)


def spec_of(method: str, n: int = 3):
    """A MergeSpec of `method` over n sources (the numbers are placeholders: the code depends on the flags)."""
    from .merge import MergeSpec
    from .rng import mask_keys

    w = tuple(1.0 / n for _ in range(n))
    ones = (1.0,) * n
    if method == "task_arithmetic":
        return MergeSpec("delta", weights=w, scales=ones)
    if method in ("ties", "breadcrumbs"):
        t_out = (math.inf,) * n if method == "ties" else (0.9,) * n
        return MergeSpec("delta", keep="topk", t_in=(0.1,) * n, c_in=(5,) * n, t_out=t_out, c_out=(7,) * n,
                         scales=ones, weights=w, consensus=method == "ties", normalize=True)
    if method == "dare_ties":
        keys = tuple(mask_keys(0, "t", i) for i in range(n))
        return MergeSpec("delta", keep="random", densities=(0.5,) * n, keys=keys, scales=(2.0,) * n, weights=w,
                         consensus=True, normalize=True)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def count(method: str) -> dict:
    """{'total': instructions, 'per_element': total / 8, 'ops': {opcode: count}} of `method`'s merge kernel."""
    return dict(count_spec(spec_of(method)), method=method)


def count_spec(spec) -> dict:
    """`count` of the merge kernel a MergeSpec compiles to (bf16 in and out, the fixed config, sm_90)."""
    import importlib

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import aot

    target = GPUTarget("cuda", 90, 32)
    launch, label = aot._launches(spec, torch.bfloat16, torch.bfloat16, paths=(False,), ms=(),
                                  outs=[torch.bfloat16])[0]
    v = aot._variants_of(launch, label, target, {})[0]
    mod, name = v.kernel.split(":")
    fn = getattr(importlib.import_module(mod), name)
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    k = triton.compile(ASTSource(fn, v.signature, v.constexprs, v.attrs), target=target, options=dict(v.options))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(aot.tools_dir(), "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    by_op = collections.Counter(o.split(".")[0] for o in ops)
    return dict(label=label, total=len(ops), per_element=len(ops) / ELEMENTS_PER_THREAD,
                ops=dict(by_op.most_common()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the counts here")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = ap.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"
    from . import aot

    missing = aot.missing_tools(90)
    if missing:
        print(f"bench_sass: Triton's CUDA tools are missing ({', '.join(missing)}); nothing to count")
        return 0
    rows = [count(m) for m in args.methods]
    print(f"{'method':<17}{'instructions':>13}{'per element':>13}  top opcodes")
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in list(r["ops"].items())[:6])
        print(f"{r['method']:<17}{r['total']:>13}{r['per_element']:>13.1f}  {top}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
