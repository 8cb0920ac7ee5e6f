"""The native paged decode kernel (engine/cpu/csrc/paged_decode.cpp) against attention written out in torch, and
the choice between it and the portable path (engine/cpu/kernels.py).

The kernel must build here: a machine without a C++ compiler fails these tests, it does not skip them."""

from __future__ import annotations

import logging

import pytest
import torch

from prefixserve.engine.cpu import kernels as native
from prefixserve.engine.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def kernels():
    kernels, how = native.load_kernels()
    assert kernels is not None, f"the native kernels did not build: {how}"
    return kernels


@pytest.fixture(scope="module")
def paged_decode(kernels):
    return kernels.paged_decode


def reference(q, k_pool, v_pool, contexts, scale):
    """Each row's query heads over its slots, in fp32, with GQA by repeating K/V."""
    out = []
    group = q.shape[1] // k_pool.shape[0]
    for row, slots in enumerate(contexts):
        index = torch.tensor(slots)
        k = k_pool[:, index].float().repeat_interleave(group, 0)  # [q_heads, L, d]
        v = v_pool[:, index].float().repeat_interleave(group, 0)
        weights = torch.softmax(q[row].float()[:, None] @ k.transpose(1, 2) * scale, dim=-1)
        out.append((weights @ v)[:, 0])
    return torch.stack(out)


def flat(contexts, tokens=None):
    """The kernel's row arguments: each row's query token (by default row i is token i), slots and starts."""
    tokens = list(range(len(contexts))) if tokens is None else tokens
    slots = torch.tensor([s for c in contexts for s in c], dtype=torch.long)
    starts = torch.tensor([0] + [len(c) for c in contexts], dtype=torch.long).cumsum(0)
    return torch.tensor(tokens, dtype=torch.long), slots, starts


