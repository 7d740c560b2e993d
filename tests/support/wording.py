"""Anthropic's context-limit messages as patterns, the numbers as groups (issue #18).

Byte for byte but for the numbers: Claude Code matches the first to retry with a smaller
`max_tokens`, and the second to offer compaction.
"""

from __future__ import annotations

import re

SUM_EXCEEDS = re.compile(
    r"^input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+), "
    r"decrease input length or `max_tokens` and try again$"
)
PROMPT_TOO_LONG = re.compile(r"^prompt is too long: (\d+) tokens > (\d+) maximum$")
