"""prefixserve against the oracle, PEFT: mixed-adapter batches give PEFT's tokens and logits."""

from __future__ import annotations

import pytest
import torch

from prefixserve.adapters.format import read_adapter_dir
from prefixserve.engine.self_check import run_rows
from prefixserve.engine.sequence import SamplingParams, Sequence
from tests.conftest import arch_params
from tests.engine_harness import NAMESPACE, make_engine, run_until_idle, submit
from tests.tiny_models import build_model, make_adapter, peft_generate, peft_last_logits, peft_model

PROMPTS = [
    "The quick brown fox",
    "Hello",
    "Once upon a time there was a small robot who loved to read books about the sea.",
    "Thank you for contacting support.",
]
# (adapter or None for the base model, prompt): several adapters, several T, the base model, several lengths.
MIXED = [
    ("rand3", PROMPTS[0]),
    ("rand8", PROMPTS[1]),
    (None, PROMPTS[2]),
    ("zero5", PROMPTS[3]),
    ("proj4", PROMPTS[2]),
    ("trained6", PROMPTS[0]),
    ("rand8", PROMPTS[2]),
]
NEW_TOKENS = 12


# Decode attention's two paths: the native kernel (built here: a build failure fails these tests) and the
# portable gather + matmul that serves where no compiler is.
BACKENDS = pytest.mark.parametrize("attention", ["native", "portable"])


def check_batch_greedy(
    arch, base, adapters, store, plan, new_tokens=NEW_TOKENS, attention: str = "auto"
) -> None:
    """Every (adapter, prompt) of `plan` in one engine at once: each row gets PEFT's greedy tokens."""
    engine = make_engine(base, store, adapters, attention=attention)
    sinks = [submit(engine, prompt, name, max_new_tokens=new_tokens) for name, prompt in plan]
    run_until_idle(engine)
    for (name, prompt), sink in zip(plan, sinks, strict=True):
        expected = peft_generate(base, adapters[name] if name else None, prompt, new_tokens)
        assert sink.tokens == expected, f"{arch} adapter={name} prompt={prompt!r}"


def check_prefill_logits(arch, base, adapters, store, plan, atol: float) -> None:
    """Every row of `plan` prefilled in one step: its last logits within `atol` of PEFT's forward."""
    engine = make_engine(base, store, adapters)
    tok = engine.loaded.tokenizer
    seqs = []
    for name, prompt in plan:
        prefix = engine.registry.get(NAMESPACE, (name,)) if name else None
        seqs.append(Sequence(tok.encode(prompt), SamplingParams(), prefix, lambda e: None))
    logits = run_rows(engine.runner, engine.scheduler.blocks, [(s, len(s.prompt_ids)) for s in seqs])
    for (name, prompt), row in zip(plan, logits, strict=True):
        expected = peft_last_logits(base, adapters[name] if name else None, prompt)
        assert torch.allclose(row, expected, atol=atol, rtol=0), (
            f"{arch} adapter={name}: max |dlogit| {(row - expected).abs().max():.2e}"
        )


@BACKENDS
@pytest.mark.parametrize("arch", arch_params())
def test_mixed_batch_greedy_equals_peft(arch, attention, tiny_model_dirs, adapter_dirs, tmp_path):
    check_batch_greedy(
        arch, tiny_model_dirs[arch], adapter_dirs[arch], tmp_path / "store", MIXED, attention=attention
    )


@pytest.mark.parametrize("arch", arch_params())
def test_mixed_batch_prefill_logits_match_peft(arch, tiny_model_dirs, adapter_dirs, tmp_path):
    check_prefill_logits(arch, tiny_model_dirs[arch], adapter_dirs[arch], tmp_path / "store", MIXED, 1e-4)


@pytest.fixture(scope="module")
def head_size_64(tmp_path_factory):
    """Models with heads of 64 values (the native kernel's vector path) and a few adapters each."""
    root = tmp_path_factory.mktemp("head-size-64")
    out = {}
    for arch in ("llama-d64", "gpt2-d64"):
        base = build_model(arch, root / arch)
        specs = {
            "rand3": (3, "random"),
            "rand8": (8, "random"),
            "zero5": (5, "zero"),
            "proj4": (4, "projection"),
        }
        adapters = {
            name: make_adapter(base, root / f"{arch}-{name}", t, kind, seed=i)
            for i, (name, (t, kind)) in enumerate(specs.items())
        }
        out[arch] = (base, adapters)
    return out


