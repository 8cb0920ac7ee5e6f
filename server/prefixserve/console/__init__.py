"""The web console at /console: static HTML, JS and CSS shipped in the package (no CDN, no build step).

The page calls the server's own API from the browser (`/v1/adapters`, `/generate_stream`, `/info`) with the
key typed into it, so serving the files needs no authentication; its Content-Security-Policy keeps every
request it makes on this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONSOLE_PATH = "/console"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'self'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    """A browser pointed at the server lands on the console (POST / is TGI's generation route)."""
    return RedirectResponse(f"{CONSOLE_PATH}/")


class ConsoleFiles(StaticFiles):
    """The console's files, with a policy that forbids the page any request off this server."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_policy(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"content-security-policy", CSP.encode()),
                    (b"cache-control", b"no-cache"),
                ]
            await send(message)

        await super().__call__(scope, receive, send_with_policy)


def install_console(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(CONSOLE_PATH, ConsoleFiles(directory=STATIC_DIR, html=True), name="console")
