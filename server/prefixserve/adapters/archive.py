"""Adapter uploads: the PEFT file pair as sent, or one .zip / .tar / .tar.gz of the adapter directory,
unpacked in memory with limits (member count, unpacked size) and no unsafe paths, links or special files."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from prefixserve.adapters.errors import AdapterTooLargeError, InvalidAdapterError
from prefixserve.adapters.format import (
    CONFIG_NAME,
    PICKLE_NAMES,
    WEIGHTS_NAME,
    PeftAdapter,
    read_adapter_files,
)

MAX_ARCHIVE_MEMBERS = 64


def read_adapter_archive(data: bytes, filename: str, max_unpacked_bytes: int) -> PeftAdapter:
    """Read a .zip / .tar / .tar.gz of a PEFT adapter directory, taking only regular files by basename."""
    return read_adapter_files(extract_archive(data, filename, max_unpacked_bytes))


def is_archive_name(filename: str) -> bool:
    name = filename.lower()
    return name.endswith((".zip", ".tar", ".tar.gz", ".tgz"))


def extract_archive(data: bytes, filename: str, max_unpacked_bytes: int) -> dict[str, bytes]:
    name = filename.lower()
    try:
        if name.endswith(".zip"):
            return _extract_zip(data, max_unpacked_bytes)
        return _extract_tar(data, max_unpacked_bytes)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidAdapterError(f"{filename} is not a readable archive: {exc}") from None


def _safe_member_name(name: str) -> str:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise InvalidAdapterError(
            f"archive member {name!r} has an unsafe path (absolute or '..'); refusing the archive"
        )
    return path.name


@dataclass(frozen=True)
class _Member:
    name: str
    kind: str  # "file", "dir" or "other" (links, devices, ...)
    size: int
    read: Callable[[int], bytes]  # read(at_most)


def _zip_members(archive: zipfile.ZipFile) -> list[_Member]:
    def kind(info: zipfile.ZipInfo) -> str:
        if info.is_dir():
            return "dir"
        return "file" if (info.external_attr >> 16) & 0o170000 in (0, 0o100000) else "other"

    def reader(info: zipfile.ZipInfo) -> Callable[[int], bytes]:
        def read(at_most: int) -> bytes:
            with archive.open(info) as member:
                return member.read(at_most)

        return read

    return [_Member(i.filename, kind(i), i.file_size, reader(i)) for i in archive.infolist()]


def _tar_members(archive: tarfile.TarFile, limit: int) -> list[_Member]:
    def reader(info: tarfile.TarInfo) -> Callable[[int], bytes]:
        def read(at_most: int) -> bytes:
            extracted = archive.extractfile(info)
            return extracted.read(at_most) if extracted else b""

        return read

    def kind(info: tarfile.TarInfo) -> str:
        return "dir" if info.isdir() else "file" if info.isfile() else "other"

    members = []
    # Lazily, member by member: a header's size is checked before tarfile decompresses past that member's
    # content, and the count before the next header is read, so a tar bomb costs no more than `limit`.
    while (info := archive.next()) is not None:
        if len(members) >= MAX_ARCHIVE_MEMBERS:
            raise InvalidAdapterError(
                f"archive holds more than {MAX_ARCHIVE_MEMBERS} entries; send only the adapter directory"
            )
        if info.size > limit:  # the same answer as a zip bomb's: too large
            raise AdapterTooLargeError(f"archive member {info.name!r} unpacks to more than {_mb(limit)}")
        members.append(_Member(info.name, kind(info), info.size, reader(info)))
    return members


def _extract_zip(data: bytes, limit: int) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return _take_adapter_files(_zip_members(archive), limit)


def _extract_tar(data: bytes, limit: int) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
        return _take_adapter_files(_tar_members(archive, limit), limit)


def _take_adapter_files(members: list[_Member], limit: int) -> dict[str, bytes]:
    """The adapter files of an archive, by basename; refuses unsafe paths, links and oversized content."""
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise InvalidAdapterError(
            f"archive holds more than {MAX_ARCHIVE_MEMBERS} entries; send only the adapter directory"
        )
    out: dict[str, bytes] = {}
    total = 0
    for member in members:
        base = _safe_member_name(member.name)
        if member.kind == "dir":
            continue
        if member.kind != "file":
            raise InvalidAdapterError(
                f"archive member {member.name!r} is a link or special file; refusing it"
            )
        if base not in (CONFIG_NAME, WEIGHTS_NAME, *PICKLE_NAMES):
            continue
        if member.size > limit:
            raise AdapterTooLargeError(f"archive member {member.name!r} unpacks to more than {_mb(limit)}")
        content = member.read(limit + 1)
        total += len(content)
        if total > limit:
            raise AdapterTooLargeError(f"archive unpacks to more than {_mb(limit)}; the adapter is too large")
        if base in out:
            raise InvalidAdapterError(f"archive holds {base} twice; send one adapter per archive")
        out[base] = content
    return out


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def read_upload(files: list[tuple[str, bytes]], max_bytes: int) -> PeftAdapter:
    """An upload is either the PEFT file pair or a single archive holding it."""
    total = sum(len(content) for _, content in files)
    if total > max_bytes:
        raise AdapterTooLargeError(
            f"upload is {total / 2**20:.1f} MB, above this server's limit of {max_bytes / 2**20:.1f} MB (--max-adapter-mb)"
        )
    if not files:
        raise InvalidAdapterError(
            f"no files in the upload: send multipart field 'files' with {CONFIG_NAME} and {WEIGHTS_NAME}, "
            "or one .zip/.tar.gz of the adapter directory"
        )
    if len(files) == 1 and is_archive_name(files[0][0]):
        name, data = files[0]
        return read_adapter_archive(data, name, max_bytes)
    by_name: dict[str, bytes] = {}
    for name, content in files:
        base = PurePosixPath(name.replace("\\", "/")).name
        if base in by_name:
            raise InvalidAdapterError(f"{base} was sent twice; send each file once")
        by_name[base] = content
    return read_adapter_files(by_name)
