"""The systemd units give each daemon longer to stop than its own drain takes.

If systemd's TimeoutStopSec ran out first, it would SIGKILL the process in the middle of
its grace period, and the streams the drain was about to end in band would be cut.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cortex_core.config.gateway import load_gateway_config
from cortex_core.config.neuron import load_neuron_config
from cortex_core.drain import FLUSH_SECS

RPM = Path(__file__).resolve().parents[2] / "rpm"


def stop_timeout_secs(unit: str) -> float:
    match = re.search(r"^TimeoutStopSec=(\d+)s$", (RPM / unit).read_text(), re.MULTILINE)
    assert match, f"{unit} sets no TimeoutStopSec"
    return float(match.group(1))


@pytest.mark.parametrize("config", [None, RPM / "cortex.toml"])
def test_the_gateway_unit_outlasts_its_grace(config: Path | None) -> None:
    grace = load_gateway_config(config, env={}).gateway.shutdown_grace_secs
    assert grace == 30.0
    assert stop_timeout_secs("cortex.service") > grace + FLUSH_SECS


@pytest.mark.parametrize("config", [None, RPM / "neuron.toml"])
def test_the_neuron_unit_outlasts_its_drain(config: Path | None) -> None:
    drain = load_neuron_config(config, env={}).drain_timeout_secs
    # The rest is the unloading of every model after the drain.
    assert stop_timeout_secs("neuron.service") >= 2 * (drain + FLUSH_SECS)
