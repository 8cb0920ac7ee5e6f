"""The scheduler without a model: token budgets, admission bounded by rows and blocks, preemption, finishing.

Only the demo model's tokenizer is loaded (the detokenizer needs one); `postprocess` is given tokens in place
of what a forward pass would sample.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from prefixserve.adapters.kv_prefix import LoadedPrefix
from prefixserve.demo import DEMO_MODEL_DIR
from prefixserve.engine.block_manager import BlockManager
from prefixserve.engine.detokenizer import OutputText
from prefixserve.engine.scheduler import Scheduler
from prefixserve.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

BLOCK = 4


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def prefix(name: str, t: int) -> LoadedPrefix:
    return LoadedPrefix("ns", (name,), (name,), torch.zeros(1, 2, 1, t, 1))


def make_seq(
    tokenizer, prompt_len: int, new: int, adapter: LoadedPrefix | None = None, tenant: str = ""
) -> Sequence:
    seq = Sequence(
        list(range(5, 5 + prompt_len)), SamplingParams(max_new_tokens=new), adapter, lambda e: None, tenant
    )
    seq.text = OutputText(tokenizer, ())
    return seq


def scheduler(blocks: int, rows: int = 64, budget: int = 1000) -> Scheduler:
    return Scheduler(BlockManager(blocks, BLOCK), rows, max_waiting=100, max_step_tokens=budget)


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    return out, s.postprocess(out, [token] * len(out.sampling))


def test_decoding_rows_come_first_and_prompts_fill_the_token_budget(tokenizer):
    s = scheduler(blocks=100, budget=10)
    first = make_seq(tokenizer, 3, 5)
    s.add(first)
    step(s)  # its 3 prompt tokens
    s.add(second := make_seq(tokenizer, 20, 5))
    out, _ = step(s)
    assert [(r.seq, r.num_tokens) for r in out.rows] == [(first, 1), (second, 9)]  # a chunk of what is left
    assert [seq is first for seq in out.sampling] == [True]  # the chunked prompt samples nothing yet
    out, _ = step(s)
    assert [(r.seq, r.num_tokens) for r in out.rows] == [(first, 1), (second, 9)]
    out, _ = step(s)
    assert [(r.seq, r.num_tokens) for r in out.rows] == [(first, 1), (second, 2)]
    assert second.output_ids == [7]


def test_admission_stops_at_max_rows_and_at_the_blocks_left(tokenizer):
    s = scheduler(blocks=5, rows=3)
    seqs = [make_seq(tokenizer, 6, 4) for _ in range(4)]  # 2 blocks each for the prompt
    for seq in seqs:
        s.add(seq)
    out = s.schedule()
    assert [r.seq for r in out.rows] == seqs[:2]  # a third row is allowed, but 1 block is left, not 2
    assert len(s.waiting) == 2


def test_rows_on_one_adapter_hold_one_copy_of_its_prefix(tokenizer):
    cartridge = prefix("cartridge", 512)
    s = scheduler(blocks=128 + 64 * 2)
    for _ in range(64):
        s.add(make_seq(tokenizer, 4, 4, cartridge))
    out = s.schedule()
    assert len(out.rows) == 64 and len(out.prefix_fills) == 1  # the prefix is written once ...
    assert s.blocks.num_used == 512 // BLOCK + 64  # ... and stored once, beside one block per row


def test_a_full_pool_preempts_the_newest_row_which_is_recomputed_later(tokenizer):
    s = scheduler(blocks=4)
    old, new = make_seq(tokenizer, 4, 8), make_seq(tokenizer, 4, 8)
    s.add(old)
    s.add(new)
    step(s)  # both prompts: 1 block each, a token each
    for _ in range(4):
        step(s)  # each needs a second block after its 4th token, a third after its 8th
    out, _ = step(s)
    assert out.preempted == [new] and new.status is SequenceStatus.WAITING and new.num_computed == 0
    assert s.waiting.peek() is new and [r.seq for r in out.rows] == [old]
    generated = list(new.output_ids)
    while old.status is not SequenceStatus.FINISHED:
        step(s)
    out, _ = step(s)  # old left; new comes back and takes in its prompt and what it had generated
    assert out.rows[0].seq is new and out.rows[0].num_tokens == 4 + len(generated)
    assert new.output_ids[: len(generated)] == generated


def test_finished_rows_free_their_blocks(tokenizer):
    s = scheduler(blocks=10)
    seq = make_seq(tokenizer, 3, 2, prefix("p", 5))
    s.add(seq)
    _, updates = step(s)
    assert updates[0].finish_reason is None
    _, updates = step(s)
    assert updates[0].finish_reason is FinishReason.LENGTH and seq.status is SequenceStatus.FINISHED
    assert not s.running and s.blocks.num_free == 10  # the prefix stays resident but evictable


def test_cancelled_rows_leave_at_the_next_step(tokenizer):
    s = scheduler(blocks=10)
    running, waiting = make_seq(tokenizer, 3, 9), make_seq(tokenizer, 3, 9)
    s.add(running)
    step(s)
    s.add(waiting)
    running.cancelled = waiting.cancelled = True
    assert set(s.take_cancelled()) == {running, waiting}
    assert not s.has_work() and s.blocks.num_free == 10
    assert running.finish_reason is FinishReason.CANCELLED


def test_waiting_tenants_take_turns(tokenizer):
    s = scheduler(blocks=100, rows=1)
    seqs = [make_seq(tokenizer, 3, 1, tenant=t) for t in "AAABBC"]
    for seq in seqs:
        s.add(seq)
    order = []
    while s.has_work():
        out, _ = step(s)
        order += [r.seq.tenant for r in out.rows]
    assert "".join(order) == "ABCABA"


def test_a_tenant_without_rows_gets_one_from_the_tenant_holding_them_all(tokenizer):
    s = scheduler(blocks=100, rows=4)
    hog = [make_seq(tokenizer, 4, 16, tenant="A") for _ in range(8)]
    for seq in hog:
        s.add(seq)
    step(s)
    assert [r.tenant for r in s.running] == ["A"] * 4 and len(s.waiting) == 4
    s.add(short := make_seq(tokenizer, 4, 5, tenant="B"))
    out, _ = step(s)
    assert short in [r.seq for r in out.rows] and out.preempted == [hog[3]]  # A's newest row made room
    while short.status is not SequenceStatus.FINISHED:
        out, _ = step(s)
        assert not out.preempted or short not in out.preempted  # B's only row is never the one pushed out
    assert short.output_ids == [7] * 5 and not any(seq.is_finished for seq in hog)
    while s.has_work():
        step(s)
    assert all(len(seq.output_ids) == 16 for seq in hog)
