"""Serve the gateway: the API on `[gateway].listen`, Prometheus on `[gateway].metrics_listen`.

Both listeners run on one event loop with hypercorn's programmatic API and stop together
when the shutdown trigger fires (SIGINT/SIGTERM in `run_gateway`). The API app's lifespan
starts the poller and closes the HTTP sessions, so a stop is clean.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette
from starlette.routing import Mount

from cortex_core.config.catalogue import ModelCatalogue
from cortex_core.config.gateway import GatewayConfig, check_exposure
from cortex_gateway.app import create_app

log = logging.getLogger(__name__)


def _hypercorn_config(bind: str) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [bind]
    # The access log costs ~30 % of throughput (toolchain.md); requests are in the metrics.
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # Streams may sit silent while a cold load runs; the proxy owns the idle timeouts.
    config.keep_alive_timeout = 75
    return config


async def serve_gateway(
    config: GatewayConfig,
    catalogue: ModelCatalogue,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    app: Starlette | None = None,
) -> None:
    """Run until `shutdown_trigger` returns. `app` defaults to `create_app(config, catalogue)`.

    Refuses (ConfigError) to serve beyond loopback without keys unless the config allows
    it. SIGHUP re-reads the keys file (when the loop runs in the main thread).
    """
    if check_exposure(config, "cortex.toml"):
        log.warning(
            "cortex gateway: listening on %s WITHOUT API keys (auth.allow_anonymous = true): anyone who "
            "can reach it can use every model and the admin routes",
            config.gateway.listen,
        )
    app = app or create_app(config, catalogue)
    stop = asyncio.Event()
    hangup = _reload_keys_on_sighup(app)
    # The exporter answers any path; a Starlette shell gives it lifespan handling.
    metrics_app = Starlette(routes=[Mount("/", app=app.state.metrics.asgi_app())])

    async def trigger() -> None:
        await shutdown_trigger()
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
            serve(app, _hypercorn_config(config.gateway.listen), shutdown_trigger=stop.wait),  # type: ignore[arg-type]
            serve(metrics_app, _hypercorn_config(config.gateway.metrics_listen), shutdown_trigger=stop.wait),  # type: ignore[arg-type]
        )
    finally:
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
