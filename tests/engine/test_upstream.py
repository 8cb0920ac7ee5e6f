"""Upstream's behaviour, stated: does `PeftModel.generate` keep a prefix adapter's prefix?

The suite's oracle is greedy decoding by PEFT's forward (tests/tiny_models.greedy_by_forward), because with
transformers >= 5.24 and peft 0.21.2, `PeftModel.generate` drops the prefix: peft injects it under
`past_key_values`, which transformers' `@deprecate_kwarg(..., new_name="cache")` discards once `generate` has
set `cache` to an empty DynamicCache of its own. This test says so by name (an xfail with the versions) while
that holds, and passes the day upstream is fixed — then `generate` could be an oracle again.
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from tests.conftest import arch_params
from tests.tiny_models import EOS, greedy_by_forward, load_base, peft_model, tokenizer

PROMPT = "Once upon a time"
N = 8


@pytest.mark.parametrize("arch", arch_params())
def test_peft_generate_equals_peft_forward_for_a_prefix_adapter(arch, tiny_model_dirs, adapter_dirs):
    base, adapter = tiny_model_dirs[arch], adapter_dirs[arch]["rand8"]
    prompt_ids = tokenizer(base)(PROMPT)["input_ids"]
    model = peft_model(base, adapter)
    by_forward = greedy_by_forward(model, prompt_ids, N)
    # The comparison means something only where the prefix changes the output.
    assert by_forward != greedy_by_forward(load_base(base), prompt_ids, N)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            do_sample=False,
            pad_token_id=EOS,
        )
    by_generate = out[0, len(prompt_ids) :].tolist()
    if by_generate != by_forward:
        pytest.xfail(
            f"PeftModel.generate ignores the prefix on transformers {transformers.__version__} with peft "
            f"{peft.__version__} ({arch}): generate gave {by_generate}, PEFT's forward {by_forward}"
        )
