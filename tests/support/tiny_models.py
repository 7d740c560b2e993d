"""Tiny random-weight checkpoints, built offline in a few seconds (toolchain.md §3b).

Each builder writes a complete Hugging Face model folder (config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.jinja) that transformers and the neuron load like a real one. The tokenizer
is a byte-level BPE trained on a small corpus, with the ChatML specials and the reasoning
and tool-call markers of Qwen3 in the vocabulary, so the reasoning and tool parsers can be
exercised by forcing those token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Hello, how are you today? I am fine, thank you for asking.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}',
    "The quick brown fox jumps over the lazy dog while the sea waves roll in.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: < > & ' \" { } [ ] ( ).",
    "Think step by step: first we read, then we reason, then we answer.",
    "Émilie a visité Zürich et São Paulo; 東京 と 北京 も訪れました。🙂",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKER_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# A ChatML template in the style of Qwen3's: system + tools preamble, reasoning history,
# tool calls and tool responses, and the `enable_thinking` switch.
QWEN3_STYLE_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content and loop.last %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}
{%- if message.content %}{{- message.content }}{%- endif %}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- set fn = tool_call.function if tool_call.function else tool_call %}
{{- '\\n<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 16},
    "llama": {"head_dim": 16},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}


def build_tokenizer(chat_template: str = QWEN3_STYLE_TEMPLATE) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens(MARKER_TOKENS)
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_text_config(
    tokenizer: Any, *, layers: int = 2, max_positions: int = 1024, **extra: Any
) -> dict[str, Any]:
    """The shape every tiny model shares (64 wide, 4 heads of which 2 K/V, tied embeddings,
    the test tokenizer's specials), plus the family's own `extra` keys."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": True,
        # The default 0.02 makes greedy decoding repeat one token; 0.2 gives varied output.
        "initializer_range": 0.2,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        **extra,
    }


def build_tiny_model(
    out: Path, model_type: str = "qwen3", *, seed: int = 0, max_positions: int = 1024
) -> Path:
    """Write a tiny random checkpoint of `model_type` into `out` and return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        model_type, **tiny_text_config(tokenizer, max_positions=max_positions, **ARCHITECTURES[model_type])
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Gated DeltaNet layers between full-attention ones, as in Qwen3.5 / Qwen3.6 and Qwen3-Next.
HYBRID_TEXT: dict[str, Any] = {
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    "head_dim": 16,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
}
HYBRID_MOE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
}
# A vision tower as small as the image processor allows (for the checkpoints that have one).
TINY_VISION = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def build_tiny_hybrid(out: Path, model_type: str, *, seed: int = 0, max_positions: int = 1024) -> Path:
    """A tiny random hybrid checkpoint: `qwen3_next` (MoE, text only), or `qwen3_5` /
    `qwen3_5_moe` saved as the real ones are, a vision model around the text one (the neuron
    serves its text part through AutoModelForCausalLM)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    tokenizer = build_tokenizer()
    moe = HYBRID_MOE if model_type in ("qwen3_next", "qwen3_5_moe") else {}
    text = tiny_text_config(tokenizer, layers=4, max_positions=max_positions, **HYBRID_TEXT, **moe)
    torch.manual_seed(seed)
    if model_type == "qwen3_next":
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type, **text), dtype=torch.float32
        )
    else:
        config = AutoConfig.for_model(
            model_type, text_config=text, vision_config=TINY_VISION, tie_word_embeddings=True
        )
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# More families, to show the engine's generic path (transformers' own layers over the paged
# pool) serves them: sliding windows of 8 positions, so short test prompts already slide.
FAMILIES: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 8},
    "gemma3_text": {"sliding_window": 8, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
    "gemma2": {"sliding_window": 8},
    "phi3": {},
    "qwen2": {},
    "olmo2": {},
    "cohere2": {"sliding_window": 8, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
    "gpt_oss": {
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
}


def tiny_family_model(model_type: str, tokenizer: Any, *, seed: int = 0) -> Any:
    """A 4-layer random model of `model_type` (a key of FAMILIES) in memory, for `tokenizer`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, **tiny_text_config(tokenizer, layers=4, head_dim=16, **FAMILIES[model_type])
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# --- vision-language checkpoints ------------------------------------------------------

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The Qwen-VL way to render content parts: an image part becomes its placeholder between
# the vision markers (the neuron expands the placeholder to one token per merged patch).
_VISION_CONTENT = (
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
)
VISION_TEMPLATE = QWEN3_STYLE_TEMPLATE.replace(
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}",
    "{{- '<|im_start|>' + message.role + '\\n' }}" + _VISION_CONTENT + "{{- '<|im_end|>\\n' }}",
)
# Per family: the text model's extra keys and the smallest vision tower the processor allows.
VISION_FAMILIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "qwen3_5": (
        {
            **HYBRID_TEXT,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.5,
            },
        },
        {**TINY_VISION, "depth": 2, "patch_size": 16, "num_position_embeddings": 64},
    ),
    "qwen3_vl": (
        {
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        },
        {
            **TINY_VISION,
            "depth": 2,
            "patch_size": 16,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
    ),
    "qwen2_5_vl": (
        {
            "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        {**TINY_VISION, "fullatt_block_indexes": [0], "window_size": 56},
    ),
}


def build_tiny_vision(out: Path, model_type: str, *, seed: int = 0) -> Path:
    """A tiny random vision-language checkpoint of `model_type` (a key of VISION_FAMILIES)
    saved as the real ones are: weights, a tokenizer with the vision tokens, the image
    processor's preprocessor_config.json and a template that places images."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(VISION_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    text_extra, vision = VISION_FAMILIES[model_type]
    layers = 4 if "layer_types" in text_extra else 2
    config = AutoConfig.for_model(
        model_type,
        text_config=tiny_text_config(tokenizer, layers=layers, **text_extra),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    patch = int(vision["patch_size"])
    unit = patch * int(vision["spatial_merge_size"])
    # Small images stay small: at most 16 merged patches (placeholder tokens) per image.
    processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=unit * unit,
        max_pixels=16 * unit * unit,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out
