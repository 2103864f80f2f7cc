"""The lazy runtime against transformers' own forward of materialized (exported) checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close
from transformers import AutoModelForCausalLM

from lazymerge.engine import Engine, SamplingParams
from lazymerge.engine.export import export
from lazymerge.kernels import merge_cpu


@pytest.fixture(autouse=True)
def _compile_small_tensors(monkeypatch):
    """The test families' tensors are small; these tests are about the compiled route, which by default such tensors
    never compile (`merge_cpu.COMPILE_FROM`, tested in test_merge_cpu.py)."""
    monkeypatch.setattr(merge_cpu, "COMPILE_FROM", 0)

METHOD_RECIPES = {
    "linear": {"merge_method": "linear", "models": [{"model": "e1", "parameters": {"weight": [0.2, 0.9]}},
                                                    {"model": "e2", "parameters": {"weight": 0.5}}]},
    "slerp": {"merge_method": "slerp", "base_model": "e1", "parameters": {"t": [0.1, 0.9]},
              "models": [{"model": "e1"}, {"model": "e2"}]},
    "passthrough": {"merge_method": "passthrough", "slices": [{"sources": [{"model": "e1", "layer_range": [0, 2]}]},
                                                              {"sources": [{"model": "e2", "layer_range": [1, 3]}]}]},
}
for _m, _extra in (("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}),
                   ("dare_linear", {"density": 0.7}), ("breadcrumbs", {"density": 0.6, "gamma": 0.05}),
                   ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}), ("della", {"density": 0.5}),
                   ("della_linear", {"density": 0.6})):
    METHOD_RECIPES[_m] = {"merge_method": _m, "base_model": "base", "random_seed": 3, "models": [
        {"model": "e1", "parameters": {"weight": 0.8, **_extra}}, {"model": "e2", "parameters": {"weight": 0.5, **_extra}}]}


def load_hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def batch(vocab, B=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize("family", ["mistral", "llama_sharded", "qwen2"])
@pytest.mark.parametrize("method", list(METHOD_RECIPES))
def test_lazy_logits_equal_transformers_on_exported(families, family, method, tmp_path):
    if family != "mistral" and method not in ("ties", "dare_ties", "passthrough"):
        pytest.skip("every method runs on mistral; the other architectures take a representative subset")
    eng = Engine(families[family], policy="on_the_fly")
    model = eng.compile(METHOD_RECIPES[method])
    export(model.plan, tmp_path / "out", merger=eng.merger)
    ref = load_hf(tmp_path / "out")
    ids, mask = batch(ref.config.vocab_size)
    got, want = model.logits(ids, mask), hf_logits(ref, ids, mask)
    m = mask.bool()
    # same float32 weights, same transformers kernels: equal up to float32 rounding of the merge vs the export
    assert_close(got[m], want[m], atol=1e-5, rtol=1e-5, what=f"{family}/{method}")


@pytest.mark.parametrize("policy", ["cached", "on_the_fly"])
@pytest.mark.parametrize("case", ["bf16_sources", "dtype_bfloat16", "out_dtype_float16"])
def test_lazy_logits_equal_a_narrower_export(families, case, policy, tmp_path):
    """A recipe whose output is bfloat16/float16 (bf16 sources, or `dtype`/`out_dtype`): the float32 lazy model
    computes with the merged values rounded to that dtype, so it equals transformers' float32 forward of the export
    (which stores them rounded), not a model the export never was."""
    fam = families["mistral_bf16" if case == "bf16_sources" else "mistral"]
    recipe = dict(METHOD_RECIPES["ties"])
    if case == "dtype_bfloat16":
        recipe["dtype"] = "bfloat16"
    if case == "out_dtype_float16":
        recipe["out_dtype"] = "float16"
    eng = Engine(fam, policy=policy)
    model = eng.compile(recipe)
    assert model.plan.dtype == {"bf16_sources": "bfloat16", "dtype_bfloat16": "bfloat16",
                                "out_dtype_float16": "float16"}[case]
    export(model.plan, tmp_path / "out", merger=eng.merger)
    ref = load_hf(tmp_path / "out")
    ids, mask = batch(ref.config.vocab_size)
    got, want = model.logits(ids, mask), hf_logits(ref, ids, mask)
    m = mask.bool()
    assert_close(got[m], want[m], atol=1e-5, rtol=1e-5, what=case)


def test_all_weight_on_one_source_gives_exactly_its_logits(fam):
    eng = Engine(fam)
    model = eng.compile({"merge_method": "linear", "models": [{"model": "e1", "parameters": {"weight": 1.0}},
                                                              {"model": "e2", "parameters": {"weight": 0.0}}]})
    ref = load_hf(fam["e1"])
    ids, mask = batch(ref.config.vocab_size)
    assert torch.equal(model.logits(ids, mask)[mask.bool()], hf_logits(ref, ids, mask)[mask.bool()])


def test_layer_path_equals_hand_built_deeper_model(fam):
    hops = [("e1", 0, 1.0), ("e2", 1, 0.7), ("e1", 1, 1.3), ("e1", 1, 1.0), ("e2", 2, 0.9), ("e1", 2, 1.0)]
    eng = Engine(fam)
    model = eng.compile({"merge_method": "path", "base_model": "e1",
                         "path": [{"model": m, "layer": layer, "scale": s} for m, layer, s in hops]})
    src = {k: load_hf(fam[k]) for k in ("e1", "e2")}
    deep_cfg = copy.deepcopy(src["e1"].config)
    deep_cfg.num_hidden_layers = len(hops)
    deep = AutoModelForCausalLM.from_config(deep_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        deep.model.embed_tokens.weight.copy_(src["e1"].model.embed_tokens.weight)
        deep.model.norm.weight.copy_(src["e1"].model.norm.weight)
        deep.lm_head.weight.copy_(src["e1"].lm_head.weight)
        for i, (m, layer, _) in enumerate(hops):
            deep.model.layers[i].load_state_dict(src[m].model.layers[layer].state_dict())
    ids = torch.randint(4, deep_cfg.vocab_size, (2, 9))
    # hand-built forward: the hidden state entering hop i is multiplied by its scale
    with torch.no_grad():
        inner = deep.model
        h = inner.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        pe = inner.rotary_emb(h, position_ids=pos)
        for i, (_, _, s) in enumerate(hops):
            # attention_mask=None: transformers' SDPA attention is then causal
            h = inner.layers[i](h * s, attention_mask=None, position_ids=pos, position_embeddings=pe)
        want = deep.lm_head(inner.norm(h))
    assert_close(model.logits(ids), want, atol=1e-5, rtol=1e-5, what="path")


def test_path_hops_keep_their_own_kv_cache_slots(fam):
    """Generation with the KV cache equals recomputing the whole sequence each step, with a layer used twice."""
    eng = Engine(fam)
    model = eng.compile({"merge_method": "path", "base_model": "e1", "path": [
        {"model": "e1", "layer": 0}, {"model": "e1", "layer": 1}, {"model": "e1", "layer": 1, "scale": 0.8},
        {"model": "e2", "layer": 2}]})
    prompt = model.encode("the cat sees the big dog and")
    got = model.generate([prompt], max_tokens=8)[0].token_ids
    seq = list(prompt)
    for _ in range(len(got)):
        seq.append(int(model.logits(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear"])
def test_greedy_generation_equals_transformers_generate(fam, tmp_path, method):
    eng = Engine(fam)
    model = eng.compile(METHOD_RECIPES[method])
    export(model.plan, tmp_path / "out", merger=eng.merger)
    ref = load_hf(tmp_path / "out")
    prompts = ["the cat sees", "one plus two is", "hello world and the big red"]
    ours = model.generate(prompts, max_tokens=10)
    for p, o in zip(prompts, ours):
        enc = model.tokenizer([p], return_tensors="pt")
        g = ref.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=model.pad_id)[0].tolist()
        new = g[enc["input_ids"].shape[1]:]
        if model.tokenizer.eos_token_id in new:
            new = new[: new.index(model.tokenizer.eos_token_id)]
        assert o.token_ids == new


def test_batched_generation_equals_one_by_one(fam):
    model = Engine(fam).compile(METHOD_RECIPES["ties"])
    prompts = ["the cat", "one plus two is the big", "hello"]
    together = model.generate(prompts, max_tokens=7)
    alone = [model.generate([p], max_tokens=7)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


@pytest.mark.parametrize("recipe", ["ties", "path"])
def test_finished_rows_leave_the_batch(fam, monkeypatch, recipe):
    """Rows that finish early are dropped from the batch (KV cache and mask shrink); every row's tokens are still
    those it gets alone, through repeated layers' cache slots too."""
    from lazymerge.engine import api
    from lazymerge.engine.generate import SamplingParams

    rec = METHOD_RECIPES["ties"] if recipe == "ties" else {"merge_method": "path", "base_model": "e1", "path": [
        {"model": "e1", "layer": 0}, {"model": "e1", "layer": 1}, {"model": "e1", "layer": 1, "scale": 0.8},
        {"model": "e2", "layer": 2}]}
    model = Engine(fam).compile(rec)
    prompts = ["the cat", "one plus two is the big", "hello", "the big red dog sees"]
    params = [SamplingParams(max_tokens=k) for k in (1, 9, 2, 5)]
    sizes = []
    select = api._Session.select
    monkeypatch.setattr(api._Session, "select", lambda self, rows: (sizes.append(len(rows)), select(self, rows)))
    together = model.generate(prompts, params)
    alone = [model.generate([p], p_)[0] for p, p_ in zip(prompts, params)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [len(c.token_ids) for c in together] == [1, 9, 2, 5]  # no EOS in this family's greedy outputs
    assert sizes and sizes[-1] == 1, sizes  # the last steps ran the longest row alone


def test_cached_and_on_the_fly_give_identical_outputs(fam):
    outs = []
    for policy in ("cached", "on_the_fly"):
        eng = Engine(fam, policy=policy)
        model = eng.compile(METHOD_RECIPES["dare_ties"])
        ids, mask = batch(60)
        outs.append((model.logits(ids, mask), model.generate(["the cat sees"], max_tokens=6)[0].token_ids))
        if policy == "cached":
            assert eng.stats()["cache_entries"] > 0
        else:
            assert eng.stats()["cache_bytes"] == 0
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]


