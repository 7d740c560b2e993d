"""A loaded model as the serving layer sees it: tokenizer, template, defaults and engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex_core.neuron_api import ModelSpec
from neuron.device import DeviceWorker
from neuron.engine.api import Engine

if TYPE_CHECKING:
    from neuron.vision.prepare import ImagePreparer


@dataclass
class LoadedModel:
    model_id: str
    spec: ModelSpec
    # Local folder with config.json, tokenizer files and the chat template.
    path: Path
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    hf_config: Any  # transformers PretrainedConfig
    # Parsed generation_config.json ({} when absent): sampling defaults and EOS ids.
    generation_config: dict[str, Any]
    # chat_template.jinja -> chat_template.json -> tokenizer_config.json, or None.
    chat_template: str | None
    engine: Engine
    worker: DeviceWorker
    devices: list[int] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=lambda: ["text"])
    # A vision model's image processor and URL policy (None: images are refused).
    images: ImagePreparer | None = None

    def served_context(self, config_context: int | None) -> int | None:
        """The context a request can use: the config's (`config_context`), capped by what
        the engine's K/V pool holds when the engine reports that."""
        limits = [limit for limit in (config_context, self.engine.load().max_model_len) if limit]
        return min(limits) if limits else None
