"""Tensor-parallel pieces that need no second process: sharding math, plans, device choice."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from neuron.engine.paged import ForwardRow
from neuron.tp.group import (
    NCCL_DAEMON_ENVIRONMENT,
    UnsupportedBackend,
    abort_group,
    choose_backend,
    configure_nccl_environment,
    rank_devices,
)
from neuron.tp.leader import describe_exit
from neuron.tp.loading import TensorParallelPlacementError, tensor_parallel_devices
from neuron.tp.protocol import Call, RankSetup
from neuron.tp.rank import RankState
from neuron.tp.shard import UnshardableModel, plan_shards, shard_model
from neuron.tp.smoke import parse_devices


def dense_config(**overrides: Any) -> SimpleNamespace:
    base = {
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "hidden_size": 64,
        "head_dim": 16,
    }
    return SimpleNamespace(**(base | overrides))


@pytest.mark.parametrize(
    ("config", "world", "expected"),
    [
        (dense_config(), 1, (4, 2, 128, 16)),
        (dense_config(), 2, (2, 1, 64, 16)),
        (dense_config(head_dim=None), 2, (2, 1, 64, 16)),  # head_dim from hidden_size // heads
        (
            dense_config(num_attention_heads=8, num_key_value_heads=8, intermediate_size=256),
            4,
            (2, 2, 64, 16),
        ),
    ],
)
def test_plan_shards_splits_heads_and_channels(config: Any, world: int, expected: tuple[int, ...]) -> None:
    plan = plan_shards(config, world)
    assert (plan.local_heads, plan.local_kv_heads, plan.local_intermediate, plan.head_dim) == expected


@pytest.mark.parametrize(
    ("config", "world", "message"),
    [
        (dense_config(), 3, "attention heads (4)"),
        (dense_config(), 4, "key/value heads (2)"),
        (dense_config(intermediate_size=129), 2, "intermediate size (129)"),
        (dense_config(model_type="qwen3_moe", num_experts=4), 2, "mixture-of-experts"),
        (dense_config(), 0, "at least 1"),
        (SimpleNamespace(model_type="weird"), 2, "'weird'"),
    ],
)
def test_plan_shards_refuses_with_a_reason(config: Any, world: int, message: str) -> None:
    with pytest.raises(UnshardableModel, match=re.escape(message)):
        plan_shards(config, world)


@pytest.mark.parametrize(
    ("devices", "backend", "expected"),
    [
        ([0, 1], "gloo", ["cpu", "cpu"]),
        ([2, 3], "nccl", ["cuda:2", "cuda:3"]),
        ([0], "nccl", ["cuda:0"]),
    ],
)
def test_rank_devices(devices: list[int], backend: str, expected: list[str]) -> None:
    assert rank_devices(devices, backend) == expected


@pytest.mark.parametrize(
    ("devices", "backend", "message"),
    [([], "gloo", "at least one"), ([1, 1], "nccl", "distinct"), ([0, 1], "mpi", "unknown")],
)
def test_rank_devices_refuses(devices: list[int], backend: str, message: str) -> None:
    with pytest.raises(UnsupportedBackend, match=message):
        rank_devices(devices, backend)


@pytest.mark.parametrize(
    ("requested", "tp", "gpus", "expected"),
    [
        (None, None, [0, 1], None),  # no TP asked for
        ([1], None, [0, 1], None),  # one named device is a single-device load
        (None, 1, [0, 1], None),
        (None, 2, [3, 1, 0], [3, 1]),  # the first (best) GPUs
        ([2, 0], None, [0, 1, 2], [2, 0]),  # the list's length is the size; its order the ranks
        ([0, 1], 2, [0, 1], [0, 1]),
        (None, 2, [], [0, 1]),  # CPU host: nominal rank numbers
        ([4, 5], None, [], [4, 5]),
    ],
)
def test_tensor_parallel_devices(
    requested: list[int] | None, tp: int | None, gpus: list[int], expected: list[int] | None
) -> None:
    assert tensor_parallel_devices(requested, tp, gpus) == expected


@pytest.mark.parametrize(
    ("requested", "tp", "gpus", "message"),
    [
        ([0, 1], 3, [0, 1, 2], "name 2 device(s) but tensor_parallel is 3"),
        (None, 4, [0, 1], "needs 4 GPUs but this host has 2"),
        ([0, 7], None, [0, 1], "devices [7] do not exist"),
        ([1, 1], None, [0, 1], "distinct"),
        (None, 0, [0], "at least 1"),
    ],
)
def test_tensor_parallel_devices_refuses(
    requested: list[int] | None, tp: int | None, gpus: list[int], message: str
) -> None:
    with pytest.raises(TensorParallelPlacementError, match=re.escape(message)):
        tensor_parallel_devices(requested, tp, gpus)


@pytest.mark.parametrize(
    ("cuda", "allow_cpu", "expected"),
    [(True, False, "nccl"), (True, True, "nccl"), (False, True, "gloo"), (False, False, None)],
)
def test_choose_backend(cuda: bool, allow_cpu: bool, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(UnsupportedBackend, match="allow_cpu_tensor_parallel"):
            choose_backend(cuda_available=cuda, allow_cpu=allow_cpu)
    else:
        assert choose_backend(cuda_available=cuda, allow_cpu=allow_cpu) == expected


@pytest.mark.parametrize(("text", "expected"), [("0,1", [0, 1]), ("3", [3]), ("0, 1,", [0, 1])])
def test_parse_devices(text: str, expected: list[int]) -> None:
    assert parse_devices(text) == expected


@pytest.mark.parametrize("text", ["", "a,b", ","])
def test_parse_devices_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_devices(text)


@pytest.mark.parametrize(
    ("code", "expected"),
    [(0, "exited with code 0"), (3, "exited with code 3"), (-9, "was killed by SIGKILL")],
)
def test_describe_exit(code: int, expected: str) -> None:
    assert describe_exit(code) == expected


class ThreadAllReduce:
    """An all-reduce SUM between threads, standing in for the process group in-process."""

    def __init__(self, world_size: int) -> None:
        self._barrier = threading.Barrier(world_size, timeout=30)
        self._slots: list[torch.Tensor | None] = [None] * world_size

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], None]:
        def all_reduce(tensor: torch.Tensor) -> None:
            self._slots[rank] = tensor
            self._barrier.wait()
            total = torch.stack([t for t in self._slots if t is not None]).sum(0)
            self._barrier.wait()  # everyone has read every slot before anyone overwrites its own
            tensor.copy_(total)

        return all_reduce


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["tiny_qwen3", "tiny_llama"])
def test_sharded_ranks_reproduce_the_full_model(arch: str, request: pytest.FixtureRequest) -> None:
    """Two shards run side by side (threads) give the single model's logits: the slicing is right."""
    from transformers import AutoModelForCausalLM

    path: Path = request.getfixturevalue(arch)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
    expected = _logits(full, ids)

    world = 2
    reduce = ThreadAllReduce(world)
    shards = []
    for rank in range(world):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        shard_model(model, rank, plan_shards(model.config, world), reduce.for_rank(rank))
        assert (
            model.model.layers[0].self_attn.q_proj.weight.shape[0]
            == full.model.layers[0].self_attn.q_proj.weight.shape[0] // world
        )
        shards.append(model)
    results: list[torch.Tensor | None] = [None] * world
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = _logits(shards[rank], ids)
        except BaseException as exc:  # surfaced below; a dead thread would otherwise hang its peer
            errors.append(exc)
            reduce._barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for result in results:
        assert result is not None
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-4)
    assert shards[0].config.num_key_value_heads == full.config.num_key_value_heads // world


