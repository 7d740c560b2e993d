"""Relay OpenAI-path requests to a neuron, byte for byte.

`Proxy.forward` returns at once with a `RelayResponse`; all the work happens when
Starlette runs that response, so that one watcher on the client's connection covers the
whole request — waiting for the upstream's headers (a non-streamed generation can take
minutes) as much as the body — and a client that goes away cancels the upstream request.

Per request:
1. The body is forwarded as received; only when the lease resolved an alias is `model`
   rewritten (spliced in place when it occurs once, otherwise a decode/encode).
2. Replicas are tried in the lease's order, each at most once and at most
   `proxy.max_attempts` of them. Only what is safe moves on to the next replica: a
   connection that could not be made (the request never left), or the neuron's explicit
   "not ready" (503 model_loading / model_unloading, 404 model_not_found). A request a
   neuron received and then failed (5xx), timed out on, or broke off before its first byte
   is never repeated — it may have run, and repeating it doubles the wait on a hung node.
   The client's response starts only with the upstream's first body chunk.
3. Then chunks are relayed as they arrive, never re-serialised. A stall longer than
   `proxy.idle_timeout_secs` between chunks ends the request; a long stream that keeps
   flowing never does (there is no total timeout).
4. If the upstream breaks mid-response: an SSE stream gets a final OpenAI error event (so
   SDKs raise instead of taking a truncated answer for a complete one); any other body is
   cut off (the connection is aborted), since nothing else can tell the client.
5. No replica reachable: 503 + Retry-After in the OpenAI error shape; reached but failed:
   502; no headers within the idle timeout: 504. A neuron's own 5xx is relayed intact
   (status, Retry-After and the neuron's envelope).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from time import perf_counter
from typing import Any

import aiohttp
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cortex_core.config.gateway import ProxySection
from cortex_core.errors import ApiError
from cortex_core.http import CLAMP_MAX_TOKENS_HEADER, POOLED_CONNECTION_SECS, error_asgi_headers
from cortex_gateway.lease import Lease, Upstream
from cortex_gateway.metrics import CLIENT_CLOSED, GatewayMetrics, RequestOutcome, TargetMetrics
from cortex_gateway.neuron_client import neuron_auth_headers
from cortex_gateway.observers import Observer, StreamObserver, observer_for

log = logging.getLogger(__name__)

# Never forwarded in either direction: hop-by-hop headers (RFC 9110 §7.6.1), and headers
# the next hop computes itself. `accept-encoding` is replaced by identity so the gateway
# can read usage from the body and relay each chunk the moment it arrives.
_REQUEST_HEADERS_DROPPED = frozenset(
    {
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"accept-encoding",
        # The catalogue decides this one (clamp_max_tokens), not the client.
        CLAMP_MAX_TOKENS_HEADER.encode(),
        # The client's gateway key stays at the gateway: a neuron has its own token
        # (auth.neuron_token_env), and a secret it never sees cannot end up in its logs.
        b"authorization",
        b"x-api-key",
    }
)
# hypercorn writes its own date and server headers and frames the body itself.
_RESPONSE_HEADERS_DROPPED = frozenset(
    {
        b"content-length",
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"server",
    }
)

NO_UPSTREAM_RETRY_AFTER_SECS = 5.0


def _splice_model(body: bytes, model_id: str) -> bytes | None:
    """Replace the string value after the one `"model"` key, or None if it is not that shape."""
    at = body.index(b'"model"') + len(b'"model"')
    end = len(body)
    while at < end and body[at] in b" \t\r\n":
        at += 1
    if at >= end or body[at] != ord(":"):
        return None  # `"model"` was a value, not a key
    at += 1
    while at < end and body[at] in b" \t\r\n":
        at += 1
    if at >= end or body[at] != ord('"'):
        return None
    close = at + 1
    while True:
        close = body.find(b'"', close)
        if close < 0:
            return None
        backslashes = 0
        while body[close - 1 - backslashes] == ord("\\"):
            backslashes += 1
        if backslashes % 2 == 0:
            break
        close += 1
    return body[:at] + msgspec.json.encode(model_id) + body[close + 1 :]


def rewrite_model(body: bytes, model_id: str) -> bytes:
    """`body` with its top-level `model` set to `model_id`, every other byte kept where possible.

    With one `"model"` in the body (the usual case) the value is spliced; when the key also
    appears nested (a tool schema with a `model` property, say), the body is decoded and
    re-encoded, which is correct but does not keep the client's formatting.
    """
    if body.count(b'"model"') == 1:
        spliced = _splice_model(body, model_id)
        if spliced is not None:
            return spliced
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body
    if not isinstance(document, dict) or document.get("model") == model_id:
        return body
    document["model"] = model_id
    return msgspec.json.encode(document)


def request_headers(
    raw: Iterable[tuple[bytes, bytes]], *, clamp_max_tokens: bool = False
) -> list[tuple[str, str]]:
    """Client headers to forward upstream (x-include-thinking included, the client's key not),
    and the catalogue's `clamp_max_tokens` for the model."""
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in raw
        if name.lower() not in _REQUEST_HEADERS_DROPPED
    ]
    headers.append(("accept-encoding", "identity"))
    if clamp_max_tokens:
        headers.append((CLAMP_MAX_TOKENS_HEADER, "true"))
    return headers


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in raw if name.lower() not in _RESPONSE_HEADERS_DROPPED]


