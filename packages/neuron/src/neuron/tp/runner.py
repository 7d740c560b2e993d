"""TensorParallelRunner: the ModelRunner contract over a tensor-parallel group.

The engine's scheduler drives it exactly like a single-device runner, on the device's owner
thread. Each forward is mirrored to every rank, where the same inner runner (the engine's
SingleDeviceRunner over that rank's shard, with a K/V pool of the same number of blocks)
computes the same rows into the same blocks; rank 0's logits are returned. Arguments are
checked here before they are fanned out, so a bad call is a plain ValueError and does not
poison the model; any failure after the fan-out does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from neuron.engine.blocks import NULL_BLOCK
from neuron.engine.paged import ForwardRow
from neuron.tp.group import rank_devices
from neuron.tp.leader import TensorParallelError, TensorParallelGroup
from neuron.tp.protocol import Call, ModelSource
from neuron.tp.shard import plan_shards

DEFAULT_STEP_TIMEOUT_S = 120.0
DEFAULT_START_TIMEOUT_S = 600.0

__all__ = ["TensorParallelError", "TensorParallelRunner"]


class TensorParallelRunner:
    def __init__(
        self,
        group: TensorParallelGroup,
        max_context: int,
        num_blocks: int,
        block_size: int,
        vocab_size: int,
    ) -> None:
        self._group = group
        self._max_context = max_context
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._vocab_size = vocab_size

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

        config = AutoConfig.from_pretrained(source.path)
        plan_shards(config, len(devices))
        group, (max_context, num_blocks, block_size) = TensorParallelGroup.start(
            devices=rank_devices(list(devices), backend),
            backend=backend,
            model=source,
            step_timeout_s=step_timeout_s,
            start_timeout_s=start_timeout_s,
            worker_threads=worker_threads,
            on_failure=on_failure,
        )
        # Every rank's embedding is built from this config: its rows are the vocabulary.
        return cls(group, max_context, num_blocks, block_size, int(config.vocab_size))

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def state_slots(self) -> int:
        return 0  # hybrid models are refused under tensor parallel (tp/shard.py)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

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

    def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
        if not rows or any(not row.tokens for row in rows):
            raise ValueError("a forward needs at least one row, each with at least one new token")
        for row in rows:
            capacity = len(row.blocks) * self._block_size
            if row.end > capacity or any(not NULL_BLOCK < b < self._num_blocks for b in row.blocks):
                raise ValueError(
                    f"a row up to position {row.end} has blocks {list(row.blocks)} "
                    f"(pool of {self._num_blocks} blocks of {self._block_size})"
                )
        plain = [([int(t) for t in row.tokens], int(row.start), [int(b) for b in row.blocks]) for row in rows]
        logits: torch.Tensor = self._group.call(Call("forward", (plain,)))
        return logits

    def close(self) -> None:
        self._group.close()
