"""Config files from the Rust era, for the tests that check they still start.

`SEED_CORTEX_TOML` is the seed README's `cortex.toml`, verbatim. The models.toml and
neuron.toml are written the way the Rust system documents them (harness = "candle",
`[[harnesses]]`, `[harness.candle]` with sources and admission, per-model limit and cost).
"""

from __future__ import annotations

SEED_CORTEX_TOML = """\
# /etc/cortex/cortex.toml
[gateway]
listen = "0.0.0.0:31313"
metrics_listen = "0.0.0.0:31314"

[eviction]
strategy = "lru"        # lru | priority
defrag_after_cycles = 50

[[neurons]]
name = "beast"
endpoint = "http://beast.internal:13131"

[[neurons]]
name = "benjy"
endpoint = "http://benjy.internal:13131"
"""

RUST_MODELS_TOML = """\
[[models]]
id = "Qwen/Qwen3-8B"
harness = "candle"
quant = "q6k"
vram_mb = 9000
min_devices = 1
pinned_on = ["beast"]

[models.limit]
context = 32768
output = 8192

[models.cost]
input = 0.0
output = 0.0

[[models]]
id = "Qwen/Qwen3.6-27B"
harness = "candle"
vram_mb = 30000
min_devices = 2
source = "helexa"

[aliases]
"qwen" = "Qwen/Qwen3-8B"
"""

RUST_NEURON_TOML = """\
port = 13131

[[harnesses]]
name = "candle"

[harness.candle]
hf_cache = "/var/lib/neuron/hf"
default_source = "huggingface"

[harness.candle.sources.helexa]
endpoint = "https://models.helexa.example"
auth_env = "HELEXA_TOKEN"

[harness.candle.admission]
max_in_flight = 8

[[default_models]]
model_id = "Qwen/Qwen3-0.6B-GGUF"
harness = "candle"
quant = "Q4_K_M"
"""
