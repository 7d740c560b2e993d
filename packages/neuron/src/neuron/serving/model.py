"""What the serving layer derives once per loaded model: template, markers, EOS ids, limits."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neuron.loaded_model import LoadedModel
from neuron.serving.detok import IncrementalDetokenizer, marker_token_ids
from neuron.serving.logprobs import TokenTexts, is_byte_level
from neuron.serving.params import context_length, eos_token_ids
from neuron.serving.reasoning import ReasoningMarkers, find_reasoning_markers
from neuron.serving.structured import GrammarCompiler
from neuron.serving.template import ChatTemplate
from neuron.serving.tools import ANSWER_SHARE, ToolFormat, find_tool_format

if TYPE_CHECKING:
    from neuron.vision.prepare import ImagePreparer


@dataclass(frozen=True)
class ModelTraits:
    template: ChatTemplate
    markers: ReasoningMarkers | None
    tool_format: ToolFormat
    eos_ids: frozenset[int]
    max_context: int | None
    # Special tokens the detokeniser must keep as text for the reasoning and tool parsers.
    keep_ids: frozenset[int]
    # Each reasoning and tool-call marker's token id (the grammars name them by id).
    marker_ids: Mapping[str, int]
    grammars: GrammarCompiler
    # The vocabulary spells bytes GPT-2's way (how log-probabilities find a token's bytes).
    byte_level: bool = False

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelTraits:
        tokenizer = loaded.tokenizer
        markers = find_reasoning_markers(tokenizer)
        tool_format = find_tool_format(tokenizer)
        marker_strings = list(tool_format.markers)
        if markers:
            marker_strings += [markers.open, markers.close]
        vocab = tokenizer.get_vocab()
        eos_ids = eos_token_ids(loaded.generation_config, tokenizer, loaded.hf_config)
        return cls(
            template=ChatTemplate.for_tokenizer(loaded.model_id, loaded.chat_template, tokenizer),
            markers=markers,
            tool_format=tool_format,
            eos_ids=eos_ids,
            max_context=loaded.served_context(context_length(loaded.hf_config)),
            keep_ids=frozenset(marker_token_ids(tokenizer, marker_strings)),
            marker_ids={marker: vocab[marker] for marker in marker_strings if marker in vocab},
            grammars=GrammarCompiler(loaded.model_id, tokenizer, eos_ids),
            byte_level=is_byte_level(tokenizer),
        )


@dataclass(frozen=True)
class ServingModel:
    loaded: LoadedModel
    traits: ModelTraits

    @classmethod
    def build(cls, loaded: LoadedModel) -> ServingModel:
        return cls(loaded, ModelTraits.of(loaded))

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def template(self) -> ChatTemplate:
        return self.traits.template

    @property
    def markers(self) -> ReasoningMarkers | None:
        return self.traits.markers

    @property
    def tool_format(self) -> ToolFormat:
        return self.traits.tool_format

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.traits.eos_ids

    @property
    def max_context(self) -> int | None:
        return self.traits.max_context

    @property
    def images(self) -> ImagePreparer | None:
        """A vision model's image processor (None: image parts are refused)."""
        return self.loaded.images

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.loaded.tokenizer, keep=self.traits.keep_ids)

    def token_texts(self) -> TokenTexts:
        return TokenTexts(self.loaded.tokenizer, byte_level=self.traits.byte_level)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's ids (added tokens included): what a request may name."""
        return len(self.loaded.tokenizer)

    def room_for_tools(self, prompt: str) -> int | None:
        """How many tokens tools listed in the system message may add to `prompt` (rendered
        without them) and still leave the window's `ANSWER_SHARE` to the answer; None when
        the window is unknown."""
        if self.max_context is None:
            return None
        return int(self.max_context * (1 - ANSWER_SHARE)) - self.count_tokens(prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text, add_special_tokens=False))

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self.loaded.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids


class ServingModels:
    """Per-app cache of each loaded model's traits.

    Entries hold the LoadedModel only weakly: an unloaded model's weights must be freed when
    the manager drops it, not when the same id happens to be loaded again.
    """

    def __init__(self, lookup: Callable[[str], LoadedModel]) -> None:
        self._lookup = lookup
        self._cache: dict[str, tuple[weakref.ref[LoadedModel], ModelTraits]] = {}

    def get(self, model_id: str) -> ServingModel:
        loaded = self._lookup(model_id)  # raises ApiError 404 model_not_found
        cached = self._cache.get(model_id)
        if cached is not None and cached[0]() is loaded:
            return ServingModel(loaded, cached[1])
        traits = ModelTraits.of(loaded)
        self._cache[model_id] = (weakref.ref(loaded), traits)
        return ServingModel(loaded, traits)
