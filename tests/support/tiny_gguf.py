"""A tiny llama GGUF file written with gguf-py from a tiny Hugging Face checkpoint (toolchain.md §3c).

The weights and tokenizer are those of `build_tiny_model(..., "llama")`, so a GGUF load can be
compared with the safetensors one. llama.cpp stores q/k projections permuted for its rotary
layout; transformers undoes that on load, so they are permuted here the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# transformers parameter name (per layer) -> GGUF tensor name.
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _permute(weight: Any, heads: int) -> Any:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(hf_dir: Path, out: Path, *, chat_template: str | None = None) -> Path:
    """Write `out` (a .gguf file, F32 tensors) from the tiny llama checkpoint in `hf_dir`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    added = {item["content"]: item for item in tokenizer.get("added_tokens", [])}
    for content, item in added.items():
        vocab[content] = item["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda pair: pair[1])]
    types = [
        (gguf.TokenType.CONTROL if added[token]["special"] else gguf.TokenType.USER_DEFINED)
        if token in added
        else gguf.TokenType.NORMAL
        for token in tokens
    ]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer["model"]["merges"]]
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    template = chat_template
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)

    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"].astype(np.float32))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"].astype(np.float32))
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in _LAYER_TENSORS.items():
            tensor = weights[f"model.layers.{layer}.{hf_name}"].astype(np.float32)
            if gguf_name == "attn_q.weight":
                tensor = _permute(tensor, heads)
            elif gguf_name == "attn_k.weight":
                tensor = _permute(tensor, kv_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
