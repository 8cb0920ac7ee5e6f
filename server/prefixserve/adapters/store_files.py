"""File-system steps of the adapter store: publishing a written file, fsyncing a directory, and turning
the file system's failures (full, read-only, a directory in the way) into typed errors with a message."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefixserve.adapters.errors import StoreError, StoreFullError

log = logging.getLogger("prefixserve.adapters.store")


def publish(tmp: Path, path: Path) -> bool:
    """Make the written temp file the adapter's file; True when there was none. A hard link creates without
    replacing, so of several writers storing a new id at once exactly one is told it created it."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        existed = path.exists()  # a file system without hard links: replace, and tell as well as it can
        os.replace(tmp, path)
        return not existed
    os.replace(tmp, path)
    return False


NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


@contextmanager
def storage_faults(adapter_id: str, action: str, where: Path) -> Iterator[None]:
    """File-system failures as typed errors with a message for the client (the path only in the log)."""
    try:
        yield
    except OSError as exc:
        log.error("adapter store: cannot %s %r at %s: %s", action, adapter_id, where, exc)
        if isinstance(exc, IsADirectoryError):
            raise StoreError(
                f"cannot {action} adapter '{adapter_id}': the adapter store holds a directory where its file "
                "belongs; an operator must remove it"
            ) from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFullError(
                f"cannot {action} adapter '{adapter_id}': the adapter store is full; free space or delete "
                "adapters, then retry"
            ) from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StoreError(
                f"cannot {action} adapter '{adapter_id}': the adapter store is read-only or not writable by "
                "this server; retry later or on another replica"
            ) from None
        raise StoreError(
            f"cannot {action} adapter '{adapter_id}': the adapter store failed ({exc.strerror or exc})"
        ) from None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
