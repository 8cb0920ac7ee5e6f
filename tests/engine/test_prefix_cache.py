"""The prompt cache: the pool keeps prompts' full blocks, and a request repeating a prompt's beginning skips them.

Outputs with the cache equal outputs without it, token for token in fp32 (and PEFT's); hits never cross an
adapter version, a composition, a tenant or a cache_salt."""

from __future__ import annotations

import random

import pytest

from prefixserve.adapters.format import read_adapter_dir
from prefixserve.engine.block_manager import BlockManager, RowBlocks
from prefixserve.engine.errors import RequestValidationError
from prefixserve.engine.prefix_cache import CacheScope, cache_root, extend_chain
from tests.conftest import arch_params
from tests.engine_harness import NAMESPACE, make_engine, run_until_idle, submit_ids
from tests.tiny_models import VOCAB, greedy_by_forward, peft_model

BLOCK = 4
NEW = 8


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]  # no EOS (0): every row runs its NEW tokens


SYSTEM = tokens(13, 1)  # 3 full blocks and one token
PLAN = [  # (adapter, prompt, cached tokens expected when run one after another in this order)
    ("rand8", SYSTEM, 0),  # first: nothing cached
    ("rand8", SYSTEM + tokens(6, 2), 12),  # partial: the system prompt's 3 full blocks
    ("rand8", SYSTEM, 12),  # the same prompt again: all full blocks but the one holding its last token
    ("rand8", SYSTEM[:12], 8),  # ends on a block boundary: its last block is computed for the last logits
    ("rand3", SYSTEM + tokens(6, 2), 0),  # another adapter: another chain
    (None, SYSTEM, 0),  # the base model never reads an adapter's blocks
    (None, SYSTEM + tokens(3, 3), 12),
    ("rand8+rand3", SYSTEM, 0),  # a composition is its own chain
    ("rand8+rand3", SYSTEM + tokens(2, 4), 12),
    ("pmlp3", SYSTEM, 0),  # prompt-learning adapters too
    ("pmlp3", SYSTEM + tokens(5, 5), 12),
]


def run_one(engine, adapter, ids, **kw):
    sink = submit_ids(engine, ids, adapter, max_new_tokens=NEW, **kw)
    run_until_idle(engine)
    return sink


@pytest.mark.parametrize("arch", arch_params())
def test_cached_prompts_give_the_tokens_of_uncached_ones_and_of_peft(
    arch, tiny_model_dirs, adapter_dirs, tmp_path
):
    base, adapters = tiny_model_dirs[arch], adapter_dirs[arch]
    cached = make_engine(base, tmp_path / "on", adapters, block_size=BLOCK)
    plain = make_engine(base, tmp_path / "off", adapters, block_size=BLOCK, prefix_caching=False)
    for adapter, ids, hits in PLAN:
        with_cache, without = run_one(cached, adapter, ids), run_one(plain, adapter, ids)
        assert with_cache.seq.num_cached_tokens == hits, (adapter, len(ids))
        assert without.seq.num_cached_tokens is None
        assert with_cache.tokens == without.tokens, (arch, adapter, len(ids))
    for adapter, ids, _ in PLAN[:4]:  # and PEFT's forward, for the hits of every kind
        expected = greedy_by_forward(peft_model(base, adapters[adapter]), ids, NEW)
        assert run_one(cached, adapter, ids).tokens == expected


def test_a_replaced_or_deleted_adapter_never_reaches_its_old_blocks(tiny_model_dirs, adapter_dirs, tmp_path):
    base, adapters = tiny_model_dirs["llama"], adapter_dirs["llama"]
    engine = make_engine(base, tmp_path / "store", {"live": adapters["rand8"]}, block_size=BLOCK)
    assert run_one(engine, "live", SYSTEM).seq.num_cached_tokens == 0
    assert run_one(engine, "live", SYSTEM).seq.num_cached_tokens == 12
    engine.registry.put(NAMESPACE, "live", read_adapter_dir(adapters["rand3"]))  # a new version
    after = run_one(engine, "live", SYSTEM)
    assert after.seq.num_cached_tokens == 0
    assert after.tokens == greedy_by_forward(peft_model(base, adapters["rand3"]), SYSTEM, NEW)
    engine.registry.delete(NAMESPACE, "live")
    engine.registry.put(
        NAMESPACE, "live", read_adapter_dir(adapters["rand8"])
    )  # the first version, re-uploaded
    assert run_one(engine, "live", SYSTEM).seq.num_cached_tokens == 12  # same content digest: same blocks


