"""The bytes of a stored adapter, the same in every store backend: a safetensors file holding
`prompt_embeddings` exactly as uploaded and, in its header, the PEFT config, the content hash and the
creation time. Encoding it, reading its header, and decoding it with the hash verified."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from prefixserve.adapters.errors import AdapterIntegrityError, InvalidAdapterError
from prefixserve.adapters.format import TENSOR_NAME, PeftAdapter, parse_config, parse_weights
from prefixserve.adapters.store import AdapterInfo

log = logging.getLogger("prefixserve.adapters.store")
FILE_SUFFIX = ".safetensors"
FORMAT_TAG = "prefixserve.adapter/1"


def encode_adapter(adapter: PeftAdapter, created_at: float) -> tuple[bytes, str]:
    """The stored bytes of `adapter`, and the content sha256 recorded in them."""
    config_json = json.dumps(adapter.config, sort_keys=True)
    tensors = {TENSOR_NAME: adapter.embeddings.contiguous()}
    sha256 = content_sha256(tensors, config_json)
    metadata = {
        "format": FORMAT_TAG,
        "adapter_config": config_json,
        "sha256": sha256,
        "created_at": repr(created_at),
    }
    return save_safetensors(tensors, metadata=metadata), sha256


def stored_info(
    namespace: str,
    adapter_id: str,
    adapter: PeftAdapter,
    sha256: str,
    size: int,
    created_at: float,
    at: float,
) -> AdapterInfo:
    """What a put stored, described from what was written, not read back: a concurrent writer may have
    replaced it since."""
    return AdapterInfo(
        namespace=namespace,
        adapter_id=adapter_id,
        peft_type=adapter.config["peft_type"],
        num_virtual_tokens=adapter.config["num_virtual_tokens"],
        sha256=sha256,
        size_bytes=size,
        created_at=created_at,
        updated_at=at,
        config=adapter.config,
    )


def decode_verified(
    namespace: str, adapter_id: str, data: bytes, where: object, updated_at: float
) -> tuple[PeftAdapter, AdapterInfo]:
    """Parse stored bytes, verifying their content against the sha256 recorded when they were stored.
    `where` (a path, an s3:// URL) goes to the log only."""
    try:
        header, start = read_header(data)
        metadata = metadata_of(header)
        view = stored_tensor_view(data, header, start)
        # not the layout prefixserve writes: safetensors parses it, or says what is wrong
        embeddings = view if view is not None else parse_weights(data)
    except (InvalidAdapterError, ValueError, RecursionError) as exc:  # RecursionError: a header nested deeply
        raise unreadable(adapter_id, str(exc) or type(exc).__name__) from None
    info = info_from_metadata(namespace, adapter_id, metadata, len(data), updated_at)
    actual = None if view is None else stored_content_sha256(data, header, start, metadata["adapter_config"])
    # The shortcut's header may differ from safetensors' own serialization: the definition decides.
    if actual != info.sha256:
        actual = content_sha256({TENSOR_NAME: embeddings}, metadata["adapter_config"])
    if actual != info.sha256:
        log.error(
            "adapter %r of %r: %s hashes to %s, not the sha256 %s recorded at upload; refusing to serve it",
            adapter_id,
            namespace,
            where,
            actual,
            info.sha256,
        )
        raise AdapterIntegrityError(
            f"the stored file of adapter '{adapter_id}' does not match the sha256 recorded when it was "
            f"uploaded ({info.sha256}): it was changed in the store; upload the adapter again"
        )
    return PeftAdapter(info.config, embeddings), info


def info_from_metadata(
    namespace: str, adapter_id: str, metadata: dict[str, str], size: int, updated_at: float
) -> AdapterInfo:
    try:
        if metadata.get("format") != FORMAT_TAG:
            raise ValueError("not written by prefixserve")
        config = parse_config(metadata["adapter_config"].encode())
        return AdapterInfo(
            namespace=namespace,
            adapter_id=adapter_id,
            peft_type=config["peft_type"],
            num_virtual_tokens=config["num_virtual_tokens"],
            sha256=metadata["sha256"],
            size_bytes=size,
            created_at=float(metadata["created_at"]),
            updated_at=updated_at,
            config=config,
        )
    except (KeyError, ValueError, TypeError, AttributeError, InvalidAdapterError) as exc:
        raise unreadable(adapter_id, str(exc)) from None


def unreadable(adapter_id: str, why: str) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"the stored file of adapter '{adapter_id}' is unreadable ({why}); upload the adapter again"
    )