def test_della_sorts_each_row_once_per_merge(fam, monkeypatch):
    """DELLA's L1 rescale pass and its merge pass need the same per-row ranks: on the CPU's fused path a tensor's
    ranks computed for the first (as int16) are handed to the second (engine/merger.py SHARED_RANKS_BYTES): half the
    sorts, the same logits."""
    import lazymerge.engine.merger as merger_mod
    import lazymerge.kernels.merge as merge_mod
    import lazymerge.kernels.merge_cpu as merge_cpu_mod

    calls = []

    def counting(fn):
        def f(a2):
            calls.append(a2.shape)
            return fn(a2)
        return f

    for mod in (merger_mod, merge_mod, merge_cpu_mod):
        monkeypatch.setattr(mod, "row_ranks", counting(merge_mod.row_ranks))
    monkeypatch.setattr(merger_mod, "row_rank_ints", counting(merge_mod.row_rank_ints))
    ids, mask = batch(60)
    out = {}
    for shared in (64 << 20, 0):
        monkeypatch.setattr(merger_mod, "SHARED_RANKS_BYTES", shared)
        calls.clear()
        out[shared] = Engine(fam, policy="cached", cpu_fused=True).compile(METHOD_RECIPES["della"]).logits(ids, mask)
        out[shared, "calls"] = len(calls)
    assert torch.equal(out[64 << 20], out[0])
    assert 0 < 2 * out[64 << 20, "calls"] <= out[0, "calls"]  # the merge pass sorts nothing (here: 60 vs 240)


