"""Device faults and bad ids at the engine: a sticky CUDA-style error faults the engine and
is reported once; an id outside the embedding is a 400 before anything runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from support.engine_harness import HANG_GUARD_SECS, collect, load_model

from cortex_core.config.neuron import EngineConfig
from cortex_core.errors import ApiError
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams
from neuron.engine.faults import device_fault
from neuron.engine.paged import ForwardRow

GREEDY = SamplingParams(temperature=0.0)
ASSERT = "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions."


@pytest.mark.parametrize(
    ("exc", "sticky"),
    [
        (RuntimeError(ASSERT), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`"), True),
        (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error"), True),
        (RuntimeError("CUDA error: out of memory"), False),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("prefill exploded"), False),
        (ValueError("a row up to position 40 has blocks [1]"), False),
        (ApiError(503, "model tiny was unloaded"), False),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, BaseException) else str(value),
)
def test_which_errors_leave_the_device_unusable(exc: BaseException, sticky: bool) -> None:
    assert (device_fault(exc) is not None) is sticky


def test_a_fault_wrapped_in_another_error_is_still_found_and_named() -> None:
    try:
        try:
            raise RuntimeError(ASSERT)
        except RuntimeError as inner:
            raise RuntimeError("tensor-parallel step failed on rank 0") from inner
    except RuntimeError as outer:
        reason = device_fault(outer)
    assert reason == "RuntimeError: CUDA error: device-side assert triggered"


class AssertingRunner(SingleDeviceRunner):
    """A GPU whose kernels assert once a prompt holds token 7: the error is sticky, so every
    forward after it fails the same way (as a real CUDA context does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broken = False
        self.forwards = 0

    def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
        self.forwards += 1
        if self.broken or any(7 in row.tokens for row in rows):
            self.broken = True
            raise RuntimeError(ASSERT)
        return super().forward(rows)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_qwen3: Path) -> tuple[Any, Any]:
    return load_model(tiny_qwen3)


def request(prompt: list[int], max_new: int = 4) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new, sampling=GREEDY)


@asynccontextmanager
async def running(
    runner: SingleDeviceRunner, worker: DeviceWorker, **options: Any
) -> AsyncIterator[TorchEngine]:
    """An engine over `runner`, closed however the test ends, within the hang guard: a fault
    that wedged the device thread fails the test instead of hanging the suite."""
    engine = TorchEngine(runner, worker=worker, model_id="tiny", **options)
    try:
        yield engine
    finally:
        await asyncio.wait_for(engine.close(), HANG_GUARD_SECS)


async def test_a_sticky_device_error_faults_the_engine_and_is_reported_once(
    model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker
) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = list(tokenizer.encode("The capital of France is"))
    assert 7 not in prompt
    reports: list[str] = []
    runner = AssertingRunner(model, device="cpu")
    async with running(runner, worker, config=EngineConfig(), on_device_fault=reports.append) as engine:
        healthy = await asyncio.wait_for(collect(engine.generate(request(prompt))), HANG_GUARD_SECS)
        assert len(healthy.tokens) == 4 and engine.fault is None

        doomed = engine.generate(request([7, *prompt]))
        bystander = engine.generate(request(prompt, 30))
        for stream in (doomed, bystander):
            with pytest.raises(RuntimeError, match="device-side assert"):
                await asyncio.wait_for(collect(stream), HANG_GUARD_SECS)
        assert reports == ["RuntimeError: CUDA error: device-side assert triggered"]
        assert engine.fault == reports[0]

        forwards = runner.forwards
        with pytest.raises(ApiError) as refused:
            engine.generate(request(prompt))
        assert refused.value.status == 500
        assert refused.value.code == "model_poisoned"
        assert "device-side assert" in refused.value.message
        assert runner.forwards == forwards  # refused before anything was queued


async def test_an_ordinary_step_failure_does_not_fault_the_engine(
    model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker
) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = list(tokenizer.encode("Hello"))

    class Exploding(SingleDeviceRunner):
        def forward(self, rows: Sequence[ForwardRow]) -> torch.Tensor:
            if any(7 in row.tokens for row in rows):
                raise RuntimeError("prefill exploded")
            return super().forward(rows)

    reports: list[str] = []
    async with running(Exploding(model, device="cpu"), worker, on_device_fault=reports.append) as engine:
        with pytest.raises(RuntimeError, match="exploded"):
            await asyncio.wait_for(collect(engine.generate(request([7, *prompt]))), HANG_GUARD_SECS)
        assert (
            len((await asyncio.wait_for(collect(engine.generate(request(prompt))), HANG_GUARD_SECS)).tokens)
            == 4
        )
        assert reports == [] and engine.fault is None


async def test_ids_outside_the_embedding_are_a_400_before_anything_runs(
    model_and_tokenizer: tuple[Any, Any], worker: DeviceWorker
) -> None:
    model, _ = model_and_tokenizer
    runner = AssertingRunner(model, device="cpu")
    rows = model.get_input_embeddings().num_embeddings
    assert runner.vocab_size == rows
    async with running(runner, worker) as engine:
        for bad in ([1, 2, rows], [-1, 5]):
            with pytest.raises(ApiError) as refused:
                engine.generate(request(bad))
            assert refused.value.status == 400
            assert refused.value.param == "prompt"
            assert f"0..{rows - 1}" in refused.value.message
        assert runner.forwards == 0
        ok = await asyncio.wait_for(collect(engine.generate(request([1, 2, rows - 1]))), HANG_GUARD_SECS)
        assert len(ok.tokens) == 4
