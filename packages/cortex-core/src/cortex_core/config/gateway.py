"""`cortex.toml`: the gateway's listeners, its neurons, and the knobs of each stage."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from cortex_core.config.legacy import translate_gateway
from cortex_core.config.loader import ConfigError, check_request_limits, load_config, resolve_path

ENV_PREFIX = "CORTEX_"


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class GatewaySection(Strict):
    listen: str = "127.0.0.1:31313"
    metrics_listen: str = "127.0.0.1:31314"
    # Bodies above this are refused with 413 in the caller's dialect.
    max_body_bytes: int = 32 * 1024 * 1024
    # A body must arrive within this many seconds (then 408): a stalled upload cannot hold
    # its buffer forever.
    body_read_timeout_secs: float = 60.0
    # All bodies being uploaded at once may hold this many bytes; past it a request gets 503
    # + Retry-After, so slow uploads cannot exhaust the gateway's memory.
    max_buffered_bytes: int = 256 * 1024 * 1024
    # A conversation larger than this is refused (400) before any work; models.toml may set
    # its own per model. Prompt bytes: the conversation's JSON as sent (messages, system,
    # input, instructions, prompt).
    max_messages: int = 10_000
    max_prompt_bytes: int = 8 * 1024 * 1024
    # On SIGTERM: stop accepting, give running requests this long, then end the ones left
    # with an error in their dialect (streams: an error event). systemd's TimeoutStopSec
    # must be longer.
    shutdown_grace_secs: float = 30.0


class NeuronEndpoint(Strict):
    name: str
    endpoint: str


class PollerSection(Strict):
    interval_secs: float = 5.0
    timeout_secs: float = 5.0
    # A node turns unhealthy after this many consecutive failed polls (debounce).
    unhealthy_after: int = 3


class EvictionSection(Strict):
    # Which idle resident goes first: "priority" = lowest residency_priority, then least
    # recently used; "lru" = least recently used whatever its class. Either way a model never
    # displaces one of a higher class.
    strategy: Literal["lru", "priority"] = "priority"
    # A model loaded less than this long ago is never evicted: two alternating models
    # cannot thrash a node.
    min_residency_secs: float = 60.0


class RouterSection(Strict):
    # Requests waiting for one model to finish loading; one more is refused with 429.
    max_waiting_per_model: int = 64
    # Requests relayed at once per model (0: no cap, the neurons queue). With a cap the
    # gateway holds the rest, up to max_waiting_per_model, and serves them round-robin by
    # key, so one caller's burst cannot starve the others.
    max_concurrent_per_model: int = 0
    # How long a request waits for a cold load before a 503 with Retry-After.
    load_wait_secs: float = 600.0
    load_timeout_secs: float = 1800.0
    # After a load failed on a node, requests get that failure (502, the neuron's reason)
    # for this long instead of starting one doomed load each.
    failed_load_backoff_secs: float = 30.0
    # A failed or poisoned catalogue model is reloaded by itself (`recovering`): the first
    # attempt after this many seconds, each next one twice as late up to the max, at most
    # `recovery_max_attempts` times; then it stays failed until an operator acts.
    recovery_backoff_secs: float = 5.0
    recovery_backoff_max_secs: float = 300.0
    recovery_max_attempts: int = 5


class ProxySection(Strict):
    connect_timeout_secs: float = 5.0
    # A stream times out only when no byte arrives for this long, however long it runs.
    idle_timeout_secs: float = 300.0
    # Replicas a request may try, each at most once, only before the first byte reaches the
    # client and only when safe (not connected, or the neuron said "not ready").
    max_attempts: int = 2
    # Circuit breaker per neuron: after this many requests in a row could not connect, no
    # request goes there for the cool-down; then the next successful poll closes it.
    breaker_failures: int = 3
    breaker_cooldown_secs: float = 10.0


class AuthSection(Strict):
    # The API keys (JSON, written by `cortex keys create`; docs/gateway.md). Reloaded when it
    # changes and on SIGHUP. With keys, every API route needs one and /admin/* an admin key.
    keys_file: str | None = None
    # Without a keys file the gateway refuses to listen beyond loopback unless this is true.
    allow_anonymous: bool = False
    # NAME of the environment variable holding the token the neurons require (never the token).
    neuron_token_env: str | None = None


class CorsSection(Strict):
    # Origins a browser may call the API from ("*": any); none by default.
    allow_origins: list[str] = msgspec.field(default_factory=list)


class GatewayConfig(Strict):
    gateway: GatewaySection = msgspec.field(default_factory=GatewaySection)
    neurons: list[NeuronEndpoint] = msgspec.field(default_factory=list)
    models_config: str | None = None
    poller: PollerSection = msgspec.field(default_factory=PollerSection)
    eviction: EvictionSection = msgspec.field(default_factory=EvictionSection)
    router: RouterSection = msgspec.field(default_factory=RouterSection)
    proxy: ProxySection = msgspec.field(default_factory=ProxySection)
    auth: AuthSection = msgspec.field(default_factory=AuthSection)
    cors: CorsSection = msgspec.field(default_factory=CorsSection)


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int


def parse_listen(value: str, *, source: str, key: str) -> HostPort:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(source, f"expected 'host:port' (e.g. '0.0.0.0:31313'), got {value!r}", key)
    return HostPort(host.strip("[]") or "0.0.0.0", int(port))


def _validate(config: GatewayConfig, source: str) -> None:
    parse_listen(config.gateway.listen, source=source, key="gateway.listen")
    parse_listen(config.gateway.metrics_listen, source=source, key="gateway.metrics_listen")
    seen: set[str] = set()
    for index, neuron in enumerate(config.neurons):
        key = f"neurons[{index}]"
        if neuron.name in seen:
            raise ConfigError(source, f"duplicate neuron name {neuron.name!r}", f"{key}.name")
        seen.add(neuron.name)
        parts = urlsplit(neuron.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                source,
                f"expected an http(s) URL such as 'http://gpu1:13131', got {neuron.endpoint!r}",
                f"{key}.endpoint",
            )
    if config.poller.unhealthy_after < 1:
        raise ConfigError(source, "must be at least 1", "poller.unhealthy_after")
    if config.proxy.max_attempts < 1:
        raise ConfigError(source, "must be at least 1", "proxy.max_attempts")
    section = config.gateway
    check_request_limits(section, source, "gateway.")
    if section.shutdown_grace_secs < 0:
        raise ConfigError(source, "must be 0 or more", "gateway.shutdown_grace_secs")
    if config.router.max_concurrent_per_model < 0:
        raise ConfigError(source, "must be 0 (no cap) or more", "router.max_concurrent_per_model")


def check_exposure(config: GatewayConfig, source: str) -> bool:
    """Whether serving `config` exposes the API without keys beyond loopback (allowed, to warn about).

    Refuses (ConfigError) when it would and `auth.allow_anonymous` is not set: the config
    still loads (the Rust era's files listen on 0.0.0.0), but the gateway does not serve it.
    """
    listen = parse_listen(config.gateway.listen, source=source, key="gateway.listen")
    if config.auth.keys_file is not None or is_loopback(listen.host):
        return False
    if config.auth.allow_anonymous:
        return True
    raise ConfigError(
        source,
        f"listening on {config.gateway.listen} without API keys would open every model and the "
        "admin routes to the network: set auth.keys_file (create keys with `cortex keys create`), "
        "listen on 127.0.0.1, or set auth.allow_anonymous = true to accept that",
        "gateway.listen",
    )


def is_loopback(host: str) -> bool:
    """True for a loopback address or `localhost`; a name or a wildcard address is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_gateway_config(path: Path | None, *, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load cortex.toml (None: defaults) with CORTEX_* overrides; models_config resolved to the file's folder."""
    config = load_config(path, GatewayConfig, env_prefix=ENV_PREFIX, env=env, legacy=translate_gateway)
    source = str(path) if path else "environment"
    _validate(config, source)
    base = path.resolve().parent if path else None
    auth = msgspec.structs.replace(config.auth, keys_file=resolve_path(config.auth.keys_file, base))
    return msgspec.structs.replace(config, models_config=resolve_path(config.models_config, base), auth=auth)
