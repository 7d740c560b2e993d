"""`nox -s build`: the four wheels, with the metadata people install them by."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    outdir = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "nox", "-f", str(ROOT / "noxfile.py"), "-s", "build", "--", str(outdir)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    found = {path.name.split("-")[0].replace("_", "-"): path for path in outdir.glob("*.whl")}
    assert sorted(found) == ["cortex-cli", "cortex-core", "cortex-gateway", "neuron"]
    return found


def read(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(f".dist-info/{suffix}")]
        return archive.read(name).decode()


def metadata(wheel: Path) -> Message:
    return Parser().parsestr(read(wheel, "METADATA"))


def requires(wheel: Path) -> set[str]:
    """Distribution names of the unconditional requirements (no extras)."""
    names = set()
    for line in metadata(wheel).get_all("Requires-Dist") or []:
        if "extra ==" in line:
            continue
        names.add(line.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip())
    return names


def test_console_scripts(wheels: dict[str, Path]) -> None:
    assert "cortex = cortex_cli.main:main" in read(wheels["cortex-cli"], "entry_points.txt")
    assert "neuron = neuron.cli:main" in read(wheels["neuron"], "entry_points.txt")


def test_only_the_neuron_pulls_torch(wheels: dict[str, Path]) -> None:
    assert "torch" in requires(wheels["neuron"])
    for light in ("cortex-cli", "cortex-gateway", "cortex-core"):
        assert not requires(wheels[light]) & {"torch", "transformers", "accelerate"}, light


def test_gateway_install_gives_cortex_serve(wheels: dict[str, Path]) -> None:
    # `pip install cortex-gateway` brings cortex-cli (the `cortex` command) with it; the CLI on
    # its own stays light for workstations.
    assert {"cortex-core", "cortex-cli", "starlette", "hypercorn", "aiohttp"} <= requires(
        wheels["cortex-gateway"]
    )
    assert requires(wheels["cortex-cli"]) == {"cortex-core", "click"}


def test_embedded_extra_names_what_serve_needs(wheels: dict[str, Path]) -> None:
    extras = [
        line for line in metadata(wheels["cortex-cli"]).get_all("Requires-Dist") or [] if "extra ==" in line
    ]
    assert any(line.startswith("cortex-gateway") and "embedded" in line for line in extras)
    assert any(line.startswith("neuron") and "embedded" in line for line in extras)


@pytest.mark.parametrize("package", ["cortex-cli", "cortex-core", "cortex-gateway", "neuron"])
def test_metadata_basics(wheels: dict[str, Path], package: str) -> None:
    meta = metadata(wheels[package])
    assert meta["Name"] == package
    assert meta["Version"] == "0.1.0"
    assert meta["License-Expression"] == "GPL-3.0-or-later"
    assert meta["Requires-Python"] == ">=3.11"
    module = package.replace("-", "_")
    with zipfile.ZipFile(wheels[package]) as archive:
        assert f"{module}/py.typed" in archive.namelist()
