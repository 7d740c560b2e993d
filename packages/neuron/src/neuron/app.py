"""The neuron's HTTP API (Starlette): discovery, health, lifecycle, endpoint, metrics, inference.

Built by `create_app` from the objects it needs - nothing global - so a test can hand in a
fake NVML, a fake engine or a ready ModelManager, and the gateway's tests can run a real
neuron in process. Errors are ApiErrors from anywhere below, rendered once here in the
OpenAI envelope with Retry-After where there is one.

The middlewares of cortex_core guard every route: bodies are read once under the limits
of neuron.toml (timeout, size, a shared budget) and checked (JSON nesting, conversation
size) before a route sees them, so nothing absurd reaches the template or the tokenizer;
and requests still running when the drain's time is up end with an error, not a cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import platform
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

import neuron
from cortex_core.body_guard import BodyGuard, BodyLimits, BufferBudget
from cortex_core.config.neuron import NeuronConfig
from cortex_core.drain import Drain, DrainGuard, openai_stream_error
from cortex_core.errors import ApiError, decode_json_body
from cortex_core.http import JSONResponse as JSON
from cortex_core.http import error_response, exception_handlers
from cortex_core.limits import PromptLimits, prompt_check
from cortex_core.neuron_api import (
    EndpointResponse,
    HealthResponse,
    LoadResponse,
    ModelSpec,
    UnloadRequest,
    UnloadResponse,
    VersionResponse,
)
from cortex_core.request_id import RequestIdMiddleware
from cortex_core.token import bearer_matches, token_from_env
from neuron.discovery import HostProbe, host_memory_free_mb
from neuron.loaded_model import LoadedModel
from neuron.manager import ModelManager
from neuron.metrics import CONTENT_TYPE, NeuronMetrics

log = logging.getLogger(__name__)

# Given the model lookup and the config, the inference routes (/v1/chat/completions, ...).
ServingRoutes = Callable[[Callable[[str], LoadedModel], NeuronConfig], list[BaseRoute]]


def render_error(scope: Scope, error: ApiError) -> Response:
    """The middlewares' refusals: the neuron speaks OpenAI's envelope on every route."""
    return error_response(error)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_serving_routes() -> ServingRoutes | None:
    """The OpenAI inference routes of `neuron.serving`, when this build has them."""
    try:
        from neuron.serving.routes import inference_routes
    except ImportError as exc:
        log.warning("inference routes are not available: %s", exc)
        return None

    def routes(lookup: Callable[[str], LoadedModel], config: NeuronConfig) -> list[BaseRoute]:
        return list(inference_routes(lookup, keepalive_secs=config.engine.keepalive_secs))

    return routes


# Probes and scrapes stay open: systemd, load balancers and Prometheus do not hold the token.
OPEN_PATHS = frozenset({"/health", "/livez", "/metrics"})


class RequireToken:
    """Refuses (401) every request without the gateway's token, except on `OPEN_PATHS`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in OPEN_PATHS
            or bearer_matches(scope["headers"], self._token)
        ):
            await self._app(scope, receive, send)
            return
        refusal = ApiError(
            401,
            "this neuron requires the fleet's token (Authorization: Bearer, see token_env in neuron.toml)",
            type="authentication_error",
            code="invalid_neuron_token",
        )
        await error_response(refusal)(scope, receive, send)


