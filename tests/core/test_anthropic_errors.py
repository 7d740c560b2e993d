"""Anthropic's wording of the neuron's structured refusals (cortex_core.anthropic.errors)."""

from __future__ import annotations

import re

import pytest
from support.wording import PROMPT_TOO_LONG, SUM_EXCEEDS

from cortex_core.anthropic.errors import ContextOverflow, context_limit_message, unsupported_field_message


@pytest.mark.parametrize(
    ("overflow", "pattern", "numbers"),
    [
        (ContextOverflow(3042, 32000, 8192), SUM_EXCEEDS, ("3042", "32000", "8192")),
        # The prompt fills the window exactly: the sum is what overflows, and it is true as written.
        (ContextOverflow(8192, 1, 8192), SUM_EXCEEDS, ("8192", "1", "8192")),
        (ContextOverflow(9000, 100, 8192), PROMPT_TOO_LONG, ("9000", "8192")),
        # A count without max_tokens (the neuron's default budget) can only be the prompt.
        (ContextOverflow(8192, None, 8192), PROMPT_TOO_LONG, ("8192", "8192")),
    ],
)
def test_context_limit_message_is_anthropics_wording(
    overflow: ContextOverflow, pattern: re.Pattern[str], numbers: tuple[str, ...]
) -> None:
    matched = pattern.match(context_limit_message(overflow))
    assert matched is not None, context_limit_message(overflow)
    assert matched.groups() == numbers


@pytest.mark.parametrize(
    ("chat_param", "names"),
    [("response_format", "output_config.format"), ("tool_choice", "tool_choice.type")],
)
def test_refused_fields_are_named_as_the_anthropic_caller_sent_them(chat_param: str, names: str) -> None:
    message = unsupported_field_message(chat_param)
    assert message is not None and message.startswith(names + ":")
    assert chat_param not in message.replace(names, "")


def test_an_unknown_field_keeps_the_neurons_message() -> None:
    assert unsupported_field_message("logit_bias") is None
    assert unsupported_field_message(None) is None
