"""Peak host memory of a tensor-parallel rank while it loads its shard (gloo, CPU ranks).

Writes two random-weight Llama-shaped checkpoints (bf16): a tiny one, whose load measures
what a rank costs without weights (torch, transformers, the group), and a ~570 MB one. Each
is loaded by a world-size-2 TensorParallelRunner and runs one forward (touching every
weight); rank 1's peak RSS (VmHWM of the worker process) is compared with its shard and with the whole checkpoint,
which is what every rank held when it ran a full from_pretrained.

    .venv/bin/python bench/tp_load_memory.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIB = 2**20


def write_checkpoint(folder: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """A random-weight Llama checkpoint in bf16; returns its size in bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def rank1_peak(folder: Path) -> int:
    from neuron.engine.paged import ForwardRow
    from neuron.tp import ModelSource, TensorParallelRunner

    runner = TensorParallelRunner.start(
        # No oneDNN packing or lean decoder: they copy the linears once more, a runner matter
        # apart from loading (and the same on one device).
        ModelSource(
            str(folder),
            dtype="bfloat16",
            runner_kwargs={"kv_cache_bytes": 1 << 20, "pack_cpu_linears": False, "lean_decode": False},
        ),
        [0, 1],
        backend="gloo",
        worker_threads=1,
    )
    try:
        # On the CPU a slice read from the checkpoint can stay a view of its mapped file, paged
        # in when first used: one forward touches every weight before the peak is read.
        runner.forward([ForwardRow([1, 2, 3], 0, [1])])
        return peak_rss(runner.worker_pids[0])
    finally:
        runner.close()


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        tiny, big = Path(scratch, "tiny"), Path(scratch, "big")
        write_checkpoint(tiny, hidden=128, layers=2, intermediate=256, vocab=1024)
        size = write_checkpoint(big, hidden=1024, layers=16, intermediate=4096, vocab=32000)
        embeddings = 32000 * 1024 * 2  # whole on every rank (tied: once)
        shard = embeddings + (size - embeddings) // 2
        base = rank1_peak(tiny)
        peak = rank1_peak(big)
        print(
            f"checkpoint {size / MIB:.0f} MiB; rank 1's shard ~{shard / MIB:.0f} MiB (embeddings whole, layers halved)"
        )
        print(f"rank 1 peak RSS: {base / MIB:.0f} MiB without weights, {peak / MIB:.0f} MiB with its shard")
        print(
            f"growth {(peak - base) / MIB:.0f} MiB = {(peak - base) / shard:.2f}x its shard, "
            f"{(peak - base) / size:.2f}x the checkpoint (a full from_pretrained per rank: >= 1x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
