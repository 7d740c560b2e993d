"""Fixtures the neuron's engine tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from neuron.device import DeviceWorker


@pytest.fixture(scope="module")
def worker(request: pytest.FixtureRequest) -> Iterator[DeviceWorker]:
    """One owner thread per test module, as a device has in the daemon."""
    w = DeviceWorker(f"test-{request.module.__name__}")
    yield w
    w.close()