def test_tenants_share_nothing_by_default_and_base_model_blocks_with_the_global_scope(
    tiny_model_dirs, adapter_dirs, tmp_path
):
    base, adapters = tiny_model_dirs["gpt2"], adapter_dirs["gpt2"]
    tenant_scoped = make_engine(base, tmp_path / "t", adapters, block_size=BLOCK)
    run_one(tenant_scoped, None, SYSTEM, tenant="acme")
    assert run_one(tenant_scoped, None, SYSTEM, tenant="globex").seq.num_cached_tokens == 0
    assert run_one(tenant_scoped, None, SYSTEM, tenant="acme").seq.num_cached_tokens == 12

    shared = make_engine(base, tmp_path / "g", adapters, block_size=BLOCK, cache_scope=CacheScope.GLOBAL)
    run_one(shared, None, SYSTEM, tenant="acme")
    assert run_one(shared, None, SYSTEM, tenant="globex").seq.num_cached_tokens == 12
    run_one(shared, "rand8", SYSTEM, tenant="acme")  # an adapter's blocks stay its tenant's even so
    assert run_one(shared, "rand8", SYSTEM, tenant="globex").seq.num_cached_tokens == 0


def test_cache_salt_narrows_sharing_and_must_be_a_short_string(tiny_model_dirs, tmp_path):
    engine = make_engine(tiny_model_dirs["qwen2"], tmp_path / "s", block_size=BLOCK)
    run_one(engine, None, SYSTEM, cache_salt="user-1")
    assert run_one(engine, None, SYSTEM, cache_salt="user-2").seq.num_cached_tokens == 0
    assert run_one(engine, None, SYSTEM).seq.num_cached_tokens == 0
    assert run_one(engine, None, SYSTEM, cache_salt="user-1").seq.num_cached_tokens == 12
    for bad in ("", "x" * 257, 7):
        with pytest.raises(
            RequestValidationError, match="cache_salt must be a string of 1 to 256 characters"
        ):
            submit_ids(engine, SYSTEM, None, cache_salt=bad, max_new_tokens=2)


def test_rows_racing_for_the_same_blocks_and_a_small_pool_with_preemption(
    tiny_model_dirs, adapter_dirs, tmp_path
):
    """A prompt whose next block another row computes in this very step waits one step and then reads it,
    instead of computing it beside; a pool too small for every row evicts cached blocks before it preempts,
    and a preempted row finds its own blocks again."""
    base, adapters = tiny_model_dirs["qwen2"], adapter_dirs["qwen2"]
    prompts = [SYSTEM + tokens(3, 10 + i) for i in range(4)] * 2 + [tokens(20, 20 + i) for i in range(4)]
    plain = make_engine(base, tmp_path / "off", adapters, block_size=BLOCK, prefix_caching=False)
    expected = [submit_ids(plain, p, "rand8", max_new_tokens=24) for p in prompts]
    run_until_idle(plain)
    roomy = make_engine(base, tmp_path / "roomy", adapters, block_size=BLOCK)
    sinks = [submit_ids(roomy, p, "rand8", max_new_tokens=24) for p in prompts]
    run_until_idle(roomy)
    assert [s.tokens for s in sinks] == [s.tokens for s in expected]
    # All 8 share SYSTEM's 3 full blocks: the first computes them, the 7 others wait a step and read them.
    assert [s.seq.num_cached_tokens for s in sinks[:8]] == [0] + [12] * 7
    assert all(s.seq.admitted_time is not None for s in sinks)
    again = run_one(roomy, "rand8", prompts[0])
    assert again.seq.num_cached_tokens == 12 and again.tokens == expected[0].tokens[:NEW]

    block_mb = plain.pool.nbytes / plain.pool.num_blocks / 2**20
    small = make_engine(base, tmp_path / "small", adapters, block_size=BLOCK, kv_cache_mb=30 * block_mb)
    readmitted_with_hits = []
    take_cached = small.scheduler.blocks.take_cached

    def spy(row, blocks):
        seq = next(s.seq for s in sinks if s.seq.blocks is row)
        if seq.num_preemptions and blocks:
            readmitted_with_hits.append(seq)
        take_cached(row, blocks)

    small.scheduler.blocks.take_cached = spy
    sinks = [submit_ids(small, p, "rand8", max_new_tokens=24) for p in prompts]
    run_until_idle(small)
    assert [s.tokens for s in sinks] == [s.tokens for s in expected]
    assert sum(s.seq.num_preemptions for s in sinks) > 0, "the pool never filled up"
    assert readmitted_with_hits, "no preempted row found its own blocks again"


