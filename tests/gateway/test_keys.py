"""API keys at the gateway: the checks (pure, table-driven), then the app with a keys file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx2
import msgspec
import pytest
from prometheus_client import generate_latest
from starlette.applications import Starlette
from support.fake_neuron import (
    AsgiNeuronTransport,
    FakeClock,
    gateway,
    gateway_config,
    in_process_client,
    relaying_neuron,
)
from support.fake_upstream import FakeUpstream, Script, on_hypercorn, sse_stream

from cortex_core.config.catalogue import ModelCatalogue, ModelProfile
from cortex_core.errors import ApiError
from cortex_core.keys import KeyLimits, KeysFile, new_key, write_keys
from cortex_gateway.app import create_app
from cortex_gateway.auth import Caller, KeyRing, may_use, presented_secret
from cortex_gateway.neuron_client import NeuronClient

MODEL = "org/chat"
OTHER = "other/model"
CATALOGUE = ModelCatalogue([ModelProfile(id=MODEL), ModelProfile(id=OTHER)], {"chat": MODEL})
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "a secret prompt"}]}
MESSAGES = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "a secret prompt"}]}
PATIENCE_SECS = 10.0


@dataclass
class Keys:
    path: Path
    user: str
    admin: str
    revoked: str
    narrow: str
    limited: str

    def all(self) -> list[str]:
        return [self.user, self.admin, self.revoked, self.narrow, self.limited]


def write_test_keys(path: Path) -> Keys:
    user, user_secret = new_key("user")
    admin, admin_secret = new_key("ops", admin=True)
    revoked, revoked_secret = new_key("gone")
    narrow, narrow_secret = new_key("narrow", models=["other/*"])
    limited, limited_secret = new_key("limited", limits=KeyLimits(requests_per_minute=1))
    revoked = msgspec.structs.replace(revoked, revoked=True)
    write_keys(path, KeysFile(keys=[user, admin, revoked, narrow, limited]))
    return Keys(path, user_secret, admin_secret, revoked_secret, narrow_secret, limited_secret)


# ---- the checks, pure ---------------------------------------------------------------------


def test_a_ring_authenticates_only_a_valid_unrevoked_secret() -> None:
    good, secret = new_key("good")
    gone, gone_secret = new_key("gone")
    ring = KeyRing.of(KeysFile(keys=[good, msgspec.structs.replace(gone, revoked=True)]))
    forged = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")  # right id, wrong secret
    _unknown, unknown_secret = new_key("elsewhere")
    cases: list[tuple[str | None, str | None]] = [
        (None, "missing_api_key"),
        ("", "invalid_api_key"),
        ("sk-not-ours", "invalid_api_key"),
        (forged, "invalid_api_key"),
        (unknown_secret, "invalid_api_key"),
        (gone_secret, "revoked_api_key"),
        (secret, None),
    ]
    for presented, code in cases:
        if code is None:
            assert ring.authenticate(presented).name == "good"
            continue
        with pytest.raises(ApiError) as caught:
            ring.authenticate(presented)
        assert (caught.value.status, caught.value.code) == (401, code), presented
        if presented:
            assert presented not in caught.value.message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"authorization", b"Bearer cx-1")], "cx-1"),
        ([(b"Authorization", b"bearer  cx-2 ")], "cx-2"),
        ([(b"x-api-key", b"cx-3")], "cx-3"),
        ([(b"authorization", b"Basic dXNlcjpwdw==")], None),
        ([(b"authorization", b"Bearer ")], None),
        ([(b"content-type", b"application/json")], None),
    ],
)
def test_the_key_is_read_from_either_header(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert presented_secret(headers) == expected


@pytest.mark.parametrize(
    ("patterns", "requested", "resolved", "allowed"),
    [
        (("*",), "anything", "anything", True),
        (("org/*",), "org/chat", "org/chat", True),
        (("org/*",), "other/model", "other/model", False),
        (("chat",), "chat", "org/chat", True),  # the alias is granted, so is its target
        (("org/*",), "chat", "org/chat", True),  # the target is granted through its alias
        (("Org/*",), "org/chat", "org/chat", False),  # case-sensitive, like model ids
        ((), "org/chat", "org/chat", False),
    ],
)
def test_model_globs(patterns: tuple[str, ...], requested: str, resolved: str, allowed: bool) -> None:
    assert may_use(Caller(name="k", models=patterns), requested, resolved) is allowed


# ---- the app ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def keyed_gateway(
    tmp_path: Path, **sections: dict[str, object]
) -> AsyncIterator[tuple[Keys, FakeUpstream, Starlette, httpx2.AsyncClient]]:
    keys = write_test_keys(tmp_path / "keys.json")
    async with FakeUpstream() as upstream:
        neuron = relaying_neuron(upstream.base_url, MODEL, OTHER)
        async with gateway([neuron], CATALOGUE, auth={"keys_file": str(keys.path)}, **sections) as (
            app,
            http,
        ):
            yield keys, upstream, app, http


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def test_key_checks_in_both_dialects(tmp_path: Path) -> None:
    async with keyed_gateway(tmp_path) as (keys, upstream, _app, http):
        # (headers, body model, status, OpenAI code, Anthropic error type)
        table: list[tuple[dict[str, str], str, int, str | None, str | None]] = [
            ({}, MODEL, 401, "missing_api_key", "authentication_error"),
            (bearer("cx-00000000-" + "A" * 43), MODEL, 401, "invalid_api_key", "authentication_error"),
            (bearer(keys.revoked), MODEL, 401, "revoked_api_key", "authentication_error"),
            (bearer(keys.narrow), MODEL, 403, "model_not_allowed", "permission_error"),
            (bearer(keys.user), MODEL, 200, None, None),
            ({"x-api-key": keys.user}, MODEL, 200, None, None),
            ({"x-api-key": keys.narrow}, OTHER, 200, None, None),
        ]
        for headers, model, status, code, anthropic_type in table:
            openai = await http.post("/v1/chat/completions", json={**CHAT, "model": model}, headers=headers)
            anthropic = await http.post("/v1/messages", json={**MESSAGES, "model": model}, headers=headers)
            assert (openai.status_code, anthropic.status_code) == (status, status), (headers, model)
            if code is not None:
                assert openai.json()["error"]["code"] == code
                body = anthropic.json()
                assert (body["type"], body["error"]["type"]) == ("error", anthropic_type)
                # Refused before any handler ran, and still named like every answer.
                assert body["request_id"] == anthropic.headers["request-id"]
    # Only the accepted requests reached the neuron, and without the client's key.
    assert len(upstream.calls) == 6
    assert all("authorization" not in {k.lower() for k in call.headers} for call in upstream.calls)
    assert all("x-api-key" not in {k.lower() for k in call.headers} for call in upstream.calls)


async def test_admin_routes_need_an_admin_key_and_probes_need_none(tmp_path: Path) -> None:
    async with keyed_gateway(tmp_path) as (keys, _upstream, _app, http):
        anonymous = await http.get("/admin/fleet")
        user = await http.get("/admin/fleet", headers=bearer(keys.user))
        unload = await http.post("/admin/models/unload", json={"model": OTHER}, headers=bearer(keys.user))
        admin = await http.get("/admin/fleet", headers=bearer(keys.admin))
        probes = [(await http.get(path)).status_code for path in ("/health", "/livez", "/readyz")]
    assert (anonymous.status_code, user.status_code, unload.status_code) == (401, 403, 403)
    assert user.json()["error"]["code"] == "admin_required"
    assert admin.status_code == 200
    assert probes == [200, 200, 200]


async def test_models_lists_only_what_the_key_may_use(tmp_path: Path) -> None:
    async with keyed_gateway(tmp_path) as (keys, _upstream, _app, http):
        narrow = (await http.get("/v1/models", headers=bearer(keys.narrow))).json()["data"]
        everything = (await http.get("/v1/models", headers=bearer(keys.user))).json()["data"]
        refused = await http.get("/v1/models")
    assert [entry["id"] for entry in narrow] == [OTHER]
    assert {entry["id"] for entry in everything} == {MODEL, OTHER, "chat"}
    assert refused.status_code == 401


async def test_a_key_over_its_requests_per_minute_gets_429_with_retry_after(tmp_path: Path) -> None:
    clock = FakeClock()
    keys = write_test_keys(tmp_path / "keys.json")
    async with FakeUpstream() as upstream:
        neuron = relaying_neuron(upstream.base_url, MODEL)
        async with gateway([neuron], CATALOGUE, clock=clock, auth={"keys_file": str(keys.path)}) as (
            _app,
            http,
        ):
            first = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(keys.limited))
            clock.advance(20)
            second = await http.post("/v1/messages", json=MESSAGES, headers=bearer(keys.limited))
            other_key = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(keys.user))
            clock.advance(41)  # the first request has left the one-minute window
            third = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(keys.limited))
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert second.headers["retry-after"] == "40"
    assert other_key.status_code == 200
    assert third.status_code == 200


async def test_the_secret_never_appears_in_logs_metrics_fleet_or_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[bytes] = []
    async with keyed_gateway(tmp_path) as (keys, _upstream, app, http):
        for secret in keys.all():
            for headers in (bearer(secret), {"x-api-key": secret}):
                for path, body in (("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGES)):
                    bodies.append((await http.post(path, json=body, headers=headers)).content)
                bodies.append((await http.get("/admin/fleet", headers=headers)).content)
                bodies.append((await http.get("/v1/models", headers=headers)).content)
        exposition = generate_latest(app.state.metrics.registry).decode()
    captured = caplog.text + exposition + b"".join(bodies).decode() + keys.path.read_text()
    assert 'key="user"' in exposition  # the counters are there, by name
    for secret in keys.all():
        assert secret not in captured
        assert secret[len("cx-12345678-") :] not in captured  # nor its random part alone
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "cortex.access"]
    assert access and all("secret prompt" not in json.dumps(line) for line in access)
    served = next(line for line in access if line["status"] == 200 and line["path"] == "/v1/chat/completions")
    assert (served["key"], served["model"], served["node"]) == ("user", MODEL, "a")
    assert (served["prompt_tokens"], served["completion_tokens"]) == (9, 2)
    assert set(served) >= {"request_id", "ttft_ms", "duration_ms"}


async def test_a_reload_takes_effect_at_once_and_spares_a_running_stream(tmp_path: Path) -> None:
    keys = write_test_keys(tmp_path / "keys.json")
    release = asyncio.Event()
    script = Script(content_type="text/event-stream", chunks=sse_stream(["a", "b", "c"]), gate=(2, release))
    async with FakeUpstream(script) as upstream:
        neuron = relaying_neuron(upstream.base_url, MODEL)
        config = gateway_config([neuron], auth={"keys_file": str(keys.path)})
        client = NeuronClient(AsgiNeuronTransport([neuron]), poll_timeout=2.0)
        app = create_app(config, CATALOGUE, neuron_client=client, clock=FakeClock(), run_poller=False)
        async with on_hypercorn(app) as base_url, aiohttp.ClientSession() as session:
            await app.state.poller.poll_once()
            stream = await session.post(
                base_url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(keys.user)
            )
            assert stream.status == 200
            first = await stream.content.readany()
            assert first.startswith(b"data: ")

            # Revoke the streaming key by rewriting the file, as `cortex keys revoke` does.
            entries = msgspec.json.decode(keys.path.read_bytes(), type=KeysFile).keys
            write_keys(
                keys.path,
                KeysFile(
                    keys=[msgspec.structs.replace(e, revoked=e.name == "user" or e.revoked) for e in entries]
                ),
            )
            assert app.state.keys.refresh()  # what the watcher (or SIGHUP) does
            refused = await session.post(
                base_url + "/v1/chat/completions", json=CHAT, headers=bearer(keys.user)
            )
            assert refused.status == 401
            assert (await refused.json())["error"]["code"] == "revoked_api_key"

            release.set()
            rest = await asyncio.wait_for(stream.read(), PATIENCE_SECS)
    body = first + rest
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"content": "c"' in body and b"error" not in body


async def test_a_broken_keys_file_keeps_the_previous_keys(tmp_path: Path) -> None:
    async with keyed_gateway(tmp_path) as (keys, _upstream, app, http):
        keys.path.write_text("{not json")
        assert not app.state.keys.refresh()
        still = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(keys.user))
    assert still.status_code == 200


async def test_cors_preflight_is_answered_for_configured_origins_only(tmp_path: Path) -> None:
    async with keyed_gateway(tmp_path, cors={"allow_origins": ["https://app.example"]}) as (
        _keys,
        _u,
        _a,
        http,
    ):
        preflight = {
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        }
        allowed = await http.options("/v1/chat/completions", headers=preflight)
        foreign = await http.options(
            "/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"}
        )
        refused = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"origin": "https://app.example"}
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert foreign.status_code == 400
    # A refusal still carries the CORS header, so the browser app can read the 401.
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://app.example"


async def test_without_cors_origins_no_cors_headers_are_sent(tmp_path: Path) -> None:
    async with keyed_gateway(tmp_path) as (keys, _upstream, _app, http):
        response = await http.post(
            "/v1/chat/completions", json=CHAT, headers={**bearer(keys.user), "origin": "https://app.example"}
        )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


async def test_the_sdks_authenticate_and_raise_their_typed_errors(tmp_path: Path) -> None:
    import anthropic
    import openai

    async with keyed_gateway(tmp_path) as (keys, _upstream, app, _http):

        def clients(secret: str) -> tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]:
            return (
                openai.AsyncOpenAI(
                    base_url="http://gateway/v1",
                    api_key=secret,  # sent as Authorization: Bearer
                    max_retries=0,
                    http_client=in_process_client(app),
                ),
                anthropic.AsyncAnthropic(
                    base_url="http://gateway",
                    api_key=secret,  # sent as x-api-key
                    max_retries=0,
                    http_client=in_process_client(app),
                ),
            )

        ask = [{"role": "user", "content": "hi"}]
        oai, claude = clients(keys.user)
        assert (await oai.chat.completions.create(model=MODEL, messages=ask)).choices[0].message.content
        assert (await claude.messages.create(model=MODEL, max_tokens=8, messages=ask)).content
        assert [m.id for m in (await clients(keys.narrow)[0].models.list()).data] == [OTHER]
        cases: list[tuple[str, type[Exception], type[Exception]]] = [
            (keys.revoked, openai.AuthenticationError, anthropic.AuthenticationError),
            (keys.narrow, openai.PermissionDeniedError, anthropic.PermissionDeniedError),
        ]
        for secret, openai_error, anthropic_error in cases:
            oai, claude = clients(secret)
            with pytest.raises(openai_error):
                await oai.chat.completions.create(model=MODEL, messages=ask)
            with pytest.raises(anthropic_error):
                await claude.messages.create(model=MODEL, max_tokens=8, messages=ask)
        oai, claude = clients(keys.limited)
        await oai.chat.completions.create(model=MODEL, messages=ask)
        with pytest.raises(anthropic.RateLimitError):
            await claude.messages.create(model=MODEL, max_tokens=8, messages=ask)
