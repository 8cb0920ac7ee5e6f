"""Adapter management: upload (create/replace), list, inspect, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import UploadFile as StarletteUploadFile

from prefixserve.adapters.archive import read_upload
from prefixserve.adapters.errors import AdapterTooLargeError
from prefixserve.adapters.format import PeftAdapter
from prefixserve.adapters.ids import ADAPTER_ID_PATTERN, validate_adapter_id
from prefixserve.adapters.store import AdapterInfo
from prefixserve.api.errors import APIError
from prefixserve.api.schemas import AdapterCreated, Text
from prefixserve.engine.cpu.threads import single_threaded
from prefixserve.engine.errors import RequestValidationError
from prefixserve.engine.from_text import adapter_from_text

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
# Documented, and checked by validate_adapter_id (whose message says what to do), not by FastAPI.
AdapterIdPath = Annotated[str, Path(json_schema_extra={"pattern": f"^{ADAPTER_ID_PATTERN}$"})]


class AdapterSummary(BaseModel):
    """An adapter as the API shows it: read from the store's `AdapterInfo` by attribute, plus `loaded`."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(validation_alias="adapter_id")
    peft_type: str
    method: str = Field(description="prefix-tuning, cartridge, prompt-tuning or p-tuning")
    num_virtual_tokens: int
    sha256: str
    size_bytes: int
    created_at: float
    updated_at: float
    loaded: bool = Field(False, description="Whether it is in this replica's device registry now.")
    base_model_name_or_path: str | None = None
    prefix_projection: bool | None = None


class AdapterList(BaseModel):
    data: list[AdapterSummary]
    next_cursor: str | None = None


def _read_files(files: list[StarletteUploadFile], max_bytes: int) -> list[tuple[str, bytes]]:
    out, total = [], 0
    for upload in files:
        content = upload.file.read(max_bytes + 1 - total)
        total += len(content)
        if total > max_bytes:
            raise AdapterTooLargeError(
                f"upload is above this server's limit of {max_bytes / 2**20:.1f} MB (--max-adapter-mb)"
            )
        out.append((upload.filename or "", content))
    return out


def _summary(info: AdapterInfo, loaded: bool) -> AdapterSummary:
    return AdapterSummary.model_validate(info).model_copy(update={"loaded": loaded})


class FromTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_text: Text = Field(description="Text whose keys/values (under the base model) become the prefix.")
    chat_template: bool = Field(
        False, description="Wrap the text as a system message with the chat template."
    )


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "required": ["files"],
            }
        },
        "application/json": {"schema": FromTextRequest.model_json_schema()},
    },
}


async def _adapter_from_request(request: Request) -> PeftAdapter:
    """Multipart `files` (the PEFT pair, or one archive), or JSON `{"from_text": ...}`."""
    state = request.app.state.server
    max_bytes = int(state.settings.max_adapter_mb * 2**20)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = FromTextRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(
                "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            ) from None
        state.check_chars(len(body.from_text), state.settings.max_virtual_tokens, "from_text")
        return await run_in_threadpool(
            single_threaded(adapter_from_text),
            state.loaded,
            body.from_text,
            body.chat_template,
            state.settings.max_virtual_tokens,
            state.model_name,
        )
    if not content_type.startswith("multipart/form-data"):
        raise APIError(
            415,
            "send multipart/form-data with field 'files' (the PEFT files or one archive), "
            'or application/json with {"from_text": ...}',
            "validation",
        )
    form = await request.form()
    uploads = [f for f in form.getlist("files") if isinstance(f, StarletteUploadFile)]
    files = await run_in_threadpool(_read_files, uploads, max_bytes)
    return await run_in_threadpool(single_threaded(read_upload), files, max_bytes)


async def _store(request: Request, adapter_id: str, response: Response) -> AdapterCreated:
    state = request.app.state.server
    validate_adapter_id(adapter_id)
    adapter = await _adapter_from_request(request)
    info, created = await run_in_threadpool(
        single_threaded(state.registry.put), state.namespace(request), adapter_id, adapter
    )
    response.status_code = 201 if created else 200
    return AdapterCreated.model_validate(info)


_REPLACED = {200: {"model": AdapterCreated, "description": "Replaced an adapter of this id"}}


@router.put(
    "/{adapter_id}",
    response_model=AdapterCreated,
    status_code=201,
    responses=_REPLACED,
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def put_adapter(adapter_id: AdapterIdPath, request: Request, response: Response) -> AdapterCreated:
    """Create (201) or replace (200) an adapter: multipart `files` with the two files PEFT's save_pretrained
    writes (or one .zip/.tar.gz of the directory), or JSON `{"from_text": "..."}` to make one from a text."""
    return await _store(request, adapter_id, response)


@router.post("", response_model=AdapterCreated, status_code=201, responses=_REPLACED)
async def post_adapter(
    request: Request, response: Response, adapter_id: str = Form(...), files: list[UploadFile] = File(...)
) -> AdapterCreated:
    """Same as PUT /v1/adapters/{adapter_id}, with the id as form field `adapter_id`."""
    return await _store(request, adapter_id, response)


@router.get("", response_model=AdapterList)
def list_adapters(request: Request, limit: int = 100, after: str | None = None) -> AdapterList:
    """Adapters sorted by id; pass `after=<next_cursor>` for the next page."""
    state = request.app.state.server
    namespace = state.namespace(request)
    limit = max(1, min(limit, 1000))
    infos = [i for i in state.store.list(namespace) if after is None or i.adapter_id > after]
    page = infos[:limit]
    return AdapterList(
        data=[_summary(i, state.registry.is_loaded(namespace, i.adapter_id)) for i in page],
        next_cursor=page[-1].adapter_id if len(infos) > limit else None,
    )


@router.get("/{adapter_id}", response_model=AdapterSummary)
def get_adapter(adapter_id: AdapterIdPath, request: Request) -> AdapterSummary:
    state = request.app.state.server
    namespace = state.namespace(request)
    info = state.store.info(namespace, validate_adapter_id(adapter_id))
    return _summary(info, state.registry.is_loaded(namespace, adapter_id))


@router.delete("/{adapter_id}", status_code=204)
def delete_adapter(adapter_id: AdapterIdPath, request: Request) -> Response:
    """Running requests finish with the version they started with; new requests get 404."""
    state = request.app.state.server
    state.registry.delete(state.namespace(request), validate_adapter_id(adapter_id))
    return Response(status_code=204)


class _NestedIdConvertor(Convertor[str]):
    """Matches `org/name` (two or more path segments), which the routes above, one segment each, do not."""

    regex = "[^/]+/.+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("nested_id", _NestedIdConvertor())


@router.api_route(
    "/{adapter_id:nested_id}", methods=["GET", "PUT", "POST", "DELETE"], include_in_schema=False
)
def nested_adapter_id(adapter_id: str) -> None:
    """A hub-style id such as `org/name`: a 422 that says why, instead of a bare 404 from the router."""
    validate_adapter_id(adapter_id)  # raises InvalidAdapterIdError (422) naming the '/'
