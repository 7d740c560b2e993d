"""The `cortex` command.

Only click, msgspec and the standard library are imported at start-up: the gateway (and,
through the embedded neuron, torch) are imported inside `serve`, so `cortex status` on a
workstation starts in a fraction of a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from cortex_cli import __version__
from cortex_cli.client import DEFAULT_ENDPOINT, CliError, GatewayClient

ENDPOINT_HELP = f"Gateway URL (default {DEFAULT_ENDPOINT}; env CORTEX_ENDPOINT)."
JSON_HELP = "Print JSON instead of text."

endpoint_option = click.option(
    "-e",
    "--endpoint",
    default=DEFAULT_ENDPOINT,
    envvar="CORTEX_ENDPOINT",
    show_envvar=False,
    help=ENDPOINT_HELP,
)
json_option = click.option("--json", "as_json", is_flag=True, help=JSON_HELP)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


class CortexGroup(click.Group):
    """Turns a CliError into one line on stderr and exit status 1, for every command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CliError as exc:
            click.echo(f"cortex: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=CortexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="cortex", message="%(prog)s %(version)s")
def main() -> None:
    """cortex: one OpenAI- and Anthropic-compatible API over local LLMs on many GPU hosts.

    \b
    Start here:
      cortex serve                      gateway + a local neuron with the embedded
                                        SmolLM2-135M-Instruct, on 127.0.0.1:31313
      cortex serve --model ORG/NAME     the same with another model (hub cache, folder, .gguf)
      cortex serve -c cortex.toml       the gateway in front of the neurons in cortex.toml
      cortex status                     nodes, devices and models of a running gateway
      cortex models load ORG/NAME       ask the gateway to place and load a model
    """


@main.command()
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CORTEX_CONFIG",
    help="cortex.toml: run only the gateway, in front of the neurons it lists. "
    "Without it, a local neuron is started too (the embedded default).",
)
@click.option(
    "-m",
    "--model",
    help="Model for the local neuron: a hub id from the local Hugging Face cache (ORG/NAME), "
    "a model folder or a .gguf file. Default: the embedded SmolLM2-135M-Instruct.",
)
@click.option("--listen", help="API listener HOST:PORT (default 127.0.0.1:31313, or the config's).")
@click.option(
    "--metrics-listen", help="Metrics listener HOST:PORT (default 127.0.0.1:31314, or the config's)."
)
@click.option(
    "--neuron-port",
    type=click.IntRange(0, 65535),
    default=13131,
    show_default=True,
    help="Port of the local neuron on 127.0.0.1 (0: any free port).",
)
@json_option
def serve(
    config: Path | None,
    model: str | None,
    listen: str | None,
    metrics_listen: str | None,
    neuron_port: int,
    as_json: bool,
) -> None:
    """Serve the API (OpenAI and Anthropic dialects) until interrupted.

    Prints where it listens and which model once it is ready (a JSON line with --json).
    """
    if config is not None and model is not None:
        raise click.UsageError("--model starts a local neuron; with --config, list models in models.toml")
    from cortex_cli.serve import ServeOptions, run_serve

    run_serve(
        ServeOptions(
            config=config,
            model=model,
            listen=listen,
            metrics_listen=metrics_listen,
            neuron_port=neuron_port,
            as_json=as_json,
        )
    )


@main.command()
@endpoint_option
@json_option
def status(endpoint: str, as_json: bool) -> None:
    """Show the fleet: nodes and their health, devices and memory, models and their load.

    Exits with status 1 and a one-line reason when the gateway cannot be reached.
    """
    from cortex_cli.status import fetch_fleet, render_status

    fleet = fetch_fleet(GatewayClient(endpoint))
    if as_json:
        emit_json(fleet)
    else:
        click.echo(render_status(fleet, endpoint=endpoint))


@main.group()
def models() -> None:
    """List, load and unload models through the gateway."""


