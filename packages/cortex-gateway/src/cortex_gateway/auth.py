"""Who is calling: API keys checked against the keys file, and what each key may do.

The decisions are pure functions over an immutable `KeyRing` (table-tested); the file is
read by `KeyStore`, the edge, which swaps in a new ring when the file changes (a watcher in
the app's lifespan, and SIGHUP in `serve`). A request holds the `Caller` it was admitted
as, so a reload changes what the *next* request may do and never touches one in flight.

A key is accepted as `Authorization: Bearer <secret>` or `x-api-key: <secret>` (the
Anthropic SDKs' header). Failures: 401 for a missing, malformed, unknown or revoked key;
403 for a model the key may not use or an admin route without an admin key. Messages never
repeat the secret, not even a part of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from cortex_core.errors import ApiError
from cortex_core.keys import (
    KeyEntry,
    KeyLimits,
    KeysFile,
    KeysFileError,
    key_id_of,
    read_keys,
    secret_matches,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller (or the anonymous one when the gateway runs without keys)."""

    name: str
    models: tuple[str, ...] = ("*",)
    admin: bool = False
    limits: KeyLimits = field(default_factory=KeyLimits)


# Without a keys file, on loopback (or with allow_anonymous): today's open gateway.
ANONYMOUS = Caller(name="anonymous", admin=True)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys of one reading of the keys file, by public id."""

    by_id: dict[str, KeyEntry]

    @classmethod
    def of(cls, keys: KeysFile) -> KeyRing:
        return cls({entry.id: entry for entry in keys.keys})

    def authenticate(self, secret: str | None) -> Caller:
        if secret is None:
            raise unauthorized(
                "no API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                "missing_api_key",
            )
        key_id = key_id_of(secret)
        entry = self.by_id.get(key_id) if key_id is not None else None
        if entry is None or not secret_matches(entry, secret):
            raise unauthorized("invalid API key", "invalid_api_key")
        if entry.revoked:
            raise unauthorized(f"API key '{entry.name}' has been revoked", "revoked_api_key")
        return Caller(name=entry.name, models=tuple(entry.models), admin=entry.admin, limits=entry.limits)


def presented_secret(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key in `Authorization: Bearer` or `x-api-key` (raw ASGI headers), None when neither is sent."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
        elif lowered == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


def may_use(caller: Caller, requested_model: str, model_id: str) -> bool:
    """A key's globs match the name the client sent or the catalogue id it resolves to.

    An alias is the operator's own name for a model, so granting the alias grants its target.
    """
    return any(fnmatchcase(requested_model, p) or fnmatchcase(model_id, p) for p in caller.models)


def require_model(caller: Caller, requested_model: str, model_id: str) -> None:
    if not may_use(caller, requested_model, model_id):
        raise ApiError(
            403,
            f"API key '{caller.name}' may not use model '{requested_model}'; "
            "GET /v1/models lists the models it may use",
            type="permission_error",
            code="model_not_allowed",
            param="model",
        )


def require_admin(caller: Caller) -> None:
    if not caller.admin:
        raise ApiError(
            403,
            f"API key '{caller.name}' is not an admin key; /admin routes need one (cortex keys create --admin)",
            type="permission_error",
            code="admin_required",
        )


def unauthorized(message: str, code: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code=code)


# ---- the edge: the file ------------------------------------------------------------------


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is edited or replaced (an atomic rename swaps the inode)."""
    try:
        stat = path.stat()
    except OSError:  # missing or unreadable: the reload that follows says which (and keeps the keys)
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


class KeyStore:
    """The current `KeyRing` of a keys file, re-read when the file changes.

    A file that stops parsing keeps the last good ring (logged as an error): a typo must not
    lock every caller out, nor let everyone in. A file that does not exist yet holds no keys,
    so every request is refused until the first `cortex keys create`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self.ring = KeyRing.of(read_keys(path))  # at start a broken file is an error, not a warning
        self._signature = _signature(path)

    def refresh(self) -> bool:
        """Reload when the file changed since the last reading; True when a new ring is in place."""
        if _signature(self.path) == self._signature:
            return False
        return self.reload()

    def reload(self) -> bool:
        signature = _signature(self.path)
        try:
            keys = read_keys(self.path)
        except KeysFileError as exc:
            self._signature = signature  # do not re-read a broken file every interval
            log.error("keys file not reloaded, the previous keys stay in force: %s", exc)
            return False
        self.ring = KeyRing.of(keys)
        self._signature = signature
        active = sum(1 for entry in keys.keys if not entry.revoked)
        log.info("keys file %s loaded: %d active key(s)", self.path, active)
        return True
