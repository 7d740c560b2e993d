"""API keys: the keys file shared by the gateway (which checks keys) and `cortex keys` (which writes them).

The file (`[auth] keys_file` in cortex.toml) is JSON: `{"keys": [KeyEntry, ...]}`. It never
holds a secret, only a salted SHA-256 of it:

    {"keys": [{"name": "ci", "id": "3f9c2a71", "salt": "…", "hash": "…",
               "models": ["Qwen/*"], "admin": false, "revoked": false,
               "limits": {"concurrent": 4, "requests_per_minute": 60, "tokens_per_minute": 0},
               "created": "2026-11-29T21:00:00Z"}]}

A secret is `cx-<id>-<43 characters of base64url>`: 256 random bits after a public key id.
The id finds the entry in one dict lookup; the secret is then checked against the entry's
hash with `hmac.compare_digest` (constant time). One SHA-256 is enough, and a slow password
hash (bcrypt, argon2) would buy nothing: those exist to make guessing *low-entropy*
passwords expensive, and nobody can enumerate 2^256 secrets at any speed. The per-key salt
keeps two files' hashes unrelated; the speed keeps the check to about a microsecond per
request.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import msgspec

SECRET_PREFIX = "cx"
_SECRET = re.compile(r"^cx-([0-9a-f]{8})-[A-Za-z0-9_-]{43}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class KeysFileError(Exception):
    """The keys file cannot be read or does not parse; the message names the file and the problem."""


class KeyLimits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # 0 means no limit, for each of them.
    concurrent: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


class KeyEntry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    id: str
    salt: str
    hash: str
    # Glob patterns (fnmatch, case-sensitive) over model ids and aliases; ["*"]: every model.
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    admin: bool = False
    revoked: bool = False
    limits: KeyLimits = msgspec.field(default_factory=KeyLimits)
    created: str = ""


class KeysFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keys: list[KeyEntry] = msgspec.field(default_factory=list)


_DECODER = msgspec.json.Decoder(KeysFile)


def secret_hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def key_id_of(secret: str) -> str | None:
    """The public id inside a well-formed secret, None for anything else."""
    match = _SECRET.match(secret)
    return match.group(1) if match else None


def secret_matches(entry: KeyEntry, secret: str) -> bool:
    return hmac.compare_digest(secret_hash(entry.salt, secret), entry.hash)


def parse_keys(data: bytes, source: str) -> KeysFile:
    """Decode and check a keys file; KeysFileError names the file and what is wrong."""
    try:
        parsed = _DECODER.decode(data) if data.strip() else KeysFile()
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KeysFileError(f"{source}: {exc}") from exc
    seen_names: set[str] = set()
    seen_ids: set[str] = set()
    for index, entry in enumerate(parsed.keys):
        where = f"{source}: keys[{index}]"
        if entry.name in seen_names:
            raise KeysFileError(f"{where}: duplicate key name {entry.name!r}")
        if entry.id in seen_ids:
            raise KeysFileError(f"{where}: duplicate key id {entry.id!r}")
        seen_names.add(entry.name)
        seen_ids.add(entry.id)
        limits = entry.limits
        if min(limits.concurrent, limits.requests_per_minute, limits.tokens_per_minute) < 0:
            raise KeysFileError(f"{where}.limits: limits are counts (0 = no limit), not negative")
    return parsed


def read_keys(path: Path) -> KeysFile:
    """The keys in `path`; a file that does not exist yet holds no keys (the first
    `cortex keys create` writes it)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return KeysFile()
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_keys(data, str(path))


def write_keys(path: Path, keys: KeysFile) -> None:
    """Replace the file atomically (a reader sees the old or the new file, never half of one).

    A new file is private to its writer (0600). An existing file keeps its mode and owners,
    so a file the package made readable to the gateway's group (0640 root:cortex) stays so
    when root rewrites it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    text = msgspec.json.format(msgspec.json.encode(keys), indent=2) + b"\n"
    try:
        existing: os.stat_result | None = path.stat()
    except FileNotFoundError:
        existing = None
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text)
        if existing is None:
            os.chmod(temporary, 0o600)
        else:
            os.chmod(temporary, existing.st_mode & 0o777)
            if (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(temporary, existing.st_uid, existing.st_gid)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def new_key(
    name: str,
    *,
    models: list[str] | None = None,
    admin: bool = False,
    limits: KeyLimits | None = None,
    taken_ids: set[str] | frozenset[str] = frozenset(),
) -> tuple[KeyEntry, str]:
    """A new entry and its secret (shown once; only its hash is kept)."""
    if not _NAME.match(name):
        raise ValueError(
            f"invalid key name {name!r}: 1-64 characters of letters, digits and . _ @ -, starting with a letter or digit"
        )
    key_id = secrets.token_hex(4)
    while key_id in taken_ids:
        key_id = secrets.token_hex(4)
    secret = f"{SECRET_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
    salt = secrets.token_hex(16)
    entry = KeyEntry(
        name=name,
        id=key_id,
        salt=salt,
        hash=secret_hash(salt, secret),
        models=list(models) if models else ["*"],
        admin=admin,
        limits=limits or KeyLimits(),
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return entry, secret