def create_app(
    config: NeuronConfig,
    *,
    probe: HostProbe | None = None,
    manager: ModelManager | None = None,
    metrics: NeuronMetrics | None = None,
    serving_routes: ServingRoutes | None = None,
    activate_defaults: bool = True,
) -> Starlette:
    """The neuron app. Startup (ASGI lifespan) begins loading `default_models` in the background;
    shutdown unloads every model."""
    probe = probe or HostProbe.open()
    if manager is None:
        manager = ModelManager(config, probe, metrics=metrics or NeuronMetrics())
    started = time.monotonic()
    limits = PromptLimits(config.max_messages, config.max_prompt_bytes, "{key} in neuron.toml")
    discovery = probe.discovery(manager.harness_names)
    version = VersionResponse(
        name="neuron",
        version=neuron.__version__,
        python=platform.python_version(),
        torch=_package_version("torch"),
        transformers=_package_version("transformers"),
        pid=os.getpid(),
    )

    async def get_discovery(request: Request) -> Response:
        return JSON(discovery)

    async def get_health(request: Request) -> Response:
        return JSON(
            HealthResponse(
                uptime_secs=round(time.monotonic() - started, 3),
                devices=probe.device_health(),
                activation=manager.activation,
                models=manager.loads(),
                host_memory_free_mb=host_memory_free_mb(),
            )
        )

    async def get_version(request: Request) -> Response:
        return JSON(version)

    async def get_models(request: Request) -> Response:
        return JSON(manager.models())

    async def post_load(request: Request) -> Response:
        spec = decode_json_body(await request.body(), ModelSpec)
        started_load = time.monotonic()
        info = await manager.load(spec)
        return JSON(LoadResponse(model_id=info.id, load_seconds=round(time.monotonic() - started_load, 3)))

    async def post_unload(request: Request) -> Response:
        body = decode_json_body(await request.body(), UnloadRequest)
        await manager.unload(body.model_id)
        return JSON(UnloadResponse(model_id=body.model_id))

    async def get_endpoint(request: Request) -> Response:
        manager.get(request.path_params["model_id"])
        # The address the caller reached us on is the one it can send inference to.
        return JSON(EndpointResponse(url=str(request.base_url).rstrip("/")))

    async def get_metrics(request: Request) -> Response:
        return Response(manager.metrics.render(), media_type=CONTENT_TYPE)

    routes: list[BaseRoute] = [
        Route("/discovery", get_discovery, methods=["GET"]),
        Route("/health", get_health, methods=["GET"]),
        Route("/version", get_version, methods=["GET"]),
        Route("/metrics", get_metrics, methods=["GET"]),
        Route("/models", get_models, methods=["GET"]),
        Route("/models/load", post_load, methods=["POST"]),
        Route("/models/unload", post_unload, methods=["POST"]),
        # `path` so that ids with '/' match whether the caller percent-encoded them or not.
        Route("/models/{model_id:path}/endpoint", get_endpoint, methods=["GET"]),
    ]
    serving = serving_routes or default_serving_routes()
    if serving is not None:
        routes.extend(serving(manager.get, config))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        activation = None
        if activate_defaults and config.default_models:
            activation = manager.start_activation(config.default_models)
        try:
            yield
        finally:
            if activation is not None and not activation.done():
                activation.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await activation
            await manager.close()
            probe.close()

    token = token_from_env(config.token_env, source="neuron.toml", key="token_env")
    drain = Drain("neuron")
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # The neuron speaks OpenAI's envelope only: its one client is the gateway, which
        # renders errors in its own caller's dialect.
        exception_handlers=exception_handlers(
            lambda request, error: error_response(error),
            lambda method, path: f"no route {method} {path} on this neuron",
            log_server_errors=log,
        ),
        # The gateway's x-request-id is kept, so its log lines and ours name the same request;
        # inside it, the fleet token (when configured), so refusals are named and logged too.
        middleware=[
            Middleware(RequestIdMiddleware, logger=log),
            # Requests still running when the drain's time is up end with an error, not a cut.
            Middleware(DrainGuard, drain=drain, render=render_error, stream_error=openai_stream_error),
            *([Middleware(RequireToken, token=token)] if token is not None else []),
            # Bodies are read under limits, checked (nesting, conversation size) and only then
            # handed to a route: nothing absurd reaches the template or the tokenizer.
            Middleware(
                BodyGuard,
                limits=BodyLimits(
                    max_body_bytes=config.max_body_bytes,
                    read_timeout_secs=config.body_read_timeout_secs,
                    setting="{key} in neuron.toml",
                ),
                budget=BufferBudget(config.max_buffered_bytes),
                render=render_error,
                check=prompt_check(lambda model: limits),
            ),
        ],
    )
    app.state.manager = manager
    app.state.probe = probe
    app.state.drain = drain
    return app
