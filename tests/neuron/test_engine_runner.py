"""The single-device runner over its paged K/V pool, without the scheduler."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from support.engine_harness import load_model

from neuron.engine.cpu_linear import PackedLinear, pack_cpu_linears, packing_available
from neuron.engine.hf_runner import SingleDeviceRunner, kv_geometry
from neuron.engine.paged import ForwardRow


def reference_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    """transformers' own forward over the whole sequence: logits after its last token."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def table(first: int, positions: int, block_size: int = 16) -> list[int]:
    """Consecutive blocks from `first` covering `positions`."""
    return list(range(first, first + -(-positions // block_size)))


@pytest.fixture(scope="module")
def model(tiny_llama: Path) -> Any:
    return load_model(tiny_llama)[0]


PROMPT = [(i * 37) % 300 + 5 for i in range(40)]


@pytest.mark.parametrize("chunk", [1, 7, 16, 40])
def test_chunked_prefill_equals_the_whole_forward(model: Any, chunk: int) -> None:
    runner = SingleDeviceRunner(model, device="cpu")
    blocks = table(1, len(PROMPT))
    for start in range(0, len(PROMPT), chunk):
        logits = runner.forward([ForwardRow(PROMPT[start : start + chunk], start, blocks)])
    torch.testing.assert_close(logits[0], reference_logits(model, PROMPT), atol=1e-5, rtol=1e-5)


def test_rows_of_any_shape_share_a_forward(model: Any) -> None:
    """Decode rows, prefill chunks with and without a past, of different lengths, in one
    forward: each row's logits are what it gets alone."""
    runner = SingleDeviceRunner(model, device="cpu")
    first, second = PROMPT[:30], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11]
    runner.forward([ForwardRow(first, 0, table(1, 31))])  # blocks 1-2
    runner.forward([ForwardRow(second[:5], 0, table(3, 11))])  # block 3
    rows = [
        ForwardRow([42], 30, table(1, 31)),  # a decode step
        ForwardRow(second[5:], 5, table(3, 11)),  # the rest of a prompt
        ForwardRow([5, 6, 7], 0, table(4, 3)),  # a fresh short prompt
    ]
    together = runner.forward(rows)
    expected = [
        reference_logits(model, [*first, 42]),
        reference_logits(model, second),
        reference_logits(model, [5, 6, 7]),
    ]
    for got, want in zip(together, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shared_prefix_blocks_serve_two_sequences(model: Any) -> None:
    """Two sequences read the same full blocks (the prefix cache's sharing) and write only
    their own last block."""
    runner = SingleDeviceRunner(model, device="cpu")
    runner.forward([ForwardRow(PROMPT[:32], 0, [1, 2])])
    a = runner.forward([ForwardRow(PROMPT[32:], 32, [1, 2, 3])])
    b = runner.forward([ForwardRow([77, 78], 32, [1, 2, 4])])
    torch.testing.assert_close(a[0], reference_logits(model, PROMPT), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[0], reference_logits(model, [*PROMPT[:32], 77, 78]), atol=1e-5, rtol=1e-5)


def test_only_new_tokens_are_written(model: Any) -> None:
    runner = SingleDeviceRunner(model, device="cpu")
    runner.forward([ForwardRow(PROMPT[:20], 0, [1, 2]), ForwardRow([1, 2, 3], 0, [3])])
    runner.forward([ForwardRow([4], 20, [1, 2]), ForwardRow([5], 3, [3])])
    assert runner.pool is not None
    assert runner.pool.slots_written == runner.layers * (20 + 3 + 2)


def test_runner_refuses_misuse(model: Any) -> None:
    runner = SingleDeviceRunner(model, device="cpu")
    with pytest.raises(ValueError, match="at least one new token"):
        runner.forward([ForwardRow([], 0, [1])])
    with pytest.raises(ValueError, match="holds only 1 blocks"):
        runner.forward([ForwardRow(PROMPT[:20], 0, [1])])
    with pytest.raises(ValueError, match="null block"):
        runner.forward([ForwardRow([1, 2], 0, [0])])


def test_the_pool_is_sized_from_its_budget_and_the_batch(model: Any) -> None:
    layers, kv_heads, head_dim = kv_geometry(model.config)
    per_block = 2 * layers * 16 * kv_heads * head_dim * 4  # float32
    assert SingleDeviceRunner(model, device="cpu", kv_cache_bytes=10 * per_block).num_blocks == 11
    context = model.config.max_position_embeddings
    capped = SingleDeviceRunner(model, device="cpu", kv_cache_bytes=1 << 40, max_batch_size=2)
    assert capped.num_blocks == 2 * -(-context // 16) + 1


def test_unsupported_layer_types_are_named() -> None:
    config = SimpleNamespace(
        model_type="llama4",
        layer_types=["chunked_attention", "full_attention"],
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    with pytest.raises(ValueError, match=r"llama4.*chunked_attention"):
        SingleDeviceRunner(SimpleNamespace(config=config), device="cpu")


@pytest.mark.skipif(not packing_available(), reason="this CPU/torch build has no oneDNN bf16 linear")
def test_packed_bf16_linear_matches_linear() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True, dtype=torch.bfloat16)
    packed = PackedLinear(linear)
    for shape in [(1, 1, 64), (8, 1, 64), (2, 37, 64)]:
        x = torch.randn(*shape, dtype=torch.bfloat16)
        with torch.inference_mode():
            assert torch.allclose(packed(x).float(), linear(x).float(), atol=0.05, rtol=0.02)


class Siblings(torch.nn.Module):
    """Attention-style projections reading one input, and one that reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(64, 96, bias=True, dtype=torch.bfloat16)
        self.k_proj = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
        self.v_proj = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
        self.o_proj = torch.nn.Linear(96, 64, bias=False, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        # Out of order, and k twice (the second time on another input): never a stale slice.
        return [self.v_proj(x), self.q_proj(x), self.k_proj(x), self.k_proj(y), self.o_proj(self.q_proj(y))]


@pytest.mark.skipif(not packing_available(), reason="this CPU/torch build has no oneDNN bf16 linear")
def test_merged_sibling_projections_equal_separate_packed_ones() -> None:
    torch.manual_seed(0)
    module = Siblings()
    separate = {
        name: PackedLinear(getattr(module, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert pack_cpu_linears(module) == 4
    for rows in (1, 8, 37, 300):
        x, y = torch.randn(rows, 1, 64, dtype=torch.bfloat16), torch.randn(rows, 1, 64, dtype=torch.bfloat16)
        with torch.inference_mode():
            got = module(x, y)
            want = [
                separate["v_proj"](x),
                separate["q_proj"](x),
                separate["k_proj"](x),
                separate["k_proj"](y),
                separate["o_proj"](separate["q_proj"](y)),
            ]
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.skipif(not packing_available(), reason="this CPU/torch build has no oneDNN bf16 linear")
def test_runner_packs_bf16_cpu_models_only(tiny_qwen3: Path) -> None:
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    fp32_runner = SingleDeviceRunner(fp32, device="cpu")
    fp32_runner.prepare()
    assert fp32_runner.packed_linears == 0
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.bfloat16).eval()
    reference = bf16(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, -1].float()
    runner = SingleDeviceRunner(bf16, device="cpu")
    assert runner.packed_linears == 0, "packing waits for the owner thread"
    got = runner.forward([ForwardRow([5, 6, 7, 8], 0, [1])])[0]
    assert runner.packed_linears == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert torch.allclose(got, reference, atol=0.05)
    assert runner.forward([ForwardRow([9], 4, [1])]).shape == (1, reference.shape[0])
