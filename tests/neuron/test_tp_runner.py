"""Tensor parallel on CPU ranks (gloo, world size 2): same greedy tokens as one process.

The TP runners are real: rank 0 in this process, rank 1 a spawned `neuron.tp.worker`. One
runner per architecture is shared by the module's tests (starting one costs seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from support.engine_harness import PROMPT_TEXTS, collect, eos_ids, load_model, reference_greedy

from cortex_core.config.neuron import EngineConfig
from neuron.device import DeviceWorker
from neuron.engine import SingleDeviceRunner, TorchEngine
from neuron.engine.api import GenerationRequest, SamplingParams
from neuron.engine.paged import ForwardRow
from neuron.engine.runner import ModelRunner
from neuron.tp import ModelSource, TensorParallelRunner

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0)
PROMPT_A = [5, 17, 42, 99, 7, 250, 3, 8]
PROMPT_B = [11, 12, 13]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Two ranks on two cores: one torch thread for rank 0 too (the worker gets one as well)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["tiny_qwen3", "tiny_llama"])
def arch_path(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue(request.param)
    return path


@pytest.fixture(scope="module")
def tp_runner(arch_path: Path, one_thread: None) -> Iterator[TensorParallelRunner]:
    runner = TensorParallelRunner.start(
        ModelSource(str(arch_path)), [0, 1], backend="gloo", worker_threads=1, step_timeout_s=60
    )
    yield runner
    runner.close()
    assert all(worker.proc.poll() is not None for worker in runner._group.workers)


def greedy_script(runner: ModelRunner) -> tuple[dict[int, list[int]], list[torch.Tensor]]:
    """Two sequences prefilled and decoded together, one leaves, a third joins on the first's
    full block (as the prefix cache shares it)."""
    blocks = {1: [1, 2], 2: [3], 3: [1, 4]}
    logits = runner.forward([ForwardRow(PROMPT_A, 0, blocks[1]), ForwardRow(PROMPT_B, 0, blocks[2])])
    tokens = {1: [int(logits[0].argmax())], 2: [int(logits[1].argmax())]}
    logits_seen = [logits]
    for step in range(8):
        logits = runner.forward(
            [
                ForwardRow([tokens[1][-1]], len(PROMPT_A) + step, blocks[1]),
                ForwardRow([tokens[2][-1]], len(PROMPT_B) + step, blocks[2]),
            ]
        )
        logits_seen.append(logits)
        for row, seq in enumerate((1, 2)):
            tokens[seq].append(int(logits[row].argmax()))
    # Positions 0-15 of sequence 1 (its prompt and first 8 fed tokens) fill block 1.
    third = [*PROMPT_A, *tokens[1][:8], 99]
    logits = runner.forward(
        [ForwardRow(third[16:], 16, blocks[3]), ForwardRow([tokens[2][-1]], len(PROMPT_B) + 8, blocks[2])]
    )
    logits_seen.append(logits)
    tokens[3] = [int(logits[0].argmax())]
    return tokens, logits_seen


def test_runner_api_matches_single_process(tp_runner: TensorParallelRunner, arch_path: Path) -> None:
    model, _ = load_model(arch_path)
    reference = SingleDeviceRunner(model, device="cpu")
    expected_tokens, expected_logits = greedy_script(reference)
    tokens, logits = greedy_script(tp_runner)
    assert tokens == expected_tokens
    for got, want in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert tp_runner.max_context == reference.max_context
    assert (tp_runner.num_blocks, tp_runner.block_size) == (tp_runner.num_blocks, reference.block_size)
    assert tp_runner.failure is None


def test_bad_calls_are_refused_without_poisoning(tp_runner: TensorParallelRunner) -> None:
    with pytest.raises(ValueError, match="at least one new token"):
        tp_runner.forward([ForwardRow([], 0, [1])])
    with pytest.raises(ValueError, match="blocks"):
        tp_runner.forward([ForwardRow(list(range(20)), 0, [1])])  # 20 positions in one block
    with pytest.raises(ValueError, match="blocks"):
        tp_runner.forward([ForwardRow([1], 0, [0])])  # the null block
    assert tp_runner.failure is None
    assert tp_runner.forward([ForwardRow(PROMPT_B, 0, [5])]).shape[0] == 1


@pytest.fixture
async def tp_engine(
    tp_runner: TensorParallelRunner, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TorchEngine]:
    # The engine closes its runner; the module's shared TP runner is closed by its own fixture.
    monkeypatch.setattr(tp_runner, "close", lambda: None)
    worker = DeviceWorker("tp-rank0")
    engine = TorchEngine(tp_runner, worker=worker, config=EngineConfig(max_batch_size=8), model_id="tp")
    yield engine
    await engine.close()
    worker.close()


async def test_engine_concurrent_requests_match_generate(tp_engine: TorchEngine, arch_path: Path) -> None:
    """The engine's scheduler drives the TP runner like any runner: concurrent, batched, exact."""
    model, tokenizer = load_model(arch_path)
    stops = eos_ids(model)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS[:5]]
    budgets = [10, 16, 6, 12, 9]
    expected = [reference_greedy(model, p, n) for p, n in zip(prompts, budgets, strict=True)]

    def request(prompt: list[int], max_new: int) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=prompt, max_new_tokens=max_new, sampling=GREEDY, stop_token_ids=stops
        )

    results = await asyncio.gather(
        *(collect(tp_engine.generate(request(p, n))) for p, n in zip(prompts, budgets, strict=True))
    )
    for (tokens, finish), got in zip(expected, results, strict=True):
        assert got.tokens == tokens
        assert got.finish_reason == finish
    assert tp_engine.load().in_flight == 0
