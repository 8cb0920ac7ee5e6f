"""`ServerState`: what every route shares (the engine, the adapter registry and store, the settings, tenant
limits, tokenizing off the event loop, the drain). No tensors: the API hands token ids to the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from prefixserve.api.auth import Authenticator, KeyRing
from prefixserve.api.errors import APIError
from prefixserve.api.generation import TenantLimiter
from prefixserve.runtime import Runtime

if TYPE_CHECKING:  # imported for real only when tracing is on: off, the OpenTelemetry SDK is never loaded
    from prefixserve.api.tracing import Tracing

log = logging.getLogger(__name__)


class ServerState:
    """What the routes need: the engine, the adapter registry and store, settings. No tensors."""

    def __init__(self, runtime: Runtime, keyring: KeyRing | None) -> None:
        self.settings = runtime.settings
        self.loaded = runtime.loaded
        self.engine = runtime.engine
        self.registry = runtime.registry
        self.store = runtime.store
        self.model_name = runtime.settings.model_name or runtime.loaded.name
        self.authenticator = Authenticator(keyring)
        self.limiter = TenantLimiter(runtime.settings.max_concurrent_per_tenant)
        self.started_at = time.time()
        self.tracing: Tracing | None = None  # set by create_app when --otlp-traces-endpoint is given
        self.draining = False
        self.special_ids = frozenset(runtime.loaded.tokenizer.all_special_ids)
        self.max_model_len = runtime.loaded.max_length
        self.vocab_size = runtime.engine.vocab_size
        # No token stands for more characters than its vocabulary entry has, so a text longer than
        # n x the longest entry surely has more than n tokens: refused before the tokenizer spends on it.
        self.max_token_chars = max((len(t) for t in runtime.loaded.tokenizer.get_vocab()), default=1)

    def namespace(self, request: Request) -> str:
        return request.state.principal.tenant

    def check_chars(self, chars: int, max_tokens: int, field: str) -> None:
        limit = max_tokens * self.max_token_chars
        if chars > limit:
            raise APIError(
                422,
                f"{field} is {chars} characters: more than the {max_tokens} tokens accepted can hold "
                f"(at most {limit} characters with this tokenizer); shorten it",
                "validation",
            )

    def encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text)

    async def aencode(self, text: str, field: str) -> list[int]:
        """Tokenize off the event loop: a long prompt must not stall every other request."""
        self.check_chars(len(text), self.engine.limits.max_input_tokens, field)
        return await run_in_threadpool(self.encode, text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if not tokenizer.chat_template:
            raise APIError(
                422,
                f"the base model {self.model_name!r} has no chat template; use /v1/completions or /generate",
                "validation",
            )
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    async def drain(self) -> None:
        """Stop taking requests (/ready → 503), let running ones finish within the grace period."""
        self.draining = True
        log.info(
            "draining: waiting up to %.0fs for %d running, %d waiting requests",
            self.settings.drain_seconds,
            self.engine.num_running,
            self.engine.num_waiting,
        )
        deadline = time.monotonic() + self.settings.drain_seconds
        while (self.engine.num_running or self.engine.num_waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.engine.stop_accepting()
        if self.engine.num_running or self.engine.num_waiting:
            log.warning("drain grace period over: cancelling the requests still running")
            self.engine.cancel_all()