HEAD_SIZE_64_PLAN = [
    (name, prompt) for name, prompt in MIXED if name in (None, "rand3", "rand8", "zero5", "proj4")
]


@pytest.mark.parametrize("arch", ["llama-d64", "gpt2-d64"])
def test_heads_of_64_through_the_native_kernel_equal_peft(arch, head_size_64, tmp_path):
    base, adapters = head_size_64[arch]
    check_batch_greedy(arch, base, adapters, tmp_path / "store", HEAD_SIZE_64_PLAN, attention="native")


@pytest.mark.parametrize("arch", ["llama-d64", "gpt2-d64"])
def test_bf16_decoding_through_the_native_kernel_is_as_close_to_fp32_as_transformers_bf16(arch, tmp_path):
    """bf16 (the default dtype where the CPU has it): at every decode step, every row's logits are within twice
    the distance from PEFT's fp32 forward (over the same tokens) that PEFT's own bf16 forward is, plus 1% of
    the largest logit. Weights of scale 0.1: attention that matters (the kernel's scores 5% off fail this; at
    0.02 attention is nearly uniform and they passed), half precision's error still moderate (at the suite's
    wide 0.3, transformers' own bf16 is off by a third of the largest logit)."""
    base = build_model(arch, tmp_path / "model", initializer_range=0.1)
    adapters = {
        name: make_adapter(base, tmp_path / name, t, seed=t) for name, t in (("rand3", 3), ("rand8", 8))
    }
    plan = [("rand3", PROMPTS[0]), ("rand8", PROMPTS[2]), (None, PROMPTS[3])]
    engine = make_engine(base, tmp_path / "store", adapters, attention="native", dtype="bfloat16")
    decoded = []  # (request, its tokens so far, the step's logits) of each decoding row at each step
    run = engine.runner.run

    def recording(step):
        out = run(step)
        for row, logits in zip([r for r in step.rows if r.samples], out.sampling, strict=True):
            if row.num_tokens == 1:
                decoded.append((row.seq.seq_id, list(row.seq.token_ids), logits.float()))
        return out

    engine.runner.run = recording
    sinks = [submit(engine, prompt, name, max_new_tokens=6) for name, prompt in plan]
    run_until_idle(engine)
    assert len(decoded) == 5 * len(plan)
    names = {sink.seq.seq_id: name for (name, _), sink in zip(plan, sinks, strict=True)}
    models = {
        dtype: {name: peft_model(base, adapters[name] if name else None, dtype) for name, _ in plan}
        for dtype in (torch.float32, torch.bfloat16)
    }
    for seq_id, ids, logits in decoded:
        with torch.no_grad():
            exact, theirs = (
                models[dtype][names[seq_id]](input_ids=torch.tensor([ids])).logits[0, -1].float()
                for dtype in (torch.float32, torch.bfloat16)
            )
        ours, bound = (
            (logits - exact).abs().max(),
            2 * (theirs - exact).abs().max() + 0.01 * exact.abs().max(),
        )
        assert ours <= bound, f"{arch}: max |dlogit| from fp32 {ours:.3g}, allowed {bound:.3g}"


def test_row_joining_a_running_batch_gets_the_same_tokens(tiny_model_dirs, adapter_dirs, tmp_path):
    base, adapters = tiny_model_dirs["llama"], adapter_dirs["llama"]
    engine = make_engine(base, tmp_path / "store", adapters)
    long_running = submit(engine, PROMPTS[2], "rand8", max_new_tokens=30)
    for _ in range(5):
        engine.step()
    assert len(long_running.tokens) == 5
    joiner = submit(engine, PROMPTS[0], "rand3", max_new_tokens=10)
    engine.step()  # the joiner's prompt goes in within the same forward pass as the running row's token
    assert len(joiner.tokens) == 1 and len(long_running.tokens) == 6
    run_until_idle(engine)
    assert joiner.tokens == peft_generate(base, adapters["rand3"], PROMPTS[0], 10)
    assert long_running.tokens == peft_generate(base, adapters["rand8"], PROMPTS[2], 30)

    alone = make_engine(base, tmp_path / "store2", adapters)
    joiner_alone = submit(alone, PROMPTS[0], "rand3", max_new_tokens=10)
    run_until_idle(alone)
    assert joiner.tokens == joiner_alone.tokens


