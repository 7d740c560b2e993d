"""The single-device runner and its prefix store, without the scheduler."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from support.engine_harness import load_model

from neuron.engine.cpu_linear import PackedLinear, pack_cpu_linears, packing_available
from neuron.engine.hf_runner import SingleDeviceRunner
from neuron.engine.kv import PrefixStore, common_prefix_len


def kv_of(length: int, value: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = torch.full((1, 2, length, 4), value)
    return [(t, t.clone())]


@pytest.mark.parametrize(
    ("a", "b", "shared"),
    [
        ([], [1], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2, 4], 2),
        ([1, 2], [1, 2, 3], 2),
        ([5], [1], 0),
    ],
)
def test_common_prefix_len(a: list[int], b: list[int], shared: int) -> None:
    assert common_prefix_len(a, b) == shared


@pytest.mark.parametrize(
    ("stored", "prompt", "limit", "shared"),
    [
        ([[1, 2, 3, 4]], [1, 2, 3, 4, 5], 4, 4),
        ([[1, 2, 3, 4]], [1, 2, 3, 4], 3, 3),  # capped: the last prompt token is always computed
        ([[1, 2, 3, 4]], [1, 2, 9, 9], 3, 2),  # the stored turn went on differently (BPE boundary)
        ([[1, 2, 3, 4], [1, 2, 7, 8, 9]], [1, 2, 7, 8, 0], 4, 4),  # the longest match wins
        ([[1, 2, 3, 4]], [9, 2, 3, 4], 3, 0),
    ],
)
def test_prefix_lookup(stored: list[list[int]], prompt: list[int], limit: int, shared: int) -> None:
    store = PrefixStore(max_entries=8, max_bytes=1 << 20)
    for tokens in stored:
        store.insert(tokens, kv_of(len(tokens)))
    entry, found = store.lookup(prompt, limit)
    assert found == shared
    assert (entry is None) == (shared == 0)


def test_prefix_insert_replaces_entries_it_extends() -> None:
    store = PrefixStore(max_entries=8, max_bytes=1 << 20)
    store.insert([1, 2, 3], kv_of(3))
    store.insert([1, 2, 3, 4, 5], kv_of(5))
    assert len(store) == 1
    store.insert([1, 2], kv_of(2))  # already covered by the longer entry
    assert len(store) == 1


def test_prefix_store_is_bounded_lru_by_entries_and_bytes() -> None:
    store = PrefixStore(max_entries=2, max_bytes=1 << 20)
    store.insert([1, 1], kv_of(2))
    store.insert([2, 2], kv_of(2))
    store.lookup([1, 1, 5], 2)  # touch [1, 1]: [2, 2] is now the least recently used
    store.insert([3, 3], kv_of(2))
    assert store.lookup([2, 2, 5], 2)[1] == 0
    assert store.lookup([1, 1, 5], 2)[1] == 2
    one_entry = 2 * 2 * 2 * 4 * 4  # keys + values, [1, 2, 2, 4] float32
    small = PrefixStore(max_entries=8, max_bytes=one_entry)
    small.insert([1, 1], kv_of(2))
    small.insert([2, 2], kv_of(2))
    assert len(small) == 1 and small.nbytes == one_entry
    small.insert([1, 2, 3], kv_of(3))  # larger than the whole budget: not stored
    assert small.lookup([2, 2, 0], 2)[1] == 2


def test_stored_kv_is_a_copy() -> None:
    store = PrefixStore(max_entries=2, max_bytes=1 << 20)
    kv = kv_of(3)
    store.insert([1, 2, 3], kv)
    kv[0][0].fill_(7.0)
    entry, _ = store.lookup([1, 2, 3, 4], 3)
    assert entry is not None and float(entry.kv[0][0].max()) == 1.0


@pytest.fixture(scope="module")
def model(tiny_llama: Path) -> Any:
    return load_model(tiny_llama)[0]


def test_chunked_prefill_and_prefix_reuse_give_the_same_logits(model: Any) -> None:
    prompt = [(i * 37) % 300 + 5 for i in range(40)]
    whole = SingleDeviceRunner(model, device="cpu", prefix_cache_entries=0).prefill(0, prompt)
    chunked = SingleDeviceRunner(model, device="cpu", prefill_chunk_tokens=7, prefix_cache_entries=0)
    assert torch.allclose(chunked.prefill(0, prompt).logits, whole.logits, atol=1e-5)
    reusing = SingleDeviceRunner(model, device="cpu")
    assert reusing.prefill(0, [*prompt[:30], 1, 2, 3]).cached_tokens == 0
    reusing.release(0)
    again = reusing.prefill(1, prompt)
    assert again.cached_tokens == 30
    assert torch.allclose(again.logits, whole.logits, atol=1e-5)


def test_batched_prefill_matches_prefilling_alone(model: Any) -> None:
    prompts = [[5, 6, 7], [(i * 37) % 300 + 5 for i in range(40)], [8, 9, 10, 11, 12], [44]]
    alone = SingleDeviceRunner(model, device="cpu", prefix_cache_entries=0)
    expected = [alone.prefill(i, p).logits for i, p in enumerate(prompts)]
    expected_next = alone.decode([0, 1, 2, 3], [20, 21, 22, 23])
    together = SingleDeviceRunner(model, device="cpu", prefix_cache_entries=0)
    results = together.prefill_batch([0, 1, 2, 3], prompts)
    for got, want in zip(results, expected, strict=True):
        assert got.cached_tokens == 0
        torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=1e-5)
    # The padded prefill's K/V carries on exactly like the lone ones' (pads never leak in).
    torch.testing.assert_close(
        together.decode([0, 1, 2, 3], [20, 21, 22, 23]), expected_next, atol=1e-5, rtol=1e-5
    )


def test_batched_prefill_runs_prefix_hits_and_long_prompts_alone(model: Any) -> None:
    long_prompt = [(i * 11) % 300 + 5 for i in range(20)]
    runner = SingleDeviceRunner(model, device="cpu", prefill_chunk_tokens=16)
    runner.prefill(0, [1, 2, 3, 4, 5, 6])
    results = runner.prefill_batch([1, 2, 3, 4], [[1, 2, 3, 4, 5, 9], long_prompt, [7, 8], [9, 10, 11]])
    assert [r.cached_tokens for r in results] == [5, 0, 0, 0]
    reference = SingleDeviceRunner(model, device="cpu", prefix_cache_entries=0)
    torch.testing.assert_close(
        results[1].logits, reference.prefill(0, long_prompt).logits, atol=1e-5, rtol=1e-5
    )


def test_a_refused_batched_prefill_leaves_nothing_behind(model: Any) -> None:
    runner = SingleDeviceRunner(model, device="cpu", prefix_cache_entries=0)
    runner.prefill(0, [1, 2, 3])
    with pytest.raises(ValueError, match="already exists"):
        runner.prefill_batch([1, 0], [[4, 5], [6]])
    with pytest.raises(ValueError, match="empty"):
        runner.prefill_batch([1, 2], [[4, 5], []])
    assert [r.cached_tokens for r in runner.prefill_batch([1, 2], [[4, 5], [6]])] == [0, 0]


def test_decode_returns_rows_in_the_order_asked(model: Any) -> None:
    runner = SingleDeviceRunner(model, device="cpu", prefix_cache_entries=0)
    runner.prefill(10, [5, 6, 7])
    runner.prefill(11, [8, 9, 10, 11, 12])
    both = runner.decode([10, 11], [20, 21])
    swapped = runner.decode([11, 10], [22, 23])
    solo = SingleDeviceRunner(model, device="cpu", prefix_cache_entries=0)
    solo.prefill(0, [8, 9, 10, 11, 12])
    solo.decode([0], [21])
    assert torch.allclose(swapped[0], solo.decode([0], [22])[0], atol=1e-5)
    assert both.shape == swapped.shape


def test_runner_refuses_misuse(model: Any) -> None:
    runner = SingleDeviceRunner(model, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        runner.prefill(0, [])
    runner.prefill(0, [1, 2, 3])
    with pytest.raises(ValueError, match="already exists"):
        runner.prefill(0, [1, 2, 3])
    with pytest.raises(ValueError, match="unknown sequence 5"):
        runner.decode([0, 5], [1, 1])
    runner.release(0)
    runner.release(0)  # releasing twice is harmless


def test_unsupported_layer_types_are_named() -> None:
    config = SimpleNamespace(
        model_type="qwen3_next",
        layer_types=["linear_attention", "full_attention"],
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    with pytest.raises(ValueError, match=r"qwen3_next.*linear_attention"):
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
    got = runner.prefill(0, [5, 6, 7, 8]).logits
    assert runner.packed_linears == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert torch.allclose(got, reference, atol=0.05)
    assert runner.decode([0], [9]).shape == (1, reference.shape[0])