@models.command("list")
@endpoint_option
@json_option
def models_list(endpoint: str, as_json: bool) -> None:
    """Every model the gateway can serve (loaded or not) and where it is loaded."""
    from cortex_cli.status import render_models_list

    listing = GatewayClient(endpoint).get("/v1/models")
    if as_json:
        emit_json(listing)
    else:
        click.echo(render_models_list(listing))


@models.command("load")
@click.argument("model")
@click.option("--node", help="Load on this node (default: wherever the gateway places it).")
@endpoint_option
@json_option
def models_load(model: str, node: str | None, endpoint: str, as_json: bool) -> None:
    """Load MODEL (an id or alias) on a node; waits until it is loaded."""
    # Loads can take minutes (downloads, big checkpoints); the gateway bounds the wait itself.
    _model_action("load", "loaded", model, node, endpoint, as_json, timeout=3600)


@models.command("unload")
@click.argument("model")
@click.option("--node", help="Unload only from this node (default: every node that has it).")
@endpoint_option
@json_option
def models_unload(model: str, node: str | None, endpoint: str, as_json: bool) -> None:
    """Unload MODEL, freeing its memory."""
    _model_action("unload", "unloaded", model, node, endpoint, as_json, timeout=600)


def _model_action(
    action: str, done: str, model: str, node: str | None, endpoint: str, as_json: bool, *, timeout: float
) -> None:
    """POST /admin/models/{action} for MODEL (on NODE, if named) and print what the gateway did."""
    body: dict[str, Any] = {"model": model}
    if node:
        body["node"] = node
    result = GatewayClient(endpoint).post(f"/admin/models/{action}", body, timeout=timeout)
    if as_json:
        emit_json(result)
    else:
        click.echo(_summary(done, model, result))


def _summary(verb: str, model: str, result: Any) -> str:
    nodes: list[str] = []
    if isinstance(result, dict):
        if isinstance(result.get("node"), str):
            nodes = [result["node"]]
        elif isinstance(result.get("nodes"), list):
            nodes = [str(node) for node in result["nodes"]]
    where = f" on {', '.join(nodes)}" if nodes else ""
    return f"{model}: {verb}{where}"


keys_file_option = click.option(
    "-f",
    "--file",
    "keys_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CORTEX_KEYS_FILE",
    help="The keys file (env CORTEX_KEYS_FILE). Default: auth.keys_file of --config.",
)
keys_config_option = click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="CORTEX_CONFIG",
    help="cortex.toml whose auth.keys_file to use (env CORTEX_CONFIG).",
)


def _keys_path(keys_file: Path | None, config: Path | None) -> Path:
    if keys_file is not None:
        return keys_file
    if config is not None:
        from cortex_core.config import ConfigError, load_gateway_config

        try:
            configured = load_gateway_config(config).auth.keys_file
        except ConfigError as exc:
            raise CliError(str(exc)) from exc
        if configured:
            return Path(configured)
        raise CliError(f"{config} sets no auth.keys_file; add one, or pass --file")
    raise CliError("which keys file? pass --file PATH or --config cortex.toml (with auth.keys_file)")


@main.group()
def keys() -> None:
    """Create, list and revoke the gateway's API keys (the gateway reloads the file by itself)."""