@pytest.mark.parametrize("cpu_fused", [True, False])
@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_l1_rescale_keeps_the_first_norm_across_recipes(fam, method, cpu_fused, monkeypatch):
    """The L1 rescale's sum |delta| does not depend on the recipe's numbers: the merger keeps it per (source, tensor),
    and a later recipe's pass sums only the kept part. A second recipe whose densities all changed gives, on the fused
    and on the reference route, the logits of an engine that computes both norms afresh, and no pass of the second
    recipe sums |delta| again."""
    import lazymerge.engine.merger as merger_mod

    calls = []
    # every route: the reference, the Inductor loop, the C loop (which runs first where it takes the spec)
    for owner, name in ((merger_mod, "l1_sums"), (merger_mod.merge_cpu, "l1_sums_fused"),
                        (merger_mod.merge_native, "l1_sums_native")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, before=None, _r=real, **k: (
            calls.append(before) or _r(*a, before=before, **k)))
    first = METHOD_RECIPES[method]
    second = copy.deepcopy(first)
    for m in second["models"]:
        m["parameters"]["density"] = round(1.2 - m["parameters"]["density"], 3)
    ids, mask = batch(60)
    eng = Engine(fam, policy="cached", cpu_fused=cpu_fused)
    eng.compile(first).logits(ids, mask)
    assert calls and all(c is None for c in calls)  # the first recipe sums both norms
    calls.clear()
    got = eng.compile(second).logits(ids, mask)
    assert calls and all(c is not None for c in calls), "the second recipe summed |delta| again"
    fresh = Engine(fam, policy="cached", cpu_fused=cpu_fused).compile(second).logits(ids, mask)
    assert torch.equal(got, fresh)


