"""A harness whose loads a test scripts: held open, failed, faulted — no torch, no weights.

It implements cortex_core.harness.Harness[LoadedModel], so the lifecycle manager
(neuron.manager.ModelManager) runs its real rules over it: single flight, reservations,
poisoning, unknown harnesses, drain. Each load reserves `weight_bytes` on the host so
reservations are exercised too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cortex_core.errors import ApiError
from cortex_core.harness import LoadTicket
from cortex_core.neuron_api import ModelLoad
from neuron.device import DeviceWorker
from neuron.engine.api import GenerationRequest, TokenEvent
from neuron.loaded_model import LoadedModel


class NoTokenizer:
    """Enough of a tokenizer for /models: an empty vocabulary has no reasoning markers."""

    def get_vocab(self) -> dict[str, int]:
        return {}


@dataclass
class IdleEngine:
    """An engine that serves nothing; the lifecycle only reads its load and closes it."""

    model_id: str
    closed: bool = False

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        raise ApiError(503, f"model {self.model_id} is scripted and generates nothing")

    def load(self) -> ModelLoad:
        return ModelLoad(id=self.model_id)

    async def close(self) -> None:
        self.closed = True


@dataclass
class ScriptedHarness:
    """Loads succeed at once unless the test clears `release` (held open until set) or puts
    an error in `fail_with`. `entered` is set when a load has begun; `tickets` keeps each
    load's ticket so a test can report faults through it."""

    name: str = "scripted"
    weight_bytes: int = 1024
    worker: DeviceWorker = field(default_factory=lambda: DeviceWorker("scripted"))
    release: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    fail_with: ApiError | None = None
    loads: list[str] = field(default_factory=list)
    unloads: list[str] = field(default_factory=list)
    tickets: dict[str, LoadTicket] = field(default_factory=dict)
    closed: bool = False
    on_load: Callable[[LoadTicket], None] | None = None

    def __post_init__(self) -> None:
        self.release.set()

    async def load(self, ticket: LoadTicket) -> LoadedModel:
        self.loads.append(ticket.model_id)
        self.tickets[ticket.model_id] = ticket
        ticket.placed(None)
        with ticket.reserve({None: (self.weight_bytes, "this host's memory (CPU)")}):
            self.entered.set()
            if self.on_load is not None:
                self.on_load(ticket)
            await self.release.wait()
            if self.fail_with is not None:
                raise self.fail_with
        ticket.sized(self.weight_bytes)
        return LoadedModel(
            model_id=ticket.model_id,
            spec=ticket.spec,
            path=Path("/nonexistent") / ticket.model_id,
            tokenizer=NoTokenizer(),
            hf_config=None,
            generation_config={},
            chat_template=None,
            engine=IdleEngine(ticket.model_id),
            worker=self.worker,
        )

    async def unload(self, model: LoadedModel) -> None:
        self.unloads.append(model.model_id)
        await model.engine.close()

    async def close(self) -> None:
        self.closed = True
        self.worker.close(timeout=5.0)


def scripted_engine(model: Any) -> IdleEngine:
    """The IdleEngine under the manager's metering wrapper."""
    inner = model.engine.inner
    assert isinstance(inner, IdleEngine)
    return inner
