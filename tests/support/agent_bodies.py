"""Requests captured from real coding agents (tests/fixtures/agents, see its README.md).

Each fixture is one request as the agent sent it — method, path with query, the headers that
matter, body — with the agents' own long texts (system prompts, tool descriptions) replaced
by short placeholders. The shape is the agent's.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "agents"


@dataclass(frozen=True)
class AgentRequest:
    name: str
    agent: str
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None

    def with_body(self, **fields: Any) -> dict[str, Any]:
        """A copy of the body with `fields` set (e.g. the test fleet's model name)."""
        assert self.body is not None, f"{self.name} has no body"
        return {**copy.deepcopy(self.body), **fields}


def agent_request(name: str) -> AgentRequest:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    return AgentRequest(name, data["agent"], data["method"], data["path"], data["headers"], data["body"])


def agent_requests(prefix: str = "") -> list[AgentRequest]:
    return [agent_request(path.stem) for path in sorted(FIXTURES.glob(f"{prefix}*.json"))]
