"""TGI/LoRAX-style generation: `POST /generate`, `POST /generate_stream`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from prefixserve.api.error_docs import EVENT_STREAM
from prefixserve.api.errors import APIError
from prefixserve.api.generation import collect, events, start
from prefixserve.api.schemas import (
    AlternativeToken,
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    InputToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from prefixserve.api.streams import RequestStream
from prefixserve.api.tgi_params import sampling_params
from prefixserve.engine.sequence import Sequence, TokenEvent

router = APIRouter(tags=["generation (TGI/LoRAX)"])


async def _start(body: GenerateRequest, request: Request, x_adapter_id: str | None) -> RequestStream:
    """Queue the request: the adapter from the body or the `X-Adapter-Id` header, `truncate` applied."""
    ids = await request.app.state.server.aencode(body.inputs, "inputs")
    if body.parameters.truncate:
        ids = ids[-body.parameters.truncate :]
    adapter = body.parameters.adapter_id or x_adapter_id
    if body.parameters.adapter_id and x_adapter_id and body.parameters.adapter_id != x_adapter_id:
        # A balancer routes on the header, the server serves the body: refuse rather than pick one silently.
        raise APIError(
            422,
            f"the X-Adapter-Id header ({x_adapter_id!r}) and parameters.adapter_id "
            f"({body.parameters.adapter_id!r}) name different adapters; send the same id in both, or only one",
            "validation",
        )
    return await start(request, ids, adapter, sampling_params(body.parameters), body.parameters.cache_salt)


def _token(event: TokenEvent, p: GenerateParameters) -> Token:
    alternatives = None
    if p.return_k_alternatives:
        alternatives = [
            AlternativeToken(id=t.token_id, text=t.text, logprob=t.logprob)
            for t in event.top[: p.return_k_alternatives]
        ]
    return Token(
        id=event.token_id,
        text=event.token_text,
        logprob=event.logprob,
        special=event.special,
        alternative_tokens=alternatives,
    )


def _top_tokens(event: TokenEvent, p: GenerateParameters, special: frozenset[int]) -> list[Token]:
    return [
        Token(id=t.token_id, text=t.text, logprob=t.logprob, special=t.token_id in special)
        for t in event.top[: p.top_n_tokens or 0]
    ]


def _seed(seq: Sequence) -> int | None:
    return seq.params.seed if seq.params.do_sample else None


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True)
async def generate(
    body: GenerateRequest, request: Request, x_adapter_id: str | None = Header(None)
) -> GenerateResponse:
    """Generate text for `inputs`, with the adapter named in `parameters.adapter_id` or the `X-Adapter-Id` header."""
    if body.stream:
        raise APIError(422, "stream=true: use POST /generate_stream for a streamed response", "validation")
    stream = await _start(body, request, x_adapter_id)
    out = await collect(stream, request)
    seq = stream.seq
    text = body.inputs + out.text if body.parameters.return_full_text else out.text
    details, p = None, body.parameters
    if p.details:
        special = request.app.state.server.special_ids
        details = Details(
            finish_reason=out.finish_reason.value,
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=len(out.tokens),
            seed=_seed(seq),
            prefill=[InputToken(id=t.token_id, text=t.text, logprob=t.logprob) for t in out.prompt],
            tokens=[_token(e, p) for e in out.tokens],
            top_tokens=[_top_tokens(e, p, special) for e in out.tokens] if p.top_n_tokens else None,
        )
    return GenerateResponse(generated_text=text, details=details)


@router.post(
    "/",
    include_in_schema=True,
    summary="TGI's compatibility route: /generate (a one-element list), or /generate_stream when stream=true",
    response_model=list[GenerateResponse],
    response_model_exclude_none=True,
    responses=EVENT_STREAM,
)
async def generate_compat(body: GenerateRequest, request: Request, x_adapter_id: str | None = Header(None)):
    """What TGI serves at its root, where its and LoRAX's clients post: a one-element list when not streamed."""
    if body.stream:
        return await generate_stream(body, request, x_adapter_id)
    return [await generate(body, request, x_adapter_id)]


@router.post("/generate_stream", response_class=StreamingResponse, responses=EVENT_STREAM)
async def generate_stream(
    body: GenerateRequest, request: Request, x_adapter_id: str | None = Header(None)
) -> StreamingResponse:
    """Server-Sent Events, one per token; the last carries `generated_text` and `details`."""
    stream = await _start(body, request, x_adapter_id)
    prefix = body.inputs if body.parameters.return_full_text else ""
    p, special = body.parameters, request.app.state.server.special_ids

    async def sse() -> AsyncIterator[str]:
        text, index = "", 0
        try:
            async for event in events(stream):
                text += event.text_delta
                if (
                    event.token_id < 0
                ):  # cancelled by the server (drain deadline): say so rather than just stop
                    error = {"error": "the request was cancelled by the server", "error_type": "cancelled"}
                    yield f"data: {json.dumps(error)}\n\n"
                    continue
                index += 1
                chunk = StreamResponse(index=index, token=_token(event, p))
                if p.top_n_tokens:
                    chunk.top_tokens = _top_tokens(event, p, special)
                if event.finish_reason is not None:
                    seq = stream.seq
                    chunk.generated_text = prefix + text
                    chunk.details = StreamDetails(
                        finish_reason=event.finish_reason.value,
                        prompt_tokens=len(seq.prompt_ids),
                        generated_tokens=index,
                        seed=_seed(seq),
                    )
                yield f"data: {chunk.model_dump_json()}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps({'error': exc.message, 'error_type': exc.error_type})}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
