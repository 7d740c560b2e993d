"""One rank's side of a tensor-parallel model, identical on rank 0 and on the workers.

A rank joins the group, checks it with an all-reduce, loads the checkpoint, keeps its
shard and builds the inner runner; then it executes the calls rank 0 fans out. Rank 0
keeps the results; workers only report small facts (the logits' shape) that rank 0 compares
with its own to catch ranks drifting apart.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch._C._distributed_c10d import Store

from neuron.engine.paged import ForwardRow
from neuron.engine.runner import ModelRunner
from neuron.tp.group import all_reduce_with, create_group, finish_device_work, sanity_sum
from neuron.tp.protocol import Call, ModelSource, RankSetup
from neuron.tp.shard import plan_shards, shard_model
from neuron.tp.slices import CheckpointLayoutError, load_shard

log = logging.getLogger(__name__)


def import_factory(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"runner factory must look like 'module:callable', got {path!r}")
    return getattr(importlib.import_module(module_name), attr)


def load_sharded_model(source: ModelSource, setup: RankSetup, group: Any) -> Any:
    """Build the model with its parameters on the meta device, shard it there, then read only
    this rank's slices of the checkpoint straight onto the rank's device (`tp/slices.py`).

    Buffers (rotary tables) are built for real on the CPU, as from_pretrained builds them, and
    moved with the model; they are small."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.path)
    plan = plan_shards(config, setup.world_size)
    dtype = getattr(torch, source.dtype)
    with init_empty_weights(include_buffers=False):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    shard_model(model, setup.rank, plan, all_reduce_with(group))
    device = torch.device(setup.device)
    read = load_shard(model, Path(source.path), setup.rank, device, dtype)
    model.tie_weights()
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        raise CheckpointLayoutError(f"parameters the checkpoint did not provide: {missing[:5]}")
    log.info("rank %d read %.1f MiB of the checkpoint (its shard)", setup.rank, read / 2**20)
    return model.to(device).eval()


class RankState:
    def __init__(self, setup: RankSetup, group: Any) -> None:
        self.setup = setup
        self.group = group
        self.runner: ModelRunner | None = None

    @classmethod
    def join(cls, setup: RankSetup, store: Store) -> RankState:
        """Create this rank's group (waits for all ranks) and check it with an all-reduce."""
        if setup.torch_threads is not None:
            torch.set_num_threads(setup.torch_threads)
        group = create_group(
            setup.backend, store, setup.rank, setup.world_size, setup.collective_timeout_s, setup.device
        )
        observed = sanity_sum(group, setup.device)
        if observed != setup.world_size:
            raise RuntimeError(
                f"all-reduce sanity check: rank {setup.rank} observed {observed}, expected {setup.world_size}"
            )
        return cls(setup, group)

    def load(self) -> tuple[int, int, int]:
        """Load the shard and build the inner runner; returns its (max_context, K/V blocks,
        block size), all 0 without a model. Every rank must report the same."""
        source = self.setup.model
        if source is None:
            return (0, 0, 0)
        model = load_sharded_model(source, self.setup, self.group)
        factory = import_factory(source.runner_factory)
        self.runner = factory(model, device=torch.device(self.setup.device), **source.runner_kwargs)
        return (int(self.runner.max_context), int(self.runner.num_blocks), int(self.runner.block_size))

    def _runner(self) -> ModelRunner:
        if self.runner is None:
            raise RuntimeError("no model is loaded on this rank")
        return self.runner

    def execute(self, call: Call) -> Any:
        """Run one call; the result on rank 0, a small comparable fact on the workers' side."""
        if call.op == "forward":
            (rows,) = call.args
            logits = self._runner().forward(
                [ForwardRow(tokens, start, blocks) for tokens, start, blocks in rows]
            )
            finish_device_work(self.setup.device)
            return logits
        if call.op == "sanity":
            return sanity_sum(self.group, self.setup.device)
        if call.op == "close":
            self.close(shutdown_group=True)
            return None
        raise ValueError(f"unknown tensor parallel op {call.op!r}")

    def close(self, *, shutdown_group: bool = False) -> None:
        """Free the model; with `shutdown_group`, also release the communicator cleanly (only
        when every rank is healthy: a poisoned NCCL group was aborted instead)."""
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        if shutdown_group:
            self.group.shutdown()


def summarise(op: str, result: Any) -> Any:
    """The part of a result that every rank must agree on (never a tensor)."""
    if op == "forward" and isinstance(result, torch.Tensor):
        return ("forward", tuple(result.shape))
    if op == "sanity":
        return ("sanity", result)
    return (op, None)
