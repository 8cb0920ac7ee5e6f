"""TGI/LoRAX-style generation: `POST /generate`, `POST /generate_stream`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from prefixserve.api.errors import APIError
from prefixserve.api.generation import collect, events, start
from prefixserve.api.schemas import (
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
    Token,
)
from prefixserve.engine.sequence import SamplingParams, TokenEvent
from prefixserve.engine.streams import RequestStream

router = APIRouter(tags=["generation (TGI/LoRAX)"])


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
        seed=p.seed,
        stop=tuple(p.stop),
    )


async def _start(body: GenerateRequest, request: Request, x_adapter_id: str | None) -> RequestStream:
    """Queue the request: the adapter from the body or the `X-Adapter-Id` header, `truncate` applied."""
    ids = await request.app.state.server.aencode(body.inputs)
    if body.parameters.truncate:
        ids = ids[-body.parameters.truncate :]
    adapter = body.parameters.adapter_id or x_adapter_id
    return await start(request, ids, adapter, sampling_params(body.parameters))


def _token(event: TokenEvent) -> Token:
    return Token(id=event.token_id, text=event.token_text, logprob=event.logprob, special=event.special)


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
    details = None
    if body.parameters.details:
        tokens = [_token(e) for e in out.tokens]
        details = Details(
            finish_reason=out.finish_reason.value,
            generated_tokens=len(tokens),
            seed=seq.params.seed if seq.params.do_sample else None,
            tokens=tokens,
        )
    return GenerateResponse(generated_text=text, details=details)


@router.post(
    "/",
    include_in_schema=True,
    summary="TGI's compatibility route: /generate, or /generate_stream when stream=true",
)
async def generate_compat(body: GenerateRequest, request: Request, x_adapter_id: str | None = Header(None)):
    """What TGI serves at its root and `huggingface_hub`'s `InferenceClient` posts to."""
    if body.stream:
        return await generate_stream(body, request, x_adapter_id)
    return await generate(body, request, x_adapter_id)


@router.post("/generate_stream")
async def generate_stream(
    body: GenerateRequest, request: Request, x_adapter_id: str | None = Header(None)
) -> StreamingResponse:
    """Server-Sent Events, one per token; the last carries `generated_text` and `details`."""
    stream = await _start(body, request, x_adapter_id)
    prefix = body.inputs if body.parameters.return_full_text else ""

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
                chunk = StreamResponse(index=index, token=_token(event))
                if event.finish_reason is not None:
                    seq = stream.seq
                    chunk.generated_text = prefix + text
                    chunk.details = StreamDetails(
                        finish_reason=event.finish_reason.value,
                        generated_tokens=index,
                        seed=seq.params.seed if seq.params.do_sample else None,
                    )
                yield f"data: {chunk.model_dump_json()}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps({'error': exc.message, 'error_type': exc.error_type})}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
