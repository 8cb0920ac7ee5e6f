"""Pure ASGI middleware: request ids and access log, authentication before the body, body size limits.

Pure ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware hides client disconnects
from the endpoint (a disconnect must free the request's batch row), and these must act before the body is
read, which FastAPI does before running any dependency.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Collection

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefixserve.api.auth import Authenticator
from prefixserve.api.errors import APIError, error_response

log = logging.getLogger("prefixserve.access")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class RequestIdMiddleware:
    """Gives every request an id (the client's `X-Request-Id` if sane), echoed in the response and the log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status, start = 0, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(  # the path is decoded (`%0a` is a newline): the log formatters escape it
                "%s %s -> %d in %.1f ms",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - start) * 1e3,
                extra={"request_id": rid},
            )


class AuthMiddleware:
    """Authenticates from the headers alone, before anything reads the body: a client without a valid key
    costs the server no more than its headers. Paths in `open_paths` (health, metrics, docs) and reads
    (GET, HEAD) of `open_reads` (the root's redirect) and of anything under `open_trees` (the console's and
    the docs' static files, which hold no data) need no key."""

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        open_paths: Collection[str],
        open_reads: Collection[str] = (),
        open_trees: Collection[str] = (),
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.open_paths = frozenset(open_paths)
        self.open_reads = frozenset(open_reads)
        self.open_trees = tuple(tree.rstrip("/") + "/" for tree in open_trees)

    def _is_open(self, scope: Scope) -> bool:
        path = scope["path"]
        if path in self.open_paths:
            return True
        if scope["method"] not in ("GET", "HEAD"):
            return False
        return path in self.open_reads or (path + "/").startswith(self.open_trees)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._is_open(scope):
            try:
                principal = self.authenticator(Headers(scope=scope))
            except APIError as exc:
                response = error_response(
                    Request(scope), exc.status, exc.message, exc.error_type, exc.headers
                )
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once the body passes its route's limit; FastAPI lets HTTPExceptions through
    its body parsing, and the app's handler answers 413."""

    error_type = "too_large"

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class BodyLimitMiddleware:
    """Counts body bytes as they stream in, chunked bodies included, against the route's limit
    (`limit_for(scope)` → (bytes, the limit as the client should read it)). A declared Content-Length above the limit is
    refused before any byte is read; otherwise reading stops at the first chunk past it, so a refused
    request holds at most its limit in memory."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], tuple[int, str]]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, shown = self.limit_for(scope)

        def too_large(size: str) -> BodyTooLargeError:
            return BodyTooLargeError(f"request body {size} this server's limit of {shown}")

        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, too_large(f"is {_mb(int(declared))}, above"))
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large("exceeds")
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLargeError as exc:  # when no exception handler answered it
            if started:
                raise
            await self._refuse(scope, receive, send, exc)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, exc: BodyTooLargeError) -> None:
        response = error_response(Request(scope), 413, str(exc.detail), exc.error_type)
        await response(scope, receive, send)


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"
