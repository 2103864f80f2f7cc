"""engine/alloc.py: with the allocator tuned (the default on glibc), an on-the-fly forward's transient tensors (pread
copies of sources read at every use, `resident_bytes=0`; the merged weight) reuse freed heap memory; untuned, glibc
hands them back to the OS and every forward faults fresh zeroed pages in again (measured: 202k page faults and 2.2x
the time per 1-token forward of an 8-layer, hidden-1024 TIES merge; BENCHMARKS.md). The test merges DARE-TIES: a
TIES engine's first cut (`select.value_table`'s attempt on these float32 sources) frees transients large enough to
raise glibc's dynamic mmap threshold, after which untuned glibc happens to stop faulting too, leaving no contrast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CODE = """
import json, resource, sys, torch
torch.set_num_threads(1)
from lazymerge.engine import Engine, alloc
paths = json.loads(sys.argv[1])
m = Engine(paths, policy="on_the_fly", cpu_fused=False, resident_bytes=0).compile({"merge_method": "dare_ties", "base_model": "base",
    "models": [{"model": "e1", "parameters": {"weight": 0.7, "density": 0.5}},
               {"model": "e2", "parameters": {"weight": 0.5, "density": 0.4}}]})
ids = torch.tensor([[5]]); mask = torch.ones_like(ids); pos = mask.cumsum(-1) - 1
for _ in range(5):  # warm: the first forwards fault in whatever the heap needs
    m._forward(ids, mask, pos, last_only=True)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    m._forward(ids, mask, pos, last_only=True)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 8
print(json.dumps({"tuned": alloc.tune(), "faults_per_forward": faults}))
"""


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """Layers of a few MB each (above glibc's 128 KiB mmap threshold, below the tuned 32 MiB)."""
    from lazymerge.engine import toy

    fam = toy.make_family(tmp_path_factory.mktemp("alloc"), "mistral", 2, seed=0, hidden=512, layers=2, heads=8,
                          kv_heads=4, intermediate=1408)
    return {k: str(v) for k, v in fam.items()}


def _run(paths: dict, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env.pop("LAZYMERGE_MALLOC_TUNE", None)
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", CODE, json.dumps(paths)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# Untuned: glibc's initial mmap threshold (128 KiB) held fixed, its trim threshold as the tuned one's. Left alone,
# glibc raises its mmap threshold to the size of a freed mapped block, and whether that happens early depends on the
# order of earlier frees: once the on-the-fly merged weights went into reused buffers (engine/weights.py), one CI run
# saw untuned glibc stop faulting after its warm-up (4.5 faults a forward) while other runs fault 7,000-15,000 times.
GLIBC_DEFAULTS = {"LAZYMERGE_MALLOC_TUNE": "0", "MALLOC_MMAP_THRESHOLD_": str(128 << 10),
                  "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def test_tuned_allocator_stops_page_faults_on_the_hot_path(medium):
    tuned, untuned = _run(medium, {}), _run(medium, GLIBC_DEFAULTS)
    if not tuned["tuned"]:
        pytest.skip("not glibc: engine/alloc.py does nothing here")
    assert untuned["tuned"] is False
    assert untuned["faults_per_forward"] > 1000, untuned  # ~5 MB of sources + weights per layer, faulted each time
    # tuned: ~0 faults alone; once in a full suite run a late heap extension gave 380 against 6507 untuned (17x)
    assert tuned["faults_per_forward"] < untuned["faults_per_forward"] / 10, (tuned, untuned)


def test_an_environment_that_tunes_glibc_itself_is_left_alone():
    """glibc's own settings in the environment (or LAZYMERGE_MALLOC_TUNE=0) keep `tune` from calling mallopt; a
    plain environment lets it (where glibc is)."""
    code = "from lazymerge.engine import alloc; print(int(alloc.tune()))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env.pop("LAZYMERGE_MALLOC_TUNE", None)
    got = {}
    for name, extra in (("plain", {}), ("glibc", {"MALLOC_TRIM_THRESHOLD_": "1000000"}),
                        ("tunables", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}),
                        ("off", {"LAZYMERGE_MALLOC_TUNE": "0"})):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**env, **extra})
        assert r.returncode == 0, r.stderr[-2000:]
        got[name] = r.stdout.strip().splitlines()[-1]
    if got["plain"] == "0":
        pytest.skip("not glibc: engine/alloc.py does nothing here")
    assert got == {"plain": "1", "glibc": "0", "tunables": "0", "off": "0"}, got


RELEASE = """
import json, sys, torch
from lazymerge.engine import alloc
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
big, pins = [], []
for _ in range(24):  # 8 MiB blocks from the heap (the environment's thresholds), each followed by a small live block
    t = torch.empty(2 << 20)
    t.fill_(1.0)
    big.append(t)
    pins.append(torch.ones(50_000))
before = rss()
big.clear()  # freed, but not at the heap's top: glibc keeps them
kept = rss()
released = alloc.release()
print(json.dumps({"before": before, "kept": kept, "after": rss(), "released": released}))
"""


def test_release_hands_freed_heap_blocks_back():
    """`alloc.release` (a search's candidate change, engine/weights.py `retain`): the pages of freed heap blocks that
    glibc keeps (blocks between live allocations) go back to the OS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env.update(MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 30))
    r = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    if not got["released"]:
        pytest.skip("not glibc: engine/alloc.py does nothing here")
    freed = 24 * (8 << 20)
    assert got["before"] - got["kept"] < freed / 4, got  # glibc kept the freed blocks' pages
    assert got["kept"] - got["after"] > freed * 3 / 4, got  # release gave them back
