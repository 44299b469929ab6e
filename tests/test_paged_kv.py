"""The engine's paged KV cache: blocks follow the actual lengths, cached prefixes are shared by reference,
and a pool too small for every request preempts and resumes without changing a token."""

import pytest

from llmkit.infer import kernels as cpu_kernels
from llmkit.infer.engine import Engine, RequestParams
from llmkit.infer.generate import stream_tokens
from llmkit.infer.kv_blocks import BlockPool, PrefixCache

# the same models and prompts as tests/test_engine.py (random weights whose greedy continuations vary)
from test_engine import FAMILIES, GREEDY, make_model, prompts  # noqa: E402

# the fused C layer (llama, kernels on), the kernels per Linear (gpt2, kernels on) and plain PyTorch
PATHS = [(f, k) for f in sorted(FAMILIES) for k in (True, False) if cpu_kernels.available() or not k]


def blocks_for(n_tokens: int, block: int) -> int:
    return -(-n_tokens // block)


def test_block_pool_counts_references():
    pool = BlockPool(n_layer=2, num_blocks=3, kv_heads=1, block_size=4, head_dim=2)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert sorted((a, b, c)) == [0, 1, 2] and pool.allocate() is None and pool.in_use == 3
    pool.retain(a)
    pool.release(a)
    assert pool.num_free == 0  # still referenced once
    pool.release(a)
    assert pool.num_free == 1 and pool.allocate() == a
    pool.release(b)
    with pytest.raises(RuntimeError, match="already free"):
        pool.release(b)
    with pytest.raises(RuntimeError, match="is free"):
        pool.retain(b)
    assert pool.peak_in_use == 3
    assert pool.block_bytes == 2 * 2 * 1 * 4 * 2 * 4  # k and v, 2 layers, fp32


def test_prefix_cache_gives_back_only_blocks_nobody_else_holds():
    pool = BlockPool(1, 4, 1, 2, 1)
    cache = PrefixCache(max_tokens=8, block_size=2, pool=pool)
    held = [pool.allocate() for _ in range(3)]  # a request's table
    cache.insert(cache.chain([1, 2, 3, 4, 5, 6], 3), lambda j: held[j])
    assert [pool.refs[b] for b in held] == [2, 2, 2]
    pool.release(held[2])  # the request let go of its last block only
    assert cache.reclaimable() == 1
    cache.reclaim(2)
    assert pool.num_free == 2 and len(cache.blocks) == 2  # one entry given back; the shared ones stay
    assert cache.lookup(cache.chain([1, 2, 3, 4, 5, 6], 3)) == held[:2]


@pytest.mark.parametrize("family, kernels", PATHS)
def test_a_small_pool_preempts_and_keeps_every_greedy_token(family, kernels):
    model = make_model(family)
    ps = prompts((5, 17, 30, 9, 40, 3, 25, 12))
    want = [list(stream_tokens(model, p, GREEDY)) for p in ps]
    assert min(len(set(w)) for w in want) >= 4  # continuations that depend on the context
    # 96 positions for 8 requests that need 237 together: they queue, grow, and the newest are preempted
    eng = Engine(model, max_batch=8, kv_cache_tokens=96, prefix_block=8, prefix_cache_tokens=0, kernels=kernels)
    assert eng.generate(ps, GREEDY) == want
    st = eng.stats()
    assert st["preemptions"] > 0 and st["kv_blocks"] == 12 and st["kv_blocks_peak"] <= 12
    assert st["kv_blocks_in_use"] == 0  # every block came back


def test_preempted_sampling_requests_draw_the_same_tokens_as_unpreempted_ones():
    model = make_model("llama_gqa")
    ps = prompts((20, 33, 8, 27), seed=4)
    params = [RequestParams(max_new_tokens=20, temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=s,
                            stop_at_eos=False) for s in range(4)]
    roomy = Engine(model, max_batch=4, prefix_cache_tokens=0).generate(ps, params)
    tight = Engine(model, max_batch=4, kv_cache_tokens=64, prefix_block=8, prefix_cache_tokens=32)
    assert tight.generate(ps, params) == roomy
    assert tight.stats()["preemptions"] > 0


def test_shared_prefix_blocks_are_referenced_not_copied():
    model = make_model("llama_gqa")
    shared = prompts((32,), seed=7)[0]
    a, b = shared + [1, 2, 3], shared + [4, 5, 6, 7]
    want = Engine(model, max_batch=2, prefix_cache_tokens=0).generate([a, b], GREEDY)
    eng = Engine(model, max_batch=4, prefix_block=8, prefix_cache_tokens=64)
    eng.generate([shared + [9]], GREEDY)  # puts the 4 blocks of the shared prefix in the cache
    ra, rb = eng.add_request(a, GREEDY), eng.add_request(b, GREEDY)
    eng.step()  # both prefilled
    A, B = eng.requests[ra], eng.requests[rb]
    assert A.cached_tokens == B.cached_tokens == 32
    assert A.blocks[:4] == B.blocks[:4]  # the same pool blocks in both tables
    assert all(eng.pool.refs[x] == 3 for x in A.blocks[:4])  # two tables + the cache
    assert not set(A.blocks[4:]) & set(B.blocks[4:])  # what follows the prefix is each request's own
    eng.run()
    assert [A.output, B.output] == want


@pytest.mark.parametrize("family, kernels", PATHS)
def test_kv_memory_follows_the_actual_lengths(family, kernels):
    model = make_model(family)
    lengths, new, block = (5, 40, 17, 60), 4, 8
    eng = Engine(model, max_batch=4, max_len=96, prefix_block=block, prefix_cache_tokens=0, kernels=kernels)
    params = RequestParams(max_new_tokens=new, temperature=0, stop_at_eos=False)
    out = eng.generate(prompts(lengths), params)
    assert [len(o) for o in out] == [new] * 4
    st = eng.stats()
    # each request holds its prompt and all but its last new token (never fed back), all four at once
    assert st["kv_blocks_peak"] == sum(blocks_for(n + new - 1, block) for n in lengths)
    assert st["kv_blocks"] == 4 * 96 // block  # the default pool: every request could reach max_len
    assert st["kv_block_bytes"] == 2 * 2 * model.config.kv_heads * block * model.config.head_dim * 4


def test_a_prompt_longer_than_the_pool_is_refused_and_budgets_fit_it():
    eng = Engine(make_model("gpt2"), max_batch=2, kv_cache_tokens=16, prefix_block=8, prefix_cache_tokens=0)
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        eng.add_request(list(range(20)), GREEDY)
    rid = eng.add_request(list(range(10)), GREEDY)
    assert eng.requests[rid].budget == 6  # 16 positions in the pool
    eng.run()
    assert len(eng.requests[rid].output) == 6
