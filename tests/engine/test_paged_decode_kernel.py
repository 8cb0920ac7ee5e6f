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


def flat(contexts, groups=None, shared=None):
    """The kernel's slot arguments; by default every row alone (groups of one, nothing shared)."""
    slots = torch.tensor([s for c in contexts for s in c], dtype=torch.long)
    starts = torch.tensor([0] + [len(c) for c in contexts], dtype=torch.long).cumsum(0)
    groups = list(range(len(contexts) + 1)) if groups is None else groups
    shared = [0] * (len(groups) - 1) if shared is None else shared
    return slots, starts, torch.tensor(groups, dtype=torch.long), torch.tensor(shared, dtype=torch.long)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"), [(12, 12, 64), (14, 2, 64), (8, 4, 128), (4, 2, 40)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_attention_written_out(paged_decode, q_heads, kv_heads, head_dim, dtype):
    """GQA and MHA, head sizes the kernel specializes (64, 128) and one it does not (40), rows of 1 to 700
    slots (across its 64-key tiles and vector widths), some sharing a prefix's slots (as rows on one adapter do), in both pool dtypes."""
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
    got = paged_decode(q, k_pool, v_pool, *flat(contexts), scale)
    want = reference(q, k_pool, v_pool, contexts, scale)
    assert got.dtype == dtype and got.shape == q.shape
    # fp32: the same sums in another order. bf16: the output rounded to bf16 (8 bits of mantissa).
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, atol=atol, rtol=0), (got.float() - want).abs().max()


