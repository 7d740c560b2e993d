"""Anthropic's wording of the neuron's structured refusals (cortex_core.anthropic.errors)."""

from __future__ import annotations

import re

import pytest
from support.wording import PROMPT_TOO_LONG, SUM_EXCEEDS

from cortex_core.anthropic.errors import ContextOverflow, anthropic_field_message, context_limit_message


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
    ("chat_param", "message", "expected"),
    [
        (
            "response_format",
            "response_format: this schema cannot be enforced: Unimplemented keys: ['not']",
            "output_config.format: this schema cannot be enforced: Unimplemented keys: ['not']",
        ),
        # Named the same in both dialects, or not about a field: the neuron's words.
        ("tool_choice", "tool_choice: function 'x' is not one of the request's tools", None),
        ("logit_bias", "logit_bias: token 9 is out of range", None),
        (None, "the prompt is empty", None),
        # A message that does not start with the field's name is left alone.
        ("response_format", "a schema was expected", None),
    ],
)
def test_refusals_name_the_field_the_anthropic_caller_sent(
    chat_param: str | None, message: str, expected: str | None
) -> None:
    assert anthropic_field_message(chat_param, message) == (expected or message)
