#!/usr/bin/env python3
"""Build the four wheels, and the cortex and helexa-neuron RPMs from them.

    python rpm/build.py wheels [OUTDIR]      # dist/ by default   (nox -s build)
    python rpm/build.py rpms [OUTDIR]        # dist/rpm/ by default (nox -s rpm)

Each RPM installs its application into a private virtual environment under /opt, built at
%build time with no network from a *wheelhouse* tarball (its Source0): our wheels plus the
exact versions of their dependencies that the development environment was tested with
(`pip download --no-deps`, so pip's cache or the configured index provide them). torch and
its CUDA libraries are left out of the neuron's wheelhouse on purpose: the right build
depends on the host's driver (see rpm/README.md). Run it with the interpreter of the dev
environment (.venv/bin/python): the dependency versions are read from it.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
RPM_DIR = ROOT / "rpm"
PACKAGES = ("cortex-core", "cortex-cli", "cortex-gateway", "neuron")
OURS = frozenset(PACKAGES)
# Which of our packages each RPM's virtual environment holds.
RPM_CONTENTS = {
    "cortex": ("cortex-core", "cortex-cli", "cortex-gateway"),
    "helexa-neuron": ("cortex-core", "neuron"),
}
# Installed by the operator for the host's CUDA (or ROCm, or CPU): not in the wheelhouse.
EXCLUDED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
RPM_SOURCES = {
    "cortex": [
        "cortex.service",
        "cortex.sysusers.conf",
        "cortex.firewalld.xml",
        "cortex.toml",
        "models.toml",
    ],
    "helexa-neuron": ["neuron.service", "neuron.sysusers.conf", "helexa-neuron.firewalld.xml", "neuron.toml"],
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(
    roots: Iterable[str],
    requires_of: Callable[[str], list[str]],
    *,
    excluded: re.Pattern[str] = EXCLUDED,
) -> set[str]:
    """Canonical names of every distribution `roots` need (markers evaluated, no extras), roots included.

    Excluded names are dropped together with whatever only they would have pulled in.
    """
    seen: set[str] = set()
    todo = [canonical(root) for root in roots]
    while todo:
        name = todo.pop()
        if name in seen or excluded.match(name):
            continue
        seen.add(name)
        for line in requires_of(name):
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            todo.append(canonical(requirement.name))
    return seen


def installed_requires(name: str) -> list[str]:
    return list(importlib.metadata.requires(name) or [])


def installed_version(name: str) -> str:
    return importlib.metadata.version(name)


def run(*command: str | Path, cwd: Path | None = None) -> None:
    print("+", " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True, cwd=cwd)


def build_wheels(outdir: Path) -> list[Path]:
    """One wheel per package, built without isolation (hatchling comes from the dev environment)."""
    outdir.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        run(
            sys.executable,
            "-m",
            "build",
            "-q",
            "--wheel",
            "--no-isolation",
            "--outdir",
            outdir,
            ROOT / "packages" / package,
        )
    return sorted(outdir.glob("*.whl"))


def version_of(package: str) -> str:
    text = (ROOT / "packages" / package / "src" / package.replace("-", "_") / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if not match:
        raise SystemExit(f"no __version__ in {package}")
    return match.group(1)


def make_wheelhouse(rpm_name: str, wheels: list[Path], workdir: Path) -> Path:
    """A tarball `<rpm>-wheelhouse-<version>.tar` with our wheels and their dependencies' wheels."""
    house = workdir / f"{rpm_name}-wheelhouse"
    house.mkdir(parents=True)
    ours = RPM_CONTENTS[rpm_name]
    for wheel in wheels:
        if canonical(wheel.name.split("-")[0]) in ours:
            shutil.copy2(wheel, house)
    third_party = sorted(dependency_closure(ours, installed_requires) - OURS)
    pins = [f"{name}=={installed_version(name)}" for name in third_party]
    run(
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--dest", house, *pins,
    )  # fmt: skip
    tarball = workdir / f"{rpm_name}-wheelhouse-{version_of('cortex-core')}.tar"
    with tarfile.open(tarball, "w") as tar:
        for wheel in sorted(house.iterdir()):
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
    return tarball


def build_rpms(outdir: Path) -> list[Path]:
    if shutil.which("rpmbuild") is None:
        raise SystemExit(
            "rpmbuild is not installed (Debian/Ubuntu: apt-get install rpm; Fedora: dnf install rpm-build)"
        )
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cortex-rpm-") as tmp:
        work = Path(tmp)
        wheels = build_wheels(work / "dist")
        sources = work / "SOURCES"
        sources.mkdir()
        for rpm_name in RPM_CONTENTS:
            shutil.copy2(make_wheelhouse(rpm_name, wheels, work), sources)
            for name in RPM_SOURCES[rpm_name]:
                shutil.copy2(RPM_DIR / name, sources)
            shutil.copy2(ROOT / "LICENSE", sources)
            run(
                "rpmbuild", "-bb", "--quiet",
                "--define", f"_topdir {work}",
                "--define", f"version {version_of('cortex-core')}",
                # Without it, the venv would bind to whatever python3 is first on PATH.
                "--define", "__python3 /usr/bin/python3",
                RPM_DIR / f"{rpm_name}.spec",
            )  # fmt: skip
        built = sorted((work / "RPMS").rglob("*.rpm"))
        for rpm in built:
            shutil.copy2(rpm, outdir)
        return [outdir / rpm.name for rpm in built]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"wheels", "rpms"}:
        print(__doc__, file=sys.stderr)
        return 2
    default = ROOT / ("dist" if argv[0] == "wheels" else "dist/rpm")
    outdir = Path(argv[1]).resolve() if len(argv) > 1 else default
    built = build_wheels(outdir) if argv[0] == "wheels" else build_rpms(outdir)
    for path in built:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