def test_cache_never_serves_another_recipes_weights(fam):
    eng = Engine(fam, policy="cached", cache_bytes=64 << 20)
    a = {"merge_method": "ties", "base_model": "base", "models": [{"model": "e1", "parameters": {"weight": 0.8, "density": 0.5}}]}
    b = copy.deepcopy(a)
    b["models"][0]["parameters"]["density"] = 0.6  # differs only in one number
    ids, mask = batch(60)
    la = eng.compile(a).logits(ids, mask)
    lb = eng.compile(b).logits(ids, mask)
    assert not torch.equal(la, lb)
    # recompute each from scratch with a fresh engine: the shared cache changed nothing
    assert torch.equal(la, Engine(fam, policy="on_the_fly").compile(a).logits(ids, mask))
    assert torch.equal(lb, Engine(fam, policy="on_the_fly").compile(b).logits(ids, mask))
    # the same content under other source names hits the same entries (content, not names, is the key)
    eng2 = Engine({"B": fam["base"], "X": fam["e1"]}, policy="cached")
    a2 = copy.deepcopy(a)
    a2["base_model"], a2["models"][0]["model"] = "B", "X"
    assert eng2.compile(a2).plan.digest() == eng.compile(a).plan.digest()


def test_cache_respects_budget(fam):
    eng = Engine(fam, policy="cached", cache_bytes=20_000)
    eng.compile(METHOD_RECIPES["ties"]).logits(*batch(60))
    assert 0 < eng.stats()["cache_bytes"] <= 20_000


def test_sampling_is_seeded_and_stops(fam):
    model = Engine(fam).compile(METHOD_RECIPES["linear"])
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    a = model.generate(["the cat"], p)[0]
    b = model.generate(["the cat"], p)[0]
    c = model.generate(["the cat"], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=43))[0]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert a.finish_reason == "length" and len(a.token_ids) == 12
    word = a.text.split()[2]
    s = model.generate(["the cat"], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, stop=(word,)))[0]
    assert s.finish_reason == "stop" and word not in s.text and a.text.startswith(s.text)


def test_streamed_text_equals_final_text(fam):
    model = Engine(fam).compile(METHOD_RECIPES["ties"])
    p = SamplingParams(max_tokens=10, stop=("zzz", "dog cat"))
    streamed = "".join(d.text for step in model.stream(["the cat", "one two"], [p, p]) for d in step if d.row == 0)
    assert streamed == model.generate(["the cat"], p)[0].text


