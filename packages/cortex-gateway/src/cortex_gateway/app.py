"""The gateway's Starlette app, built by `create_app` (no module-level state).

Wiring, one way: poller → FleetState → placement → Router → Proxy → metrics. In front of
the router sits the gate (gate.py: API keys, entitlements, per-key limits, the fair queue),
with its middleware authenticating every request before a handler reads the body; CORS,
when configured, wraps both. Around them, from cortex_core: the drain (requests still
running when a shutdown's grace ends are answered in their dialect) and, inside the key
check, the body guard (bodies read once under a timeout, a size limit and a shared budget;
JSON nesting and conversation size refused before any handler, per model from the
catalogue). The factory builds each piece from the config and hangs them
on `app.state` (fleet, router, poller, proxy, metrics, neuron_client, gate, keys) so tests
and `serve` can reach them.

Errors: handlers raise `ApiError`; one exception handler renders it in the caller's dialect
(Anthropic's shape under /v1/messages and for requests carrying `anthropic-version`,
OpenAI's everywhere else), with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from time import perf_counter

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

from cortex_core.body_guard import BodyGuard, BodyLimits, BufferBudget
from cortex_core.config.catalogue import ModelCatalogue
from cortex_core.config.gateway import GatewayConfig
from cortex_core.drain import Drain, DrainGuard, openai_stream_error
from cortex_core.errors import ApiError, decode_json_body
from cortex_core.http import Dialect, error_body, error_response, exception_handlers, json_response
from cortex_core.limits import PromptLimits, echoed, prompt_check
from cortex_core.request_id import RequestIdMiddleware, request_id_of
from cortex_core.token import token_from_env
from cortex_gateway import admin
from cortex_gateway.admission import OPENAI_PATHS, admitted_model
from cortex_gateway.auth import KeyStore, may_use
from cortex_gateway.dialects import anthropic
from cortex_gateway.effects import NeuronEffects
from cortex_gateway.fleet import BreakerPolicy, FleetState, RecoveryPolicy
from cortex_gateway.gate import AuthMiddleware, Gate, caller_of
from cortex_gateway.metrics import GatewayMetrics
from cortex_gateway.neuron_client import NeuronClient
from cortex_gateway.placement import PlacementPolicy
from cortex_gateway.poller import Poller
from cortex_gateway.proxy import Proxy
from cortex_gateway.quota import FairQueue, LimitBook
from cortex_gateway.router import Router, RouterLimits

log = logging.getLogger(__name__)

# How often the keys file's stat is checked for a change (SIGHUP reloads at once).
KEYS_CHECK_SECS = 2.0
RETRY_AFTER_QUEUE_FULL_SECS = 1.0


async def watch_keys(keys: KeyStore, interval_secs: float) -> None:
    """Reload the keys file when it changes; a bad edit keeps the previous keys (KeyStore)."""
    while True:
        await asyncio.sleep(interval_secs)
        keys.refresh()


def speaks_anthropic(request: Request) -> bool:
    return scope_speaks_anthropic(request.scope)


def scope_speaks_anthropic(scope: Scope) -> bool:
    """Anthropic's dialect: its own routes, and any request its SDKs sent (they always send
    `anthropic-version`), so that e.g. `GET /v1/models/{id}` fails in the shape they parse."""
    return scope["path"].startswith("/v1/messages") or any(
        name == b"anthropic-version" for name, _ in scope["headers"]
    )


def render_error(request: Request, error: ApiError) -> Response:
    return render_scope_error(request.scope, error)


def render_scope_error(scope: Scope, error: ApiError) -> Response:
    """`error` in the caller's dialect; the auth middleware renders its refusals with it too."""
    if scope_speaks_anthropic(scope):
        return error_response(error, Dialect.ANTHROPIC, request_id_of(scope))
    return error_response(error)


# Anthropic's Models API pages 20 entries unless asked, and at most 1000.
ANTHROPIC_PAGE_DEFAULT = 20
ANTHROPIC_PAGE_MAX = 1000


def page_limit(value: str | None) -> int:
    if value is None:
        return ANTHROPIC_PAGE_DEFAULT
    if not value.isdigit() or not 1 <= int(value) <= ANTHROPIC_PAGE_MAX:
        raise ApiError(
            400, f"limit: must be an integer from 1 to {ANTHROPIC_PAGE_MAX}, got {value!r}", param="limit"
        )
    return int(value)


def no_route_message(method: str, path: str) -> str:
    """A 404's message: under /v1 the route does not exist; elsewhere, where the API is."""
    if path.startswith("/v1/"):
        return f"route {method} {echoed(path)} does not exist (GET /v1/models lists the models)"
    return f"no route {method} {echoed(path)}; the API is under /v1 (GET /v1/models lists the models)"


async def read_body(request: Request) -> bytes:
    """The request body; BodyGuard has read it already, under the limits (timeout, size, budget)."""
    return await request.body()


