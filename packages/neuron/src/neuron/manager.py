"""ModelManager: the lifecycle of every model on this neuron, one object over its harnesses.

States: `loading` -> `loaded` | `failed` (reason kept for /models); `loaded` -> `unloading`
-> gone; `poisoned` when a device fault made a model unusable. Loads are single-flight per
model id: the record is created and the load task started without an `await` in between,
so concurrent identical loads all await one task. A load of a loaded model is a no-op
success. Memory is reserved per device while a load runs, so two loads never count the
same free bytes. Shutdown (`close`) cancels loads in progress and unloads the rest.

These rules hold whatever runs the model, so they are written once, here; the runtime's
own part (placing weights, building an engine, freeing memory) is a harness's
(cortex_core.harness): `torch` (torch_harness.py) by default, chosen per model by
`harness` in models.toml / `/models/load`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cortex_core.config.neuron import NeuronConfig
from cortex_core.errors import ApiError
from cortex_core.harness import Harness, Weights
from cortex_core.limits import echoed
from cortex_core.neuron_api import (
    ActivationFailure,
    ActivationStatus,
    ModelInfo,
    ModelLimit,
    ModelLoad,
    ModelSpec,
    ModelState,
)
from neuron.discovery import HostProbe
from neuron.engine.api import Engine, GenerationRequest, TokenEvent
from neuron.loaded_model import LoadedModel
from neuron.loader import device_name
from neuron.metrics import LiveReadings, NeuronMetrics
from neuron.preflight import check_fit, required_bytes
from neuron.prepare import ModelPreparer
from neuron.serving.params import context_length
from neuron.sources import allowed_roots, confine_local, effective_sources, is_local_path
from neuron.torch_harness import DevicePool, EngineFactory, TorchHarness, default_engine_factory

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# What a client should wait before retrying a model that is still loading or unloading.
RETRY_AFTER_SECS = 5.0


class MeteredEngine:
    """The engine as serving sees it: counts requests and generated tokens, marks the model used."""

    def __init__(
        self, inner: Engine, on_request: Callable[[], None], on_tokens: Callable[[int], None]
    ) -> None:
        self.inner = inner
        self._on_request = on_request
        self._on_tokens = on_tokens

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        # Called synchronously like the engine's own, so its refusals (400, 503) still raise at once.
        stream = self.inner.generate(request)
        self._on_request()
        return self._counted(stream)

    def generate_choices(self, request: GenerationRequest, n: int) -> list[AsyncIterator[TokenEvent]]:
        streams = self.inner.generate_choices(request, n)
        self._on_request()
        return [self._counted(stream) for stream in streams]

    async def _counted(self, stream: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
        try:
            async for event in stream:
                if event.token_id is not None:
                    self._on_tokens(1)
                yield event
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def load(self) -> ModelLoad:
        return self.inner.load()

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Engine-specific extras (e.g. statistics) stay reachable through the wrapper.
        return getattr(self.inner, name)


@dataclass
class ModelRecord:
    spec: ModelSpec
    state: ModelState
    requested_at: float
    device: int | None = None
    # Every rank's device of a tensor-parallel model (rank 0's is `device`); empty otherwise.
    devices: list[int] = field(default_factory=list)
    error: str | None = None
    loaded: LoadedModel | None = None
    memory_bytes: int = 0
    loaded_at: float | None = None
    last_used: float | None = None
    load_seconds: float | None = None
    task: asyncio.Task[LoadedModel] | None = field(default=None, repr=False)
    unload_task: asyncio.Task[None] | None = field(default=None, repr=False)


def _capabilities(loaded: LoadedModel) -> tuple[bool, bool]:
    """(tool_call, reasoning): the template takes tools; the vocabulary has reasoning markers."""
    from neuron.serving.reasoning import find_reasoning_markers
    from neuron.serving.template import template_takes_tools

    return template_takes_tools(loaded.chat_template), find_reasoning_markers(loaded.tokenizer) is not None


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


# Load failures that mean "the model source could not be reached", not "this model is bad":
# a default model's pre-warm tries those again (the registry may come back; a network may
# come up after the daemon).
SOURCE_UNREACHABLE = frozenset({"repo_fetch_failed", "download_failed"})


@dataclass(frozen=True)
class PrewarmRetry:
    """Retries of a default model whose source is unreachable: base·2^(n-1) s, capped, n ≤ attempts."""

    attempts: int = 5
    base_secs: float = 2.0
    cap_secs: float = 60.0
    # Injected so tests can run the back-off without waiting for it.
    sleep: Callable[[float], Any] = asyncio.sleep

    def delay(self, retry: int) -> float:
        return min(self.cap_secs, self.base_secs * 2.0 ** (retry - 1))


class _Ticket:
    """One load's view of the manager (cortex_core.harness.LoadTicket)."""

    def __init__(self, manager: ModelManager, model_id: str, record: ModelRecord) -> None:
        self._manager = manager
        self._record = record
        self.model_id = model_id
        self.spec = record.spec
        # The reporters are built here, on the event loop, since they post back to it.
        self._loop = asyncio.get_running_loop()

    def free_bytes(self, device: int | None) -> int:
        return self._manager._free_bytes(device)

    def reserve(self, weights: Weights) -> contextlib.AbstractContextManager[None]:
        return self._manager._reservation(self.model_id, weights)

    def placed(self, device: int | None, devices: Sequence[int] = ()) -> None:
        self._record.device, self._record.devices = device, list(devices)

    def sized(self, memory_bytes: int) -> None:
        self._record.memory_bytes = memory_bytes

    def device_fault(self) -> Callable[[str], None]:
        return self._reporter(self._manager._poison_device, "device fault")

    def model_fault(self) -> Callable[[str], None]:
        return self._reporter(self._manager._poison, "fault")

    def _reporter(self, poison: Callable[[str, ModelRecord, str], None], what: str) -> Callable[[str], None]:
        loop, model_id, record = self._loop, self.model_id, self._record

        def report(reason: str) -> None:  # any thread: the engine's owner, a TP watchdog
            try:
                loop.call_soon_threadsafe(poison, model_id, record, reason)
            except RuntimeError:  # the loop is closed: the daemon is shutting down anyway
                log.error("%s in model %s after shutdown began: %s", what, model_id, reason)

        return report


