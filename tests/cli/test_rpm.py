"""`nox -s rpm`: the cortex and helexa-neuron RPMs, inspected as an operator would.

Needs rpmbuild (Debian/Ubuntu: `apt-get install -y rpm`; Fedora: `dnf install rpm-build`).
Without it this test fails, loudly and with that command: an untested spec is a broken spec.
The build takes ~40 s on two cores and runs once per session.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cortex_core.config import load_catalogue, load_gateway_config, load_neuron_config
from cortex_core.keys import read_keys

ROOT = Path(__file__).resolve().parents[2]
RPM_DIR = ROOT / "rpm"

pytestmark = pytest.mark.slow


def rpm_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install it with `apt-get install -y rpm` (dnf: rpm-build)")
    return path


@pytest.fixture(scope="session")
def rpms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rpm_tool("rpmbuild")
    outdir = tmp_path_factory.mktemp("rpms")
    done = subprocess.run(
        [sys.executable, "-m", "nox", "-f", str(ROOT / "noxfile.py"), "-s", "rpm", "--", str(outdir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = {path.name.rsplit("-", 2)[0]: path for path in outdir.glob("*.rpm")}
    assert sorted(found) == ["cortex", "helexa-neuron"]
    return found


def query(rpm: Path, *args: str) -> list[str]:
    done = subprocess.run(
        [rpm_tool("rpm"), "-qp", *args, str(rpm)], capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


@pytest.fixture(scope="session")
def installed_root(rpms: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both payloads unpacked into one folder, as if installed there."""
    root = tmp_path_factory.mktemp("root")
    for rpm in rpms.values():
        archive = root / (rpm.name + ".tgz")
        with archive.open("wb") as out:
            subprocess.run([rpm_tool("rpm2archive"), "-"], stdin=rpm.open("rb"), stdout=out, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="tar")
        archive.unlink()
    return root


@pytest.mark.parametrize(
    ("package", "expected"),
    [
        (
            "cortex",
            [
                "/usr/bin/cortex",
                "/opt/cortex/bin/cortex",
                "/usr/lib/systemd/system/cortex.service",
                "/usr/lib/sysusers.d/cortex.conf",
                "/usr/lib/firewalld/services/cortex.xml",
                "/etc/cortex/cortex.toml",
                "/etc/cortex/models.toml",
                "/etc/cortex/keys.json",
                "/etc/cortex/fleet-token.env",
            ],
        ),
        (
            "helexa-neuron",
            [
                "/usr/bin/neuron",
                "/opt/helexa-neuron/bin/neuron",
                "/usr/lib/systemd/system/neuron.service",
                "/usr/lib/sysusers.d/neuron.conf",
                "/usr/lib/firewalld/services/helexa-neuron.xml",
                "/etc/neuron/neuron.toml",
                "/etc/neuron/fleet-token.env",
            ],
        ),
    ],
)
def test_files(rpms: dict[str, Path], package: str, expected: list[str]) -> None:
    files = set(query(rpms[package], "-l"))
    assert set(expected) <= files
    configs = set(query(rpms[package], "-c"))
    assert {path for path in expected if path.startswith("/etc/")} == configs


def test_config_files_are_noreplace(rpms: dict[str, Path]) -> None:
    for rpm in rpms.values():
        flags = query(rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]")
        config_flags = [
            line.split()[1] for line in flags if line.startswith("/etc/") and len(line.split()) > 1
        ]
        assert config_flags and all("n" in flag and "c" in flag for flag in config_flags), flags


def test_gateway_venv_has_no_torch_and_the_neuron_venv_leaves_it_to_the_host(rpms: dict[str, Path]) -> None:
    cortex_files = query(rpms["cortex"], "-l")
    assert any("/site-packages/cortex_gateway/app.py" in f for f in cortex_files)
    assert not any("/site-packages/torch/" in f or "/site-packages/neuron/" in f for f in cortex_files)
    neuron_files = query(rpms["helexa-neuron"], "-l")
    assert any("/site-packages/neuron/" in f for f in neuron_files)
    assert any("/site-packages/transformers/" in f for f in neuron_files)
    assert not any("/site-packages/torch/" in f for f in neuron_files)


def test_requires_are_explicit(rpms: dict[str, Path]) -> None:
    for name, rpm in rpms.items():
        requires = query(rpm, "--requires")
        assert any(line.startswith("python(abi) = 3.") for line in requires), requires
        # AutoReqProv is off: the private venv's shared objects are not turned into requires.
        assert not any(".so" in line for line in requires), requires
        provides = query(rpm, "--provides")
        user = "cortex" if name == "cortex" else "neuron"
        assert f"user({user})" in provides


def test_scriptlets_manage_the_units(rpms: dict[str, Path]) -> None:
    for name, unit in (("cortex", "cortex.service"), ("helexa-neuron", "neuron.service")):
        scripts = "\n".join(query(rpms[name], "--scripts"))
        assert f"preset {unit}" in scripts or f"install-system-units {unit}" in scripts  # %systemd_post
        assert f"disable --now {unit}" in scripts or "remove-system-units" in scripts  # %systemd_preun
        assert f"try-restart {unit}" in scripts or "mark-restart-system-units" in scripts  # postun
        assert "systemd-sysusers" in scripts