def test_prompt_logprobs_compute_every_prompt_token_and_reset_forgets_the_cache(tiny_model_dirs, tmp_path):
    engine = make_engine(tiny_model_dirs["llama"], tmp_path / "s", block_size=BLOCK)
    first = run_one(engine, None, SYSTEM, prompt_logprobs=1)
    scored = run_one(engine, None, SYSTEM, prompt_logprobs=1)
    assert scored.seq.num_cached_tokens == 0  # it needs the logits at every prompt position
    assert scored.events[0].prompt == first.events[0].prompt
    assert run_one(engine, None, SYSTEM).seq.num_cached_tokens == 12  # their blocks were cached all the same
    assert engine.reset_prefix_cache().result() > 0
    assert engine.scheduler.blocks.num_cached == 0
    assert run_one(engine, None, SYSTEM).seq.num_cached_tokens == 0


# ----- the bookkeeping alone ---------------------------------------------------------------------------
def chain(ids: list[int], salt: str = "t") -> list[bytes]:
    hashes: list[bytes] = []
    extend_chain(hashes, cache_root(None, salt, None, CacheScope.TENANT), ids, BLOCK)
    return hashes


def test_keys_chain_over_every_earlier_token_and_the_root():
    a, b = chain(tokens(12, 1)), chain(tokens(12, 1)[:4] + tokens(8, 2))
    assert len(a) == 3 and a[0] == b[0] and a[1] != b[1]
    assert chain(tokens(12, 1), "other")[0] != a[0]
    assert cache_root(("ns", ("a",), ("v1",)), "t", None, CacheScope.GLOBAL) != cache_root(
        None, "t", None, CacheScope.GLOBAL
    )


def test_cached_blocks_are_shared_ref_counted_and_evicted_leaf_first_before_anything_else():
    blocks = BlockManager(num_blocks=8, block_size=BLOCK)
    first, ids = RowBlocks(), tokens(12, 1)
    assert blocks.grow(first, 12)
    blocks.offer(first, chain(ids))
    second = RowBlocks()
    matched = blocks.match(chain(ids))
    assert matched == first.blocks and blocks.match_cost(matched) == 0  # held by `first`: costs nothing
    blocks.take_cached(second, matched[:2])
    blocks.free(first)  # shared blocks stay with `second`; the third becomes evictable
    assert blocks.num_free == 8 - 2 and blocks.num_cached == 3
    blocks.free(second)
    assert blocks.num_free == 8 and blocks.match(chain(ids)) == matched
    taker = RowBlocks()
    assert blocks.grow(taker, 4 * 6)  # 6 blocks: the 5 free ones, then the chain's leaf
    assert blocks.match(chain(ids)) == matched[:2]
    assert blocks.reset_cache() == 2 and blocks.match(chain(ids)) == [] and blocks.num_free == 2


@pytest.mark.parametrize("arch", arch_params())
def test_rows_decoding_on_one_cached_system_prompt_read_it_once_and_give_peft_s_tokens(
    arch, tiny_model_dirs, adapter_dirs, tmp_path, monkeypatch
):
    """Rows whose prompts begin with the same cached blocks (a system prompt shared by many requests) come one
    after another in the native kernel's order, so it finds those blocks in cache for all but the first: still
    PEFT's tokens."""
    from prefixserve.engine.attention import native_decode

    orders = []  # per decode step: each row's first 6 own blocks, in the kernel's order
    original = native_decode.decode_rows

    def spy(layout, rows):
        batch = original(layout, rows)
        row_of = {layout.query_starts[r]: r for r in rows}
        orders.append([tuple(layout.own_blocks[row_of[t]][:6]) for t in batch.tokens.tolist()])
        return batch

    monkeypatch.setattr(native_decode, "decode_rows", spy)
    base, adapters = tiny_model_dirs[arch], adapter_dirs[arch]
    engine = make_engine(base, tmp_path / "store", adapters)
    system = tokens(100, 7)  # 6 full blocks of 16
    run_one(engine, "rand8", system + tokens(3, 8))
    prompts = [system + tokens(2 + i, 10 + i) for i in range(3)] + [tokens(90, 20)]
    sinks = [submit_ids(engine, ids, "rand8", max_new_tokens=NEW) for ids in prompts]
    run_until_idle(engine)
    if engine.runner.backend.name == "native":  # the native kernel built (it must, for the kernel's tests)
        steps = [order for order in orders if len(order) == 4]
        assert steps, orders
        for order in steps:  # the three on the system prompt hold its 6 cached blocks
            sharing = [i for i, blocks in enumerate(order) if order.count(blocks) == 3]
            assert sharing == [sharing[0], sharing[0] + 1, sharing[0] + 2], order
    for sink, ids in zip(sinks, prompts, strict=True):
        assert sink.seq.num_cached_tokens == (96 if ids[:100] == system else 0)
        assert sink.tokens == greedy_by_forward(peft_model(base, adapters["rand8"]), ids, NEW), arch
