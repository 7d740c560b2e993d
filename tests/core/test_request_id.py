"""Request ids (cortex_core.request_id): what a caller's id must look like to be kept."""

from __future__ import annotations

import re

import pytest

from cortex_core.request_id import accepted_request_id, new_request_id


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (b"req_0123abcd", "req_0123abcd"),
        (b"6f1c2d3e-aaaa-bbbb-cccc-0123456789ab", "6f1c2d3e-aaaa-bbbb-cccc-0123456789ab"),
        (b"trace.span:7", "trace.span:7"),
        (None, None),
        (b"", None),
        (b"two words", None),  # would split a log line
        (b"id\r\nx-evil: 1", None),  # header injection
        (b"x" * 129, None),
    ],
)
def test_a_callers_id_is_kept_only_when_safe_to_echo_and_log(given: bytes | None, kept: str | None) -> None:
    assert accepted_request_id(given) == kept


def test_new_ids_look_like_anthropics_and_differ() -> None:
    first, second = new_request_id(), new_request_id()
    assert re.fullmatch(r"req_[0-9a-f]{24}", first) and first != second
    assert accepted_request_id(first.encode()) == first
