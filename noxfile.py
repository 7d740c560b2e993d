"""Every developer and CI command is a nox session.

Sessions run inside the environment `python3 dev.py` prepares (`.venv`, all four packages
installed editable with the pinned torch), so they start in seconds instead of each
building a multi-GB virtualenv of its own.
"""

from __future__ import annotations

import os
import sys

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "typecheck", "tests"]

# Tools run through the interpreter nox runs in (.venv), never whatever is first on PATH.
PY = sys.executable
SOURCES = ["packages", "tests", "bench", "rpm", "noxfile.py", "dev.py"]
TEST_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (what CI runs)."""
    session.run(PY, "-m", "pytest", *(session.posargs or ["-q"]), env=TEST_ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.run(PY, "-m", "ruff", "check", *SOURCES)
    session.run(PY, "-m", "ruff", "format", "--check", *SOURCES)


@nox.session
def fmt(session: nox.Session) -> None:
    """Apply ruff's fixes and formatting."""
    session.run(PY, "-m", "ruff", "check", "--fix", *SOURCES)
    session.run(PY, "-m", "ruff", "format", *SOURCES)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the four packages."""
    session.run(PY, "-m", "mypy")


@nox.session
def serve(session: nox.Session) -> None:
    """The main job: gateway + a local neuron on the embedded default model."""
    session.run(
        PY,
        "-m",
        "cortex_cli",
        "serve",
        *session.posargs,
        env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
    )


@nox.session
def build(session: nox.Session) -> None:
    """The four wheels into dist/ (or the folder given: nox -s build -- OUTDIR)."""
    session.run(PY, "rpm/build.py", "wheels", *session.posargs)


@nox.session
def rpm(session: nox.Session) -> None:
    """The cortex and helexa-neuron RPMs into dist/rpm/ (needs rpmbuild; see rpm/README.md)."""
    session.run(PY, "rpm/build.py", "rpms", *session.posargs)


@nox.session
def bench_gateway(session: nox.Session) -> None:
    """Gateway added latency and throughput vs direct and a bare relay (bench/gateway.py)."""
    session.run(PY, "bench/gateway.py", *session.posargs)


@nox.session
def bench_neuron(session: nox.Session) -> None:
    """Engine tok/s and TTFT vs transformers' generate() on SmolLM2-135M (bench/neuron.py)."""
    session.run(PY, "bench/neuron.py", *session.posargs, env=TEST_ENV)


@nox.session
def gpu_check(session: nox.Session) -> None:
    """On a CUDA host: NCCL smoke, CUDA tests and the engine benchmark on the GPU (bench/gpu_check.py)."""
    session.run(PY, "bench/gpu_check.py", *session.posargs, env=TEST_ENV)


@nox.session
def device_kit(session: nox.Session) -> None:
    """Pack .device-kit/ for gpu_check on a GPU machine with no package index (bench/device_kit.py)."""
    session.run(PY, "bench/device_kit.py", *session.posargs)


@nox.session
def agents(session: nox.Session) -> None:
    """Claude Code and Codex, run for real against `cortex serve` (bench/agents.py); not in CI."""
    session.run(PY, "bench/agents.py", *session.posargs)
