"""Gateway benchmark: latency added over going direct, and throughput, against a fast fake neuron.

    .venv/bin/python bench/gateway.py            # or: nox -s bench_gateway
    .venv/bin/python bench/gateway.py --rounds 2 --requests 150   # quicker

Targets, each a hypercorn server in its own process:
  direct  the fake neuron itself (the baseline)
  relay   a bare Starlette relay (aiohttp client + StreamingResponse): the floor for a Python relay
  proxy   cortex's Proxy behind a minimal Starlette app and a fixed router (the data plane alone)
  cortex  the real gateway app (`create_app`) with a static one-node fleet pointing at the fake
  keyed   the same with a keys file (`[auth] keys_file`), every request carrying a key: the
          added cost of authentication, entitlement and per-key accounting (`--targets
          direct,cortex,keyed` compares them alone)

Each target is measured streaming (20 SSE chunks) and not (one JSON body), with 1 and 32
concurrent clients. Noise from other work on the machine is spread over the targets
alike: with 1 client the requests go to each target in turn; with 32, each round gives
every target a short slice (in rotating order) and the median slice counts. Latency is to
the last byte of the response. Besides wall time, the CPU time the server process spent
per request is reported: on a shared machine it is the steadiest comparison of two relays.

`--pin` puts the load generator and the fake neuron on CPU 0 and the relay under test on
CPU 1, so the relay shares its core with neither (at 1 client the fake and the load
generator take turns anyway). That is the better layout on an idle machine; on a shared
one it is worse — a relay held to one busy core waits for it (measured here: +5.5 ms at
1 client for the bare relay pinned, +0.9 ms not) — so by default the OS places them.

Budgets (DESIGN.md §6): cortex adds ≤ 1.5 ms at p50 with 1 client; at 32 clients it keeps
≥ 0.9× the bare relay's throughput (the goal since the control plane's per-request
bookkeeping became O(1) and the body is validated before placement).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL = "bench/model"
# cortex's req/s at 32 clients, as a share of the bare relay's (DESIGN.md §6).
THROUGHPUT_BUDGET = 0.9
ALIAS = "bench"
STREAM_CHUNKS = 20  # role + 16 tokens + finish + usage + [DONE]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# ---------------------------------------------------------------- the fake neuron (raw ASGI)


def _canned() -> tuple[bytes, list[bytes]]:
    completion = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok " * 16}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28},
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    usage = {"id": "chatcmpl-bench", "choices": [], "usage": completion["usage"]}
    stream = [chunk({"role": "assistant", "content": ""})]
    stream += [chunk({"content": "ok "}) for _ in range(16)]
    stream += [chunk({}, "stop"), b"data: " + json.dumps(usage).encode() + b"\n\n", b"data: [DONE]\n\n"]
    assert len(stream) == STREAM_CHUNKS
    return json.dumps(completion).encode(), stream


def fake_neuron_app(own_url: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Answers inference with canned bodies at once, and the management API with one loaded model."""
    completion, stream = _canned()
    management = {
        "/discovery": {
            "hostname": "bench",
            "os": "linux",
            "kernel": "bench",
            "devices": [],
            "harnesses": ["torch"],
        },
        "/models": [{"id": MODEL, "harness": "torch", "status": "loaded", "capabilities": ["chat"]}],
        "/health": {"uptime_secs": 1.0, "models": [{"id": MODEL}]},
        f"/models/{MODEL}/endpoint": {"url": own_url},
        "/version": {"name": "fake-neuron", "version": "0", "python": sys.version.split()[0]},
    }
    answers = {path: json.dumps(body).encode() for path, body in management.items()}
    json_start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(completion)).encode()),
        ],
    }
    sse_start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
    }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if scope["method"] == "POST" and path.startswith("/v1/"):
            if b'"stream":true' in body or b'"stream": true' in body:
                await send(sse_start)
                for piece in stream:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                await send(json_start)
                await send({"type": "http.response.body", "body": completion})
            return
        answer = answers.get(path)
        status = 200 if answer is not None else 404
        answer = answer if answer is not None else b'{"error":"not found"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    return app


# ---------------------------------------------------------------- the relays under test


