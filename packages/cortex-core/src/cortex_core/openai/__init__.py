"""OpenAI dialect: wire types (`chat`, `completions`, `responses`) and the Responses ⇄ chat
converters (`responses_convert`, `responses_stream`)."""