def content_sha256(tensors: dict[str, torch.Tensor], config_json: str) -> str:
    """The recorded hash: of the tensor and the config, serialized without the store's other metadata."""
    return hashlib.sha256(save_safetensors(tensors, metadata={"adapter_config": config_json})).hexdigest()


STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
# stored_tensor_view's tensors lie in a bytes object, read-only memory, and are only ever read (the pool write
# and the registry's conversions copy out of them). Filtered once here: catch_warnings around each call is not
# thread-safe, and loads run on several helper threads at once.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def stored_tensor_view(data: bytes, header: dict[str, Any], start: int) -> torch.Tensor | None:
    """The stored tensor, read in place from `data` (which it keeps alive; never written to): a copy of a
    1.5 MB adapter cost ~1 ms of a load in a busy engine, on memory fresh from the allocator. Only for the
    layout encode_adapter writes (one 2-D float tensor filling the file after its header, which `header` and
    `start` are, from read_header); None otherwise."""
    try:
        entry = header[TENSOR_NAME]
        dtype = STORED_DTYPES[entry["dtype"]]
        rows, width = entry["shape"]
        begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        return None
    if not all(type(v) is int for v in (rows, width, begin, end)) or rows <= 0 or width <= 0:
        return None
    numel, itemsize = rows * width, dtype.itemsize
    if set(header) - {"__metadata__", TENSOR_NAME} or begin != 0 or end != numel * itemsize:
        return None
    if len(data) != start + end or start % itemsize:
        return None
    return torch.frombuffer(data, dtype=dtype, count=numel, offset=start).view(rows, width)


def stored_content_sha256(data: bytes, header: dict[str, Any], start: int, config_json: str) -> str:
    """content_sha256 of a stored file whose layout stored_tensor_view accepted, hashed where the tensor lies:
    the header content_sha256 serializes is written out as safetensors writes it (compact JSON, padded with
    spaces to a multiple of 8), so the tensor is neither converted nor copied (serializing it again took 5 ms
    of a 1.5 MB adapter's load in the engine; the hash alone 0.8)."""
    entry = header[TENSOR_NAME]
    described = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": entry["data_offsets"]}
    content = {"__metadata__": {"adapter_config": config_json}, TENSOR_NAME: described}
    text = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256(len(text).to_bytes(8, "little") + text)
    digest.update(memoryview(data)[start:])
    return digest.hexdigest()


def header_length(prefix: bytes) -> int:
    """A safetensors file starts with the length of its JSON header (8 bytes, little-endian)."""
    if len(prefix) < 8:
        raise ValueError(f"{len(prefix)} bytes, shorter than a safetensors header")
    return int.from_bytes(prefix[:8], "little")


def read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header, and where its tensor data starts."""
    n = header_length(data)
    if len(data) < 8 + n:
        raise ValueError(f"the header says {n} bytes but the file ends before")
    header = json.loads(data[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    return header, 8 + n


def metadata_of(header: dict[str, Any]) -> dict[str, Any]:
    metadata = header.get("__metadata__", {})
    return metadata if isinstance(metadata, dict) else {}


def header_metadata(data: bytes) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file, from its first 8 + header-length bytes (or all of it)."""
    return metadata_of(read_header(data)[0])
