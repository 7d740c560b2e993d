"""Client dialects the gateway converts itself (the OpenAI ones are relayed byte for byte).

One module per dialect; each exposes `routes(...)` for `create_app` to mount.
"""
