"""Default-model pre-warm: an unreachable model source is tried again with a capped back-off."""

from __future__ import annotations

import pytest

from cortex_core.config.neuron import NeuronConfig
from cortex_core.errors import ApiError
from cortex_core.neuron_api import ModelInfo, ModelSpec
from neuron.discovery import HostProbe
from neuron.manager import ModelManager, PrewarmRetry

UNREACHABLE = ApiError(
    502, "failed to fetch repo info from https://hub.example: timed out", code="repo_fetch_failed"
)


async def test_an_unreachable_source_is_retried_with_backoff_and_a_bad_model_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manager = ModelManager(NeuronConfig(), HostProbe(None, cuda_unavailable_reason="test host: CPU only"))
    # org/flaky: the registry answers on the third try; org/down: never; org/bad: refused.
    failures_left = {"org/flaky": 2, "org/down": 99}
    attempts: list[str] = []

    async def load(spec: ModelSpec) -> ModelInfo:
        attempts.append(spec.model_id)
        if spec.model_id == "org/bad":
            raise ApiError(422, "architecture 'mamba2' is not supported", code="unsupported_architecture")
        if failures_left.get(spec.model_id, 0) > 0:
            failures_left[spec.model_id] -= 1
            raise UNREACHABLE
        return ModelInfo(id=spec.model_id, harness="torch", status="loaded")

    delays: list[float] = []

    async def no_wait(seconds: float) -> None:
        delays.append(seconds)

    monkeypatch.setattr(manager, "load", load)
    manager.prewarm_retry = PrewarmRetry(attempts=4, base_secs=2.0, cap_secs=5.0, sleep=no_wait)
    await manager.start_activation(
        [ModelSpec(model_id="org/flaky"), ModelSpec(model_id="org/bad"), ModelSpec(model_id="org/down")]
    )

    assert attempts == ["org/flaky"] * 3 + ["org/bad"] + ["org/down"] * 4
    assert delays == [2.0, 4.0, 2.0, 4.0, 5.0]  # org/flaky, then org/down: doubling, capped
    activation = manager.activation
    assert (activation.state, activation.completed) == ("ready", ["org/flaky"])
    assert [(f.model_id, f.error) for f in activation.failed] == [
        ("org/bad", "architecture 'mamba2' is not supported"),
        ("org/down", UNREACHABLE.message),
    ]
    await manager.close()