def bare_relay_app(upstream: str) -> Any:
    """The floor: what a minimal Starlette relay on aiohttp does, and nothing more."""
    import aiohttp
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    state: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["session"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        yield
        await state["session"].close()

    async def relay(request: Request) -> StreamingResponse:
        body = await request.body()
        response = await state["session"].post(
            upstream + request.url.path, data=body, headers={"content-type": "application/json"}
        )

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.content.iter_any():
                    yield chunk
            finally:
                response.release()

        return StreamingResponse(
            chunks(), status_code=response.status, media_type=response.headers.get("content-type")
        )

    return Starlette(routes=[Route("/v1/chat/completions", relay, methods=["POST"])], lifespan=lifespan)


def proxy_only_app(upstream: str) -> Any:
    """cortex's Proxy with a fixed one-replica router: the data plane without the control plane.

    The proxy tests' own relay app (tests/support); the benchmark runs from the checkout.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.fake_upstream import relay_app
    from support.fixed_router import FixedRouter

    from cortex_gateway.lease import Upstream

    return relay_app(FixedRouter({MODEL: [Upstream("bench", upstream, MODEL)]}, {ALIAS: MODEL}))


def cortex_app(upstream: str, workdir: Path, keys_file: str | None = None) -> Any:
    """The real gateway from its factory, with cortex.toml/models.toml naming one neuron and one model."""
    from cortex_core.config import load_catalogue, load_gateway_config
    from cortex_gateway.app import create_app

    (workdir / "models.toml").write_text(
        f'[[models]]\nid = "{MODEL}"\nvram_mb = 1\n\n[aliases]\n{ALIAS} = "{MODEL}"\n', encoding="utf-8"
    )
    auth = f'[auth]\nkeys_file = "{keys_file}"\n\n' if keys_file else ""
    (workdir / "cortex.toml").write_text(
        'models_config = "models.toml"\n\n[poller]\ninterval_secs = 1.0\n\n'
        f'{auth}[[neurons]]\nname = "bench"\nendpoint = "{upstream}"\n',
        encoding="utf-8",
    )
    config = load_gateway_config(workdir / "cortex.toml")
    assert config.models_config is not None
    return create_app(config, load_catalogue(Path(config.models_config)))


def serve_role(role: str, port: int, upstream: str, cpu: int | None, keys_file: str | None) -> None:
    """Child process: serve one target on 127.0.0.1:port until killed."""
    import logging

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        if role == "direct":
            app = fake_neuron_app(f"http://127.0.0.1:{port}")
        elif role == "relay":
            app = bare_relay_app(upstream)
        elif role == "proxy":
            app = proxy_only_app(upstream)
        elif role == "cortex":
            app = cortex_app(upstream, Path(tmp))
        elif role == "keyed":
            app = cortex_app(upstream, Path(tmp), keys_file)
        else:
            raise SystemExit(f"unknown role {role!r}")
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        config.loglevel = "WARNING"
        config.keep_alive_timeout = 60
        asyncio.run(serve(app, config))


# ---------------------------------------------------------------- the load generator


@dataclass
class Cell:
    latencies: list[float] = field(default_factory=list)
    throughputs: list[float] = field(default_factory=list)
    failures: int = 0
    # CPU time of the server process under test (all threads), and the requests it served.
    cpu_ns: int = 0
    cpu_requests: int = 0

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_ns / self.cpu_requests / 1000.0 if self.cpu_requests else float("nan")

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0

    @property
    def throughput(self) -> float:
        return statistics.median(self.throughputs)


def request_body(stream: bool, model: str) -> bytes:
    return json.dumps(
        {
            "model": model,
            "stream": stream,
            "messages": [{"role": "user", "content": "Say ok sixteen times."}],
        },
        separators=(",", ":"),
    ).encode()


class Client:
    """One pooled aiohttp session per target, kept for the whole run (warm connections)."""

    def __init__(self, url: str, max_clients: int, api_key: str | None = None) -> None:
        import aiohttp

        self.url = url
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_clients))
        self.headers = {**JSON, "authorization": f"Bearer {api_key}"} if api_key else JSON

    async def one(self, body: bytes) -> float | None:
        t0 = time.perf_counter()
        async with self.session.post(self.url, data=body, headers=self.headers) as response:
            await response.read()
            ok = response.status == 200
        return time.perf_counter() - t0 if ok else None


JSON = {"content-type": "application/json"}


async def paired_latency(
    clients: dict[str, Client], bodies: dict[str, bytes], requests: int, cells: dict[str, Cell]
) -> None:
    """One client: requests go to each target in turn, so a noisy moment hits them all alike."""
    names = list(clients)
    elapsed = dict.fromkeys(names, 0.0)
    for i in range(requests):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            latency = await clients[name].one(bodies[name])
            if latency is None:
                cells[name].failures += 1
            else:
                cells[name].latencies.append(latency)
                elapsed[name] += latency
    for name in names:
        cells[name].throughputs.append(requests / elapsed[name] if elapsed[name] else 0.0)


async def saturate(
    client: Client, body: bytes, concurrency: int, requests: int, seconds: float, cell: Cell
) -> None:
    """`concurrency` clients back to back for a bounded count and time; records req/s."""
    remaining = requests
    deadline = time.perf_counter() + seconds
    samples: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            latency = await client.one(body)
            if latency is None:
                cell.failures += 1
            else:
                samples.append(latency)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cell.throughputs.append(len(samples) / (time.perf_counter() - started))
    cell.latencies.extend(samples)


def cpu_ns(pid: int) -> int:
    """CPU time a process has run, in ns, from the scheduler's per-thread accounting.

    Wall-clock latency on a shared 2-core machine moves with whatever else runs; the CPU a
    server spends per request does not, so it is the steadier way to compare relays.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_ready(url: str, body: bytes, api_key: str | None = None, patience_secs: float = 60.0) -> None:
    import aiohttp

    deadline = time.monotonic() + patience_secs
    headers = {**JSON, "authorization": f"Bearer {api_key}"} if api_key else JSON
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        return
                    reason = f"HTTP {response.status}"
            except aiohttp.ClientError as exc:
                reason = str(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready after {patience_secs:g} s: {reason}")
            await asyncio.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=300,
        help="1 client: requests per target and round; 32: 4x that (default 300)",
    )
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="time cap of a 32-client slice (default 1)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--targets", default="direct,relay,proxy,cortex,keyed")
    parser.add_argument("--pin", action="store_true", help="pin processes to CPUs (see above)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keys-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        serve_role(args.role, args.port, args.upstream, args.cpu, args.keys_file)
        return
    pin = args.pin and len(os.sched_getaffinity(0)) >= 2
    if pin:
        os.sched_setaffinity(0, {0})
    targets = args.targets.split(",")
    ports = {target: free_port() for target in targets}
    direct = f"http://127.0.0.1:{ports['direct']}"
    processes: dict[str, subprocess.Popen[bytes]] = {}
    keys_dir = tempfile.TemporaryDirectory()
    keys_file, api_key = bench_key(Path(keys_dir.name))
    try:
        for target in targets:
            command = [
                sys.executable,
                __file__,
                "--role",
                target,
                "--port",
                str(ports[target]),
                "--upstream",
                direct,
            ]
            if pin:
                command += ["--cpu", "0" if target == "direct" else "1"]
            if target == "keyed":
                command += ["--keys-file", str(keys_file)]
            processes[target] = subprocess.Popen(command)
        asyncio.run(run(args, targets, ports, {t: p.pid for t, p in processes.items()}, pin, api_key))
    finally:
        keys_dir.cleanup()
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def bench_key(folder: Path) -> tuple[Path, str]:
    """A keys file with one key (allowed every model, no limits) and its secret."""
    from cortex_core.keys import KeysFile, new_key, write_keys

    entry, secret = new_key("bench")
    path = folder / "keys.json"
    write_keys(path, KeysFile(keys=[entry]))
    return path, secret


async def run(
    args: argparse.Namespace,
    targets: list[str],
    ports: dict[str, int],
    pids: dict[str, int],
    pin: bool,
    api_key: str,
) -> None:
    clients_list = [int(c) for c in args.clients.split(",")]
    usable = []
    for target in targets:
        url = f"http://127.0.0.1:{ports[target]}/v1/chat/completions"
        try:
            await wait_ready(
                url, request_body(False, model_for(target)), api_key if target == "keyed" else None
            )
            usable.append(target)
        except RuntimeError as exc:
            print(f"skipping {target}: {exc}", file=sys.stderr)
    cells: dict[tuple[str, bool, int], Cell] = {}
    clients = {
        t: Client(
            f"http://127.0.0.1:{ports[t]}/v1/chat/completions",
            max(clients_list),
            api_key if t == "keyed" else None,
        )
        for t in usable
    }
    try:
        for round_index in range(args.rounds):
            for stream in (False, True):
                bodies = {t: request_body(stream, model_for(t)) for t in usable}
                for concurrency in clients_list:
                    row = {t: cells.setdefault((t, stream, concurrency), Cell()) for t in usable}
                    if round_index == 0:  # warm-up: connections open, code paths hot
                        for t in usable:
                            await saturate(clients[t], bodies[t], concurrency, 4 * concurrency, 5.0, Cell())
                    if concurrency == 1:
                        before = {t: cpu_ns(pids[t]) for t in usable}
                        await paired_latency(clients, bodies, args.requests, row)
                        for t in usable:
                            row[t].cpu_ns += cpu_ns(pids[t]) - before[t]
                            # The fake neuron served every target's requests in this phase.
                            row[t].cpu_requests += args.requests * (len(usable) if t == "direct" else 1)
                        continue
                    shift = round_index % len(usable)
                    for t in usable[shift:] + usable[:shift]:
                        before_ns, served = cpu_ns(pids[t]), len(row[t].latencies)
                        await saturate(
                            clients[t], bodies[t], concurrency, args.requests * 4, args.seconds, row[t]
                        )
                        row[t].cpu_ns += cpu_ns(pids[t]) - before_ns
                        row[t].cpu_requests += len(row[t].latencies) - served
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for client in clients.values():
            await client.session.close()
    report(cells, usable, clients_list, pin)


def model_for(target: str) -> str:
    # The gateways are asked for the alias: the model rewrite is on the measured path.
    return ALIAS if target in ("proxy", "cortex", "keyed") else MODEL


def report(
    cells: dict[tuple[str, bool, int], Cell], targets: list[str], clients_list: list[int], pin: bool
) -> None:
    cpus = "load generator and fake neuron on CPU 0, relays on CPU 1" if pin else "not pinned"
    print(f"\ngateway benchmark ({os.cpu_count()} CPUs, {cpus}, load average {os.getloadavg()[0]:.1f})")
    print("latency to the last byte in ms; +: over direct; cpu: the server process's CPU per request")
    header = (
        f"{'mode':<7}{'clients':>8}  {'target':<8}{'p50':>8}{'p99':>8}{'+p50':>8}{'+p99':>8}"
        f"{'req/s':>8}{'vs relay':>9}{'cpu us':>8}{'vs relay':>9}"
    )
    print(header)
    print("-" * len(header))
    blank = ""
    for stream in (False, True):
        for clients in clients_list:
            base = cells.get(("direct", stream, clients))
            relay = cells.get(("relay", stream, clients))
            for target in targets:
                cell = cells[(target, stream, clients)]
                compare = base is not None and target != "direct"
                against_relay = relay is not None and target not in ("relay", "direct")
                added50 = f"{cell.pct(0.5) - base.pct(0.5):8.2f}" if compare and base else f"{blank:>8}"
                added99 = f"{cell.pct(0.99) - base.pct(0.99):8.2f}" if compare and base else f"{blank:>8}"
                rps = (
                    f"{cell.throughput / relay.throughput:8.2f}x"
                    if against_relay and relay
                    else f"{blank:>9}"
                )
                cpu = (
                    f"{cell.cpu_us_per_request / relay.cpu_us_per_request:8.2f}x"
                    if against_relay and relay
                    else f"{blank:>9}"
                )
                failed = f"  ({cell.failures} failed)" if cell.failures else ""
                print(
                    f"{'stream' if stream else 'json':<7}{clients:>8}  {target:<8}"
                    f"{cell.pct(0.5):8.2f}{cell.pct(0.99):8.2f}{added50}{added99}"
                    f"{cell.throughput:8.0f}{rps}{cell.cpu_us_per_request:8.0f}{cpu}{failed}"
                )
            print()
    for text, ok in verdicts(cells, targets, clients_list):
        print(("PASS  " if ok else "FAIL  ") + text)


def verdicts(
    cells: dict[tuple[str, bool, int], Cell], targets: list[str], clients_list: list[int]
) -> list[tuple[str, bool]]:
    found = []
    for stream in (False, True):
        mode = "stream" if stream else "json"
        if 1 in clients_list and {"cortex", "keyed"} <= set(targets):
            added = cells[("keyed", stream, 1)].pct(0.5) - cells[("cortex", stream, 1)].pct(0.5)
            found.append(
                (f"keyed {mode}: {added:+.2f} ms p50 over cortex at 1 client (budget 0.2)", added <= 0.2)
            )
        for target in ("cortex", "proxy"):
            if target not in targets:
                continue
            if 1 in clients_list and "direct" in targets:
                added = cells[(target, stream, 1)].pct(0.5) - cells[("direct", stream, 1)].pct(0.5)
                found.append((f"{target} {mode}: +{added:.2f} ms p50 at 1 client (budget 1.5)", added <= 1.5))
            if 32 in clients_list and "relay" in targets:
                ratio = cells[(target, stream, 32)].throughput / cells[("relay", stream, 32)].throughput
                found.append(
                    (
                        f"{target} {mode}: {ratio:.2f}x the bare relay's req/s at 32 clients (budget 0.9)",
                        ratio >= THROUGHPUT_BUDGET,
                    )
                )
    return found


if __name__ == "__main__":
    main()