class ModelManager:
    """Every model's lifecycle on this neuron, loading and unloading through its harnesses."""

    def __init__(
        self,
        config: NeuronConfig,
        probe: HostProbe,
        *,
        metrics: NeuronMetrics | None = None,
        engine_factory: EngineFactory = default_engine_factory,
        preparer: ModelPreparer | None = None,
        devices: DevicePool | None = None,
        harnesses: Sequence[Harness[LoadedModel]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`harnesses` defaults to the `torch` one, built from `engine_factory`, `preparer`
        and `devices`."""
        self.config = config
        self.probe = probe
        self.metrics = metrics or NeuronMetrics()
        self.metrics.watch(self.live_readings)
        if harnesses is None:
            harnesses = [
                TorchHarness(config, probe, engine_factory=engine_factory, preparer=preparer, devices=devices)
            ]
        self.harnesses: dict[str, Harness[LoadedModel]] = {harness.name: harness for harness in harnesses}
        # Local paths load only from these, whichever harness would load them.
        self._roots = allowed_roots(config, effective_sources(config))
        self._clock = clock
        self._records: dict[str, ModelRecord] = {}
        # Bytes that loads in progress will occupy, per device (None = host memory). Free memory
        # readings do not show a load until its weights are resident.
        self._reserved: dict[int | None, int] = {}
        self.activation = ActivationStatus()
        self.prewarm_retry = PrewarmRetry()

    @property
    def harness_names(self) -> list[str]:
        return sorted(self.harnesses)

    # --- queries ---------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return [self._info(model_id, record) for model_id, record in sorted(self._records.items())]

    def info(self, model_id: str) -> ModelInfo:
        return self._info(model_id, self._records[model_id])

    def _info(self, model_id: str, record: ModelRecord) -> ModelInfo:
        info = ModelInfo(
            id=model_id,
            harness=record.spec.harness,
            status=record.state,
            devices=record.devices or ([] if record.device is None else [record.device]),
            error=record.error,
            loaded_at=record.loaded_at,
            last_used=record.last_used,
        )
        loaded = record.loaded
        if loaded is not None:
            info.vram_used_mb = record.memory_bytes // MIB
            info.tool_call, info.reasoning = _capabilities(loaded)
            # What the model can do, derived from it: its inputs, then its template's tools
            # and its vocabulary's reasoning markers.
            info.capabilities = [
                *loaded.capabilities,
                *(["tool_call"] if info.tool_call else []),
                *(["reasoning"] if info.reasoning else []),
            ]
            # The window serving enforces (serving/model.py): the config's, capped by the K/V pool.
            context = loaded.served_context(context_length(loaded.hf_config))
            if context is not None:
                # What one request can really get: a prompt takes at least one token of the
                # window, and so does the answer (serving/params.py refuses anything more).
                info.limit = ModelLimit(context=context, input=context - 1, output=context - 1)
            info.in_flight = loaded.engine.load().in_flight
        return info

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model for serving; 404 when absent or failed, 503 + Retry-After while it changes."""
        record = self._records.get(model_id)
        if record is None:
            raise ApiError(
                404,
                f"model '{echoed(model_id)}' is not loaded on this neuron; loaded: {self._loaded_ids()}. "
                "Load it with POST /models/load",
                code="model_not_found",
                extras={"model_id": echoed(model_id)},
            )
        if record.state == "loaded" and record.loaded is not None:
            record.last_used = self._clock()
            return record.loaded
        if record.state in ("loading", "unloading"):
            raise ApiError(
                503,
                f"model '{model_id}' is {record.state}; retry shortly",
                code=f"model_{record.state}",
                retry_after=RETRY_AFTER_SECS,
            )
        if record.state == "poisoned":
            raise ApiError(
                500,
                f"model '{model_id}' is poisoned ({record.error}); unload and load it again to recover",
                code="model_poisoned",
            )
        raise ApiError(
            404,
            f"model '{model_id}' failed to load: {record.error}. Fix the cause and load it again",
            code="model_not_found",
            extras={"model_id": model_id},
        )

    def _loaded_ids(self) -> list[str]:
        return sorted(model_id for model_id, record in self._records.items() if record.state == "loaded")

    def loads(self) -> list[ModelLoad]:
        return [
            record.loaded.engine.load()
            for _, record in sorted(self._records.items())
            if record.state == "loaded" and record.loaded is not None
        ]

    def live_readings(self) -> LiveReadings:
        live = LiveReadings()
        for model_id, record in self._records.items():
            if record.state == "loaded" and record.loaded is not None:
                load = record.loaded.engine.load()
                live.requests[model_id] = (load.in_flight, load.queue_depth)
                live.model_memory[model_id] = record.memory_bytes
        for reading in self.probe.device_health():
            live.device_memory[str(reading.index)] = (reading.vram_used_mb * MIB, reading.vram_free_mb * MIB)
        if not self.probe.gpu_indices:
            from neuron.discovery import read_meminfo

            memory = read_meminfo()
            total, free = memory.get("MemTotal", 0), memory.get("MemAvailable", 0)
            live.device_memory["cpu"] = (total - free, free)
        return live

    # --- load ------------------------------------------------------------------------------

    def _harness(self, spec: ModelSpec) -> Harness[LoadedModel]:
        harness = self.harnesses.get(spec.harness)
        if harness is None:
            raise ApiError(
                422,
                f"unknown harness '{spec.harness}' for model '{spec.model_id}'; "
                f"this neuron runs {self.harness_names}",
                code="unknown_harness",
                param="harness",
            )
        return harness

    async def load(self, spec: ModelSpec) -> ModelInfo:
        """Load (single-flight per id) and return once resident; a loaded model is a no-op success."""
        harness = self._harness(spec)
        if not spec.model_id.strip():
            raise ApiError(400, "model_id is empty", code="invalid_model_id", param="model_id")
        if is_local_path(spec.model_id):
            # Before any record exists: a refused path never shows up in /health or /models.
            confine_local(spec.model_id, self._roots)
        model_id = spec.served_id
        record = self._records.get(model_id)
        if record is not None and record.state == "unloading":
            raise ApiError(
                503,
                f"model '{model_id}' is being unloaded; retry shortly",
                code="model_unloading",
                retry_after=RETRY_AFTER_SECS,
            )
        if record is not None and record.state == "poisoned":
            raise ApiError(
                409,
                f"model '{model_id}' is poisoned; unload it first, then load it again",
                code="model_poisoned",
            )
        if record is None or record.state == "failed":
            # No await between the membership check and the insert: this is what makes it single-flight.
            record = ModelRecord(spec=spec, state="loading", requested_at=self._clock())
            self._records[model_id] = record
            record.task = asyncio.create_task(
                self._run_load(harness, model_id, record), name=f"load {model_id}"
            )
            # The outcome is kept in the record; mark it retrieved for when every waiter went away.
            record.task.add_done_callback(_retrieve)
        if record.task is not None and record.state == "loading":
            # Shielded: a caller that goes away (HTTP disconnect) does not cancel the load for the others.
            await asyncio.shield(record.task)
        return self._info(model_id, record)

    async def _run_load(
        self, harness: Harness[LoadedModel], model_id: str, record: ModelRecord
    ) -> LoadedModel:
        started = time.monotonic()
        try:
            loaded = await harness.load(_Ticket(self, model_id, record))
        except ApiError as exc:
            self._fail(model_id, record, exc.message)
            raise
        except asyncio.CancelledError:
            self._fail(model_id, record, "the load was cancelled (the neuron is shutting down)")
            raise
        except Exception as exc:  # translated, never swallowed: the caller gets it as an ApiError
            message = f"loading model '{model_id}' failed: {type(exc).__name__}: {exc}"
            log.exception("%s", message)
            self._fail(model_id, record, message)
            raise ApiError(500, message, code="load_failed") from exc
        # Metered here, so every harness's models count requests and tokens alike.
        loaded.engine = MeteredEngine(
            loaded.engine,
            on_request=self.metrics.requests.labels(model_id).inc,
            on_tokens=self.metrics.tokens_generated.labels(model_id).inc,
        )
        record.load_seconds = time.monotonic() - started
        record.loaded = loaded
        record.loaded_at = self._clock()
        record.state = "loaded"
        self.metrics.load_duration.labels(model_id).observe(record.load_seconds)
        self._count_loaded()
        log.info("model %s loaded on %s in %.1f s", model_id, device_name(record.device), record.load_seconds)
        return loaded

    def _fail(self, model_id: str, record: ModelRecord, message: str) -> None:
        record.state = "failed"
        record.error = message
        self.metrics.load_failures.labels(model_id).inc()
        log.warning("model %s failed to load: %s", model_id, message)

    def _free_bytes(self, device: int | None) -> int:
        return self.probe.free_bytes(device) - self._reserved.get(device, 0)

    @contextlib.contextmanager
    def _reservation(self, model_id: str, weights: Weights) -> Iterator[None]:
        """Check the fit again and hold the memory until the load ends; `weights` maps each
        device to the weight bytes it will hold and how to name it in a refusal.

        Pre-flight checked against free memory before an await (downloads, file reads); another
        load may have claimed that memory since. Checking and reserving here with no await in
        between means two loads can never both count the same free bytes.
        """
        for device, (weight_bytes, where) in weights.items():
            check_fit(model_id, weight_bytes, self._free_bytes(device), where)
        # The headroom pre-flight demands (weights plus runtime overhead) is what gets held.
        held = {device: required_bytes(weight_bytes) for device, (weight_bytes, _) in weights.items()}
        for device, amount in held.items():
            self._reserved[device] = self._reserved.get(device, 0) + amount
        try:
            yield
        finally:
            for device, amount in held.items():
                self._reserved[device] -= amount

    def _poison(self, model_id: str, record: ModelRecord, reason: str) -> None:
        """A device fault (e.g. a tensor-parallel rank died): refuse requests until unload + load."""
        if self._records.get(model_id) is not record or record.state != "loaded":
            return
        record.state = "poisoned"
        record.error = reason
        self._count_loaded()
        log.error("model %s is poisoned: %s", model_id, reason)

    def _poison_device(self, model_id: str, record: ModelRecord, reason: str) -> None:
        """A sticky device error in one model's step: that device's context is unusable, so
        every model on it is poisoned, each naming the model and the error that did it."""
        if self._records.get(model_id) is not record:
            return
        faulty = {record.device, *record.devices}
        where = ", ".join(
            device_name(device) for device in sorted(faulty, key=lambda d: -1 if d is None else d)
        )
        for other_id, other in list(self._records.items()):
            if {other.device, *other.devices} & faulty:
                self._poison(
                    other_id, other, f"device {where} failed in a step of model '{model_id}': {reason}"
                )

    def _count_loaded(self) -> None:
        self.metrics.models_loaded.set(sum(1 for r in self._records.values() if r.state == "loaded"))

    # --- unload ----------------------------------------------------------------------------

    async def unload(self, model_id: str) -> None:
        record = self._records.get(model_id)
        if record is None:
            raise ApiError(
                404,
                f"model '{echoed(model_id)}' is not loaded on this neuron; loaded: {self._loaded_ids()}",
                code="model_not_found",
                param="model_id",
            )
        if record.state == "loading":
            raise ApiError(
                503,
                f"model '{model_id}' is still loading; unload it once the load has finished",
                code="model_loading",
                retry_after=RETRY_AFTER_SECS,
            )
        if record.state == "failed":
            del self._records[model_id]
            return
        if record.unload_task is None:
            record.state = "unloading"
            record.unload_task = asyncio.create_task(
                self._run_unload(model_id, record), name=f"unload {model_id}"
            )
        await asyncio.shield(record.unload_task)

    async def _run_unload(self, model_id: str, record: ModelRecord) -> None:
        try:
            if record.loaded is not None:
                # Handed over without a reference left here: every path from this manager to
                # the weights (the record's model, its finished load task whose result is the
                # same model) is gone before the harness frees the memory.
                await self.harnesses[record.spec.harness].unload(_take_loaded(record))
            else:
                log.info("model %s unloaded", model_id)
        finally:
            self._records.pop(model_id, None)
            self._count_loaded()

    # --- default models and shutdown -------------------------------------------------------

    def start_activation(self, specs: Sequence[ModelSpec]) -> asyncio.Task[None]:
        """Begin loading the default models in the background; /health shows `pre_warming` at once."""
        self.activation = ActivationStatus(
            state="pre_warming" if specs else "ready", pending=[spec.served_id for spec in specs]
        )
        return asyncio.create_task(self._activate(specs), name="activate default models")

    async def _activate(self, specs: Sequence[ModelSpec]) -> None:
        """One after another (they compete for memory); a failure does not stop the rest."""
        for spec in specs:
            self.activation.pending.remove(spec.served_id)
            self.activation.in_progress = spec.served_id
            try:
                await self._prewarm(spec)
            except ApiError as exc:
                self.activation.failed.append(ActivationFailure(model_id=spec.served_id, error=exc.message))
            else:
                self.activation.completed.append(spec.served_id)
        self.activation.in_progress = None
        self.activation.state = "ready"

    async def _prewarm(self, spec: ModelSpec) -> None:
        """Load a default model; an unreachable source is tried again with a capped back-off."""
        retry = self.prewarm_retry
        for attempt in range(1, retry.attempts + 1):
            try:
                await self.load(spec)
                return
            except ApiError as exc:
                if exc.code not in SOURCE_UNREACHABLE or attempt == retry.attempts:
                    raise
                delay = retry.delay(attempt)
                log.warning(
                    "pre-warming %s: %s; trying again in %.0f s (%d of %d)",
                    spec.served_id,
                    exc.message,
                    delay,
                    attempt + 1,
                    retry.attempts,
                )
                await retry.sleep(delay)

    async def close(self) -> None:
        """Drain: cancel loads in progress, unload every model, then release the harnesses."""
        for record in list(self._records.values()):
            if record.task is not None and not record.task.done():
                record.task.cancel()
        for model_id, record in list(self._records.items()):
            if record.state in ("loaded", "poisoned", "unloading"):
                try:
                    await self.unload(model_id)
                except ApiError as exc:
                    log.error("unloading %s at shutdown failed: %s", model_id, exc.message)
        self._records.clear()
        for harness in self.harnesses.values():
            await harness.close()


def _take_loaded(record: ModelRecord) -> LoadedModel:
    loaded = record.loaded
    assert loaded is not None
    record.loaded, record.task = None, None
    return loaded
