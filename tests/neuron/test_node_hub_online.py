"""The download path against an operator mirror on loopback: exactly the needed files, the token, the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.fake_registry import COMMIT, FakeRegistry, serve_registry

from cortex_core.config.neuron import NeuronConfig, SourceConfig
from cortex_core.errors import ApiError
from cortex_core.neuron_api import ModelSpec
from neuron.discovery import HostProbe
from neuron.manager import ModelManager


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest sets HF_HUB_OFFLINE=1 for every test; this one talks to 127.0.0.1 only.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


async def test_a_mirror_model_is_downloaded_with_its_token_into_its_own_cache(
    online: None, tiny_qwen3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_qwen3, repo)
    (repo / "README.md").write_text("not needed")
    (repo / "pytorch_model.bin").write_bytes(b"legacy weights nobody should fetch")
    registry = FakeRegistry({"tiny-org/tiny-qwen3": repo})
    monkeypatch.setenv("MIRROR_TOKEN", "s3cret")
    cache = tmp_path / "mirror-cache"
    async with serve_registry(registry) as endpoint:
        config = NeuronConfig(
            sources={"mirror": SourceConfig(endpoint=endpoint, auth_env="MIRROR_TOKEN", cache_dir=str(cache))}
        )
        manager = ModelManager(config, HostProbe(None, cuda_unavailable_reason="test"))
        try:
            info = await manager.load(ModelSpec(model_id="mirror:tiny-org/tiny-qwen3"))
            assert info.status == "loaded"
            with pytest.raises(ApiError) as absent:
                await manager.load(ModelSpec(model_id="mirror:tiny-org/absent"))
            assert absent.value.status == 404
            assert "was not found on" in absent.value.message
        finally:
            await manager.close()

    assert registry.downloaded() == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "model.safetensors",
    }
    assert {auth for _, _, auth in registry.requests} == {"Bearer s3cret"}
    snapshot = cache / "models--tiny-org--tiny-qwen3" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_file()
    assert not (snapshot / "README.md").exists()


async def test_download_progress_is_logged_from_the_growing_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import contextlib
    import logging

    from neuron.hub import log_download_progress

    blobs = tmp_path / "models--o--m" / "blobs"
    blobs.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="neuron.hub")
    watcher = asyncio.create_task(
        log_download_progress("o/m", tmp_path / "models--o--m", 4 * 2**20, interval=0.01)
    )
    # The watcher counts bytes that arrive after it started: wait for its first (empty) report.
    for _ in range(200):
        if any("downloading o/m: 0 MiB" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.01)
    (blobs / "abc.incomplete").write_bytes(bytes(2 * 2**20))
    for _ in range(200):
        if any("downloading o/m: 2 MiB of 4 MiB" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.01)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert any("downloading o/m: 2 MiB of 4 MiB" in r.getMessage() for r in caplog.records)