def test_short_request_leaves_without_waiting_for_a_long_one(tiny_model_dirs, adapter_dirs, tmp_path):
    engine = make_engine(tiny_model_dirs["gpt2"], tmp_path / "store", adapter_dirs["gpt2"])
    long_one = submit(engine, PROMPTS[0], "rand3", max_new_tokens=60)
    short = submit(engine, PROMPTS[1], "rand8", max_new_tokens=3)
    steps = 0
    while short.finish_reason is None:
        engine.step()
        steps += 1
    assert steps <= 4 and long_one.finish_reason is None
    assert engine.num_running == 1
    run_until_idle(engine)
    assert len(long_one.tokens) == 60


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tiny_model_dirs, adapter_dirs, tmp_path):
    base, adapters = tiny_model_dirs["qwen2"], adapter_dirs["qwen2"]
    params = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=1234)
    engine = make_engine(base, tmp_path / "store", adapters)
    first = submit(engine, PROMPTS[0], "rand8", **params)
    run_until_idle(engine)
    # Same seed again, this time sharing the batch with other rows (sampled and greedy).
    second = submit(engine, PROMPTS[0], "rand8", **params)
    submit(engine, PROMPTS[1], "rand3", **{**params, "seed": 99})
    submit(engine, PROMPTS[2], None, max_new_tokens=16)
    other_seed = submit(engine, PROMPTS[0], "rand8", **{**params, "seed": 4321})
    run_until_idle(engine)
    assert first.tokens == second.tokens
    assert first.tokens != other_seed.tokens
    greedy = peft_generate(base, adapters["rand8"], PROMPTS[0], 16)
    assert first.tokens != greedy  # it really sampled


def test_evicted_adapter_reloads_identically(tiny_model_dirs, adapter_dirs, tmp_path):
    base, adapters = tiny_model_dirs["gpt2"], adapter_dirs["gpt2"]
    probe = make_engine(base, tmp_path / "probe")
    rand8_bytes = probe.loaded.kv_shape.token_width * 8 * 4  # T=8, float32
    # A budget for exactly one adapter of this size: loading a second evicts the first.
    engine = make_engine(base, tmp_path / "store", adapters, cache_bytes=rand8_bytes)
    registry = engine.registry
    one = registry.get(NAMESPACE, ("rand8",))
    assert one.nbytes == rand8_bytes
    kv_before = one.kv.clone()
    before = submit(engine, PROMPTS[0], "rand8", max_new_tokens=8)
    run_until_idle(engine)
    registry.get(NAMESPACE, ("rand3",))
    assert not registry.is_loaded(NAMESPACE, "rand8")
    again = registry.get(NAMESPACE, ("rand8",))
    assert again is not one and torch.equal(again.kv, kv_before)
    after = submit(engine, PROMPTS[0], "rand8", max_new_tokens=8)
    run_until_idle(engine)
    assert before.tokens == after.tokens == peft_generate(base, adapters["rand8"], PROMPTS[0], 8)


@BACKENDS
@pytest.mark.parametrize("arch", arch_params("gpt2", "llama"))
def test_rows_leaving_and_joining_at_different_steps_equal_peft(
    arch, attention, tiny_model_dirs, adapter_dirs, tmp_path
):
    """Rows finish at different steps (the last row is moved into each freed slot) while others join."""
    base, adapters = tiny_model_dirs[arch], adapter_dirs[arch]
    engine = make_engine(base, tmp_path / "store", adapters, max_batch_size=4, attention=attention)
    plan = [  # (step to submit at, adapter, prompt, max_new_tokens)
        (0, "rand3", PROMPTS[0], 3),
        (0, "rand8", PROMPTS[2], 12),
        (0, None, PROMPTS[1], 1),
        (0, "proj4", PROMPTS[3], 9),
        (0, "trained6", PROMPTS[1], 7),  # waits for a free row
        (2, "zero5", PROMPTS[2], 5),
        (4, "rand8", PROMPTS[0], 10),
    ]
    sinks: list = [None] * len(plan)
    step = 0
    while step < 200 and (engine.scheduler.has_work() or any(s is None for s in sinks)):
        for i, (at, name, prompt, n) in enumerate(plan):
            if at == step:
                sinks[i] = submit(engine, prompt, name, max_new_tokens=n)
        engine.step()
        step += 1
    for (_, name, prompt, n), sink in zip(plan, sinks, strict=True):
        assert sink.tokens == peft_generate(base, adapters[name] if name else None, prompt, n), (name, prompt)


def test_replacing_an_adapter_mid_request_keeps_the_running_version(tiny_model_dirs, adapter_dirs, tmp_path):
    base, adapters = tiny_model_dirs["llama"], adapter_dirs["llama"]
    engine = make_engine(base, tmp_path / "store", {"live": adapters["rand8"]})
    running = submit(engine, PROMPTS[0], "live", max_new_tokens=12)
    for _ in range(4):
        engine.step()
    engine.registry.put(NAMESPACE, "live", read_adapter_dir(adapters["rand3"]))  # replaced under the request
    after = submit(engine, PROMPTS[0], "live", max_new_tokens=12)
    run_until_idle(engine)
    assert running.tokens == peft_generate(base, adapters["rand8"], PROMPTS[0], 12)
    assert after.tokens == peft_generate(base, adapters["rand3"], PROMPTS[0], 12)


LONG_PROMPT = "The pirate captain raised the flag, and the crew sang loudly as the ship left the harbor."


@BACKENDS
@pytest.mark.parametrize("arch", arch_params("gpt2", "llama"))
def test_prompts_taken_in_chunks_equal_peft(arch, attention, tiny_model_dirs, adapter_dirs, tmp_path):
    """A prefill budget of 3 tokens: every prompt goes in over several steps, in padded chunks."""
    base, adapters = tiny_model_dirs[arch], adapter_dirs[arch]
    engine = make_engine(base, tmp_path / "store", adapters, max_prefill_tokens=3, attention=attention)
    sinks = [submit(engine, prompt, name, max_new_tokens=NEW_TOKENS) for name, prompt in MIXED]
    run_until_idle(engine)
    for (name, prompt), sink in zip(MIXED, sinks, strict=True):
        assert sink.tokens == peft_generate(base, adapters[name] if name else None, prompt, NEW_TOKENS), name


@BACKENDS
@pytest.mark.parametrize("arch", arch_params())
def test_prompt_chunks_attending_in_two_parts_equal_peft(
    arch, attention, tiny_model_dirs, adapter_dirs, tmp_path, causal_chunks
):
    """Every prompt chunk of two or more tokens takes the path of long prompts (attention/causal_chunk.py): one
    causal square where what comes before it (adapter prefix, earlier chunks) is no longer than the chunk,
    else a causal part and an unmasked one merged by log-sum-exp. PEFT's tokens, whole prompts in one step
    and prompts in chunks of 5."""
    base, adapters = tiny_model_dirs[arch], adapter_dirs[arch]
    check_batch_greedy(arch, base, adapters, tmp_path / "whole", MIXED, attention=attention)
    assert any(c.before == 0 for c in causal_chunks)  # the base model's prompts: nothing before them
    assert any(0 < c.before <= c.queries for c in causal_chunks)  # behind an adapter prefix: one square
    causal_chunks.clear()
    engine = make_engine(base, tmp_path / "chunked", adapters, max_prefill_tokens=5, attention=attention)
    sinks = [submit(engine, prompt, name, max_new_tokens=NEW_TOKENS) for name, prompt in MIXED]
    run_until_idle(engine)
    for (name, prompt), sink in zip(MIXED, sinks, strict=True):
        assert sink.tokens == peft_generate(base, adapters[name] if name else None, prompt, NEW_TOKENS), name
    assert any(c.before > c.queries for c in causal_chunks)  # a later chunk: two parts


