"""Reading one rank's shard of a safetensors checkpoint, and nothing more.

The model is built with its parameters on the meta device (no memory), sharded there
(`shard.shard_model` slices meta tensors as it would real ones), and then each parameter is
read from the checkpoint as exactly the slice this rank keeps, straight into a tensor on the
rank's device. So a rank's host memory holds at most one tensor's slice at a time, rather
than the whole checkpoint as a full `from_pretrained` per rank did (N ranks, N copies).

Which slice a parameter is follows from shapes alone: the sharded parameter has the
checkpoint tensor's shape except along the one dimension it was split on, where it has
1/world of it, and rank r keeps the r-th part (`slice_of`, pure). Replicated tensors
(embeddings, norms, lm_head) are read whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn


class CheckpointLayoutError(ValueError):
    """The checkpoint's tensors do not match the model's parameters (names or shapes)."""


def slice_of(full: Sequence[int], local: Sequence[int], rank: int) -> tuple[int, int, int] | None:
    """(dim, start, stop) of rank `rank`'s part of a tensor of shape `full` whose shard has
    shape `local`; None when the tensor is replicated (the same shape)."""
    if len(full) != len(local):
        raise CheckpointLayoutError(
            f"a shard of shape {list(local)} cannot come from a tensor of shape {list(full)}"
        )
    split = [dim for dim, (f, n) in enumerate(zip(full, local, strict=True)) if f != n]
    if not split:
        return None
    if len(split) > 1 or full[split[0]] % local[split[0]]:
        raise CheckpointLayoutError(
            f"a shard of shape {list(local)} is not an even part of shape {list(full)}"
        )
    dim = split[0]
    return dim, rank * local[dim], (rank + 1) * local[dim]


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint (sharded with an index, or a single file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointLayoutError(f"{folder} has no model.safetensors (tensor parallel reads safetensors only)")


def _parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(full name, owning module, attribute, parameter) for every parameter, shared ones once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attribute, parameter in list(module._parameters.items()):
            if parameter is None or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            yield f"{module_name}.{attribute}" if module_name else attribute, module, attribute, parameter


def load_shard(model: nn.Module, folder: Path, rank: int, device: torch.device, dtype: torch.dtype) -> int:
    """Fill every meta parameter of the sharded `model` with its slice from the checkpoint in
    `folder`, on `device` in `dtype`; returns the bytes read. A tied parameter (lm_head tied
    to the input embedding) that the checkpoint does not store is left for the caller to
    re-tie (`tie_weights`)."""
    from safetensors import safe_open

    read = 0
    tied = tied_names(model)
    with ExitStack() as stack:
        handles = [
            stack.enter_context(safe_open(str(path), framework="pt")) for path in checkpoint_files(folder)
        ]
        where = {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118 (not a dict)
        for name, module, attribute, parameter in _parameters(model):
            if not parameter.is_meta:
                continue
            handle = where.get(name)
            if handle is None and name in tied:
                continue  # e.g. lm_head, tied to the input embedding: re-tied by the caller
            if handle is None:
                raise CheckpointLayoutError(
                    f"the checkpoint has no tensor {name!r} (shape {list(parameter.shape)})"
                )
            source = handle.get_slice(name)
            part = slice_of(source.get_shape(), parameter.shape, rank)
            if part is None:
                tensor = source[:]
            else:
                dim, start, stop = part
                tensor = source[(slice(None),) * dim + (slice(start, stop),)]
            read += tensor.numel() * tensor.element_size()
            module._parameters[attribute] = nn.Parameter(
                tensor.to(device=device, dtype=dtype), requires_grad=False
            )
    return read


def tied_names(model: nn.Module) -> set[str]:
    """Parameters that transformers ties to another one when the config says so (a dict of
    tied -> source in transformers 5, a list of names before)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or ()
    return set(keys)
