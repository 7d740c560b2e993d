"""A lease provider over a fixed table, for the proxy's tests and the gateway benchmark.

They exercise the data plane without a fleet to poll or the gate in front of it; the real
control plane is cortex_gateway.router.Router, and the real app reads `model` in
cortex_gateway.admission.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from cortex_core.errors import ApiError
from cortex_gateway.lease import Lease, Upstream, model_not_found


class _ModelField(msgspec.Struct):
    model: str


def read_model(body: bytes) -> str:
    """The request's `model`, or a 400 naming what is wrong (what a bare relay app needs)."""
    try:
        return msgspec.json.decode(body, type=_ModelField).model
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(
            400,
            f"missing or invalid 'model' field in request body: {exc}",
            type="invalid_request_error",
            code="missing_model_field",
            param="model",
        ) from exc


class FixedRouter:
    """A LeaseProvider over a fixed model → replicas table, with in-flight counts.

    For proxy tests and the gateway benchmark, where there is no fleet to poll: it answers
    from the table, orders replicas least busy first, and refuses unknown models with the
    same 404 as the real router.
    """

    def __init__(self, table: Mapping[str, Sequence[Upstream]], aliases: Mapping[str, str] | None = None):
        self._table = {model: tuple(upstreams) for model, upstreams in table.items()}
        self._aliases = dict(aliases or {})
        self.in_flight: dict[Upstream, int] = {}
        self.failures: list[tuple[Upstream, str]] = []

    async def acquire(self, requested_model: str) -> Lease:
        model_id = self._aliases.get(requested_model, requested_model)
        upstreams = self._table.get(model_id)
        if not upstreams:
            raise model_not_found(requested_model)
        ordered = sorted(upstreams, key=lambda u: (self.in_flight.get(u, 0), u.node))
        lease = Lease(
            requested_model=requested_model,
            model_id=model_id,
            candidates=ordered,
            on_use=self._inc,
            on_done=self._dec,
            on_failure=lambda upstream, reason, unreachable: self.failures.append((upstream, reason)),
        )
        return lease

    def _inc(self, upstream: Upstream) -> None:
        self.in_flight[upstream] = self.in_flight.get(upstream, 0) + 1

    def _dec(self, upstream: Upstream) -> None:
        self.in_flight[upstream] = self.in_flight.get(upstream, 1) - 1