def test_a_long_prompt_goes_in_while_rows_decode(tiny_model_dirs, adapter_dirs, tmp_path):
    """A running row takes a token at every step while long prompts go in chunk by chunk beside it, in the
    same forward passes, and nobody's tokens change."""
    base, adapters = tiny_model_dirs["llama"], adapter_dirs["llama"]
    engine = make_engine(base, tmp_path / "store", adapters, max_batch_size=4, max_prefill_tokens=6)
    first = submit(engine, PROMPTS[1], "rand3", max_new_tokens=40)
    engine.step()
    long_one = submit(engine, LONG_PROMPT, "rand8", max_new_tokens=8)
    short = submit(engine, PROMPTS[1], None, max_new_tokens=30)
    second_long = submit(engine, LONG_PROMPT, "proj4", max_new_tokens=8)
    steps = 0
    while not long_one.tokens:
        before = len(first.tokens)
        engine.step()
        steps += 1
        assert len(first.tokens) == before + 1, "the decoding row stalled behind a prompt"
    assert steps >= 3, "the long prompt should have taken several chunks"
    run_until_idle(engine)
    assert first.tokens == peft_generate(base, adapters["rand3"], PROMPTS[1], 40)
    assert long_one.tokens == peft_generate(base, adapters["rand8"], LONG_PROMPT, 8)
    assert second_long.tokens == peft_generate(base, adapters["proj4"], LONG_PROMPT, 8)
    assert short.tokens == peft_generate(base, None, PROMPTS[1], 30)


@BACKENDS
@pytest.mark.parametrize("arch", arch_params("gpt2", "qwen2"))
def test_rows_preempted_from_a_full_pool_are_recomputed_and_equal_peft(
    arch, attention, tiny_model_dirs, adapter_dirs, tmp_path
):
    """A pool too small for every row at once: the newest rows are pushed out and recomputed later, and
    every request still gets PEFT's tokens."""
    base, adapters = tiny_model_dirs[arch], adapter_dirs[arch]
    probe = make_engine(base, tmp_path / "probe", adapters)
    block_mb = probe.pool.nbytes / probe.pool.num_blocks / 2**20
    engine = make_engine(
        base, tmp_path / "store", adapters, kv_cache_mb=14 * block_mb, block_size=4, attention=attention
    )
    sinks = [submit(engine, prompt, name, max_new_tokens=24) for name, prompt in MIXED]
    run_until_idle(engine)
    assert sum(s.seq.num_preemptions for s in sinks) > 0, "the pool never filled up"
    for (name, prompt), sink in zip(MIXED, sinks, strict=True):
        assert sink.tokens == peft_generate(base, adapters[name] if name else None, prompt, 24), name


@pytest.mark.parametrize("arch", arch_params())
def test_rows_sharing_a_prefix_attend_it_once_and_equal_peft(
    arch, tiny_model_dirs, adapter_dirs, tmp_path, cascaded_groups
):
    """The cascade path (a prefix shared by several rows is attended once for all of them) is taken for long
    prefixes only; with the threshold lowered, the tiny adapters take it, and every row is still PEFT's."""
    cascaded = cascaded_groups
    base, adapters = tiny_model_dirs[arch], adapter_dirs[arch]
    engine = make_engine(base, tmp_path / "store", adapters, attention="portable")  # its grouping
    shared = [("rand8", p) for p in PROMPTS] + [("proj4", p) for p in PROMPTS[:2]] + MIXED
    sinks = [submit(engine, prompt, name, max_new_tokens=NEW_TOKENS) for name, prompt in shared]
    run_until_idle(engine)
    assert cascaded, "no step attended a shared prefix once"
    for (name, prompt), sink in zip(shared, sinks, strict=True):
        assert sink.tokens == peft_generate(base, adapters[name] if name else None, prompt, NEW_TOKENS), name