def test_loglikelihood_and_token_logprobs(fam):
    model = Engine(fam).compile(METHOD_RECIPES["ties"])
    tokens, lps = model.token_logprobs("the cat sees the dog")
    assert tokens == ["the", "cat", "sees", "the", "dog"] and lps[0] is None
    assert model.token_logprobs("") == ([], [])  # no token (no BOS here): nothing to run, nothing to score
    ids = model.encode("the cat sees the dog")
    full = torch.log_softmax(model.logits(torch.tensor([ids]))[0], -1)
    for i in range(1, len(ids)):
        assert abs(lps[i] - float(full[i - 1, ids[i]])) < 1e-5
    (ll, greedy), (ll2, greedy2) = model.loglikelihood([("the cat sees", " the dog"), ("the cat", " sees the dog")])
    assert abs(ll - sum(lps[3:])) < 1e-4 and abs(ll2 - sum(lps[2:])) < 1e-4
    argmax = [int(full[i - 1].argmax()) == ids[i] for i in range(1, len(ids))]
    assert greedy == all(argmax[2:]) and greedy2 == all(argmax[1:])
    # a continuation made of the model's own greedy tokens is greedy
    g = model.generate(["the cat"], max_tokens=3)[0]
    assert model.loglikelihood([("the cat", " " + g.text)])[0][1] is True


def test_chat_template_from_tokenizer(fam):
    model = Engine(fam).compile(METHOD_RECIPES["ties"])
    ids = model.chat_prompt([{"role": "user", "content": "hello world"}])
    assert model.tokenizer.decode(ids) == "user : hello world </s> assistant :"


def test_row_lookups_read_only_their_rows(fam, monkeypatch):
    """An embedding lookup reads the block of rows it spans, and returns exactly the rows of the whole tensor."""
    import torch

    from lazymerge.engine.merger import TensorStore
    from lazymerge.engine.plan import SourceSet, TensorRef

    S = SourceSet.open({"base": fam["base"]})
    store = TensorStore(S)
    name = S["base"].embed_name
    full = S["base"].get(name)
    sizes = []
    reader = S["base"]._readers.files[S["base"].tensors[name].file]
    real = reader.read
    monkeypatch.setattr(reader, "read", lambda s, e, *a: (sizes.append(e - s), real(s, e, *a))[1])
    rows = torch.tensor([7, 3, 7, 12])
    got = store.rows(TensorRef("base", name), rows)
    assert torch.equal(got, full[rows])
    assert sizes == [(12 - 3 + 1) * full.shape[1] * full.element_size()]
    # a resident store past its bound reads rows as well; one with room reads the whole tensor once, then nothing
    sizes.clear()
    assert torch.equal(TensorStore(S, resident_limit=1).rows(TensorRef("base", name), rows), full[rows])
    assert sizes == [(12 - 3 + 1) * full.shape[1] * full.element_size()]
    sizes.clear()
    roomy = TensorStore(S, resident_limit=1 << 30)
    for _ in range(2):
        assert torch.equal(roomy.rows(TensorRef("base", name), rows), full[rows])
    assert sizes == [full.numel() * full.element_size()]