def test_example_configs_load_with_our_loaders(installed_root: Path) -> None:
    cortex = load_gateway_config(installed_root / "etc/cortex/cortex.toml", env={})
    assert cortex.gateway.listen == "0.0.0.0:31313"
    assert cortex.gateway.metrics_listen == "0.0.0.0:31314"
    assert cortex.neurons and cortex.models_config == str(installed_root / "etc/cortex/models.toml")
    catalogue = load_catalogue(Path(cortex.models_config))
    assert len(catalogue) >= 1
    assert all(catalogue.get(target) for target in catalogue.aliases.values())
    neuron = load_neuron_config(installed_root / "etc/neuron/neuron.toml", env={})
    assert neuron.port == 13131


def test_the_packages_set_up_keys_and_the_fleet_token(rpms: dict[str, Path], installed_root: Path) -> None:
    cortex = load_gateway_config(installed_root / "etc/cortex/cortex.toml", env={})
    neuron = load_neuron_config(installed_root / "etc/neuron/neuron.toml", env={})
    # Listening on 0.0.0.0 is allowed because there are keys, shipped empty (nobody gets in
    # until `cortex keys create`).
    assert cortex.auth.keys_file == str(installed_root / "etc/cortex/keys.json")
    assert read_keys(Path(cortex.auth.keys_file)).keys == []
    assert not cortex.auth.allow_anonymous
    assert cortex.auth.neuron_token_env == neuron.token_env == "CORTEX_FLEET_TOKEN"
    for unit, folder in (("cortex", "cortex"), ("neuron", "neuron")):
        text = (installed_root / f"usr/lib/systemd/system/{unit}.service").read_text()
        assert f"EnvironmentFile=-/etc/{folder}/fleet-token.env" in text
    modes = query(rpms["cortex"], "--qf", "[%{FILENAMES} %{FILEMODES:perms} %{FILEGROUPNAME}\n]")
    assert "/etc/cortex/keys.json -rw-r----- cortex" in modes
    for name, own in (("cortex", "cortex"), ("helexa-neuron", "neuron")):
        scripts = "\n".join(query(rpms[name], "--scripts"))
        assert f"/etc/{own}/fleet-token.env" in scripts and "/dev/urandom" in scripts


def test_firewalld_services(installed_root: Path) -> None:
    cortex = (installed_root / "usr/lib/firewalld/services/cortex.xml").read_text()
    assert 'port="31313"' in cortex and 'port="31314"' in cortex
    neuron = (installed_root / "usr/lib/firewalld/services/helexa-neuron.xml").read_text()
    assert 'port="13131"' in neuron


def test_sysusers(installed_root: Path) -> None:
    for user in ("cortex", "neuron"):
        lines = (installed_root / f"usr/lib/sysusers.d/{user}.conf").read_text().splitlines()
        assert any(line.startswith(f"u {user} ") for line in lines)


def test_units_run_as_their_users_from_the_venv(installed_root: Path) -> None:
    for unit, user, config in (
        ("cortex", "cortex", "/etc/cortex/cortex.toml"),
        ("neuron", "neuron", "/etc/neuron/neuron.toml"),
    ):
        text = (installed_root / f"usr/lib/systemd/system/{unit}.service").read_text()
        assert f"User={user}" in text
        assert f"--config {config}" in text
    assert (installed_root / "usr/bin/cortex").readlink() == Path("/opt/cortex/bin/cortex")
    shebang = (installed_root / "opt/cortex/bin/cortex").read_text().splitlines()[0]
    assert shebang == "#!/opt/cortex/bin/python", (
        "the venv must point at its installed path, not the build root"
    )


def test_installed_cortex_runs(installed_root: Path) -> None:
    # The payload's venv is bound to /opt/cortex; run its code with the same system python.
    python = "/usr/bin/python3"
    if not Path(python).exists():
        pytest.fail("the RPM venv is built on /usr/bin/python3, which is missing here")
    site = next((installed_root / "opt/cortex/lib").glob("python3.*/site-packages"))
    done = subprocess.run(
        [python, "-S", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); "
         "from cortex_cli.main import main; main(['version', '--json'])"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"cortex-gateway": "0.1.0"' in done.stdout


def test_systemd_analyze_verify(installed_root: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not available on this machine")
    # verify resolves dependencies (sysinit.target, ...) inside --root: give it the host's units.
    units = installed_root / "usr/lib/systemd/system"
    for host_unit in Path("/usr/lib/systemd/system").iterdir():
        target = units / host_unit.name
        if not target.exists() and not target.is_symlink():
            if host_unit.is_dir():
                shutil.copytree(host_unit, target, symlinks=True)
            else:
                shutil.copy2(host_unit, target, follow_symlinks=False)
    done = subprocess.run(
        [
            analyze,
            "verify",
            f"--root={installed_root}",
            str(units / "cortex.service"),
            str(units / "neuron.service"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # Unknown keys are only warnings to verify; any output at all means a unit needs fixing.
    assert done.stderr.strip() == "" and done.stdout.strip() == ""
