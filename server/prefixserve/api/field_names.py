"""How each API names the engine's request fields in its error messages (engine/errors.py's WORDING): an
engine refusal says `inputs` to a TGI client and `max_tokens` to an OpenAI one, from the same template."""

from __future__ import annotations

from prefixserve.engine.errors import RequestValidationError

TGI_WORDING = {"prompt": "inputs"}
OPENAI_WORDING = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "prompt_logprobs": "logprobs",
    "scoring": "with echo: true, to score the prompt",
}


def worded(exc: RequestValidationError, openai: bool) -> tuple[str, str | None]:
    """The message and the field at fault, in the words of the API the request came through."""
    wording = OPENAI_WORDING if openai else TGI_WORDING
    return exc.worded(wording), exc.field_name(wording)
