"""TOML first, environment on top, errors that name the file, the key and the problem.

Every config file of cortex goes through `load_config`: the file is parsed with tomllib,
environment variables with the file's prefix override keys (`CORTEX_GATEWAY__LISTEN` sets
`gateway.listen`; `__` separates levels), and the result is converted into strict msgspec
Structs. Unknown keys in a file are errors (a typo must never empty a catalogue silently);
environment variables that name no known key are ignored, because the same prefixes also
carry runtime knobs read elsewhere.
"""

from __future__ import annotations

import logging
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from cortex_core.validation import convert_check, dotted, locate_invalid

T = TypeVar("T")
log = logging.getLogger("cortex_core.config")


class ConfigError(Exception):
    """A config that cannot be used; the message names the source, the key and the problem."""

    def __init__(self, source: str, problem: str, key: str | None = None) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: key `{key}`" if key else source
        super().__init__(f"{where}: {problem}")


class RequestLimitFields(Protocol):
    """The request-size limits both daemons take: the gateway's in [gateway], the neuron's at
    the top level of neuron.toml."""

    @property
    def max_body_bytes(self) -> int: ...
    @property
    def max_buffered_bytes(self) -> int: ...
    @property
    def max_messages(self) -> int: ...
    @property
    def max_prompt_bytes(self) -> int: ...
    @property
    def body_read_timeout_secs(self) -> float: ...


def check_request_limits(section: RequestLimitFields, source: str, prefix: str) -> None:
    """Counts of at least 1 and a positive read timeout; `prefix` places the keys in the file."""
    for key, value in (
        ("max_body_bytes", section.max_body_bytes),
        ("max_buffered_bytes", section.max_buffered_bytes),
        ("max_messages", section.max_messages),
        ("max_prompt_bytes", section.max_prompt_bytes),
    ):
        if value < 1:
            raise ConfigError(source, "must be at least 1", prefix + key)
    if section.body_read_timeout_secs <= 0:
        raise ConfigError(source, "must be positive", prefix + "body_read_timeout_secs")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "file not found") from exc
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"is not valid TOML: {exc}") from exc


def _struct_in(hint: Any) -> Any:
    """The Struct (or dict value type) a type hint leads into, unwrapping Optional."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is not type(None):
                return _struct_in(arg)
    return hint


def _type_at(schema: Any, path: list[str]) -> Any | None:
    """The type hint at a dotted path of a Struct schema, or None when the path is not in it."""
    current = schema
    for part in path:
        current = _struct_in(current)
        if isinstance(current, type) and issubclass(current, msgspec.Struct):
            hints = typing.get_type_hints(current)
            names = {field.encode_name: field.name for field in msgspec.structs.fields(current)}
            if part not in names:
                return None
            current = hints[names[part]]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    return current


def _is_known_path(schema: Any, path: list[str]) -> bool:
    return _type_at(schema, path) is not None


def _parse_env_value(raw: str) -> Any:
    """Interpret an environment value as a TOML value when it is one (`8`, `true`, `[0, 1]`)."""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env_overrides(
    data: dict[str, Any], *, prefix: str, env: Mapping[str, str], schema: Any
) -> list[str]:
    """Merge `PREFIX_A__B=value` into data["a"]["b"]; returns the dotted keys that were set."""
    applied: list[str] = []
    for name in sorted(env):
        if not name.startswith(prefix):
            continue
        path = [part.lower() for part in name[len(prefix) :].split("__")]
        if not all(path) or not _is_known_path(schema, path):
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = _parse_env_value(env[name])
        applied.append(".".join(path))
    return applied


def _allowed_values(hint: Any) -> str:
    literal = _struct_in(hint)
    values = typing.get_args(literal) if typing.get_origin(literal) is typing.Literal else ()
    return f"; expected one of {', '.join(repr(v) for v in values)}" if values else ""


def convert(data: dict[str, Any], into: type[T], *, source: str) -> T:
    try:
        return msgspec.convert(data, type=into, strict=True)
    except msgspec.ValidationError as exc:
        # The key comes from walking the schema (cortex_core.validation), not from
        # msgspec's wording, which names a bad dict entry only as `[...]`.
        invalid = locate_invalid(data, into, convert_check(strict=True))
        if invalid is None:  # msgspec refused what each part accepts: report it as it said
            raise ConfigError(source, str(exc)) from exc
        problem = invalid.problem
        if invalid.path:  # after "key `x`: " the problem reads on mid-sentence
            problem = problem[:1].lower() + problem[1:]
        if problem.startswith("invalid enum value"):
            problem += _allowed_values(invalid.hint)
        raise ConfigError(source, problem, dotted(invalid.path) or None) from exc


Legacy = Callable[[dict[str, Any], str], tuple[dict[str, Any], list[str]]]


def load_config(
    path: Path | None,
    into: type[T],
    *,
    env_prefix: str,
    env: Mapping[str, str] | None = None,
    legacy: Legacy | None = None,
) -> T:
    """Read `path` (None: defaults only), overlay the environment, convert into `into`.

    `legacy` rewrites the Rust system's keys first (config/legacy.py); its warnings are logged.
    """
    environ = os.environ if env is None else env
    data = read_toml(path) if path is not None else {}
    source = str(path) if path is not None else f"defaults + {env_prefix}* environment"
    if legacy is not None and data:
        data, warnings = legacy(data, source)
        for message in warnings:
            log.warning("%s", message)
    apply_env_overrides(data, prefix=env_prefix, env=environ, schema=into)
    return convert(data, into, source=source)


def resolve_path(value: str | None, base: Path | None) -> str | None:
    """Relative paths in a config file are relative to that file's folder, never the cwd."""
    if value is None or value == "":
        return None
    expanded = Path(value).expanduser()
    if expanded.is_absolute() or base is None:
        return str(expanded)
    return str((base / expanded).resolve())