def test_on_the_fly_sources_stay_resident_within_their_bound(fam, monkeypatch):
    """Under on_the_fly on the CPU, source tensors read once stay in memory (engine/resident.py): a second forward reads
    no file, gives the same logits as reading every use, and the resident bytes never pass the bound."""
    import torch

    from lazymerge.engine import Engine
    from lazymerge.engine.reader import FileReader

    reads = []
    real = FileReader.read
    monkeypatch.setattr(FileReader, "read", lambda self, *a: (reads.append(a[1] - a[0]), real(self, *a))[1])
    ids = torch.tensor([[5, 9, 2]])
    mask = torch.ones_like(ids)

    def logits(eng):
        m = eng.compile(METHOD_RECIPES["ties"])
        return [m._forward(ids, mask, mask.cumsum(-1) - 1, last_only=True) for _ in range(2)]

    streamed = Engine(fam, policy="on_the_fly", resident_bytes=0)
    assert not streamed.merger.store.resident_bytes()
    want = logits(streamed)
    eng = Engine(fam, policy="on_the_fly")
    assert eng.merger.store.resident_limit > 0 and Engine(fam, policy="cached").merger.store.resident_limit == 0
    reads.clear()
    first = logits(eng)[0]
    n_first = len(reads)
    reads.clear()
    again = eng.compile(METHOD_RECIPES["ties"])._forward(ids, mask, mask.cumsum(-1) - 1, last_only=True)
    assert n_first > 0 and reads == []  # every source tensor was already in memory
    assert torch.equal(first, want[0]) and torch.equal(again, want[1])
    total = eng.merger.store.resident_bytes()
    small = Engine(fam, policy="on_the_fly", resident_bytes=total // 3)
    got = logits(small)
    assert 0 < small.merger.store.resident_bytes() <= total // 3  # the rest is read at each use, as before
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_cache_makes_room_before_a_weight_is_formed():
    """`LRU.reserve` evicts least recently used entries until the coming bytes fit: a cached weight being replaced is
    freed before its successor is merged (the search's peak memory: sources + cache budget, not budget + a tensor)."""
    from lazymerge.engine.merger import LRU

    c = LRU(10, lambda v: v)
    for k in "abc":
        c.put(k, 3)
    c.get("a")  # b is now the least recently used
    c.reserve(4)
    assert list(c.data) == ["c", "a"] and c.bytes == 6
    c.reserve(100)  # more than the budget: everything goes (the put then declines to keep it)
    assert not c.data and c.bytes == 0


def test_a_search_candidate_frees_the_previous_ones_weights_first(fam, monkeypatch):
    """`prefetch` (search/evaluate.py) evicts every cached weight the new candidate does not use before merging it,
    even when the budget would hold both: a search's cache holds one candidate, not 1.3 (measured: its peak RSS grew
    with every candidate). Weights the new candidate shares (here the base's own tensors) stay."""
    from lazymerge.engine import alloc
    from lazymerge.search.evaluate import prefetch

    released = []
    monkeypatch.setattr(alloc, "release", lambda: released.append(1) or True)
    eng = Engine(fam, policy="cached", cache_bytes=1 << 30)
    a = copy.deepcopy(METHOD_RECIPES["ties"])
    b = copy.deepcopy(a)
    for m in b["models"]:  # the MLPs change, the rest of the plan stays as it was
        m["parameters"]["weight"] = [{"filter": "mlp", "value": 0.3}, {"value": m["parameters"]["weight"]}]
    ma, mb = eng.compile(a), eng.compile(b)
    prefetch(eng, ma)
    keys_a = set(eng.provider.cache.data)
    ptrs_a = {k: t.data_ptr() for k, t in eng.provider.cache.data.items()}
    assert not released  # nothing was evicted
    prefetch(eng, mb)
    assert not released  # every evicted weight was reused: nothing freed, the heap left as it is
    keys_b = set(eng.provider.cache.data)
    wanted = {(tp.key, eng.provider.dtype) for tp in mb.plan.tensors.values()}
    assert keys_b <= wanted and keys_a - wanted and not (keys_a - wanted) & keys_b
    assert keys_a & keys_b  # tensors both candidates use (not re-merged)
    # b's new weights were merged into the memory of a's evicted ones (same shapes: the MLPs), none newly allocated
    new_ptrs = {eng.provider.cache.data[k].data_ptr() for k in keys_b - keys_a}
    assert new_ptrs and new_ptrs <= {ptrs_a[k] for k in keys_a - keys_b}
    assert not eng.provider._spares  # what no merge took was freed
    assert eng.provider.cache.bytes == sum(t.nbytes for t in eng.provider.cache.data.values())
    ids, mask = batch(60)
    assert torch.equal(mb.logits(ids, mask), Engine(fam, policy="on_the_fly").compile(b).logits(ids, mask))
    # a candidate that merges nothing (layers taken as they are): b's weights are freed, their pages handed back
    prefetch(eng, eng.compile(METHOD_RECIPES["passthrough"]))
    assert released and not eng.provider._spares
    assert not keys_b & set(eng.provider.cache.data)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_magnitude_cuts_on_the_fused_path_equal_the_reference(families, method, monkeypatch):
    """The CPU's default route of a TIES / breadcrumbs cut (kernels/select.py with merge_cpu.bucket_blocks: the
    cut's bucket collected by a compiled pass) gives the eager reference's logits bit for bit. The toy's tensors are
    small, so the small-tensor sort is switched off and nothing of a bucket is kept (the tie pass runs too)."""
    import lazymerge.kernels.merge_cpu as merge_cpu_mod
    from lazymerge.kernels import select

    fam = families["mistral_bf16"]
    monkeypatch.setattr(select, "SMALL_SORT", 0)
    monkeypatch.setattr(select, "COLLECT_MAX", 0)
    monkeypatch.setattr(select, "TABLE_MAX", 0)  # no value tables: the histogram route (the next test has them)
    calls = []
    real = merge_cpu_mod.bucket_blocks
    monkeypatch.setattr(merge_cpu_mod, "bucket_blocks", lambda *a: calls.append(a[3]) or real(*a))
    ids, mask = batch(60)
    fused = Engine(fam, policy="cached", cpu_fused=True).compile(METHOD_RECIPES[method]).logits(ids, mask)
    assert 16 in calls and 0 in calls, "the compiled bucket pass and its tie pass ran"
    ref = Engine(fam, policy="cached", cpu_fused=False).compile(METHOD_RECIPES[method]).logits(ids, mask)
    assert torch.equal(fused, ref)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_magnitude_cuts_from_value_tables_equal_the_reference(families, method, monkeypatch):
    """The CPU's route for bf16 sources: each (source, tensor)'s exact |delta| table is kept (`select.value_table`)
    and every cut is read from it, the tie index counted by the compiled mask from either end (`merge_cpu.nth_equal`):
    the logits of the eager reference cutting each tensor from one sort (no table), bit for bit, for a first recipe
    and for a second whose densities all changed."""
    import lazymerge.kernels.merge_cpu as merge_cpu_mod
    from lazymerge.engine import merger as merger_mod
    from lazymerge.kernels import select

    fam = families["mistral_bf16"]
    monkeypatch.setattr(merger_mod, "KEEP_HISTOGRAM_FROM", 1)  # the toy's tensors are small: keep every table
    monkeypatch.setattr(merge_cpu_mod, "NTH_BLOCK", 97)
    calls = []
    real = merge_cpu_mod.nth_equal
    monkeypatch.setattr(merge_cpu_mod, "nth_equal", lambda *a: calls.append(real(*a)) or calls[-1])
    ids, mask = batch(60)
    eng = Engine(fam, policy="cached", cpu_fused=True)
    ref_eng = Engine(fam, policy="cached", cpu_fused=False)
    first = METHOD_RECIPES[method]
    second = copy.deepcopy(first)
    for m in second["models"]:
        if "parameters" in m and "density" in m["parameters"]:
            m["parameters"]["density"] = round(1.1 - m["parameters"]["density"], 3)
    assert second != first
    small_sort = select.SMALL_SORT
    for rec in (first, second):
        calls.clear()
        monkeypatch.setattr(select, "SMALL_SORT", 0)
        fused = eng.compile(rec).logits(ids, mask)
        assert any(c is not None for c in calls), "tie indices came from the compiled count"
        monkeypatch.setattr(select, "SMALL_SORT", small_sort)  # the reference: one sort per tensor, no table
        assert torch.equal(fused, ref_eng.compile(rec).logits(ids, mask))
    kept = [v for k, v in eng.merger.stats.data.items() if k[0] == "top"]
    assert kept and all(isinstance(v, tuple) for v in kept), "every kept cut statistic is a value table"
