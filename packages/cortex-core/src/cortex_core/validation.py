"""Where a value fails its type: the path as data, found by walking the type, not msgspec's text.

msgspec reports a validation failure as one message string (``Expected `int`, got `str` -
at `$.gateway.port```) and keeps no structured location. Parsing that string would break
silently the day msgspec words it differently, and its `[...]` stands for "some dict
entry" without saying which. `locate_invalid` instead descends from the top: it checks
each part of the value against its part of the type with msgspec itself and goes into the
first part that fails, until no smaller part fails. The path walked is the location, and
msgspec's message for that innermost part — which then carries no location suffix — is
the problem. It runs only after a conversion has already failed, so its cost (one check
per level) is paid on errors, never on the hot path.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

PathPart = str | int
# Raises msgspec.ValidationError when `value` does not fit `hint`, as the real decode would.
Check = Callable[[Any, Any], object]


@dataclass(frozen=True)
class Invalid:
    """The innermost part of a value that fails: its path, msgspec's problem, its type."""

    path: tuple[PathPart, ...]
    problem: str
    hint: Any


def dotted(path: tuple[PathPart, ...]) -> str:
    """`gateway.port`, `neurons[0].endpoint`, `sources.helexa` (a dict entry by its key)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def json_path(path: tuple[PathPart, ...]) -> str | None:
    """The path in JSONPath form (`$.messages[0].content`), None for the whole document."""
    if not path:
        return None
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def convert_check(strict: bool = True) -> Check:
    def check(value: Any, hint: Any) -> object:
        return msgspec.convert(value, type=hint, strict=strict)

    return check


def json_check(value: Any, hint: Any) -> object:
    """What `msgspec.json.decode(body, type=hint)` would say of this part of a JSON document."""
    return msgspec.json.decode(msgspec.json.encode(value), type=hint)


def locate_in_json(body: bytes, hint: Any) -> Invalid | None:
    """Where a JSON body fails `hint`, or None. A typed decode can fail validation before it
    reaches a syntax error later in the body; such a body has no location to give."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    return locate_invalid(document, hint, json_check)


def locate_invalid(value: Any, hint: Any, check: Check) -> Invalid | None:
    """The innermost failing part of `value` against `hint`, or None when it fits."""
    try:
        check(value, hint)
    except msgspec.ValidationError as exc:
        problem = str(exc)
    else:
        return None
    for key, part_hint, part in _parts(value, hint):
        inner = locate_invalid(part, part_hint, check)
        if inner is not None:
            return Invalid((key, *inner.path), inner.problem, inner.hint)
    return Invalid((), problem, hint)


def _is_absent(hint: Any) -> bool:
    return hint is type(None) or type(hint).__name__ == "UnsetType"


def _candidate(value: Any, hint: Any) -> Any | None:
    """The one member of a union that a dict or list value can be meant for, else None."""
    members = [m for m in typing.get_args(hint) if not _is_absent(m)]
    if isinstance(value, dict):
        members = [m for m in members if _is_struct(m) or typing.get_origin(m) is dict or m is dict]
        structs = [m for m in members if _is_struct(m)]
        if len(structs) > 1:
            members = [m for m in structs if _tag_matches(m, value)]
    elif isinstance(value, list):
        members = [m for m in members if typing.get_origin(m) in (list, tuple, set, frozenset)]
    else:
        return None  # a scalar: the union's own message says what was expected
    return members[0] if len(members) == 1 else None


def _is_struct(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, msgspec.Struct)


def _tag_matches(struct: Any, value: dict[str, Any]) -> bool:
    config = struct.__struct_config__
    return config.tag_field is not None and value.get(config.tag_field) == config.tag


def _unknown_tag(value: dict[str, Any], structs: list[Any]) -> Iterator[tuple[PathPart, Any, Any]]:
    """A tagged union's tag that names none of its members: the tag field is what is wrong."""
    fields = {struct.__struct_config__.tag_field for struct in structs}
    if len(fields) != 1 or None in fields:
        return
    (field,) = fields
    if field in value:
        tags = tuple(struct.__struct_config__.tag for struct in structs)
        yield field, typing.Literal[tags], value[field]


def _parts(value: Any, hint: Any) -> Iterator[tuple[PathPart, Any, Any]]:
    """(key, type, value) of each part of `value` its type says something about."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        member = _candidate(value, hint)
        if member is not None:
            yield from _parts(value, member)
        elif isinstance(value, dict):
            yield from _unknown_tag(value, [m for m in typing.get_args(hint) if _is_struct(m)])
        return
    if origin is typing.Annotated:
        yield from _parts(value, typing.get_args(hint)[0])
        return
    if _is_struct(hint) and isinstance(value, dict):
        if not _tag_matches(hint, value) and hint.__struct_config__.tag_field is not None:
            yield from _unknown_tag(value, [hint])
            return
        hints = typing.get_type_hints(hint, include_extras=True)
        for field in msgspec.structs.fields(hint):
            if field.encode_name in value:
                yield field.encode_name, hints[field.name], value[field.encode_name]
    elif origin is dict and isinstance(value, dict):
        _, value_hint = typing.get_args(hint) or (Any, Any)
        for key, item in value.items():
            yield key, value_hint, item
    elif origin in (list, set, frozenset) and isinstance(value, list):
        (item_hint,) = typing.get_args(hint) or (Any,)
        for index, item in enumerate(value):
            yield index, item_hint, item
    elif origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        for index, (item_hint, item) in enumerate(zip(args, value, strict=False)):
            yield index, item_hint, item