def test_nccl_settings_are_set_over_inherited_ones() -> None:
    inherited = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "PATH": "/usr/bin"}  # 1 tears the process down
    replaced = configure_nccl_environment(inherited)
    assert replaced == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert inherited == {**NCCL_DAEMON_ENVIRONMENT, "PATH": "/usr/bin"}
    assert inherited["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    assert inherited["TORCH_NCCL_ENABLE_MONITORING"] == "0"
    assert configure_nccl_environment(inherited) == {}


def test_a_cuda_rank_answers_a_forward_only_once_its_gpu_work_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []

    class Runner:
        def forward(self, rows: list[ForwardRow]) -> torch.Tensor:
            events.append("forward queued")
            return torch.zeros(len(rows), 8)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"synchronize {device}"))
    for device, expected in (
        ("cuda:3", ["forward queued", "synchronize cuda:3"]),
        ("cpu", ["forward queued"]),  # the CPU computes synchronously
    ):
        events.clear()
        setup = RankSetup(1, 2, "nccl", device, 0, 10.0, None, None)
        rank = RankState(setup, group=None)
        rank.runner = Runner()  # type: ignore[assignment]
        logits = rank.execute(Call("forward", ([([1, 2], 0, [1])],)))
        assert logits.shape == (1, 8)
        assert events == expected


def test_an_nccl_abort_that_hangs_is_left_behind_after_its_timeout() -> None:
    release = threading.Event()

    class Wedged:
        aborted = 0

        def abort(self) -> None:
            self.aborted += 1
            release.wait()  # a broken device: the abort never returns on its own

    class Healthy:
        def abort(self) -> None:
            pass

    try:
        assert abort_group(Healthy(), "nccl", timeout_s=30.0) is True
        assert abort_group(Wedged(), "nccl", timeout_s=0.05) is False
        assert abort_group(Wedged(), "gloo", timeout_s=0.05) is True  # gloo: nothing to abort
    finally:
        release.set()
