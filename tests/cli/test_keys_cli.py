"""`cortex keys create|list|revoke`: the secret is printed once, only its hash is stored."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner

from cortex_cli.main import main
from cortex_core.keys import read_keys
from cortex_gateway.auth import KeyRing


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_create_prints_the_secret_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    code, out, err = run(
        "keys", "create", "ci", "--models", "Qwen/*", "--models", "fast", "--rpm", "60", "-f", str(path)
    )
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("cx-") and "only time" in err
    text = path.read_text()
    assert secret not in text and secret[len("cx-12345678-") :] not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [entry] = read_keys(path).keys
    assert (entry.name, entry.models, entry.admin, entry.limits.requests_per_minute) == (
        "ci",
        ["Qwen/*", "fast"],
        False,
        60,
    )
    # The gateway accepts exactly that secret.
    assert KeyRing.of(read_keys(path)).authenticate(secret).name == "ci"


def test_list_revoke_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    assert run("keys", "list", "-f", str(path))[1].startswith("no keys")
    assert run("keys", "create", "ops", "--admin", "-f", str(path))[0] == 0
    assert run("keys", "create", "dev", "-f", str(path))[0] == 0
    code, _out, err = run("keys", "create", "dev", "-f", str(path))
    assert code == 1 and "exists already" in err
    assert run("keys", "create", "bad name", "-f", str(path))[0] == 1
    assert run("keys", "revoke", "dev", "-f", str(path))[0] == 0
    code, _out, err = run("keys", "revoke", "nobody", "-f", str(path))
    assert code == 1 and "no key named" in err
    listed = json.loads(run("keys", "list", "-f", str(path), "--json")[1])
    assert [(row["name"], row["admin"], row["revoked"]) for row in listed] == [
        ("ops", True, False),
        ("dev", False, True),
    ]
    text = run("keys", "list", "-f", str(path))[1]
    assert "ops" in text and "admin" in text and "revoked" in text
    assert all("salt" not in row and "hash" not in row for row in listed)


def test_the_keys_file_comes_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text('[auth]\nkeys_file = "secrets/keys.json"\n')
    code, _out, err = run("keys", "create", "a", "-c", str(config))
    assert code == 0, err
    assert [e.name for e in read_keys(tmp_path / "secrets" / "keys.json").keys] == ["a"]
    bare = tmp_path / "bare.toml"
    bare.write_text("")
    code, _out, err = run("keys", "list", "-c", str(bare))
    assert code == 1 and "sets no auth.keys_file" in err
    code, _out, err = run("keys", "list")
    assert code == 1 and "which keys file" in err


def test_serve_refuses_to_listen_beyond_loopback_without_keys(tmp_path: Path) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text("")
    result = CliRunner().invoke(main, ["serve", "-c", str(config), "--listen", "0.0.0.0:31313"])
    assert result.exit_code == 1
    assert "without API keys" in result.stderr and "allow_anonymous" in result.stderr
