"""Run the app under uvicorn, with the keys policy and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from types import FrameType

import uvicorn

from prefixserve.api.app import create_app
from prefixserve.api.auth import KeyRing, is_loopback
from prefixserve.api.state import ServerState
from prefixserve.config import Settings
from prefixserve.runtime import build_runtime
from prefixserve.startup import StartupError, bind_socket

log = logging.getLogger(__name__)


# After the drain, uvicorn gives open connections this long to close before the process exits; an
# orchestrator's grace period must cover preStop + drain + this.
SHUTDOWN_SECONDS_AFTER_DRAIN = 5


class DrainingServer(uvicorn.Server):
    """First SIGTERM: drain (ready → 503, running requests finish within --drain-seconds), then exit.
    A second SIGTERM or a SIGINT exits at once, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def signal_from_main_thread(self, sig: int, frame: FrameType | None) -> None:
        """Python runs signal handlers on the main thread, where the engine steps; the server's loop is on
        another thread, so the signal is handed over to it."""
        if self._loop is None:  # not serving yet: nothing to drain
            raise KeyboardInterrupt
        self._loop.call_soon_threadsafe(self.handle_exit, sig, frame)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_task is None and not self.should_exit:
            log.info("SIGTERM: draining before exit")
            self._drain_task = asyncio.get_event_loop().create_task(self._drain_then_exit())
            return
        super().handle_exit(sig, frame)

    async def _drain_then_exit(self) -> None:
        await self.state.drain()
        self.should_exit = True


def load_keyring(settings: Settings) -> KeyRing | None:
    if settings.api_keys_file is not None:
        keyring = KeyRing.from_file(settings.api_keys_file)
        log.info("API keys loaded from %s: multi-tenant mode", settings.api_keys_file)
        return keyring
    if not is_loopback(settings.host) and not settings.allow_anonymous:
        where = settings.host or "every interface (empty --host)"
        raise StartupError(
            f"refusing to serve {where} without API keys: pass --api-keys-file (PREFIXSERVE_API_KEYS_FILE), "
            "or --allow-anonymous to accept anyone"
        )
    log.warning("no API keys: anonymous single-tenant mode (every client shares one adapter namespace)")
    return None


def run(settings: Settings, sock: socket.socket | None = None) -> None:
    """HTTP on a thread of its own, the engine's step loop on the main thread (see LLMEngine.run_loop).

    `sock`: the address, already bound (`bind_socket`), so that a busy port is found before the model loads.
    """
    sock = sock or bind_socket(settings.host, settings.port)
    keyring = load_keyring(settings)
    runtime = build_runtime(settings)
    app = create_app(runtime, keyring, start_engine=False)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=SHUTDOWN_SECONDS_AFTER_DRAIN,
    )
    server = DrainingServer(config, app.state.server)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # uvicorn exits (SystemExit) when it cannot bind
            failure.append(exc)
        finally:
            runtime.engine.stop_accepting()  # the loop below returns once the last request is done

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.signal_from_main_thread)
    http = threading.Thread(target=serve, name="prefixserve-http", daemon=True)
    http.start()
    runtime.engine.run_loop()
    http.join()
    if failure or not server.started:
        raise SystemExit(1)
