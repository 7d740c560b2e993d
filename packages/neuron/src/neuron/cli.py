"""`neuron serve`: run the daemon on hypercorn until SIGTERM/SIGINT, then drain, unload and exit 0.

The listening socket is bound before the app starts, so the port is reachable (connections
wait in the backlog) while default models load in the background, and a port already in use
is reported at once. On the first signal hypercorn stops accepting and gives in-flight
requests `drain_timeout_secs` to finish, then ends the ones still running with an error
(streams: an error event; cortex_core.drain); the app's shutdown then unloads every model. The
process ends with os._exit so that a thread stuck in a driver call or a download cannot
hold it open (the reference does the same); a second signal exits immediately.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import click

import neuron
from cortex_core.config.loader import ConfigError
from cortex_core.config.neuron import NeuronConfig, load_neuron_config
from cortex_core.drain import FLUSH_SECS

log = logging.getLogger("neuron")

DEFAULT_CONFIG = Path("neuron.toml")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_until_signalled(config: NeuronConfig, sock: socket.socket) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config as HypercornConfig

    from cortex_core.http import SERVER_KEEP_ALIVE_SECS
    from neuron.app import create_app

    app = create_app(config)
    hypercorn_config = HypercornConfig()
    hypercorn_config.bind = [f"fd://{sock.detach()}"]
    # The app's drain ends what still runs at drain_timeout_secs (streams with an error
    # event); hypercorn waits a little longer, so that those last events are written.
    hypercorn_config.graceful_timeout = config.drain_timeout_secs + FLUSH_SECS
    hypercorn_config.accesslog = None
    hypercorn_config.errorlog = logging.getLogger("hypercorn.error")
    hypercorn_config.keep_alive_timeout = SERVER_KEEP_ALIVE_SECS

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.error("second %s: exiting without draining", signal.Signals(signum).name)
            os._exit(1)
        log.info(
            "%s: draining in-flight requests (up to %.0f s), then unloading models",
            signal.Signals(signum).name,
            config.drain_timeout_secs,
        )
        app.state.drain.begin(config.drain_timeout_secs)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await serve(app, hypercorn_config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    log.info("shutdown complete")


@click.group()
@click.version_option(neuron.__version__, prog_name="neuron")
def main() -> None:
    """neuron: the per-GPU-host daemon of cortex (discovery, model lifecycle, torch inference)."""


@main.command()
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="neuron.toml (default: ./neuron.toml when present, else built-in defaults)",
)
@click.option("--host", default=None, help="address to listen on (default: host in neuron.toml, 0.0.0.0)")
@click.option(
    "--port", "-p", type=int, default=None, help="port to listen on (default: port in neuron.toml, 13131)"
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def serve(config_path: Path | None, host: str | None, port: int | None, log_level: str) -> None:
    """Serve the neuron API until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # NVML numbers GPUs by PCI bus; make CUDA (torch) agree, or device 0 could mean two different cards.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    try:
        config = load_neuron_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    host = host or config.host
    port = config.port if port is None else port
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    log.info(
        "neuron %s listening on http://%s:%d (config: %s)",
        neuron.__version__,
        host,
        bound_port,
        config_path or "built-in defaults",
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve_until_signalled(config, sock))
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


@main.command("tp-smoke")
@click.option(
    "--devices", default="0,1", show_default=True, help="comma-separated device indices, one rank each"
)
@click.option(
    "--backend", type=click.Choice(["gloo", "nccl"]), default=None, help="default: nccl with CUDA, else gloo"
)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="seconds for init and the check")
def tp_smoke(devices: str, backend: str | None, timeout: float) -> None:
    """Tensor-parallel diagnostic: spawn the ranks, init, all-reduce sanity; exit code 0 when healthy."""
    from neuron.tp.smoke import parse_devices, run_smoke

    try:
        indices = parse_devices(devices)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--devices") from exc
    sys.exit(run_smoke(indices, backend, timeout_s=timeout, echo=click.echo))
