"""`neuron tp-smoke --devices 0,1`: can this host run a tensor-parallel group at all?

Spawns the worker ranks exactly as a model load does, joins the group, runs the all-reduce
sanity check (every rank contributes 1 and must observe the world size) and tears the group
down, printing one `key=value` line. Exit code 0 on success, 1 on failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from neuron.tp.group import UnsupportedBackend, choose_backend, rank_devices
from neuron.tp.leader import TensorParallelError, TensorParallelGroup
from neuron.tp.protocol import Call

SMOKE_TIMEOUT_S = 60.0


def parse_devices(text: str) -> list[int]:
    """'0,1' -> [0, 1]."""
    try:
        devices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"devices must be comma-separated integers like 0,1, got {text!r}") from exc
    if not devices:
        raise ValueError("at least one device is needed")
    return devices


def default_backend() -> str:
    import torch

    return choose_backend(cuda_available=torch.cuda.is_available(), allow_cpu=True)


def run_smoke(
    devices: Sequence[int],
    backend: str | None = None,
    *,
    timeout_s: float = SMOKE_TIMEOUT_S,
    echo: Callable[[str], None] = print,
) -> int:
    """Init, all-reduce sanity, teardown. Prints `status=ok|failed ...`; returns the exit code."""
    chosen = backend or default_backend()
    listed = ",".join(str(d) for d in devices)
    started = time.monotonic()
    try:
        group, _ = TensorParallelGroup.start(
            devices=rank_devices(list(devices), chosen),
            backend=chosen,
            model=None,
            step_timeout_s=timeout_s,
            start_timeout_s=timeout_s,
            worker_threads=1,
        )
        try:
            observed = group.call(Call("sanity"))
        finally:
            group.close()
    except (TensorParallelError, UnsupportedBackend) as exc:
        echo(f"status=failed backend={chosen} tp_size={len(devices)} devices={listed} reason={exc}")
        return 1
    elapsed_ms = (time.monotonic() - started) * 1000
    if observed != len(devices):
        echo(
            f"status=failed backend={chosen} tp_size={len(devices)} devices={listed} "
            f"reason=all-reduce observed {observed}, expected {len(devices)}"
        )
        return 1
    echo(
        f"status=ok backend={chosen} tp_size={len(devices)} devices={listed} "
        f"all_reduce_sum={observed} elapsed_ms={elapsed_ms:.0f}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m neuron.tp.smoke --devices 0,1 [--backend gloo|nccl]` (the CLI's twin)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m neuron.tp.smoke")
    parser.add_argument("--devices", default="0,1")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    parser.add_argument("--timeout", type=float, default=SMOKE_TIMEOUT_S)
    args = parser.parse_args(argv)
    return run_smoke(parse_devices(args.devices), args.backend, timeout_s=args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