def prompt_limits(config: GatewayConfig, catalogue: ModelCatalogue) -> Callable[[str], PromptLimits]:
    """The conversation limits of a requested model: its own from models.toml, else the gateway's."""
    section = config.gateway
    default = PromptLimits(section.max_messages, section.max_prompt_bytes, "gateway.{key} in cortex.toml")

    def limits_for(requested: str) -> PromptLimits:
        profile = catalogue.get(catalogue.resolve_alias(requested))
        if profile is None or (profile.max_messages is None and profile.max_prompt_bytes is None):
            return default
        return PromptLimits(
            profile.max_messages or default.max_messages,
            profile.max_prompt_bytes or default.max_prompt_bytes,
            f"{{key}} of {echoed(profile.id)} in models.toml, else gateway.{{key}}",
        )

    return limits_for


def stream_error(scope: Scope, error: ApiError) -> bytes:
    """The last event of a stream the gateway has to end, in the caller's dialect."""
    if scope_speaks_anthropic(scope):
        body = msgspec.json.encode(error_body(error, Dialect.ANTHROPIC, request_id_of(scope)))
        return b"\n\nevent: error\ndata: " + body + b"\n\n"
    return openai_stream_error(scope, error)


def create_app(
    config: GatewayConfig,
    catalogue: ModelCatalogue,
    *,
    neuron_client: NeuronClient | None = None,
    metrics: GatewayMetrics | None = None,
    clock: Callable[[], float] = time.time,
    run_poller: bool = True,
    extra_routes: list[BaseRoute] | None = None,
) -> Starlette:
    """The gateway app. `run_poller=False` leaves polling to the caller (`app.state.poller.poll_once()`)."""
    token = token_from_env(config.auth.neuron_token_env, source="cortex.toml", key="auth.neuron_token_env")
    client = neuron_client or NeuronClient(
        poll_timeout=config.poller.timeout_secs, load_timeout=config.router.load_timeout_secs, token=token
    )
    metrics = metrics or GatewayMetrics()
    fleet = FleetState(
        config.neurons,
        unhealthy_after=config.poller.unhealthy_after,
        clock=clock,
        recoverable=lambda model_id: catalogue.get(model_id) is not None,
        recovery=RecoveryPolicy(
            base_secs=config.router.recovery_backoff_secs,
            cap_secs=config.router.recovery_backoff_max_secs,
            max_attempts=config.router.recovery_max_attempts,
        ),
        breaker=BreakerPolicy(
            failures=config.proxy.breaker_failures, cooldown_secs=config.proxy.breaker_cooldown_secs
        ),
    )
    router = Router(
        fleet,
        catalogue,
        NeuronEffects(client, fleet),
        policy=PlacementPolicy(
            min_residency_secs=config.eviction.min_residency_secs,
            eviction_strategy=config.eviction.strategy,
            failed_load_backoff_secs=config.router.failed_load_backoff_secs,
        ),
        limits=RouterLimits(
            max_waiting_per_model=config.router.max_waiting_per_model,
            load_wait_secs=config.router.load_wait_secs,
        ),
        clock=clock,
        observer=metrics,
    )
    poller = Poller(
        fleet,
        client,
        interval_secs=config.poller.interval_secs,
        on_error=metrics.poller_error,
        after_cycle=router.start_recoveries,
    )
    metrics.watch_fleet(fleet.snapshot)
    proxy = Proxy(config.proxy, metrics, neuron_token=token)
    body_limit = config.gateway.max_body_bytes
    drain = Drain("gateway")
    keys = KeyStore(Path(config.auth.keys_file)) if config.auth.keys_file else None
    gate = Gate(
        router,
        catalogue,
        metrics,
        keys=keys,
        limits=LimitBook(clock),
        queue=FairQueue(
            config.router.max_concurrent_per_model,
            config.router.max_waiting_per_model,
            retry_after=RETRY_AFTER_QUEUE_FULL_SECS,
        ),
        # A request waits for a slot as long as it may wait for a cold load.
        queue_wait_secs=config.router.load_wait_secs,
    )

    async def relay(request: Request) -> Response:
        received_at = perf_counter()
        body = await read_body(request)
        # scope["path"], not request.url: the URL object costs a parse on every relayed request.
        path = request.scope["path"]
        # Validated before placement: a request the neuron would refuse never loads or evicts.
        lease = await gate.acquire(request.scope, admitted_model(path, body))
        return await proxy.forward(
            request,
            body,
            lease,
            path,
            received_at=received_at,
            clamp_max_tokens=catalogue.clamps_max_tokens(lease.model_id),
        )

    def models_for(request: Request) -> admin.ModelList:
        """The model list as the caller's key sees it: listing a model is how one learns it exists."""
        models = admin.model_list(fleet.snapshot(), catalogue, clock())
        caller = caller_of(request.scope)
        models.data = [e for e in models.data if may_use(caller, e.id, catalogue.resolve_alias(e.id))]
        return models

    async def list_models(request: Request) -> Response:
        models = models_for(request)
        if not speaks_anthropic(request):
            return json_response(models)
        query = request.query_params
        page = admin.anthropic_model_page(
            models,
            limit=page_limit(query.get("limit")),
            after_id=query.get("after_id"),
            before_id=query.get("before_id"),
        )
        return json_response(page)

    async def retrieve_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        entry = admin.find_model(models_for(request), model_id)
        if entry is None:
            raise ApiError(
                404,
                f"model '{echoed(model_id)}' does not exist on this gateway (GET /v1/models lists the models)",
                code="model_not_found",
                param="model",
            )
        return json_response(admin.anthropic_model(entry) if speaks_anthropic(request) else entry)

    async def health(request: Request) -> Response:
        return json_response(admin.fleet_health(fleet.snapshot()))

    async def livez(request: Request) -> Response:
        return json_response({"status": "alive"})

    async def readyz(request: Request) -> Response:
        snapshot = fleet.snapshot()
        healthy = len(snapshot.healthy_nodes)
        if healthy:
            return json_response({"status": "ready", "healthy_nodes": healthy})
        reason = "no neurons are configured" if not snapshot.nodes else "no neuron has answered a poll yet"
        raise ApiError(503, f"not ready: {reason}", code="not_ready", retry_after=config.poller.interval_secs)

    async def fleet_report(request: Request) -> Response:
        return json_response(admin.fleet_report(fleet.snapshot(), catalogue, router.loads_in_flight, clock()))

    async def load_model(request: Request) -> Response:
        action = decode_json_body(await read_body(request), admin.ModelAction)
        node = await router.load_by_hand(action.model, action.node)
        model_id = catalogue.resolve_alias(action.model)
        return json_response(admin.ModelActionResult(model=model_id, nodes=[node], status="loaded"))

    async def unload_model(request: Request) -> Response:
        action = decode_json_body(await read_body(request), admin.ModelAction)
        nodes = await router.unload_by_hand(action.model, action.node)
        model_id = catalogue.resolve_alias(action.model)
        return json_response(admin.ModelActionResult(model=model_id, nodes=nodes, status="unloaded"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        if run_poller:
            poller.start()
        watcher = asyncio.create_task(watch_keys(keys, KEYS_CHECK_SECS)) if keys is not None else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await poller.stop()
            await router.close()
            await proxy.close()
            await client.close()

    routes: list[BaseRoute] = [
        *(Route(path, relay, methods=["POST"]) for path in OPENAI_PATHS),
        *anthropic.routes(
            acquire=lambda request, model: gate.acquire(request.scope, model),
            proxy=proxy,
            read_body=read_body,
            clamps_max_tokens=catalogue.clamps_max_tokens,
        ),
        Route("/v1/models", list_models, methods=["GET"]),
        # `path`: catalogue ids are `org/name`, and the SDKs do not percent-encode the slash.
        Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", health, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/admin/fleet", fleet_report, methods=["GET"]),
        Route("/admin/models/load", load_model, methods=["POST"]),
        Route("/admin/models/unload", unload_model, methods=["POST"]),
        *(extra_routes or []),
    ]
    # Outermost first: CORS answers preflights (which carry no key) and decorates every
    # answer, the auth middleware's 401/403 included; the request id is given before the
    # key is checked, so refusals carry one and the access log names it.
    middleware = [
        # The caller's x-request-id is kept (if sane), so both logs name the same request.
        Middleware(RequestIdMiddleware, logger=log),
        # Requests still running when a shutdown's grace is over end in their dialect.
        Middleware(DrainGuard, drain=drain, render=render_scope_error, stream_error=stream_error),
        Middleware(AuthMiddleware, gate=gate, render=render_scope_error),
        # Bodies are read (under limits) only once the key was accepted.
        Middleware(
            BodyGuard,
            limits=BodyLimits(
                max_body_bytes=body_limit,
                read_timeout_secs=config.gateway.body_read_timeout_secs,
                setting="gateway.{key}",
            ),
            budget=BufferBudget(config.gateway.max_buffered_bytes),
            render=render_scope_error,
            check=prompt_check(prompt_limits(config, catalogue)),
        ),
    ]
    if config.cors.allow_origins:
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=config.cors.allow_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=[
                    "authorization",
                    "x-api-key",
                    "content-type",
                    "anthropic-version",
                    "x-request-id",
                ],
                max_age=600,
            ),
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=exception_handlers(render_error, no_route_message),
    )
    app.state.config = config
    app.state.catalogue = catalogue
    app.state.fleet = fleet
    app.state.poller = poller
    app.state.router = router
    app.state.proxy = proxy
    app.state.metrics = metrics
    app.state.neuron_client = client
    app.state.body_limit = body_limit
    app.state.drain = drain
    app.state.gate = gate
    app.state.keys = keys
    return app
