"""A rank that dies or hangs poisons the model with a clear reason; nothing hangs; reload works.

Worker failures are real: the worker process is stopped (SIGSTOP, a hang) or killed (SIGKILL)
while rank 0 is inside a collective. The waits below are hang guards with generous bounds,
never speed assertions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.engine_harness import greedy_forward, load_model
from support.processes import tp_worker_pids

from neuron.engine import SingleDeviceRunner
from neuron.engine.paged import ForwardRow
from neuron.tp import ModelSource, TensorParallelError, TensorParallelRunner, UnshardableModel
from neuron.tp.leader import TensorParallelGroup
from neuron.tp.protocol import Call

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 99, 7, 250, 3, 8]
HANG_GUARD_S = 60.0


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def process_gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs nothing, whoever reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"hang guard: {what} did not happen within {HANG_GUARD_S} s")
        time.sleep(0.05)


def greedy(runner: object, steps: int = 6) -> list[int]:
    return greedy_forward(runner, PROMPT, steps, [1, 2])


def start(path: Path, reasons: list[str], step_timeout_s: float = 5.0) -> TensorParallelRunner:
    return TensorParallelRunner.start(
        ModelSource(str(path)),
        [0, 1],
        backend="gloo",
        worker_threads=1,
        step_timeout_s=step_timeout_s,
        on_failure=reasons.append,
    )


def test_killed_worker_poisons_then_reload_then_hang_hits_the_deadline(tiny_qwen3: Path) -> None:
    model, _ = load_model(tiny_qwen3)
    expected = greedy(SingleDeviceRunner(model, device="cpu"))

    # 1. A worker killed while rank 0 waits in a collective: the request gets the error.
    reasons: list[str] = []
    runner = start(tiny_qwen3, reasons)
    token = int(runner.forward([ForwardRow(PROMPT, 0, [1, 2])])[0].argmax())
    token = int(runner.forward([ForwardRow([token], len(PROMPT), [1, 2])])[0].argmax())
    (pid,) = runner.worker_pids
    os.kill(pid, signal.SIGSTOP)  # rank 1 stops answering: rank 0 blocks in the first all-reduce
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL during forward"):
        runner.forward([ForwardRow([token], len(PROMPT) + 1, [1, 2])])
    killer.join()
    assert runner.failure is not None and "SIGKILL" in runner.failure
    wait_until(lambda: reasons == [runner.failure], "the on_failure callback")
    # Poisoned: later calls fail at once with the same reason, close is clean.
    with pytest.raises(TensorParallelError, match="SIGKILL"):
        runner.forward([ForwardRow(PROMPT, 0, [3, 4])])
    runner.close()
    assert tp_worker_pids() == []

    # 2. The model loads again and is exact again.
    reasons = []
    runner = start(tiny_qwen3, reasons, step_timeout_s=3.0)
    try:
        assert greedy(runner) == expected
        assert runner.failure is None

        # 3. A hung worker (never answers, never dies): the step deadline poisons the model.
        (pid,) = runner.worker_pids
        runner.forward([ForwardRow(PROMPT, 0, [3, 4])])
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(TensorParallelError, match="did not finish within its deadline"):
            runner.forward([ForwardRow([1], len(PROMPT), [3, 4])])
        assert reasons and "hung" in reasons[0]
    finally:
        runner.close()
    assert tp_worker_pids() == []


def test_worker_dying_while_idle_is_noticed_without_a_request() -> None:
    noticed = threading.Event()
    reasons: list[str] = []

    def on_failure(reason: str) -> None:
        reasons.append(reason)
        noticed.set()

    group, _ = TensorParallelGroup.start(
        devices=["cpu", "cpu"], backend="gloo", model=None, worker_threads=1, on_failure=on_failure
    )
    try:
        assert group.call(Call("sanity")) == 2
        group.workers[0].proc.kill()
        assert noticed.wait(HANG_GUARD_S), "hang guard: the watchdog never noticed the dead worker"
        assert "rank 1" in reasons[0] and "while idle" in reasons[0]
        with pytest.raises(TensorParallelError, match="while idle"):
            group.call(Call("sanity"))
    finally:
        group.close()


def test_a_rank_failing_to_load_fails_the_start_and_leaves_no_process(tiny_qwen3: Path) -> None:
    with pytest.raises(TensorParallelError, match="no_such_module"):
        TensorParallelRunner.start(
            ModelSource(str(tiny_qwen3), runner_factory="no_such_module:Runner"),
            [0, 1],
            backend="gloo",
            worker_threads=1,
        )
    assert tp_worker_pids() == []


def test_unshardable_model_is_refused_before_spawning(tiny_qwen3_moe: Path) -> None:
    with pytest.raises(UnshardableModel, match="mixture-of-experts"):
        TensorParallelRunner.start(ModelSource(str(tiny_qwen3_moe)), [0, 1], backend="gloo")
    assert tp_worker_pids() == []


DAEMON_SCRIPT = """
import time
from neuron.tp.leader import TensorParallelGroup
group, _ = TensorParallelGroup.start(devices=["cpu", "cpu"], backend="gloo", model=None, worker_threads=1)
print(group.workers[0].proc.pid, flush=True)
time.sleep(600)
"""


def test_workers_never_outlive_the_daemon() -> None:
    """SIGKILL the process holding rank 0 (no cleanup runs): its worker goes away too."""
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        worker_pid = int(daemon.stdout.readline())
        assert not process_gone(worker_pid)
        daemon.kill()
        daemon.wait()
        wait_until(lambda: process_gone(worker_pid), f"worker {worker_pid} exiting after the daemon died")
    finally:
        daemon.kill()
        daemon.wait()
