"""A rank reads only its slices of the checkpoint: the shard equals the slice of the full
model, and the bytes read are the shard's, not the checkpoint's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.engine_harness import load_model

from neuron.tp.protocol import ModelSource, RankSetup
from neuron.tp.rank import load_sharded_model
from neuron.tp.shard import plan_shards, shard_model
from neuron.tp.slices import CheckpointLayoutError, checkpoint_files, load_shard, slice_of


@pytest.mark.parametrize(
    ("full", "local", "rank", "expected"),
    [
        ([64, 32], [64, 32], 1, None),  # replicated
        ([64, 32], [32, 32], 0, (0, 0, 32)),  # column-parallel: output rows
        ([64, 32], [32, 32], 1, (0, 32, 64)),
        ([64, 32], [64, 8], 3, (1, 24, 32)),  # row-parallel: input columns
        ([64], [16], 2, (0, 32, 48)),  # a bias
    ],
)
def test_which_slice_a_rank_keeps(
    full: list[int], local: list[int], rank: int, expected: tuple[int, int, int] | None
) -> None:
    assert slice_of(full, local, rank) == expected


@pytest.mark.parametrize(("full", "local"), [([64, 32], [32, 16]), ([64, 32], [48, 32]), ([64], [64, 1])])
def test_shapes_that_no_shard_can_have_are_refused(full: list[int], local: list[int]) -> None:
    with pytest.raises(CheckpointLayoutError):
        slice_of(full, local, 0)


class NoCollectives:
    """A group for one rank of two, for building the shard alone (its forward is not run)."""

    def allreduce(self, tensors: list[torch.Tensor]) -> None:
        raise AssertionError("no collective while loading")


@pytest.mark.parametrize("checkpoint", ["tiny_qwen3", "tiny_llama"])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_s_shard_read_from_slices_equals_the_full_model_sharded(
    request: pytest.FixtureRequest, checkpoint: str, rank: int
) -> None:
    path: Path = request.getfixturevalue(checkpoint)
    setup = RankSetup(rank, 2, "gloo", "cpu", 0, 10.0, None, ModelSource(str(path)))
    shard = load_sharded_model(ModelSource(str(path)), setup, NoCollectives())
    full, _ = load_model(path)
    shard_model(full, rank, plan_shards(full.config, 2), lambda tensor: None)
    expected = dict(full.state_dict())
    got = dict(shard.state_dict())
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert shard.lm_head.weight is shard.model.embed_tokens.weight  # re-tied, as from_pretrained ties


def test_only_the_shard_s_bytes_are_read(tiny_qwen3: Path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_qwen3)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shard_model(model, 1, plan_shards(config, 2), lambda tensor: None)
    read = load_shard(model, tiny_qwen3, 1, torch.device("cpu"), torch.float32)
    model.tie_weights()
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert read == held  # every byte read is kept: no full tensor was read to be cut
    checkpoint = sum(p.stat().st_size for p in checkpoint_files(tiny_qwen3))
    # Embeddings (tied, once) and norms are whole on every rank; the layers are halved.
    assert read < 0.8 * checkpoint