class Proxy:
    """The data plane of one app: an aiohttp session (pooled connections) and the relay."""

    def __init__(
        self, config: ProxySection, metrics: GatewayMetrics, *, neuron_token: str | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._neuron_token = neuron_token
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the session; call from the app's lifespan (it must run on the serving loop)."""
        if self._session is not None:
            return
        timeout = aiohttp.ClientTimeout(
            total=None,  # a long generation is fine while bytes flow
            sock_connect=self.config.connect_timeout_secs,
            sock_read=self.config.idle_timeout_secs,  # reset by every read: an idle timeout
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, enable_cleanup_closed=True, keepalive_timeout=POOLED_CONNECTION_SECS
            ),
            timeout=timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Content-Type"),
            # One session serves every client: a cookie one neuron answer sets must never ride
            # along on another client's request (and not parsing them is cheaper).
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=neuron_auth_headers(self._neuron_token),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Proxy.start() was not called (the app's lifespan opens the session)")
        return self._session

    async def forward(
        self,
        request: Request,
        body: bytes,
        lease: Lease,
        endpoint: str,
        *,
        received_at: float | None = None,
        clamp_max_tokens: bool = False,
    ) -> Response:
        """The response that relays `body` to the lease's upstreams; it owns (releases) the lease.

        `endpoint` is the path on the neuron, e.g. "/v1/chat/completions". `received_at`
        (perf_counter) lets the gateway-overhead metric include the handler's own work.
        """
        started_at = received_at if received_at is not None else perf_counter()
        if lease.model_id != lease.requested_model:
            body = rewrite_model(body, lease.model_id)
        headers = request_headers(request.headers.raw, clamp_max_tokens=clamp_max_tokens)
        return RelayResponse(self, lease, endpoint, body, headers, started_at)


class AttemptsFailed(Exception):
    """Every attempt failed before the client got anything; carries the error to render."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class UpstreamCutOff(Exception):
    """The upstream broke after the client's response had started; the connection is aborted."""


class _ClientWatch:
    """Cancels the relaying task when the client disconnects (hypercorn drops our sends silently)."""

    __slots__ = ("_task", "done", "gone")

    def __init__(self, receive: Receive, relay: asyncio.Task[object]) -> None:
        self.gone = False
        self.done = False
        self._task = asyncio.ensure_future(self._watch(receive, relay))

    async def _watch(self, receive: Receive, relay: asyncio.Task[object]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                if not self.done:
                    relay.cancel()
                return

    def stop(self) -> None:
        self.done = True
        self._task.cancel()


class RelayResponse(Response):
    """An ASGI response that performs the upstream request and relays it (see module doc).

    Dialects that convert the body instead of relaying it (dialects/anthropic.py) subclass
    this and override `_answer` (what to send once an upstream answered) and `_error_body`
    (errors in their dialect). `_relay` does the failover, the error answer and the
    connection's release or close; `_answer` sets `_status` and `_error`, feeds `_observer`
    with the upstream's bytes and stamps `_last_upstream_byte_at`, and `__call__`/`_finish`
    do the client watch, lease release and metrics as for a plain relay.
    """

    def __init__(
        self,
        proxy: Proxy,
        lease: Lease,
        endpoint: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        started_at: float,
    ) -> None:
        # Response.__init__ would render a body; this response writes its own ASGI messages.
        self.status_code = 200
        self.background = None
        self._proxy = proxy
        self._lease = lease
        self._endpoint = endpoint
        self._body = body
        self._forward_headers = headers
        self._started_at = started_at
        self._status = 0
        self._error = False
        self._sent_at: float | None = None
        self._last_upstream_byte_at: float | None = None
        self._observer: Observer | None = None
        self._target: TargetMetrics | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = _ClientWatch(receive, task)
        upstream: Upstream | None = None
        try:
            upstream = await self._relay(send)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task.uncancel()  # the client went away: the request is over, not the server
            self._status = CLIENT_CLOSED
        finally:
            watch.stop()
            self._finish(upstream)

    async def _relay(self, send: Send) -> Upstream | None:
        try:
            upstream, response, first = await self._open()
        except AttemptsFailed as failed:
            await self._send_error(send, failed.error, gateway_failed=True)
            return self._lease.current
        try:
            await self._answer(send, upstream, response, first)
        finally:
            # A finished body returns the connection to the pool; anything else closes it,
            # which is how the neuron learns that nobody is listening any more.
            if response.content.at_eof() and not self._error:
                response.release()
            else:
                response.close()
        return upstream

    async def _answer(
        self, send: Send, upstream: Upstream, response: aiohttp.ClientResponse, first: bytes
    ) -> None:
        """The upstream answered: relay its bytes (a dialect converts them instead)."""
        await self._stream(send, response, first)

    def _error_body(self, error: ApiError) -> dict[str, Any]:
        """An error in the caller's dialect: OpenAI's envelope here."""
        return error.openai_body()

    async def _send_error(self, send: Send, error: ApiError, *, gateway_failed: bool) -> None:
        """Answer with `error`; `gateway_failed` is False when it only passes on the neuron's."""
        self._status = error.status
        self._error = gateway_failed
        await send(
            {"type": "http.response.start", "status": error.status, "headers": error_asgi_headers(error)}
        )
        await send({"type": "http.response.body", "body": msgspec.json.encode(self._error_body(error))})

    async def _open(self) -> tuple[Upstream, aiohttp.ClientResponse, bytes]:
        """The first replica's answer that may be used (`first_answer`), with this request's
        metrics and failure accounting on every attempt."""
        proxy = self._proxy

        def attempting(upstream: Upstream) -> None:
            self._switch_target(upstream)
            self._sent_at = perf_counter()

        return await first_answer(
            proxy.session,
            self._lease,
            self._endpoint,
            self._body,
            self._forward_headers,
            max_attempts=proxy.config.max_attempts,
            attempting=attempting,
            failed=self._attempt_failed,
        )

    async def _stream(self, send: Send, response: aiohttp.ClientResponse, first: bytes) -> None:
        content = response.content
        headers = response_headers(response.raw_headers)
        observer = observer_for(response.headers.get("content-type")) if response.status < 300 else None
        self._observer = observer
        self._status = response.status
        now = self._last_upstream_byte_at = perf_counter()
        complete = content.at_eof()
        if complete:
            # The whole body is in hand: a content-length saves the chunked framing.
            headers.append((b"content-length", str(len(first)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": first, "more_body": not complete})
        if observer is not None:
            observer.feed(first, now)
        if complete:
            return

        def broke(reason: str) -> bytes:
            # Only an SSE client can be told in-band; any other body is cut off.
            if not isinstance(observer, StreamObserver):
                raise UpstreamCutOff(reason)
            return _sse_error_event(reason)

        await self._pump(send, response, convert=None, broke=broke, end=lambda: b"")

    async def _pump(
        self,
        send: Send,
        response: aiohttp.ClientResponse,
        *,
        convert: Callable[[bytes], bytes] | None,
        broke: Callable[[str], bytes],
        end: Callable[[], bytes],
    ) -> None:
        """The rest of an upstream body after its first chunk, each chunk sent as it arrives
        (`convert`ed, for a dialect that does not relay bytes) and fed to `_observer`. A
        stall or a broken connection ends the answer with `broke(reason)`; the upstream's
        end with `end()`. Shared by the relay and the dialects that convert."""
        read = response.content.readany
        observer = self._observer
        try:
            while True:
                chunk = await read()
                if not chunk:
                    break
                now = self._last_upstream_byte_at = perf_counter()
                out = chunk if convert is None else convert(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if observer is not None:
                    observer.feed(chunk, now)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._error = True
            reason = (
                f"no data from node for {self._proxy.config.idle_timeout_secs:g} s"
                if isinstance(exc, TimeoutError)
                else f"connection to node lost mid-response ({type(exc).__name__})"
            )
            log.warning("upstream %s for %s: %s", self._endpoint, self._lease.model_id, reason)
            try:
                last = broke(reason)
            except UpstreamCutOff as cut:
                raise cut from exc
            await send({"type": "http.response.body", "body": last, "more_body": False})
            return
        await send({"type": "http.response.body", "body": end(), "more_body": False})

    def _switch_target(self, upstream: Upstream) -> None:
        if self._target is not None:
            self._target.in_flight.dec()
        self._target = self._proxy.metrics.target(self._lease.model_id, upstream.node)
        self._target.in_flight.inc()

    def _attempt_failed(self, upstream: Upstream, reason: str, unreachable: bool) -> None:
        log.warning("attempt on node %s for %s failed: %s", upstream.node, self._lease.model_id, reason)
        if self._target is not None:
            self._target.upstream_failures.inc()
        self._lease.upstream_failed(upstream, reason, unreachable=unreachable)

    def _finish(self, upstream: Upstream | None) -> None:
        lease = self._lease
        if self._target is not None:
            self._target.in_flight.dec()
        node = upstream.node if upstream is not None else (lease.current or lease.candidates[0]).node
        try:
            observer = self._observer
            outcome = RequestOutcome(
                status=self._status,
                started_at=self._started_at,
                sent_at=self._sent_at,
                last_upstream_byte_at=self._last_upstream_byte_at,
                finished_at=perf_counter(),
                error=self._error,
                observation=observer.finish() if observer is not None else None,
                cold_start=lease.cold_start,
            )
            # Before the release, whose hooks (per-key accounting, the access log) read it.
            lease.finished(node, outcome)
        finally:
            lease.release()
        self._proxy.metrics.record(lease.model_id, node, outcome)


class _NotReadyDetail(msgspec.Struct):
    code: str | None = None


class _NotReadyEnvelope(msgspec.Struct):
    error: _NotReadyDetail | None = None


_NOT_READY_DECODER = msgspec.json.Decoder(_NotReadyEnvelope)
# A neuron's answers that say it did not run the request: the model is loading or
# unloading there (503), or it is not there at all any more (404, evicted meanwhile).
NOT_READY = frozenset({(503, "model_loading"), (503, "model_unloading"), (404, "model_not_found")})


def retry_plan(candidates: Sequence[Upstream], max_attempts: int) -> tuple[Upstream, ...]:
    """The replicas to try, in order: each at most once (a retry never goes back to the same
    node), at most `max_attempts` of them."""
    return tuple(candidates[: max(1, max_attempts)])


def is_connect_failure(exc: BaseException) -> bool:
    """True when the connection could not be made, so the request was certainly not sent."""
    return isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def not_ready(status: int, body: bytes) -> bool:
    """The neuron said explicitly that it did not run the request (safe on another replica)."""
    if status not in (503, 404):
        return False
    try:
        detail = _NOT_READY_DECODER.decode(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return detail is not None and (status, detail.code) in NOT_READY


async def first_answer(
    session: aiohttp.ClientSession,
    lease: Lease,
    endpoint: str,
    body: bytes,
    headers: Sequence[tuple[str, str]],
    *,
    max_attempts: int,
    attempting: Callable[[Upstream], None],
    failed: Callable[[Upstream, str, bool], None],
) -> tuple[Upstream, aiohttp.ClientResponse, bytes]:
    """POST `body` to the lease's replicas in `retry_plan` order until one answers; return it
    with its first body chunk. The one attempt loop of the gateway: the relay, the Anthropic
    conversion and count_tokens all go through it.

    Only what is safe is retried, and only on another replica: a connection that could not
    be made (the request never left), or a neuron's explicit "not ready" answer. A request
    the neuron received and failed, timed out on or broke off is never repeated. Raises
    `AttemptsFailed` with the error to answer when no replica gave a usable answer.
    `attempting(upstream)` runs before each attempt and `failed(upstream, reason,
    unreachable)` after each failed one (metrics, logs, the lease's failure accounting).
    """
    replicas = retry_plan(lease.candidates, max_attempts)
    last_error: ApiError | None = None
    for index, upstream in enumerate(replicas):
        another = index + 1 < len(replicas)
        lease.use(upstream)
        attempting(upstream)
        try:
            response = await session.post(upstream.base_url + endpoint, data=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            last_error = _attempt_error(upstream, exc)
            never_sent = is_connect_failure(exc)
            failed(upstream, last_error.message, never_sent)
            if never_sent:
                continue
            raise AttemptsFailed(last_error) from exc
        try:
            first = await response.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            response.close()
            last_error = _attempt_error(upstream, exc)
            failed(upstream, last_error.message, False)
            raise AttemptsFailed(last_error) from exc
        if another and response.content.at_eof() and not_ready(response.status, first):
            response.close()
            failed(upstream, f"HTTP {response.status}: not ready", False)
            continue
        return upstream, response, first
    assert last_error is not None  # every replica refused the connection
    raise AttemptsFailed(last_error)


def _attempt_error(upstream: Upstream, exc: BaseException) -> ApiError:
    node = upstream.node
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return ApiError(
            503,
            f"node '{node}' is unreachable ({exc}); retry shortly",
            type="api_error",
            code="upstream_unavailable",
            retry_after=NO_UPSTREAM_RETRY_AFTER_SECS,
        )
    if isinstance(exc, TimeoutError):
        return ApiError(
            504,
            f"node '{node}' sent nothing within the idle timeout",
            type="api_error",
            code="upstream_timeout",
        )
    return ApiError(
        502,
        f"upstream request to node '{node}' failed: {type(exc).__name__}: {exc}",
        type="api_error",
        code="upstream_connection_error",
    )


def _sse_error_event(reason: str) -> bytes:
    # Blank lines first: they end any event the upstream left half-written.
    error = ApiError(502, f"upstream stream failed: {reason}", type="api_error", code="upstream_stream_error")
    return b"\n\ndata: " + msgspec.json.encode(error.openai_body()) + b"\n\n"
