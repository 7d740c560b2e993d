"""Building blocks shared by the dialect wire types.

Every optional request field is `Maybe[T]`: absent (`UNSET`, never encoded), explicit `null`
(`None`) or a value. Keeping absent and null apart is what makes decode → encode lossless, so a
proxy or a test can re-serialise a body without inventing `null`s the client never sent.
"""

from __future__ import annotations

from typing import TypeVar, Union

import msgspec
from msgspec import UNSET, UnsetType

T = TypeVar("T")

# Union[...] rather than `|`: a generic alias must stay subscriptable at runtime for msgspec.
Maybe = Union[T, None, UnsetType]  # noqa: UP007

__all__ = ["UNSET", "Maybe", "UnsetType", "given", "or_default", "to_json_bytes", "to_json_str"]


def given(value: Maybe[T]) -> T | None:
    """The value, with absent and null both read as None (what converters care about)."""
    return None if value is UNSET else value


def or_default(value: Maybe[T], default: T) -> T:
    return default if value is UNSET or value is None else value


def to_json_bytes(obj: object) -> bytes:
    return msgspec.json.encode(obj)


def to_json_str(obj: object) -> str:
    return msgspec.json.encode(obj).decode()
