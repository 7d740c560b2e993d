"""Rank 0: spawns the worker ranks, fans every call out to them, and watches over them.

Step protocol: send the call to every worker (no wait) -> run it on rank 0 -> collect exactly
one reply from every worker. The next call is only sent once all ranks have answered, so
ranks never drift apart. Anything unexpected (a worker error, a dead or hung rank, a failed
collective, ranks disagreeing) poisons the group: it is never used again, its workers are
killed, and every later call fails at once with the recorded reason. The caller unloads and
loads the model again, which builds a new group.

The supervisor thread owns the worker processes. It spawns them (PR_SET_PDEATHSIG fires when
the *spawning thread* ends, so that thread must live exactly as long as the workers) and
polls them: a rank that exits, or a step that overruns its deadline, poisons the group and
kills the remaining workers, which unblocks rank 0 from any gloo collective (closed sockets);
NCCL is aborted explicitly. So a call on rank 0 always returns within the step timeout plus
a poll interval.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from neuron.tp.group import abort_group, master_store
from neuron.tp.protocol import Call, Hello, ModelSource, RankSetup, Reply
from neuron.tp.rank import RankState, summarise

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
# Collectives get a little longer than rank 0's own deadline so that the watchdog, which
# knows which rank misbehaved, reports first.
COLLECTIVE_GRACE_S = 10.0
CLOSE_TIMEOUT_S = 10.0
# Longest the watchdog waits for an NCCL abort after a poison before it moves on.
ABORT_TIMEOUT_S = 10.0


class TensorParallelError(RuntimeError):
    """The tensor-parallel group failed and is poisoned; `reason` says which rank did what."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"tensor-parallel group failed: {reason}")
        self.reason = reason


@dataclass
class _WorkerProcess:
    rank: int
    proc: subprocess.Popen[bytes]
    conn: Connection
    lifeline: int  # write end; the worker exits when it closes


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _spawn_worker(rank: int) -> _WorkerProcess:
    ours, theirs = socket.socketpair()
    lifeline_read, lifeline_write = os.pipe()
    try:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "neuron.tp.worker",
                "--conn-fd", str(theirs.fileno()),
                "--lifeline-fd", str(lifeline_read),
                "--parent-pid", str(os.getpid()),
            ],
            pass_fds=(theirs.fileno(), lifeline_read),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except BaseException:
        ours.close()
        os.close(lifeline_write)
        raise
    finally:
        theirs.close()
        os.close(lifeline_read)
    return _WorkerProcess(rank, proc, Connection(ours.detach()), lifeline_write)


