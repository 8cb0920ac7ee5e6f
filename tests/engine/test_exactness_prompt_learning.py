"""Prompt tuning and P-tuning against the oracle, PEFT's forward: in batches mixed with prefix adapters and the
base model, every row gets PEFT's tokens and logits."""

from __future__ import annotations

import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file

from prefixserve.adapters.errors import InvalidAdapterError
from prefixserve.engine.self_check import _max_delta, run_rows
from prefixserve.engine.sequence import SamplingParams, Sequence
from tests.conftest import PROMPT_SPECS, arch_params
from tests.engine.test_exactness import PROMPTS, check_batch_greedy, check_prefill_logits
from tests.engine_harness import NAMESPACE, make_engine, run_until_idle, submit
from tests.tiny_models import load_base, peft_generate, peft_last_logits

# Every prompt-learning kind beside prefix adapters (projected and not) and the base model, several lengths.
MIXED = [
    ("prompt4", PROMPTS[0]),
    ("rand3", PROMPTS[1]),
    ("prompttext6", PROMPTS[2]),
    (None, PROMPTS[3]),
    ("pmlp3", PROMPTS[1]),
    ("plstm7", PROMPTS[0]),
    ("proj4", PROMPTS[3]),
    ("prompttrained5", PROMPTS[2]),
    ("prompt4", PROMPTS[3]),
]
NEW_TOKENS = 10


def oracle(base, adapters, name, prompt, n=NEW_TOKENS):
    return peft_generate(base, adapters[name] if name else None, prompt, n)


@pytest.mark.parametrize("arch", arch_params())
def test_mixed_batch_greedy_equals_peft(arch, tiny_model_dirs, adapter_dirs, tmp_path):
    check_batch_greedy(arch, tiny_model_dirs[arch], adapter_dirs[arch], tmp_path / "store", MIXED, NEW_TOKENS)


@pytest.mark.parametrize("arch", arch_params())
def test_mixed_batch_prefill_logits_match_peft(arch, tiny_model_dirs, adapter_dirs, tmp_path):
    check_prefill_logits(arch, tiny_model_dirs[arch], adapter_dirs[arch], tmp_path / "store", MIXED, 1e-5)


def test_each_method_reports_its_kind_and_length(tiny_model_dirs, adapter_dirs, tmp_path):
    engine = make_engine(tiny_model_dirs["llama"], tmp_path / "store", adapter_dirs["llama"])
    methods = {"prompt4": "prompt-tuning", "prompttext6": "prompt-tuning", "pmlp3": "p-tuning"}
    for name, method in {**methods, "plstm7": "p-tuning", "rand3": "prefix-tuning"}.items():
        prefix = engine.registry.get(NAMESPACE, (name,))
        assert prefix.method == method
        want = PROMPT_SPECS[name][0] if name in PROMPT_SPECS else 3
        assert prefix.num_virtual_tokens == want and prefix.kv.shape[3] == want


@pytest.mark.parametrize("arch", arch_params("gpt2", "qwen2"))
def test_prompt_adapters_in_chunks_in_a_cascade_and_preempted_equal_peft(
    arch, tiny_model_dirs, adapter_dirs, tmp_path, cascaded_groups
):
    """The engine's other paths, with prompt-learning rows: prompts in chunks of 3 tokens, a shared prefix
    attended once for several rows, and a pool so small that rows are pushed out and recomputed."""
    cascaded = cascaded_groups
    base, adapters = tiny_model_dirs[arch], adapter_dirs[arch]
    plan = MIXED + [("plstm7", p) for p in PROMPTS]
    expected = [oracle(base, adapters, name, prompt, 16) for name, prompt in plan]
    # The portable path's grouping makes the cascade; the small pool's engine below decodes natively.
    chunked = make_engine(base, tmp_path / "chunked", adapters, max_prefill_tokens=3, attention="portable")
    sinks = [submit(chunked, prompt, name, max_new_tokens=16) for name, prompt in plan]
    run_until_idle(chunked)
    assert cascaded, "no step attended a shared prefix once"
    assert [s.tokens for s in sinks] == expected

    block_mb = chunked.pool.nbytes / chunked.pool.num_blocks / 2**20
    small = make_engine(base, tmp_path / "small", adapters, kv_cache_mb=10 * block_mb, block_size=4)
    sinks = [submit(small, prompt, name, max_new_tokens=16) for name, prompt in plan]
    run_until_idle(small)
    assert sum(s.seq.num_preemptions for s in sinks) > 0, "the pool never filled up"
    assert [s.tokens for s in sinks] == expected


def test_composed_prompt_adapters_equal_one_adapter_of_their_virtual_tokens(
    tiny_model_dirs, adapter_dirs, tmp_path
):
    """`a+b` of prompt-learning adapters is defined as a's virtual tokens then b's, run through the model
    together: what PEFT serves for one prompt-tuning adapter holding both embeddings in that order."""
    base, adapters = tiny_model_dirs["llama"], adapter_dirs["llama"]
    first, second = adapters["prompt4"], adapters["pmlp3"]
    joined = torch.cat(
        [load_file(d / "adapter_model.safetensors")["prompt_embeddings"] for d in (first, second)]
    )
    model = get_peft_model(
        load_base(base), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=7)
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(joined)
    model.save_pretrained(tmp_path / "joined")

    engine = make_engine(base, tmp_path / "store", adapters)
    composed = submit(engine, PROMPTS[2], "prompt4+pmlp3", max_new_tokens=NEW_TOKENS)
    run_until_idle(engine)
    assert composed.tokens == peft_generate(base, tmp_path / "joined", PROMPTS[2], NEW_TOKENS)
    assert engine.registry.get(NAMESPACE, ("prompt4", "pmlp3")).num_virtual_tokens == 7


def test_composing_prefix_and_prompt_adapters_is_refused_with_the_reason(
    tiny_model_dirs, adapter_dirs, tmp_path
):
    engine = make_engine(tiny_model_dirs["gpt2"], tmp_path / "store", adapter_dirs["gpt2"])
    with pytest.raises(
        InvalidAdapterError, match=r"mixes prefix adapters with prompt-learning adapters \(pmlp3\)"
    ):
        submit(engine, PROMPTS[0], "rand3+pmlp3", max_new_tokens=4)
    assert engine.scheduler.waiting == [] or len(engine.scheduler.waiting) == 0


def test_bf16_prompt_adapters_stay_within_the_prefix_adapters_tolerance(
    tiny_model_dirs, adapter_dirs, tmp_path
):
    """In bf16, batching changes rounding: every row, prefix or prompt kind, stays as close to PEFT's forward in
    bf16 as the start-up self-check requires of prefix adapters."""
    base, adapters = tiny_model_dirs["llama"], adapter_dirs["llama"]
    engine = make_engine(base, tmp_path / "store", adapters, dtype="bfloat16")
    tok = engine.loaded.tokenizer
    names = ["rand3", "proj4", "prompt4", "prompttext6", "pmlp3", "plstm7"]
    seqs = [
        Sequence(
            tok.encode(PROMPTS[2]), SamplingParams(), engine.registry.get(NAMESPACE, (n,)), lambda e: None
        )
        for n in names
    ]
    logits = run_rows(engine.runner, engine.scheduler.blocks, [(s, len(s.prompt_ids)) for s in seqs])
    for name, row in zip(names, logits, strict=True):
        delta, tolerance = _max_delta(
            row, peft_last_logits(base, adapters[name], PROMPTS[2], torch.bfloat16), torch.bfloat16
        )
        assert delta <= tolerance, f"{name}: max |dlogit| {delta:.3g} above bf16's {tolerance:.3g}"
