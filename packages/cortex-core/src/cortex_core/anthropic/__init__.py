"""Anthropic dialect: wire types (`messages`), request/response converters (`convert`) and the
OpenAI-chunk → Anthropic-event stream converter (`stream`)."""
