"""OpenAI request fields to engine inputs (sampling parameters, chat messages), and engine events to OpenAI's
log-probability shapes."""

from __future__ import annotations

from prefixserve.api.errors import APIError
from prefixserve.api.generation import grammar_spec
from prefixserve.api.openai_schemas import CompletionLogprobs, TokenLogprob, TopLogprob, _SamplingFields
from prefixserve.api.schemas import check_text
from prefixserve.engine.sequence import GrammarSpec, PromptToken, SamplingParams, TokenEvent
from prefixserve.engine.sequence import TokenLogprob as Alt


def refuse(field: str, why: str) -> APIError:
    return APIError(422, f"{field}: {why}", "validation", param=field)


def sampling_params(
    body: _SamplingFields, max_new_tokens: int | None, logprobs: int = 0, prompt_logprobs: int | None = None
) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias = []
    for token, value in (body.logit_bias or {}).items():
        digits = token.removeprefix("-")
        if not (digits.isascii() and digits.isdigit()):  # not str.isdigit alone: "³" is a digit to it
            raise refuse("logit_bias", f"keys are token ids (as strings), got {token!r}")
        bias.append((int(token), value))
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=body.min_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=tuple(bias),
        seed=body.seed,
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        include_stop_str_in_output=body.include_stop_str_in_output,
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=_grammar(body),
    )


def _grammar(body: _SamplingFields) -> GrammarSpec | None:
    given = [
        name
        for name, value in (
            ("response_format", body.response_format and body.response_format.type != "text"),
            ("guided_json", body.guided_json is not None),
            ("guided_regex", body.guided_regex is not None),
        )
        if value
    ]
    if len(given) > 1:
        raise refuse(" and ".join(given), "give one way to constrain the output")
    if body.guided_json is not None:
        return grammar_spec("json_schema", body.guided_json)
    if body.guided_regex is not None:
        return grammar_spec("regex", body.guided_regex)
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return grammar_spec("json_object")
    if fmt.json_schema is None:
        raise refuse("response_format.json_schema", "required when type is 'json_schema'")
    return grammar_spec("json_schema", fmt.json_schema.schema_)


def chat_messages(messages: list) -> list[dict[str, str]]:
    """Messages for the chat template: text parts joined; other parts are refused by position."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise refuse(f"messages.{i}.content", "only text parts are supported")
            content = "".join(str(part.get("text", "")) for part in content)
            try:
                check_text(content)
            except ValueError as exc:
                raise refuse(f"messages.{i}.content", str(exc)) from None
        out.append({"role": message.role, "content": content or ""})
    return out


def _top_dict(chosen_text: str, chosen: float, alternatives: tuple[Alt, ...], n: int) -> dict[str, float]:
    """The legacy completions shape: the n most likely and, as vLLM does, always the chosen token."""
    top = {a.text: a.logprob for a in alternatives[:n]}
    top.setdefault(chosen_text, chosen)
    return top


def completion_logprobs(
    tokens: list[TokenEvent], n: int, prompt: tuple[PromptToken, ...] = (), start_offset: int = 0
) -> CompletionLogprobs:
    """`prompt` (echo): the prompt's tokens first, the first with null log-probabilities."""
    texts: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    for p in prompt:
        texts.append(p.text)
        values.append(p.logprob)
        tops.append(None if p.logprob is None else _top_dict(p.text, p.logprob, p.top, n))
    for t in tokens:
        texts.append(t.token_text)
        values.append(t.logprob)
        tops.append(_top_dict(t.token_text, t.logprob, t.top, n))
    offsets, at = [], start_offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return CompletionLogprobs(
        tokens=texts, token_logprobs=values, top_logprobs=tops if n > 0 else None, text_offset=offsets
    )


def chat_logprobs(tokens: list[TokenEvent], n: int) -> list[TokenLogprob]:
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [
        TokenLogprob(
            **entry(t.token_text, t.logprob),
            top_logprobs=[TopLogprob(**entry(a.text, a.logprob)) for a in t.top[:n]],
        )
        for t in tokens
    ]