def attend(paged_decode, q, k_pool, v_pool, contexts, scale):
    out = torch.empty_like(q)
    paged_decode(q, k_pool, v_pool, *flat(contexts), scale, out)
    return out


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"),
    [(12, 12, 64), (14, 2, 64), (8, 4, 128), (4, 2, 40), (4, 1, 80), (2, 2, 256), (71, 1, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_attention_written_out(paged_decode, q_heads, kv_heads, head_dim, dtype):
    """GQA, MQA (Falcon-7B's 71 query heads on one kv head among them) and MHA, head sizes of whole vectors (64,
    80, 128, 256) and one that is not (40), rows of 1 to 700 slots (across vector widths), some sharing a
    prefix's slots (as rows on one adapter do), in both pool dtypes."""
    gen = torch.Generator().manual_seed(q_heads * head_dim)
    pool_slots = 2048
    k_pool = torch.randn(kv_heads, pool_slots, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(kv_heads, pool_slots, head_dim, generator=gen).to(dtype)
    prefix = list(range(1000, 1020))
    lengths = [1, 2, 17, 300, 64, 5, 128, 33, 65, 700]
    contexts = [
        (prefix if i % 2 else []) + torch.randperm(900, generator=gen)[:n].tolist()
        for i, n in enumerate(lengths)
    ]
    q = torch.randn(len(contexts), q_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    got = attend(paged_decode, q, k_pool, v_pool, contexts, scale)
    want = reference(q, k_pool, v_pool, contexts, scale)
    # fp32: the same sums in another order. bf16: the output rounded to bf16 (8 bits of mantissa).
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, atol=atol, rtol=0), (got.float() - want).abs().max()


def test_large_score_gaps_and_one_slot_rows(paged_decode):
    """Scores far apart (exp of the gap is below the smallest normal float: the kernel floors it) and rows of a
    single slot, whose weight is exactly 1."""
    gen = torch.Generator().manual_seed(3)
    k_pool = torch.randn(2, 64, 64, generator=gen) * 8
    v_pool = torch.randn(2, 64, 64, generator=gen)
    contexts = [list(range(0, 40)), [7], list(range(20, 64))]
    q = torch.randn(3, 4, 64, generator=gen) * 8
    got = attend(paged_decode, q, k_pool, v_pool, contexts, 1.0)
    assert torch.allclose(got, reference(q, k_pool, v_pool, contexts, 1.0), atol=1e-5, rtol=0)
    assert torch.equal(got[1], v_pool[:, 7].repeat_interleave(2, 0))


def test_a_rows_result_does_not_depend_on_the_other_rows(paged_decode):
    """Batch invariance: a row alone and in a batch of others gives the same bits."""
    gen = torch.Generator().manual_seed(1)
    k_pool, v_pool = torch.randn(2, 2, 512, 64, generator=gen).unbind(0)  # 2 kv heads, 14 query heads
    contexts = [torch.randperm(512, generator=gen)[:n].tolist() for n in (40, 7, 200, 90)]
    q = torch.randn(4, 14, 64, generator=gen)
    k_pool, v_pool = k_pool.contiguous(), v_pool.contiguous()
    together = attend(paged_decode, q, k_pool, v_pool, contexts, 0.125)
    for row, context in enumerate(contexts):
        alone = attend(paged_decode, q[row : row + 1].contiguous(), k_pool, v_pool, [context], 0.125)
        assert torch.equal(alone[0], together[row])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_in_any_order_read_and_write_the_layers_own_strided_tensors(paged_decode, dtype):
    """q and out as the layers hold them ([q_heads, tokens, d] seen as [tokens, q_heads, d]); rows in the
    kernel's order (not the tokens'); tokens that are not decoding rows (a prompt chunk's) left alone. Rows that
    share leading slots (one adapter, one cached system prompt) and come one after another, as decode_rows
    orders them, give the bits they give alone."""
    gen = torch.Generator().manual_seed(5)
    k_pool = torch.randn(2, 4096, 64, generator=gen).to(dtype)
    v_pool = torch.randn(2, 4096, 64, generator=gen).to(dtype)
    system = torch.randperm(1000, generator=gen)[:400].tolist()
    others = iter(torch.randperm(3000, generator=gen).add(1000).tolist())
    own = [[next(others) for _ in range(n)] for n in (1, 30, 64, 200)]
    contexts = [system + own[0], system + own[1], system[:96] + own[2], own[3]]
    tokens = [5, 0, 3, 6]  # flat tokens 1, 2 and 4 belong to other rows
    q = torch.randn(8, 7, 64, generator=gen).to(dtype)  # 8 heads, 7 tokens: [q_heads, N, d] as a layer has it
    out = torch.full_like(q, 7.0)
    paged_decode(q.transpose(0, 1), k_pool, v_pool, *flat(contexts, tokens), 0.125, out.transpose(0, 1))
    rows_q = q.transpose(0, 1)[tokens]
    want = reference(rows_q, k_pool, v_pool, contexts, 0.125)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.transpose(0, 1)[tokens].float(), want, atol=atol, rtol=0)
    assert (out[:, [1, 2, 4]] == 7.0).all()
    for i, context in enumerate(contexts):
        alone = attend(paged_decode, rows_q[i : i + 1].contiguous(), k_pool, v_pool, [context], 0.125)
        assert torch.equal(alone[0], out[:, tokens[i]])


def test_the_kernel_runs_on_torchs_threads_with_this_cpus_vectors(kernels):
    """Built without OpenMP, at::parallel_for runs on one thread (the kernel was 3x slower for it, unnoticed);
    linked to an OpenMP runtime of its own, it would ignore torch.set_num_threads. Neither may happen."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert f"threads={threads} " in kernels.build_info()
    finally:
        torch.set_num_threads(before)
    flags = native.compile_flags(native._cpu_flags(), "Linux")
    width = 16 if "-DCPU_CAPABILITY_AVX512" in flags else 8 if "-DCPU_CAPABILITY_AVX2" in flags else None
    if width is not None:
        assert kernels.build_info().endswith(f"vector_floats={width}")


def test_compile_flags_follow_the_cpu():
    assert "-DCPU_CAPABILITY_AVX512" in native.compile_flags(
        {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, "Linux"
    )
    assert "-DCPU_CAPABILITY_AVX2" in native.compile_flags({"avx2", "fma", "avx512f"}, "Linux")
    plain = native.compile_flags(
        {"asimd"}, "Darwin"
    )  # arm64: at::vec's portable loops, no -fopenmp (Apple clang)
    assert not [f for f in plain if "CPU_CAPABILITY" in f or "openmp" in f]
    assert "-fopenmp" in native.compile_flags(set(), "Linux")


def test_bad_inputs_are_clear_errors_not_crashes(paged_decode):
    k_pool = torch.zeros(2, 64, 64)
    args = flat([[0, 1]])
    q = torch.zeros(1, 4, 64)

    def call(q=q, k_pool=k_pool, args=args, out=None):
        paged_decode(q, k_pool, k_pool, *args, 1.0, torch.empty_like(q) if out is None else out)

    with pytest.raises(RuntimeError, match="one dtype"):
        call(q=q.bfloat16())
    with pytest.raises(RuntimeError, match="head sizes"):
        call(q=torch.zeros(1, 3, 64))
    with pytest.raises(RuntimeError, match="rows \\+ 1"):
        call(args=(torch.tensor([0, 0]), *args[1:]))
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        call(q=q.half(), k_pool=k_pool.half())
    with pytest.raises(RuntimeError, match="out must have q's shape"):
        call(out=torch.zeros(2, 4, 64))
    with pytest.raises(RuntimeError, match="at least one slot"):
        call(args=flat([[]]))
    with pytest.raises(RuntimeError, match="token is outside q"):
        call(args=flat([[0, 1]], tokens=[1]))
    with pytest.raises(RuntimeError, match="slot is outside the pool"):
        call(args=flat([[0, 64]]))
    with pytest.raises(RuntimeError, match="contiguous in their last dimension"):
        call(q=torch.zeros(1, 64, 4).transpose(1, 2))


def test_the_backend_setting_chooses_and_falls_back(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert native.native_kernels("portable", cpu, torch.float32) is None
    assert native.native_kernels("native", cpu, torch.float32) is not None
    assert native.native_kernels("auto", cpu, torch.bfloat16) is not None
    with pytest.raises(UnsupportedModelError, match="float32 and bfloat16, not torch.float16"):
        native.native_kernels("native", cpu, torch.float16)
    # A machine without a C++ compiler (simulated: the lookup finds none): auto serves the portable path and
    # says why at start-up; native refuses to start.
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.load_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="prefixserve.engine.cpu.kernels"):
            assert native.native_kernels("auto", cpu, torch.float32) is None
        assert "no C++ compiler found" in caplog.text and "portable path" in caplog.text
        with pytest.raises(
            UnsupportedModelError, match="no C\\+\\+ compiler found.*--attention-backend auto"
        ):
            native.native_kernels("native", cpu, torch.float32)
    finally:
        native.load_kernels.cache_clear()


def test_decode_rows_puts_rows_whose_contexts_begin_alike_next_to_each_other():
    """The kernel works through rows in decode_rows' order: rows on one adapter, and among them rows on one
    cached prompt, come one after another (their shared blocks stay in cache). Each row's slots are its
    prefix's first prefix_len, then its own."""
    from prefixserve.engine.attention.layout import StepLayout
    from prefixserve.engine.attention.native_decode import decode_rows

    adapter, system = [0, 1], list(range(10, 20))  # an adapter's 20 slots; a cached prompt's 10 blocks of 16
    rows = [(20, adapter, 161, system + [20]), (20, adapter, 162, system + [21])]
    rows.append((20, adapter, 11, [30]))  # same adapter, another prompt
    rows.append((0, [], 90, list(range(40, 46))))  # the base model
    rows += [(0, [], 65, [50, 51, 52, 53, 60 + i]) for i in range(3)]
    rows.append(
        (20, adapter, 140, system[:8] + [22])
    )  # the same adapter and the cached prompt's first blocks
    n = len(rows)
    layout = StepLayout.build(
        16,
        list(range(n + 1)),
        [r[0] for r in rows],
        [r[2] for r in rows],
        [r[1] for r in rows],
        [r[3] for r in rows],
        torch.device("cpu"),
    )
    batch = decode_rows(layout, list(range(n)))
    order = batch.tokens.tolist()  # row r's query is flat token r here
    assert sorted(order) == list(range(n))
    on_system = [i for i, r in enumerate(order) if r in (0, 1, 7)]
    on_adapter = [i for i, r in enumerate(order) if rows[r][1] == adapter]
    on_blocks = [i for i, r in enumerate(order) if r in (4, 5, 6)]
    for run in (on_system, on_adapter, on_blocks):
        assert run == list(range(run[0], run[0] + len(run))), order
    starts, slots = batch.starts.tolist(), batch.slots.tolist()

    def expected(prefix_len, prefix, own_len, own):
        def of(blocks):
            return [b * 16 + o for b in blocks for o in range(16)]

        return of(prefix)[:prefix_len] + of(own)[:own_len]

    for i, token in enumerate(batch.tokens.tolist()):  # row `token` is the i-th in the kernel's order
        assert slots[starts[i] : starts[i + 1]] == expected(*rows[token])
