"""Device owner threads bind their device before any job; dtype by what the card computes in."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from support.fake_nvml import FakeGpu, FakeNvml, cuda_view, mig_slice

from neuron.device import DeviceWorker
from neuron.discovery import HostProbe
from neuron.loader import choose_dtype, gpu_has_bf16, load_checkpoint
from neuron.torch_harness import DevicePool


def test_a_worker_runs_its_start_hook_first_on_its_own_thread() -> None:
    order: list[tuple[str, threading.Thread]] = []
    worker = DeviceWorker("cuda:1", on_start=lambda: order.append(("bound", threading.current_thread())))
    try:
        worker.submit(lambda: order.append(("job", threading.current_thread()))).result(timeout=30)
    finally:
        worker.close(timeout=30)
    assert [what for what, _ in order] == ["bound", "job"]
    assert order[0][1] is order[1][1] is not threading.current_thread()


def test_a_worker_whose_device_cannot_be_bound_runs_nothing() -> None:
    ran: list[str] = []

    def bind() -> None:
        raise RuntimeError("CUDA error: invalid device ordinal")

    worker = DeviceWorker("cuda:7", on_start=bind)
    try:
        for _ in range(2):  # every job, not only the first
            with pytest.raises(RuntimeError, match="could not start") as failed:
                worker.submit(ran.append, "job").result(timeout=30)
            assert "invalid device ordinal" in str(failed.value.__cause__)
    finally:
        worker.close(timeout=30)
    assert ran == []


def test_the_pool_binds_each_device_on_that_device_s_thread() -> None:
    bound: list[tuple[int | None, str]] = []
    pool = DevicePool(bind=lambda device: bound.append((device, threading.current_thread().name)))
    try:
        for device in (1, None, 0, 1):
            pool.worker(device).submit(lambda: None).result(timeout=30)
    finally:
        pool.close()
    assert sorted(bound, key=str) == sorted([(1, "cuda:1"), (None, "cpu"), (0, "cuda:0")], key=str)


@pytest.mark.parametrize(
    ("capability", "bf16"),
    [((6, 1), False), ((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True)],
)
def test_bf16_from_ampere_on(capability: tuple[int, int], bf16: bool) -> None:
    assert gpu_has_bf16(capability) is bf16
    assert choose_dtype(0, "bfloat16", bf16_supported=bf16) == ("bfloat16" if bf16 else "float16")


def test_the_probe_says_which_cards_have_bf16_a_mig_slice_by_its_card() -> None:
    turing = FakeGpu(name="T4", compute_capability=(7, 5))
    ampere = FakeGpu(name="A100", compute_capability=(8, 0), mig_slices=[mig_slice("A100 MIG 1g.10gb", 9984)])
    nvml = FakeNvml(gpus=[turing, ampere])
    probe = HostProbe.open(
        nvml, cuda_uuids=cuda_view(nvml.gpus, f"{ampere.mig_slices[0].uuid},0", "PCI_BUS_ID")
    )
    assert [probe.supports_bf16(i) for i in probe.gpu_indices] == [True, False]


def test_a_gpu_load_goes_straight_to_its_device_and_a_pre_ampere_card_gets_fp16(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    import transformers

    calls: list[dict[str, Any]] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def recording(folder: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        # This host has no GPU: load on the CPU what the neuron asked for cuda:1.
        return real(folder, **{k: v for k, v in kwargs.items() if k != "device_map"})

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)
    checkpoint = load_checkpoint(tiny_qwen3, None, 1)
    assert calls[0]["device_map"] == {"": "cuda:1"}
    assert calls[0]["dtype"] == torch.float16
    assert checkpoint.dtype == "float16"

    calls.clear()
    load_checkpoint(tiny_qwen3, None, None)
    assert "device_map" not in calls[0]  # the CPU: loaded where it is used anyway
