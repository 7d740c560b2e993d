"""`neuron.toml`: the daemon's listener, model sources, default models and engine knobs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec

from cortex_core.config.legacy import translate_neuron
from cortex_core.config.loader import ConfigError, check_request_limits, load_config, resolve_path
from cortex_core.neuron_api import ModelSpec

ENV_PREFIX = "NEURON_"
DEFAULT_PORT = 13131
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SourceConfig(Strict):
    """An operator mirror: `scheme:org/name` ids are fetched from `endpoint`."""

    endpoint: str
    # NAME of the environment variable that holds the bearer token (never the token itself).
    auth_env: str | None = None
    cache_dir: str | None = None


class EngineConfig(Strict):
    # Sequences decoded together in one forward step.
    max_batch_size: int = 8
    # Requests queued beyond the running batch; more are refused with 503 + Retry-After.
    max_queue_depth: int = 64
    # Prompt tokens computed per step at most (one chunk of a long prompt, or several short
    # ones), so running streams wait at most one chunk between tokens.
    prefill_chunk_tokens: int = 512
    # Reuse the K/V of earlier requests' full blocks (reported as cached_tokens).
    prefix_caching: bool = True
    # Positions per K/V block.
    kv_block_size: int = 16
    # The K/V pool: this share of the device memory free once the weights are loaded ...
    kv_cache_fraction: float = 0.5
    # ... and never more than this (GiB).
    kv_cache_max_gib: float = 8.0
    # SSE keep-alive comment interval while a long prompt prefills.
    keepalive_secs: float = 5.0


class VisionConfig(Strict):
    """Images for vision-language models (docs/vision.md)."""

    # Pixels of one image after resizing, capping the checkpoint's own maximum: one huge
    # image cannot exhaust device memory or the context (about max_pixels / 1024 image tokens
    # for Qwen3-VL and Qwen3.5, / 784 for Qwen2.5-VL).
    max_pixels: int = 1 << 20
    # Pixels of one image as sent, read from its header before it is decoded.
    max_source_pixels: int = 50_000_000
    max_images: int = 16
    # Bytes of one image, in a data URI or fetched.
    max_image_bytes: int = 20 << 20
    # http(s) image URLs: off unless set, then only these hosts, never to a non-public address.
    fetch_urls: bool = False
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    fetch_timeout_secs: float = 10.0
    max_redirects: int = 3


class NeuronConfig(Strict):
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    # Hugging Face cache root for the `huggingface` source (default: HF_HUB_CACHE / HF_HOME / ~/.cache).
    cache_dir: str | None = None
    default_source: str = "huggingface"
    sources: dict[str, SourceConfig] = msgspec.field(default_factory=dict)
    default_models: list[ModelSpec] = msgspec.field(default_factory=list)
    # Tensor parallel over gloo on CPU ranks; for tests and diagnostics, never for speed.
    allow_cpu_tensor_parallel: bool = False
    # A tensor-parallel step (any rank) taking longer than this poisons the model instead of hanging it.
    tensor_parallel_step_timeout_secs: float = 120.0
    # Seconds in-flight requests get to finish on SIGTERM before models are unloaded; the
    # ones still running then end with an error (streams: an error event).
    drain_timeout_secs: float = 30.0
    # Local folders and .gguf files load only from inside these directories (besides the
    # Hugging Face caches of the sources, and the paths default_models names); any other
    # path in a load request is refused with 403.
    model_roots: list[str] = msgspec.field(default_factory=list)
    # Request bodies: larger ones get 413; one must arrive within body_read_timeout_secs
    # (408); all bodies being uploaded at once hold at most max_buffered_bytes (503).
    max_body_bytes: int = 64 * 1024 * 1024
    body_read_timeout_secs: float = 60.0
    max_buffered_bytes: int = 512 * 1024 * 1024
    # A conversation larger than this is refused (400) before it is templated or tokenised.
    # Prompt bytes: the conversation's JSON as sent (messages, input, instructions, prompt).
    max_messages: int = 10_000
    max_prompt_bytes: int = 8 * 1024 * 1024
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    vision: VisionConfig = msgspec.field(default_factory=VisionConfig)
    # NAME of the environment variable holding the token the gateway sends (never the token
    # itself). When set, every route but /health, /livez and /metrics requires it.
    token_env: str | None = None


def load_neuron_config(path: Path | None, *, env: Mapping[str, str] | None = None) -> NeuronConfig:
    """Load neuron.toml (None: defaults) with NEURON_* overrides; cache paths resolved to the file's folder."""
    config = load_config(path, NeuronConfig, env_prefix=ENV_PREFIX, env=env, legacy=translate_neuron)
    source = str(path) if path else "environment"
    if not 0 < config.port < 65536:
        raise ConfigError(source, f"expected a TCP port 1-65535, got {config.port}", "port")
    if config.tensor_parallel_step_timeout_secs <= 0:
        raise ConfigError(source, "must be positive", "tensor_parallel_step_timeout_secs")
    check_request_limits(config, source, "")
    engine = config.engine
    for key, value in (
        ("max_batch_size", engine.max_batch_size),
        ("prefill_chunk_tokens", engine.prefill_chunk_tokens),
        ("kv_block_size", engine.kv_block_size),
    ):
        if value < 1:
            raise ConfigError(source, "must be at least 1", f"engine.{key}")
    if not 0 < engine.kv_cache_fraction <= 1:
        raise ConfigError(source, "must be a share of free memory in (0, 1]", "engine.kv_cache_fraction")
    if engine.kv_cache_max_gib <= 0:
        raise ConfigError(source, "must be positive", "engine.kv_cache_max_gib")
    vision = config.vision
    for key, number in (
        ("max_pixels", vision.max_pixels),
        ("max_source_pixels", vision.max_source_pixels),
        ("max_images", vision.max_images),
        ("max_image_bytes", vision.max_image_bytes),
        ("fetch_timeout_secs", vision.fetch_timeout_secs),
    ):
        if number <= 0:
            raise ConfigError(source, "must be positive", f"vision.{key}")
    if vision.max_redirects < 0:
        raise ConfigError(source, "cannot be negative", "vision.max_redirects")
    if vision.fetch_urls and not vision.allowed_hosts:
        raise ConfigError(
            source, "fetch_urls needs at least one host in vision.allowed_hosts", "vision.allowed_hosts"
        )
    for scheme in config.sources:
        if not scheme or "/" in scheme or ":" in scheme:
            raise ConfigError(
                source, f"a source scheme cannot be empty or contain '/' or ':': {scheme!r}", "sources"
            )
    base = path.resolve().parent if path else None
    sources = {
        scheme: msgspec.structs.replace(src, cache_dir=resolve_path(src.cache_dir, base))
        for scheme, src in config.sources.items()
    }
    roots = [resolve_path(root, base) or root for root in config.model_roots]
    return msgspec.structs.replace(
        config, cache_dir=resolve_path(config.cache_dir, base), sources=sources, model_roots=roots
    )