@keys.command("create")
@click.argument("name")
@click.option(
    "--models",
    "models_",
    multiple=True,
    help="Model glob the key may use (repeatable; default: every model).",
)
@click.option("--admin", is_flag=True, help="The key may also call /admin/* (cortex models load|unload).")
@click.option("--concurrent", type=click.IntRange(0), default=0, help="Requests at once (0: no limit).")
@click.option("--rpm", type=click.IntRange(0), default=0, help="Requests per minute (0: no limit).")
@click.option("--tpm", type=click.IntRange(0), default=0, help="Tokens per minute (0: no limit).")
@keys_file_option
@keys_config_option
@json_option
def keys_create(
    name: str,
    models_: tuple[str, ...],
    admin: bool,
    concurrent: int,
    rpm: int,
    tpm: int,
    keys_file: Path | None,
    config: Path | None,
    as_json: bool,
) -> None:
    """Create key NAME and print its secret, once: only a hash of it is stored."""
    from cortex_core.keys import KeyLimits, KeysFile, KeysFileError, new_key, read_keys, write_keys

    path = _keys_path(keys_file, config)
    try:
        current = read_keys(path)
    except KeysFileError as exc:
        raise CliError(str(exc)) from exc
    if any(entry.name == name for entry in current.keys):
        raise CliError(f"a key named {name!r} exists already in {path} (revoke it, or pick another name)")
    try:
        entry, secret = new_key(
            name,
            models=list(models_),
            admin=admin,
            limits=KeyLimits(concurrent=concurrent, requests_per_minute=rpm, tokens_per_minute=tpm),
            taken_ids={e.id for e in current.keys},
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    write_keys(path, KeysFile(keys=[*current.keys, entry]))
    if as_json:
        emit_json({"name": name, "key": secret, "models": entry.models, "admin": admin, "file": str(path)})
        return
    click.echo(secret)
    click.echo(f"cortex: key {name!r} written to {path}; this is the only time its secret is shown", err=True)


@keys.command("list")
@keys_file_option
@keys_config_option
@json_option
def keys_list(keys_file: Path | None, config: Path | None, as_json: bool) -> None:
    """The keys in the file: names, models, admin, limits (never secrets; the file has none)."""
    from cortex_core.keys import KeysFileError, read_keys

    path = _keys_path(keys_file, config)
    try:
        current = read_keys(path)
    except KeysFileError as exc:
        raise CliError(str(exc)) from exc
    rows: list[dict[str, Any]] = [
        {
            "name": entry.name,
            "id": entry.id,
            "models": entry.models,
            "admin": entry.admin,
            "revoked": entry.revoked,
            "concurrent": entry.limits.concurrent,
            "requests_per_minute": entry.limits.requests_per_minute,
            "tokens_per_minute": entry.limits.tokens_per_minute,
            "created": entry.created,
        }
        for entry in current.keys
    ]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no keys in {path} (cortex keys create NAME)")
        return
    for row in rows:
        state = "revoked" if row["revoked"] else ("admin" if row["admin"] else "user")
        limits = "/".join(
            str(row[k] or "-") for k in ("concurrent", "requests_per_minute", "tokens_per_minute")
        )
        click.echo(
            f"{row['name']:<20} {row['id']}  {state:<7}  models={','.join(row['models'])}  "
            f"limits(conc/rpm/tpm)={limits}"
        )


@keys.command("revoke")
@click.argument("name")
@keys_file_option
@keys_config_option
def keys_revoke(name: str, keys_file: Path | None, config: Path | None) -> None:
    """Revoke key NAME: the gateway refuses it from its next reload on (requests in flight finish)."""
    import msgspec

    from cortex_core.keys import KeysFile, KeysFileError, read_keys, write_keys

    path = _keys_path(keys_file, config)
    try:
        current = read_keys(path)
    except KeysFileError as exc:
        raise CliError(str(exc)) from exc
    if not any(entry.name == name for entry in current.keys):
        raise CliError(f"no key named {name!r} in {path}")
    revoked = [msgspec.structs.replace(e, revoked=True) if e.name == name else e for e in current.keys]
    write_keys(path, KeysFile(keys=revoked))
    click.echo(f"cortex: key {name!r} revoked in {path}", err=True)


@main.command()
@json_option
def version(as_json: bool) -> None:
    """Versions of cortex and of the packages installed beside it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    packages: dict[str, str | None] = {}
    for name in ("cortex-cli", "cortex-core", "cortex-gateway", "neuron"):
        try:
            packages[name] = installed(name)
        except PackageNotFoundError:
            packages[name] = None
    info = {"cortex": __version__, "python": sys.version.split()[0], "packages": packages}
    if as_json:
        emit_json(info)
        return
    click.echo(f"cortex {__version__} (python {info['python']})")
    for name, found in packages.items():
        click.echo(f"  {name:<15} {found or 'not installed'}")