class TensorParallelGroup:
    """Rank 0 of one group. Calls come from one thread (the device's owner thread)."""

    def __init__(
        self,
        *,
        devices: list[str],
        backend: str,
        step_timeout_s: float,
        on_failure: Callable[[str], None] | None,
    ) -> None:
        self.devices = devices
        self.backend = backend
        self.step_timeout_s = step_timeout_s
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._op: str | None = None  # what rank 0 is doing now, for the watchdog
        self._deadline = 0.0
        self._timeout_s = 0.0
        self._closing = False
        self._stop = threading.Event()
        self._spawned = threading.Event()
        self._spawn_error: BaseException | None = None
        self.workers: list[_WorkerProcess] = []
        self.local: RankState | None = None
        self._store: Any = None
        self._supervisor = threading.Thread(target=self._supervise, name="tp-supervisor", daemon=True)

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def failure(self) -> str | None:
        """Why the group is poisoned, or None while it is healthy."""
        return self._failure

    # ---- start -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        devices: list[str],
        backend: str,
        model: ModelSource | None,
        step_timeout_s: float = 120.0,
        start_timeout_s: float = 600.0,
        worker_threads: int | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> tuple[TensorParallelGroup, tuple[int, int, int]]:
        """Spawn, join, load; returns the group and the model's (max_context, K/V blocks, block
        size), zeros without a model.

        Raises TensorParallelError (with every process already cleaned up) when any rank fails.
        """
        group = cls(devices=devices, backend=backend, step_timeout_s=step_timeout_s, on_failure=on_failure)
        try:
            layout = group._start(model, start_timeout_s, worker_threads)
        except BaseException as exc:
            reason = group._failure or group._explain(exc, "start")
            group._poison(reason, notify=False)
            group.close()
            raise TensorParallelError(reason) from exc
        return group, layout

    def _start(
        self, model: ModelSource | None, start_timeout_s: float, worker_threads: int | None
    ) -> tuple[int, int, int]:
        collective_timeout = self.step_timeout_s + COLLECTIVE_GRACE_S
        self._store = master_store(self.world_size, collective_timeout)
        self._arm("start", start_timeout_s)
        self._supervisor.start()
        self._spawned.wait()
        if self._spawn_error is not None:
            raise self._spawn_error
        deadline = time.monotonic() + start_timeout_s
        for hello in self._collect(deadline, "start"):
            if not isinstance(hello, Hello):
                raise TensorParallelError(f"a worker rank said {hello!r} instead of hello")
        base = RankSetup(
            rank=0,
            world_size=self.world_size,
            backend=self.backend,
            device=self.devices[0],
            store_port=self._store.port,
            collective_timeout_s=collective_timeout,
            torch_threads=worker_threads,
            model=model,
        )
        for worker in self.workers:
            worker.conn.send(replace(base, rank=worker.rank, device=self.devices[worker.rank]))
        # Rank 0 lives in the daemon: its thread count is the daemon's business.
        self.local = RankState.join(replace(base, torch_threads=None), self._store)
        layout = self.local.load()
        self._check_replies("start", self._collect(deadline, "start"), expected=lambda _: layout)
        self._disarm()
        log.info(
            "tensor-parallel group ready: %d ranks, %s on %s", self.world_size, self.backend, self.devices
        )
        return layout

    # ---- calls ---------------------------------------------------------------------------

    def call(self, call: Call) -> Any:
        """Run `call` on every rank in step; returns rank 0's result."""
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        if self.local is None or self._closing:
            raise TensorParallelError("the group is closed")
        self._arm(call.op, self.step_timeout_s)
        try:
            for worker in self.workers:
                worker.conn.send(call)
            result = self.local.execute(call)
            expected = summarise(call.op, result)
            self._check_replies(
                call.op, self._collect(time.monotonic() + self.step_timeout_s, call.op), lambda _: expected
            )
        except BaseException as exc:
            reason = self._failure or self._explain(exc, call.op)
            self._poison(reason)
            raise TensorParallelError(self._failure or reason) from exc
        finally:
            self._disarm()
        return result

    def _collect(self, deadline: float, op: str) -> list[Any]:
        """Exactly one message from every worker, in rank order, or an error by the deadline."""
        pending = {worker.conn: worker for worker in self.workers}
        received: dict[int, Any] = {}
        while pending:
            if self._failure is not None:
                raise TensorParallelError(self._failure)
            if time.monotonic() > deadline:
                late = ", ".join(str(w.rank) for w in pending.values())
                raise TensorParallelError(f"rank(s) {late} did not answer {op} within the deadline")
            for conn in wait(list(pending), timeout=POLL_INTERVAL_S):
                assert isinstance(conn, Connection)
                worker = pending.pop(conn)
                try:
                    received[worker.rank] = conn.recv()
                except (EOFError, OSError) as exc:
                    code = worker.proc.poll()
                    how = describe_exit(code) if code is not None else f"closed its connection ({exc!r})"
                    raise TensorParallelError(
                        f"rank {worker.rank} (pid {worker.proc.pid}) {how} during {op}"
                    ) from exc
        return [received[rank] for rank in sorted(received)]

    def _check_replies(self, op: str, replies: list[Any], expected: Callable[[int], Any]) -> None:
        failures = []
        for rank, reply in enumerate(replies, start=1):
            if not isinstance(reply, Reply):
                failures.append(f"rank {rank} sent {type(reply).__name__} instead of a reply")
            elif not reply.ok:
                failures.append(f"rank {rank}: {reply.error}")
            elif reply.value != expected(rank):
                failures.append(f"rank {rank} disagrees with rank 0 ({reply.value!r} != {expected(rank)!r})")
        if failures:
            raise TensorParallelError(f"{op}: " + "; ".join(failures))

    def _explain(self, exc: BaseException, op: str) -> str:
        """Prefer naming the rank that died (its exit often surfaces first as a gloo error)."""
        if isinstance(exc, TensorParallelError):
            return exc.reason
        grace = time.monotonic() + 1.0
        while time.monotonic() < grace:
            for worker in self.workers:
                code = worker.proc.poll()
                if code is not None:
                    return f"rank {worker.rank} (pid {worker.proc.pid}) {describe_exit(code)} during {op}"
            time.sleep(POLL_INTERVAL_S)
        return f"rank 0 failed during {op}: {type(exc).__name__}: {exc}"

    # ---- watchdog --------------------------------------------------------------------------

    def _arm(self, op: str, timeout_s: float) -> None:
        with self._lock:
            self._op, self._timeout_s = op, timeout_s
            self._deadline = time.monotonic() + timeout_s

    def _disarm(self) -> None:
        with self._lock:
            self._op = None

    def _supervise(self) -> None:
        try:
            for rank in range(1, self.world_size):
                self.workers.append(_spawn_worker(rank))
        except BaseException as exc:  # handed to the starting thread
            self._spawn_error = exc
        finally:
            self._spawned.set()
        while not self._stop.wait(POLL_INTERVAL_S):
            reason = self._watch()
            if reason is not None:
                self._poison(reason)
        # Leaving this thread fires PR_SET_PDEATHSIG in any worker still running.

    def _watch(self) -> str | None:
        with self._lock:
            if self._failure is not None or self._closing:
                return None
            op = self._op
            for worker in self.workers:
                code = worker.proc.poll()
                if code is not None:
                    when = f"during {op}" if op else "while idle"
                    return f"rank {worker.rank} (pid {worker.proc.pid}) {describe_exit(code)} {when}"
            if op is not None and time.monotonic() > self._deadline:
                return f"{op} did not finish within its deadline ({self._timeout_s:g} s); a rank is hung or stalled"
        return None

    def _poison(self, reason: str, *, notify: bool = True) -> None:
        with self._lock:
            if self._failure is not None:
                return
            self._failure = reason
        log.error("tensor-parallel group failed: %s", reason)
        self._kill_workers()
        if self.local is not None:
            abort_group(self.local.group, self.backend, ABORT_TIMEOUT_S)
        if notify and self._on_failure is not None:
            try:
                self._on_failure(reason)
            except Exception:  # the owner's bug must not kill the watchdog or mask the failure
                log.exception("on_failure callback raised")

    def _kill_workers(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()

    # ---- close -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every rank and free rank 0's model; idempotent, never hangs."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        healthy = self._failure is None and self.local is not None
        if healthy:
            try:
                for worker in self.workers:
                    worker.conn.send(Call("close"))
                self._collect(time.monotonic() + CLOSE_TIMEOUT_S, "close")
            except (OSError, TensorParallelError) as exc:
                log.warning("tensor-parallel workers did not close cleanly: %s", exc)
        if self.local is not None:
            self.local.close(shutdown_group=healthy and self._failure is None)
            self.local = None
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            worker.conn.close()
            os.close(worker.lifeline)
        self._stop.set()
        if self._supervisor.is_alive():
            self._supervisor.join()
        self._store = None
