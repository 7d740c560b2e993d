"""The gate: who may call, what they may use, how much, and the account of what they did.

Per request, in order, and all before any placement:
1. `AuthMiddleware` (the outermost layer inside CORS) authenticates the key from the
   headers — before the body is even read — and keeps the `Caller` in the ASGI scope;
   `/admin/*` also needs an admin key. Health probes (`/`, `/health`, `/livez`, `/readyz`)
   are open: load balancers and systemd call them without keys.
2. The handler decodes the body (admission.py), then `Gate.acquire` checks the model
   against the key's globs (403), books the key's limits (429 + Retry-After), waits for a
   model slot in the fair queue (round-robin by key) and only then asks the router for a
   lease.
3. When the lease is released, the key's limits are credited, its slot passed on, the
   per-key counters bumped, and the middleware writes one JSON access-log line.

Without a keys file every caller is `ANONYMOUS` (an admin, no limits): the gateway as it
was, which `serve` allows only on loopback unless `auth.allow_anonymous` is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cortex_core.config.catalogue import ModelCatalogue
from cortex_core.errors import ApiError
from cortex_core.request_id import request_id_of
from cortex_gateway.auth import ANONYMOUS, Caller, KeyStore, presented_secret, require_admin, require_model
from cortex_gateway.lease import Lease, LeaseProvider
from cortex_gateway.metrics import GatewayMetrics, derive_timings
from cortex_gateway.quota import FairQueue, LimitBook

access_log = logging.getLogger("cortex.access")

CALLER = "cortex.caller"
ACCESS = "cortex.access"
OPEN_PATHS = frozenset({"/", "/health", "/livez", "/readyz"})
QUEUE_TIMEOUT_RETRY_AFTER_SECS = 5.0


def caller_of(scope: Scope) -> Caller:
    caller: Caller = scope.get(CALLER, ANONYMOUS)
    return caller


@dataclass(slots=True)
class AccessRecord:
    """What one request did, filled in as it goes; written as one JSON line at its end."""

    request_id: str
    key: str
    method: str
    path: str
    model: str | None = None
    node: str | None = None
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None

    def line(self, duration_secs: float) -> str:
        # Never the prompt, never the secret: only names, numbers and the path.
        return json.dumps(
            {
                "request_id": self.request_id,
                "key": self.key,
                "method": self.method,
                "path": self.path,
                "model": self.model,
                "node": self.node,
                "status": self.status,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "ttft_ms": self.ttft_ms,
                "duration_ms": round(duration_secs * 1000, 3),
            },
            separators=(",", ":"),
        )


class Gate:
    """Authentication, entitlements, limits and fair queueing in front of the router."""

    def __init__(
        self,
        router: LeaseProvider,
        catalogue: ModelCatalogue,
        metrics: GatewayMetrics,
        *,
        keys: KeyStore | None,
        limits: LimitBook,
        queue: FairQueue,
        queue_wait_secs: float,
    ) -> None:
        self._router = router
        self._catalogue = catalogue
        self._metrics = metrics
        self.keys = keys
        self.limits = limits
        self.queue = queue
        self._queue_wait_secs = queue_wait_secs

    def authenticate(self, scope: Scope) -> Caller:
        if self.keys is None:
            return ANONYMOUS
        return self.keys.ring.authenticate(presented_secret(scope["headers"]))

    async def acquire(self, scope: Scope, requested_model: str) -> Lease:
        """A lease for `requested_model` on behalf of the scope's caller, or the refusal."""
        caller = caller_of(scope)
        model_id = self._catalogue.resolve_alias(requested_model)
        record: AccessRecord | None = scope.get(ACCESS)
        if record is not None:
            record.model = model_id
        require_model(caller, requested_model, model_id)
        self.limits.admit(caller)
        queued = False
        try:
            if self.queue.enabled:
                await self._wait_for_slot(model_id, caller.name)
                queued = True
            lease = await self._router.acquire(requested_model)
        except BaseException:
            if queued:
                self.queue.leave(model_id)
            self.limits.finished(caller, 0)
            raise
        lease.on_release(lambda done: self._released(caller, done, record, queued))
        return lease

    async def _wait_for_slot(self, model_id: str, key: str) -> None:
        """A slot of the model's fair queue, waited for as long as a cold load may be (503 after)."""
        try:
            async with asyncio.timeout(self._queue_wait_secs):
                await self.queue.enter(model_id, key)
        except TimeoutError as exc:
            raise ApiError(
                503,
                f"no slot for '{model_id}' freed up within {self._queue_wait_secs:g} s "
                "(router.max_concurrent_per_model requests are running); retry shortly",
                code="service_unavailable",
                retry_after=QUEUE_TIMEOUT_RETRY_AFTER_SECS,
            ) from exc

    def _released(self, caller: Caller, lease: Lease, record: AccessRecord | None, queued: bool) -> None:
        if queued:
            self.queue.leave(lease.model_id)
        outcome = lease.outcome
        timings = derive_timings(outcome) if outcome is not None else None
        prompt = (timings.prompt_tokens or 0) if timings is not None else 0
        completion = (timings.completion_tokens or 0) if timings is not None else 0
        self.limits.finished(caller, prompt + completion)
        self._metrics.key_used(caller.name, lease.model_id, prompt, completion)
        if record is not None:
            record.node = lease.node
            if outcome is not None:
                record.status = outcome.status
            if timings is not None:
                record.prompt_tokens = timings.prompt_tokens
                record.completion_tokens = timings.completion_tokens
                record.ttft_ms = None if timings.ttft is None else round(timings.ttft * 1000, 3)


class AuthMiddleware:
    """Authenticates every HTTP request but the health probes, and writes the access log."""

    def __init__(self, app: ASGIApp, gate: Gate, render: Callable[[Scope, ApiError], Any]) -> None:
        self._app = app
        self._gate = gate
        self._render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        started = perf_counter()
        record = AccessRecord(
            # RequestIdMiddleware (outside this one) named the request.
            request_id=request_id_of(scope) or "-",
            key="-",
            method=scope.get("method", ""),
            path=path,
        )
        scope[ACCESS] = record

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start" and record.status is None:
                record.status = message["status"]
            await send(message)

        try:
            try:
                caller = self._gate.authenticate(scope)
                record.key = caller.name
                if path.startswith("/admin/"):
                    require_admin(caller)
            except ApiError as refused:
                response = self._render(scope, refused)
                await response(scope, receive, send_and_note)
                return
            scope[CALLER] = caller
            await self._app(scope, receive, send_and_note)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(record.line(perf_counter() - started))
