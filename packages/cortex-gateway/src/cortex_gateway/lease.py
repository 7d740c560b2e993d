"""The contract between the control plane (router) and the data plane (proxy).

The app handler parses the request's `model`, asks a `LeaseProvider` for a `Lease`, rewrites
the body's `model` when `lease.model_id != lease.requested_model` (an alias), and hands the
lease to the proxy. The proxy then:

1. tries `lease.candidates` in order (best first: least busy replica first). Before each
   attempt it calls `lease.use(upstream)`, which moves the in-flight accounting to that
   replica; when an attempt fails before the first byte reached the client it calls
   `lease.upstream_failed(upstream, reason)` and may go on to the next candidate;
2. calls `lease.release()` exactly when the request is over (end of stream, error, client
   disconnect). `release()` is idempotent, so a `finally:` may call it unconditionally.

`acquire` raises `cortex_core.errors.ApiError` for every refusal (unknown model 404, no
feasible neuron, 429 waiting queue full, 503 + Retry-After load still in progress, 502/503
failed load); the HTTP edge renders it in the caller's dialect.

Control-plane events that metrics care about (cold starts, load duration, evictions, time
spent waiting for a load) are reported through `ControlPlaneObserver`, implemented by the
metrics module; `NullObserver` does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cortex_core.errors import ApiError
from cortex_core.limits import echoed

if TYPE_CHECKING:
    from cortex_gateway.metrics import RequestOutcome


@dataclass(frozen=True, slots=True)
class Upstream:
    """One replica of a model: POST `{base_url}/v1/chat/completions` reaches it."""

    node: str
    # Inference base URL, loopback-rewritten to the configured neuron host, no trailing '/'.
    base_url: str
    model_id: str


class Lease:
    """One request's claim on a model: where it may go and the accounting hooks.

    The router builds it with callbacks into its own state; the proxy only calls the
    methods. Not thread-safe: it lives on the event loop like the request.
    """

    def __init__(
        self,
        *,
        requested_model: str,
        model_id: str,
        candidates: Sequence[Upstream],
        cold_start: bool = False,
        waited_secs: float = 0.0,
        on_use: Callable[[Upstream], None] | None = None,
        on_done: Callable[[Upstream], None] | None = None,
        on_failure: Callable[[Upstream, str, bool], None] | None = None,
    ) -> None:
        if not candidates:
            raise ValueError("a lease needs at least one candidate upstream")
        self.requested_model = requested_model
        # The concrete id (aliases resolved); metric labels and the forwarded body use it.
        self.model_id = model_id
        self.candidates: tuple[Upstream, ...] = tuple(candidates)
        # True when this request triggered or waited for a cold load.
        self.cold_start = cold_start
        # Seconds spent waiting for a load before the lease was granted (queue wait).
        self.waited_secs = waited_secs
        self._on_use = on_use
        self._on_done = on_done
        self._on_failure = on_failure
        self._current: Upstream | None = None
        self._released = False
        self._release_hooks: list[Callable[[Lease], None]] = []
        # Set by the proxy just before it releases the lease: how the request went.
        self.outcome: RequestOutcome | None = None
        self.node: str | None = None

    @property
    def current(self) -> Upstream | None:
        """The replica the request is (or was last) sent to."""
        return self._current

    @property
    def released(self) -> bool:
        return self._released

    def use(self, upstream: Upstream) -> None:
        """Account the request as in flight on `upstream` (moving it off the previous one)."""
        if self._released:
            raise RuntimeError("lease already released")
        if upstream == self._current:
            return
        if self._current is not None and self._on_done is not None:
            self._on_done(self._current)
        self._current = upstream
        if self._on_use is not None:
            self._on_use(upstream)

    def upstream_failed(self, upstream: Upstream, reason: str, *, unreachable: bool = False) -> None:
        """An attempt on `upstream` failed before any byte reached the client.

        `unreachable=True` when the neuron could not be reached at all (connect error,
        reset before any response): that counts toward marking the node unhealthy, like a
        failed poll. A neuron that answered (a 5xx, its own backpressure) is reachable.
        """
        if self._on_failure is not None:
            self._on_failure(upstream, reason, unreachable)

    def on_release(self, hook: Callable[[Lease], None]) -> None:
        """Call `hook(lease)` once when the request is over (the app's per-key accounting)."""
        self._release_hooks.append(hook)

    def finished(self, node: str, outcome: RequestOutcome) -> None:
        """The proxy's account of the request, for the release hooks to read."""
        self.node = node
        self.outcome = outcome

    def release(self) -> None:
        """The request is over; ends the in-flight count and stamps the model's last use."""
        if self._released:
            return
        self._released = True
        if self._current is not None and self._on_done is not None:
            self._on_done(self._current)
        for hook in self._release_hooks:
            hook(self)


class LeaseProvider(Protocol):
    """What the app and the proxy need from the router."""

    async def acquire(self, requested_model: str) -> Lease: ...


class ControlPlaneObserver(Protocol):
    """Control-plane events for metrics. Labels: the concrete model id and the node name."""

    def cold_start(self, model: str, node: str) -> None: ...

    def load_finished(self, model: str, node: str, seconds: float, ok: bool) -> None: ...

    def evicted(self, model: str, node: str) -> None: ...

    def queue_wait(self, model: str, seconds: float) -> None: ...


class NullObserver:
    def cold_start(self, model: str, node: str) -> None:
        return None

    def load_finished(self, model: str, node: str, seconds: float, ok: bool) -> None:
        return None

    def evicted(self, model: str, node: str) -> None:
        return None

    def queue_wait(self, model: str, seconds: float) -> None:
        return None


def model_not_found(requested_model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{echoed(requested_model)}' does not exist on any neuron and is not in the catalogue; "
        "GET /v1/models lists the models this gateway can serve.",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )
