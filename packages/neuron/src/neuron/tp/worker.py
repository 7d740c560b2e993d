"""A worker rank: `python -m neuron.tp.worker --conn-fd N --lifeline-fd M --parent-pid P`.

Started by rank 0 (the daemon). It says hello, receives its setup, joins the group, loads
its shard and then executes one call at a time, answering each with exactly one Reply.

It never outlives the daemon, by three independent means: the kernel sends it SIGKILL when
the thread that spawned it ends (PR_SET_PDEATHSIG), a thread watches the lifeline pipe and
exits on EOF (the daemon's end closes however it dies), and the call connection's EOF ends
the loop. A collective with a dead rank 0 fails on the closed socket or the gloo timeout.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from multiprocessing.connection import Connection

log = logging.getLogger("neuron.tp.worker")

PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 70


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    # The parent may have died before prctl took effect: then we were re-parented already.
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)


def watch_lifeline(fd: int) -> None:
    def wait_for_eof() -> None:
        while True:
            try:
                data = os.read(fd, 1)
            except InterruptedError:
                continue
            except OSError:
                break
            if not data:
                break
        # os._exit: the main thread may be blocked inside a collective; nothing to flush.
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=wait_for_eof, name="tp-lifeline", daemon=True).start()


def serve(conn: Connection) -> int:
    from neuron.tp.group import client_store
    from neuron.tp.protocol import Call, Hello, RankSetup, Reply
    from neuron.tp.rank import RankState, summarise

    conn.send(Hello(pid=os.getpid()))
    setup = conn.recv()
    if not isinstance(setup, RankSetup):
        raise TypeError(f"expected RankSetup first, got {type(setup).__name__}")
    log.info("rank %d/%d joining (%s on %s)", setup.rank, setup.world_size, setup.backend, setup.device)
    try:
        store = client_store(setup.store_port, setup.world_size, setup.collective_timeout_s)
        state = RankState.join(setup, store)
        layout = state.load()
    except Exception as exc:  # reported to rank 0, which fails the load with this text
        log.exception("rank %d failed to start", setup.rank)
        conn.send(Reply(ok=False, error=f"{type(exc).__name__}: {exc}"))
        return 1
    conn.send(Reply(ok=True, value=layout))
    while True:
        try:
            call = conn.recv()
        except EOFError:
            log.info("rank %d: rank 0 closed the connection; exiting", setup.rank)
            return EXIT_PARENT_GONE
        if not isinstance(call, Call):
            conn.send(Reply(ok=False, error=f"expected a Call, got {type(call).__name__}"))
            continue
        try:
            result = state.execute(call)
        except Exception as exc:  # reported to rank 0, which poisons the model
            log.exception("rank %d: %s failed", setup.rank, call.op)
            conn.send(Reply(ok=False, error=f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(Reply(ok=True, value=summarise(call.op, result)))
        if call.op == "close":
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuron.tp.worker")
    parser.add_argument("--conn-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s neuron.tp.worker[%(process)d] %(message)s"
    )
    die_with_parent(args.parent_pid)
    watch_lifeline(args.lifeline_fd)
    conn = Connection(socket.socket(fileno=args.conn_fd).detach())
    try:
        return serve(conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("rank 0 went away; exiting")
        return EXIT_PARENT_GONE


if __name__ == "__main__":
    sys.exit(main())
