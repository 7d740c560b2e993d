"""Run the real coding agents against `cortex serve` and report what they got (issue #18).

    .venv/bin/python bench/agents.py          # or: nox -s agents

Not part of the test run (it needs npm and minutes of CPU time). It:

1. finds Claude Code (`@anthropic-ai/claude-code`) and Codex (`@openai/codex`) under
   `--prefix` (default `$CORTEX_AGENTS_PREFIX` or `~/.cache/cortex/agents`), installing them
   with `npm install --prefix` when they are missing;
2. starts `cortex serve --json` with the embedded model on free loopback ports;
3. runs each agent non-interactively (`claude -p`, `codex exec`) in a scratch home and
   project, with a time limit each, configured only as a user would (docs/agents.md);
4. prints, per agent: exit status, time, its answer, and the API requests the gateway
   logged while it ran (request id, route, status, duration).

Claude Code runs twice: as installed (its first request asks for `max_tokens: 32000`, which
the model's window cannot hold, and it retries on cortex's answer in Anthropic's wording),
and with `CLAUDE_CODE_MAX_OUTPUT_TOKENS` set so a small model on a CPU finishes in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

PACKAGES = ("@anthropic-ai/claude-code", "@openai/codex")
PROMPT = "Reply with one short sentence: what is the capital of France?"
# One line per API request, as the gateway logs it (cortex_core.request_id).
REQUEST_LINE = re.compile(r"cortex_gateway\.app: (req_\w+|\S+) (\w+) (/v1/\S+) -> (\S+) in ([\d.]+) ms")


@dataclass
class Run:
    name: str
    command: list[str]
    env: dict[str, str]


@dataclass
class Outcome:
    run: Run
    status: int | str
    seconds: float
    output: str
    requests: list[str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def agent_bins(prefix: Path) -> tuple[Path, Path]:
    """The two CLIs under `prefix`, installed there first if either is missing."""
    bins = prefix / "node_modules" / ".bin"
    claude, codex = bins / "claude", bins / "codex"
    if not (claude.exists() and codex.exists()):
        npm = shutil.which("npm")
        if npm is None:
            sys.exit("agents: npm is needed to install the agents (or pass --prefix with them installed)")
        print(f"agents: installing {' '.join(PACKAGES)} into {prefix}", flush=True)
        subprocess.run([npm, "install", "--prefix", str(prefix), *PACKAGES], check=True)
    if subprocess.run([str(claude), "--version"], capture_output=True).returncode != 0:
        # npm 11 holds back install scripts it was not told to allow; Claude Code's only
        # copies its native binary into place, so run it as its README says.
        package = prefix / "node_modules" / "@anthropic-ai" / "claude-code"
        subprocess.run(["node", "install.cjs"], cwd=package, check=True)
    return claude, codex


def start_cortex(log: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    command = [
        sys.executable,
        "-m",
        "cortex_cli",
        "serve",
        "--json",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--metrics-listen",
        f"127.0.0.1:{free_port()}",
        "--neuron-port",
        "0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    assert process.stdout is not None
    return process, ready_event(process.stdout, process)


def ready_event(stdout: IO[str], process: subprocess.Popen[str]) -> dict[str, Any]:
    for line in stdout:
        if line.startswith("{"):
            event: dict[str, Any] = json.loads(line)
            if event.get("event") == "ready":
                return event
    sys.exit(f"agents: cortex serve exited with {process.wait()} before it was ready")


def runs(claude: Path, codex: Path, api: str, model: str, scratch: Path, max_output_tokens: int) -> list[Run]:
    home = scratch / "home"
    codex_home = scratch / "codex-home"
    codex_home.mkdir(parents=True)
    (codex_home / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "cortex"\n\n'
        f'[model_providers.cortex]\nname = "cortex"\nbase_url = "{api}/v1"\n'
        'wire_api = "responses"\nenv_key = "CORTEX_API_KEY"\n'
    )
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "TERM": "dumb", "NO_COLOR": "1"}
    claude_env = {
        **base,
        "ANTHROPIC_BASE_URL": api,
        "ANTHROPIC_API_KEY": "local",
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    return [
        Run("claude-code (as installed)", [str(claude), "-p", PROMPT], claude_env),
        Run(
            f"claude-code (CLAUDE_CODE_MAX_OUTPUT_TOKENS={max_output_tokens})",
            [str(claude), "-p", PROMPT],
            {**claude_env, "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output_tokens)},
        ),
        Run(
            "codex (exec, Responses API)",
            [str(codex), "exec", "--skip-git-repo-check", PROMPT],
            {**base, "CODEX_HOME": str(codex_home), "CORTEX_API_KEY": "local"},
        ),
    ]


def run_agent(run: Run, project: Path, log: Path, timeout: float) -> Outcome:
    logged = log.read_text(errors="replace").count("\n")
    started = time.monotonic()
    process = subprocess.Popen(
        run.command,
        cwd=project,
        env=run.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so the agent's own children stop with it
    )
    status: int | str
    try:
        output, _ = process.communicate(timeout=timeout)
        status = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate()
        status = f"stopped after {timeout:.0f} s"
    seconds = time.monotonic() - started
    lines = log.read_text(errors="replace").splitlines()[logged:]
    requests = [" ".join(match.groups()) for line in lines if (match := REQUEST_LINE.search(line))]
    return Outcome(run, status, seconds, output.strip(), requests)


def report(outcome: Outcome) -> str:
    answer = "\n".join("    " + line for line in outcome.output.splitlines()[-12:]) or "    (nothing)"
    requests = "\n".join(f"    {line} ms" for line in outcome.requests) or "    (none)"
    return (
        f"## {outcome.run.name}\n"
        f"  exit: {outcome.status}, {outcome.seconds:.0f} s\n"
        f"  output (last lines):\n{answer}\n"
        f"  requests the gateway logged (id, method, route, status, duration):\n{requests}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_prefix = os.environ.get("CORTEX_AGENTS_PREFIX", str(Path.home() / ".cache" / "cortex" / "agents"))
    parser.add_argument("--prefix", type=Path, default=Path(default_prefix), help="npm prefix of the agents")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds each agent may run")
    parser.add_argument("--max-output-tokens", type=int, default=64, help="for the second Claude Code run")
    options = parser.parse_args()

    claude, codex = agent_bins(options.prefix)
    with tempfile.TemporaryDirectory(prefix="cortex-agents-") as tmp:
        scratch = Path(tmp)
        project = scratch / "project"
        project.mkdir()
        (project / "hello.py").write_text("print('hello')\n")
        log = scratch / "cortex.log"
        print("agents: starting cortex serve with the embedded model", flush=True)
        cortex, ready = start_cortex(log)
        try:
            api, model = ready["api"], ready["model"]
            versions = [
                subprocess.run([str(cli), "--version"], capture_output=True, text=True).stdout.strip()
                for cli in (claude, codex)
            ]
            print(f"agents: cortex at {api}, model {model}; {', '.join(versions)}\n", flush=True)
            for run in runs(claude, codex, api, model, scratch, options.max_output_tokens):
                print(report(run_agent(run, project, log, options.timeout)), flush=True)
        finally:
            cortex.send_signal(signal.SIGINT)
            try:
                cortex.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cortex.kill()


if __name__ == "__main__":
    main()
