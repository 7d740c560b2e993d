"""From a ModelSpec to a local folder that passed pre-flight: resolve, fetch small files, check, fetch weights.

The order matters: config.json and the listing are read before any weight is downloaded or
loaded, so an unsupported architecture, a model that cannot fit, or a missing file is refused
in seconds with a 4xx, not after a multi-gigabyte download or an out-of-memory crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cortex_core.errors import ApiError
from neuron import preflight
from neuron.hub import HubClient, RepoListing, log_download_progress
from neuron.loader import choose_dtype, has_vision
from neuron.sources import (
    FilePlan,
    HubModelId,
    HubSource,
    is_local_path,
    list_local_files,
    parse_hub_id,
    pick_source,
    plan_files,
    resolve_local,
    shards_from_index,
)

log = logging.getLogger(__name__)

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class PreparedModel:
    folder: Path
    gguf_file: str | None
    model_type: str
    weight_bytes: int  # estimated, at the dtype the model will be loaded in


@dataclass(frozen=True)
class Placement:
    """Where a model goes: a GPU index (None = CPU), its free memory now, and a name for messages."""

    device: int | None
    free_bytes: int
    description: str


class ModelPreparer:
    def __init__(
        self,
        sources: dict[str, HubSource],
        default_scheme: str,
        *,
        supported_types: Callable[[], list[str]] = preflight.supported_model_types,
        supported_gguf: Callable[[], list[str]] = preflight.supported_gguf_architectures,
    ) -> None:
        self.sources = sources
        self.default_scheme = default_scheme
        self._supported_types = supported_types
        self._supported_gguf = supported_gguf

    async def prepare(self, model_id: str, quant: str | None, placement: Placement) -> PreparedModel:
        if is_local_path(model_id):
            return await asyncio.to_thread(self._prepare_local, model_id, quant, placement)
        return await self._prepare_hub(model_id, quant, placement)

    # --- GGUF (local file, or fetched) -----------------------------------------------------

    def _check_gguf(self, model_id: str, folder: Path, gguf_file: str, placement: Placement) -> PreparedModel:
        try:
            summary = preflight.read_gguf_summary(folder / gguf_file)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise ApiError(
                422, f"model '{model_id}': cannot read {gguf_file}: {exc}", code="invalid_gguf"
            ) from exc
        preflight.check_gguf_architecture(model_id, summary.architecture, self._supported_gguf())
        itemsize = _ITEMSIZE[choose_dtype(placement.device, None)]
        weight_bytes = summary.elements * itemsize
        preflight.check_fit(model_id, weight_bytes, placement.free_bytes, placement.description)
        return PreparedModel(folder, gguf_file, summary.architecture, weight_bytes)

    # --- safetensors -----------------------------------------------------------------------

    def _check_config(self, model_id: str, folder: Path) -> tuple[str, str | None]:
        config = preflight.read_model_config(model_id, folder)
        supported = self._supported_types()
        if has_vision(folder):
            # Built by the image-text auto class (loader.py), not AutoModelForCausalLM.
            supported = sorted({*supported, str(config.get("model_type"))})
        model_type = preflight.check_architecture(model_id, config, supported)
        preflight.check_layer_types(model_id, config)
        dtype = config.get("dtype") or config.get("torch_dtype")
        return model_type, str(dtype) if dtype else None

    def _weights(self, model_id: str, folder: Path, plan: FilePlan) -> tuple[str, ...]:
        if plan.index_file is None:
            return plan.weights
        try:
            index = json.loads((folder / plan.index_file).read_text(encoding="utf-8"))
            return shards_from_index(index["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ApiError(
                422,
                f"model '{model_id}': {plan.index_file} is unreadable or has no weight_map: {exc}",
                code="invalid_index",
            ) from exc

    def _prepare_local(self, model_id: str, quant: str | None, placement: Placement) -> PreparedModel:
        local = resolve_local(model_id)
        if local.gguf_file:
            return self._check_gguf(model_id, local.folder, local.gguf_file, placement)
        plan = plan_files(model_id, list_local_files(local.folder), quant)
        if plan.gguf_file:
            return self._check_gguf(model_id, local.folder, plan.gguf_file, placement)
        model_type, config_dtype = self._check_config(model_id, local.folder)
        weights = self._weights(model_id, local.folder, plan)
        preflight.check_files(model_id, local.folder, weights, needs_tokenizer=True)
        itemsize = _ITEMSIZE[choose_dtype(placement.device, config_dtype)]
        weight_bytes = sum(preflight.safetensors_bytes(local.folder / name, itemsize) for name in weights)
        preflight.check_fit(model_id, weight_bytes, placement.free_bytes, placement.description)
        return PreparedModel(local.folder, None, model_type, weight_bytes)

    # --- hub -------------------------------------------------------------------------------

    async def _prepare_hub(self, model_id: str, quant: str | None, placement: Placement) -> PreparedModel:
        model = parse_hub_id(model_id)
        client = HubClient(pick_source(model, self.default_scheme, self.sources))
        listing = await asyncio.to_thread(client.listing, model)
        plan = plan_files(model_id, listing.files, quant)
        folder = await asyncio.to_thread(client.fetch, model, listing, list(plan.sidecars))
        if plan.gguf_file:
            # Before downloading: a GGUF holds at most one weight per 4 bytes (F32), so
            # size/4 weights is a lower bound - enough to refuse what can never fit.
            size = listing.files.get(plan.gguf_file) or 0
            itemsize = _ITEMSIZE[choose_dtype(placement.device, None)]
            preflight.check_fit(model_id, size // 4 * itemsize, placement.free_bytes, placement.description)
            weights: tuple[str, ...] = (plan.gguf_file,)
            model_type = ""
        else:
            model_type, config_dtype = await asyncio.to_thread(self._check_config, model_id, folder)
            weights = await asyncio.to_thread(self._weights, model_id, folder, plan)
            absent = [name for name in weights if name not in listing.files]
            if absent:
                raise ApiError(
                    422,
                    f"model '{model_id}' names weight files its repository does not have: {absent}",
                    code="missing_files",
                    extras={"missing": absent},
                )
            stored = preflight.config_dtype_itemsize({"dtype": config_dtype}) or 4
            target = _ITEMSIZE[choose_dtype(placement.device, config_dtype)]
            stored_bytes = sum(listing.files.get(name) or 0 for name in weights)
            weight_bytes = stored_bytes * target // stored
            preflight.check_fit(model_id, weight_bytes, placement.free_bytes, placement.description)
        folder = await self._fetch_weights(client, model, listing, plan, weights)
        if plan.gguf_file:
            return await asyncio.to_thread(self._check_gguf, model_id, folder, plan.gguf_file, placement)
        await asyncio.to_thread(preflight.check_files, model_id, folder, weights, needs_tokenizer=True)
        return PreparedModel(folder, None, model_type, weight_bytes)

    async def _fetch_weights(
        self,
        client: HubClient,
        model: HubModelId,
        listing: RepoListing,
        plan: FilePlan,
        weights: tuple[str, ...],
    ) -> Path:
        model_id = str(model)
        expected = sum(listing.files.get(name) or 0 for name in weights)
        if not listing.from_cache:
            log.info("fetching %s: %d weight file(s), %.0f MiB", model_id, len(weights), expected / 2**20)
        progress = asyncio.create_task(
            log_download_progress(model_id, client.storage_dir(model.repo_id), expected)
        )
        try:
            return await asyncio.to_thread(client.fetch, model, listing, [*plan.sidecars, *weights])
        finally:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
