"""Serve the gateway: the API on `[gateway].listen`, Prometheus on `[gateway].metrics_listen`.

Both listeners run on one event loop with hypercorn's programmatic API and stop together
when the shutdown trigger fires (SIGINT/SIGTERM in `run_gateway`). The API app's lifespan
starts the poller and closes the HTTP sessions, so a stop is clean.

A stop drains: no new connections, `gateway.shutdown_grace_secs` for the requests in
flight, then the app's drain (cortex_core.drain) ends those still running with an error in
their dialect; hypercorn's own deadline is a few seconds later, so those last events are
written before it cancels anything.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette
from starlette.routing import Mount

from cortex_core.config.catalogue import ModelCatalogue
from cortex_core.config.gateway import GatewayConfig, check_exposure, parse_listen
from cortex_core.drain import FLUSH_SECS
from cortex_core.http import SERVER_KEEP_ALIVE_SECS
from cortex_gateway.app import create_app

log = logging.getLogger(__name__)


class ListenError(Exception):
    """A listener could not be bound: its address, the config key that sets it, and why."""

    def __init__(self, address: str, key: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({key}): {reason}")
        self.address = address
        self.key = key
        self.reason = reason


@dataclass
class Listeners:
    """The gateway's sockets, bound before anything is started or announced."""

    api: socket.socket
    metrics: socket.socket

    def close(self) -> None:
        self.api.close()
        self.metrics.close()


def bind_listener(address: str, key: str) -> socket.socket:
    listen = parse_listen(address, source="cortex.toml", key=key)
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As hypercorn would: a restart is not refused for the previous run's TIME_WAIT sockets.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ListenError(address, key, exc.strerror or str(exc)) from exc
    sock.setblocking(False)
    return sock


def bind_listeners(config: GatewayConfig) -> Listeners:
    """Bind the API and metrics sockets (ListenError names the one that failed)."""
    api = bind_listener(config.gateway.listen, "gateway.listen")
    try:
        metrics = bind_listener(config.gateway.metrics_listen, "gateway.metrics_listen")
    except ListenError:
        api.close()
        raise
    return Listeners(api, metrics)


def _hypercorn_config(sock: socket.socket, grace_secs: float) -> HypercornConfig:
    config = HypercornConfig()
    # hypercorn serves the socket we bound (and owns it from here on).
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = grace_secs + FLUSH_SECS
    # The access log costs ~30 % of throughput (toolchain.md); requests are in the metrics.
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # Streams may sit silent while a cold load runs; the proxy owns the idle timeouts.
    config.keep_alive_timeout = SERVER_KEEP_ALIVE_SECS
    return config


async def serve_gateway(
    config: GatewayConfig,
    catalogue: ModelCatalogue,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    app: Starlette | None = None,
    listeners: Listeners | None = None,
) -> None:
    """Run until `shutdown_trigger` returns. `app` defaults to `create_app(config, catalogue)`;
    `listeners` to sockets bound here (ListenError when one is taken).

    Refuses (ConfigError) to serve beyond loopback without keys unless the config allows
    it. SIGHUP re-reads the keys file (when the loop runs in the main thread).
    """
    if check_exposure(config, "cortex.toml"):
        log.warning(
            "cortex gateway: listening on %s WITHOUT API keys (auth.allow_anonymous = true): anyone who "
            "can reach it can use every model and the admin routes",
            config.gateway.listen,
        )
    listeners = listeners or bind_listeners(config)
    try:
        app = app or create_app(config, catalogue)
    except BaseException:
        listeners.close()
        raise
    stop = asyncio.Event()
    hangup = _reload_keys_on_sighup(app)
    # The exporter answers any path; a Starlette shell gives it lifespan handling.
    metrics_app = Starlette(routes=[Mount("/", app=app.state.metrics.asgi_app())])

    grace = config.gateway.shutdown_grace_secs

    async def trigger() -> None:
        await shutdown_trigger()
        app.state.drain.begin(grace)
        stop.set()

    watcher = asyncio.create_task(trigger())
    log.info(
        "cortex gateway: API on %s, metrics on %s, %d neuron(s), %d catalogue model(s)",
        config.gateway.listen,
        config.gateway.metrics_listen,
        len(config.neurons),
        len(catalogue),
    )
    try:
        await asyncio.gather(
            serve(app, _hypercorn_config(listeners.api, grace), shutdown_trigger=stop.wait),  # type: ignore[arg-type]
            serve(
                metrics_app,  # type: ignore[arg-type]
                _hypercorn_config(listeners.metrics, grace),
                shutdown_trigger=stop.wait,
            ),
        )
    finally:
        app.state.drain.cancel()
        stop.set()
        watcher.cancel()
        if hangup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


def _reload_keys_on_sighup(app: Starlette) -> bool:
    """Install the SIGHUP handler; False where signals cannot be handled (not the main thread)."""
    keys = app.state.keys
    if keys is None:
        return False
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, keys.reload)
    except (ValueError, RuntimeError):  # not the main thread: the file watcher still reloads
        return False
    return True


def run_gateway(config: GatewayConfig, catalogue: ModelCatalogue) -> None:
    """Blocking entry point for `cortex serve -c cortex.toml`; SIGINT/SIGTERM stop it cleanly."""

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await serve_gateway(config, catalogue, shutdown_trigger=stopping.wait)

    asyncio.run(main())