def test_a_rows_result_does_not_depend_on_the_other_rows(paged_decode):
    """Batch invariance: a row alone and in a batch of others gives the same bits."""
    gen = torch.Generator().manual_seed(1)
    k_pool, v_pool = torch.randn(2, 2, 512, 64, generator=gen).unbind(0)  # 2 kv heads, 14 query heads
    contexts = [torch.randperm(512, generator=gen)[:n].tolist() for n in (40, 7, 200, 90)]
    q = torch.randn(4, 14, 64, generator=gen)
    k_pool, v_pool = k_pool.contiguous(), v_pool.contiguous()
    together = paged_decode(q, k_pool, v_pool, *flat(contexts), 0.125)
    for row, context in enumerate(contexts):
        alone = paged_decode(q[row : row + 1].contiguous(), k_pool, v_pool, *flat([context]), 0.125)
        assert torch.equal(alone[0], together[row])


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


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"), [(12, 12, 64), (14, 2, 64), (8, 4, 128), (4, 2, 40)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_that_share_leading_slots_read_them_once_with_the_same_bits(
    paged_decode, q_heads, kv_heads, head_dim, dtype
):
    """Rows whose contexts begin with the same slots (one adapter and one cached system prompt) in a group:
    the shared slots are read once for the group, and every row's result is bit for bit what it is alone."""
    gen = torch.Generator().manual_seed(head_dim + kv_heads)
    k_pool = torch.randn(kv_heads, 4096, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(kv_heads, 4096, head_dim, generator=gen).to(dtype)
    system = torch.randperm(1000, generator=gen)[:400].tolist()  # cached blocks, anywhere in the pool
    others = iter(torch.randperm(3000, generator=gen).add(1000).tolist())
    own = [[next(others) for _ in range(n)] for n in (1, 30, 64, 65, 200, 3, 17)]
    contexts = [system[:400] + own[0], system[:400] + own[1], system[:160] + own[2], system[:160] + own[3]]
    contexts += [own[4], system[:96] + own[5], system[:96] + own[6]]
    groups, shared = [0, 2, 4, 5, 7], [400, 160, 0, 96]
    q = torch.randn(len(contexts), q_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    grouped = paged_decode(q, k_pool, v_pool, *flat(contexts, groups, shared), scale)
    alone = paged_decode(q, k_pool, v_pool, *flat(contexts), scale)
    assert torch.equal(grouped, alone)
    want = reference(q, k_pool, v_pool, contexts, scale)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(grouped.float(), want, atol=atol, rtol=0), (grouped.float() - want).abs().max()


def test_bad_inputs_are_clear_errors_not_crashes(paged_decode):
    k_pool = v_pool = torch.zeros(2, 64, 64)
    args = flat([[0, 1]])
    with pytest.raises(RuntimeError, match="one dtype"):
        paged_decode(torch.zeros(1, 4, 64, dtype=torch.bfloat16), k_pool, v_pool, *args, 1.0)
    with pytest.raises(RuntimeError, match="head sizes"):
        paged_decode(torch.zeros(1, 3, 64), k_pool, v_pool, *args, 1.0)
    with pytest.raises(RuntimeError, match="rows \\+ 1"):
        paged_decode(torch.zeros(2, 4, 64), k_pool, v_pool, *args, 1.0)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        half = torch.zeros(2, 16, 64, dtype=torch.float16)
        paged_decode(torch.zeros(1, 4, 64, dtype=torch.float16), half, half, *args, 1.0)
    two = [list(range(20)), list(range(16)) + [30, 31]]
    q = torch.zeros(2, 4, 64)
    with pytest.raises(RuntimeError, match="cover the rows"):
        paged_decode(q, k_pool, v_pool, *flat(two, [0, 1], [0]), 1.0)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        paged_decode(q, k_pool, v_pool, *flat(two, [0, 2], [8]), 1.0)
    with pytest.raises(RuntimeError, match="slots of its own"):
        paged_decode(q, k_pool, v_pool, *flat([list(range(16)), list(range(20))], [0, 2], [16]), 1.0)


def test_the_backend_setting_chooses_and_falls_back(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert native.decode_kernel("portable", cpu, torch.float32) is None
    assert native.decode_kernel("native", cpu, torch.float32) is not None
    assert native.decode_kernel("auto", cpu, torch.bfloat16) is not None
    with pytest.raises(UnsupportedModelError, match="float32 and bfloat16, not torch.float16"):
        native.decode_kernel("native", cpu, torch.float16)
    # A machine without a C++ compiler (simulated: the lookup finds none): auto serves the portable path and
    # says why at start-up; native refuses to start.
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.load_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="prefixserve.engine.cpu.kernels"):
            assert native.decode_kernel("auto", cpu, torch.float32) is None
        assert "no C++ compiler found" in caplog.text and "portable path" in caplog.text
        with pytest.raises(
            UnsupportedModelError, match="no C\\+\\+ compiler found.*--attention-backend auto"
        ):
            native.decode_kernel("native", cpu, torch.float32)
    finally:
        native.load_kernels.cache_clear()


def test_decode_rows_groups_rows_whose_contexts_begin_alike():
    """Grouped: rows sharing at least MIN_SHARED_SLOTS leading slots, in whole SHARED_QUANTUMs, at most
    MAX_SHARING_ROWS to a group (each group is one task per kv head). Not grouped: rows that share only a short
    adapter prefix, or nothing. Each row's slots are its prefix's first prefix_len, then its own."""
    from prefixserve.engine.attention.layout import StepLayout
    from prefixserve.engine.attention.native_decode import MAX_SHARING_ROWS, decode_rows

    adapter, system = [0, 1], list(range(10, 20))  # an adapter's 20 slots; a cached prompt's 10 blocks of 16
    rows = [(20, adapter, 161, system + [20]), (20, adapter, 162, system + [21])]
    rows.append((20, adapter, 11, [30]))  # same adapter, another prompt
    rows.append((0, [], 90, list(range(40, 46))))  # the base model
    rows += [(0, [], 65, [50, 51, 52, 53, 60 + i]) for i in range(MAX_SHARING_ROWS + 1)]
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
    groups, shared = batch.groups.tolist(), batch.shared.tolist()
    sizes = [(b - a, k) for a, b, k in zip(groups, groups[1:], shared, strict=False)]
    assert sorted(sizes) == sorted([(2, 176), (1, 0), (1, 0), (MAX_SHARING_ROWS, 64), (1, 0)]), sizes
    starts, slots = batch.starts.tolist(), batch.slots.tolist()
    for k, (a, b) in enumerate(zip(groups, groups[1:], strict=False)):  # each group's rows begin alike
        for r in range(a, b):
            assert slots[starts[r] : starts[r] + shared[k]] == slots[starts[a] : starts[a] + shared[k]]
    assert sorted(batch.tokens.tolist()) == list(range(n))

    def expected(prefix_len, prefix, own_len, own):
        def of(blocks):
            return [b * 16 + o for b in blocks for o in range(16)]

        return of(prefix)[:prefix_len] + of(own)[:own_len]

    for i, token in enumerate(batch.tokens.tolist()):  # row `token` is the i-th in the kernel's order
        assert slots[starts[i] : starts[i + 1]] == expected(*rows[token])
