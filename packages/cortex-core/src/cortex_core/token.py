"""The shared gateway → neuron token: read from the environment, checked in constant time.

Both configs name an environment variable (`auth.neuron_token_env` in cortex.toml,
`token_env` in neuron.toml), never the token itself, so config files can be world-readable
and checked in. Generate one with `python3 -c "import secrets; print(secrets.token_urlsafe(32))"`.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping

from cortex_core.config.loader import ConfigError


def token_from_env(
    env_name: str | None, *, source: str, key: str, environ: Mapping[str, str] | None = None
) -> str | None:
    """The token in `env_name`; None when no variable is named.

    Named but unset or empty is an error rather than "no token": the neuron would otherwise
    run open, or the gateway be refused by every neuron, without saying why.
    """
    if env_name is None:
        return None
    value = (environ if environ is not None else os.environ).get(env_name, "").strip()
    if not value:
        raise ConfigError(source, f"names the environment variable {env_name}, which is unset or empty", key)
    return value


def bearer_matches(headers: Iterable[tuple[bytes, bytes]], token: str) -> bool:
    """Whether raw ASGI `headers` carry `Authorization: Bearer <token>` (constant-time compare)."""
    expected = f"Bearer {token}".encode()
    for name, value in headers:
        if name.lower() == b"authorization":
            return hmac.compare_digest(value.strip(), expected)
    return False
