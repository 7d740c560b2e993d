"""`neuron tp-smoke` and the NCCL path (world size 1 where a GPU exists; refused cleanly where not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.engine_harness import greedy_forward

from neuron.tp import ModelSource, TensorParallelRunner
from neuron.tp.smoke import run_smoke

pytestmark = pytest.mark.slow

HAS_CUDA = torch.cuda.is_available()


def test_smoke_two_gloo_ranks() -> None:
    lines: list[str] = []
    assert run_smoke([0, 1], "gloo", echo=lines.append) == 0
    (line,) = lines
    assert line.startswith("status=ok backend=gloo tp_size=2 devices=0,1 all_reduce_sum=2 ")


def test_smoke_cli_exit_code() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "neuron"), "tp-smoke", "--devices", "0,1", "--backend", "gloo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "status=ok" in done.stdout and "tp_size=2" in done.stdout


@pytest.mark.skipif(HAS_CUDA, reason="this host has CUDA: the NCCL tests below run instead")
def test_smoke_nccl_without_cuda_fails_with_a_reason() -> None:
    lines: list[str] = []
    assert run_smoke([0], "nccl", echo=lines.append) == 1
    assert lines[0].startswith("status=failed backend=nccl tp_size=1 devices=0 ")
    assert "NCCL" in lines[0]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (NCCL)")
def test_smoke_nccl_world_size_one() -> None:
    lines: list[str] = []
    assert run_smoke([0], "nccl", echo=lines.append) == 0, lines
    assert lines[0].startswith("status=ok backend=nccl tp_size=1 devices=0 all_reduce_sum=1 ")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (NCCL)")
def test_nccl_world_size_one_matches_single_device(tiny_qwen3: Path) -> None:
    """The same code path as multi-GPU TP (store, group, shard plan, fan-out), with no workers."""
    from transformers import AutoModelForCausalLM

    from neuron.engine import SingleDeviceRunner
    from neuron.engine.paged import ForwardRow

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).to("cuda:0").eval()
    reference = SingleDeviceRunner(model, device="cuda:0")
    runner = TensorParallelRunner.start(ModelSource(str(tiny_qwen3)), [0], backend="nccl")
    try:
        prompt = [5, 17, 42, 99, 7, 250, 3, 8]
        got = runner.forward([ForwardRow(prompt, 0, [1])])
        want = reference.forward([ForwardRow(prompt, 0, [1])])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert greedy_forward(runner, prompt, 8, [1]) == greedy_forward(reference, prompt, 8, [1])
        assert runner.failure is None
    finally:
        runner.close()
