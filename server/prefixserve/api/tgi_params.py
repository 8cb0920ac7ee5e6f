"""TGI/LoRAX request parameters to engine parameters (what openai_params.py is for the OpenAI routes)."""

from __future__ import annotations

from prefixserve.api.generation import grammar_spec
from prefixserve.api.schemas import GenerateParameters
from prefixserve.engine.sequence import GrammarSpec, SamplingParams


def sampling_params(p: GenerateParameters) -> SamplingParams:
    # As TGI does: any sampling knob turns sampling on.
    do_sample = (
        p.do_sample or p.temperature not in (None, 1.0) or p.top_k is not None or p.top_p not in (None, 1.0)
    )
    return SamplingParams(
        max_new_tokens=p.max_new_tokens,  # None: the server's default, within the room left in the row
        do_sample=do_sample,
        temperature=p.temperature or 1.0,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=p.seed,
        stop=tuple(p.stop),
        ignore_eos=p.ignore_eos_token,
        logprobs=max(p.top_n_tokens or 0, p.return_k_alternatives or 0),
        prompt_logprobs=(p.top_n_tokens or 0) if p.decoder_input_details else None,
        grammar=_grammar(p),
    )


def _grammar(p: GenerateParameters) -> GrammarSpec | None:
    if p.grammar is not None:
        return grammar_spec("json_schema" if p.grammar.type == "json" else "regex", p.grammar.value)
    if p.response_format is not None and p.response_format.type != "text":
        schema = p.response_format.schema_
        return grammar_spec("json_schema", schema) if schema else grammar_spec("json_object")
    return None
