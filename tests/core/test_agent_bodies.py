"""The captured agent requests (tests/fixtures/agents) decode and convert as intended.

The replay against a real neuron is in tests/e2e/test_agents_replay.py; here the pure
conversion is pinned: what each agent feature becomes in the internal chat request.
"""

from __future__ import annotations

import msgspec
import pytest
from support.agent_bodies import AgentRequest, agent_request, agent_requests

from cortex_core.anthropic.convert import count_tokens_request_to_chat, messages_request_to_chat
from cortex_core.anthropic.messages import CountTokensRequest, MessagesRequest
from cortex_core.openai.chat import ChatCompletionRequest
from cortex_core.openai.responses import ResponsesRequest
from cortex_core.openai.responses_convert import responses_request_to_chat
from cortex_core.wire import given

CLAUDE_CODE = [request for request in agent_requests("claude-code") if request.body is not None]


def test_every_fixture_is_there() -> None:
    names = {request.name for request in agent_requests()}
    assert names >= {"claude-code-probe", "claude-code-first-turn", "claude-code-retry", "codex-turn"}


def roles(chat: ChatCompletionRequest) -> list[str]:
    return [message["role"] for message in msgspec.to_builtins(chat.messages)]


@pytest.mark.parametrize("request_", CLAUDE_CODE, ids=lambda request: request.name)
def test_claude_code_bodies_convert_with_every_feature_accounted_for(request_: AgentRequest) -> None:
    body = request_.body
    assert body is not None
    chat = messages_request_to_chat(msgspec.convert(body, MessagesRequest))
    # The top-level system blocks and the system-role message mid-conversation become one
    # system message, first (templates refuse one anywhere else).
    assert roles(chat).count("system") == 1 and roles(chat)[0] == "system"
    assert len(roles(chat)) == len([m for m in body["messages"] if m["role"] != "system"]) + 1
    assert [tool.function.name for tool in given(chat.tools) or []] == [
        tool["name"] for tool in body["tools"]
    ]
    assert chat.chat_template_kwargs == {"enable_thinking": True}  # thinking: adaptive
    assert chat.reasoning_effort == body["output_config"]["effort"]
    assert chat.max_tokens == body["max_tokens"] and chat.stream is True
    # context_management, metadata and cache_control have no meaning for a local model.
    encoded = msgspec.json.encode(chat)
    assert b"cache_control" not in encoded and b"context_management" not in encoded

    # count_tokens renders exactly the prompt the request renders.
    counted = count_tokens_request_to_chat(msgspec.convert(body, CountTokensRequest))
    assert counted.messages == chat.messages and counted.tools == chat.tools
    assert counted.chat_template_kwargs == chat.chat_template_kwargs


def test_codex_namespace_and_hosted_tools_are_left_out_function_tools_kept() -> None:
    body = agent_request("codex-turn").body
    assert body is not None
    chat = responses_request_to_chat(msgspec.convert(body, ResponsesRequest))
    offered = [tool["name"] for tool in body["tools"] if tool["type"] == "function"]
    assert {tool["type"] for tool in body["tools"]} == {"function", "namespace", "web_search"}
    assert [tool.function.name for tool in given(chat.tools) or []] == offered
    # Codex's developer messages are instructions: they lead the conversation.
    assert roles(chat)[:2] == ["developer", "developer"]
    assert chat.stream is True and chat.tool_choice == "auto"
