"""TensorParallelRunner: the ModelRunner contract over a tensor-parallel group.

The engine's scheduler drives it exactly like a single-device runner, on the device's owner
thread. Each call is mirrored to every rank, where the same inner runner (the engine's
SingleDeviceRunner over that rank's shard) makes the same decisions; rank 0's logits are
returned. Arguments are checked here before they are fanned out, so a bad call is a plain
ValueError and does not poison the model; any failure after the fan-out does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from neuron.runner import PrefillResult
from neuron.tp.group import rank_devices
from neuron.tp.leader import TensorParallelError, TensorParallelGroup
from neuron.tp.protocol import Call, ModelSource
from neuron.tp.shard import plan_shards

DEFAULT_STEP_TIMEOUT_S = 120.0
DEFAULT_START_TIMEOUT_S = 600.0

__all__ = ["TensorParallelError", "TensorParallelRunner"]


class TensorParallelRunner:
    def __init__(self, group: TensorParallelGroup, max_context: int) -> None:
        self._group = group
        self._max_context = max_context
        self._running: set[int] = set()

    @classmethod
    def start(
        cls,
        source: ModelSource,
        devices: Sequence[int],
        *,
        backend: str,
        step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        worker_threads: int | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> TensorParallelRunner:
        """Spawn len(devices)-1 workers, shard `source` over all ranks; rank 0 is this process.

        Blocking (seconds to minutes): call it on the device's owner thread. `on_failure` is
        called once, from the watchdog thread, with the reason when the group gets poisoned
        (e.g. a worker dies while idle). Raises UnshardableModel before any process starts when
        the architecture cannot be split over len(devices) ranks, TensorParallelError when any
        rank fails to start (every process is already cleaned up then).
        """
        from transformers import AutoConfig

        plan_shards(AutoConfig.from_pretrained(source.path), len(devices))
        group, max_context = TensorParallelGroup.start(
            devices=rank_devices(list(devices), backend),
            backend=backend,
            model=source,
            step_timeout_s=step_timeout_s,
            start_timeout_s=start_timeout_s,
            worker_threads=worker_threads,
            on_failure=on_failure,
        )
        return cls(group, max_context)

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def world_size(self) -> int:
        return self._group.world_size

    @property
    def failure(self) -> str | None:
        """Why the model is poisoned (a rank died, hung or failed), or None while healthy."""
        return self._group.failure

    @property
    def worker_pids(self) -> list[int]:
        return [worker.proc.pid for worker in self._group.workers]

    def prefill(self, seq_id: int, token_ids: Sequence[int]) -> PrefillResult:
        if not token_ids:
            raise ValueError("prefill needs at least one token")
        if seq_id in self._running:
            raise ValueError(f"sequence {seq_id} is already running")
        result: PrefillResult = self._group.call(Call("prefill", (seq_id, [int(t) for t in token_ids])))
        self._running.add(seq_id)
        return result

    def prefill_batch(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        if len(seq_ids) != len(prompts) or not all(prompts):
            raise ValueError("prefill_batch needs one prompt of at least one token per sequence")
        already = [seq for seq in seq_ids if seq in self._running]
        if already or len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"sequences already running or repeated: {already or list(seq_ids)}")
        results: list[PrefillResult] = self._group.call(
            Call("prefill_batch", ([int(s) for s in seq_ids], [[int(t) for t in p] for p in prompts]))
        )
        self._running.update(seq_ids)
        return results

    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        if len(seq_ids) != len(token_ids) or not seq_ids:
            raise ValueError(
                f"decode needs one token per sequence, got {len(seq_ids)} ids and {len(token_ids)} tokens"
            )
        unknown = [seq for seq in seq_ids if seq not in self._running]
        if unknown:
            raise ValueError(f"decode of sequences that were never prefilled: {unknown}")
        logits: torch.Tensor = self._group.call(
            Call("decode", ([int(s) for s in seq_ids], [int(t) for t in token_ids]))
        )
        return logits

    def release(self, seq_id: int) -> None:
        if seq_id not in self._running:
            return
        self._running.discard(seq_id)
        if self._group.failure is not None:
            # The workers are gone; rank 0's caches are freed by close().
            return
        self._group.call(Call("release", (seq_id,)))

    def close(self) -> None:
        self._running.clear()
        self._group.close()
