"""The GPU check: what only a CUDA host can tell, in one run of under 8 minutes on one GPU.

1. NCCL tensor-parallel smoke at world size 1 (`neuron tp-smoke --backend nccl`).
2. The CUDA tests (`pytest -m cuda`, run with -s so their figures reach this log): greedy
   parity with generate() on the GPU, bf16 logits against the HF forward, the memory given
   back when an engine closes and across load -> generate -> unload -> load (figures after
   each phase), the batched sampler against row by row (at most one synchronisation), a
   profile of one decode step of 8, a forced out-of-memory step then a normal request, and
   the NCCL runner against a single-device one.
3. The engine benchmark on CUDA (basic, mixed, arrival), for SmolLM2-135M and for a
   random-weight 1.2B Llama-shaped model built from a config (realistic speed, no download).

    nox -s gpu_check                  # in the dev environment, with a CUDA build of torch
    python3 bench/gpu_check.py        # any Python whose torch sees a GPU and that has the
                                      # neuron's dependencies; the packages' sources are
                                      # put on PYTHONPATH here
    python3 bench/gpu_check.py --kit .device-kit
                                      # a GPU machine with no package index: the kit's
                                      # wheels (bench/device_kit.py) are installed into a
                                      # temporary folder first, and the benchmark builds
                                      # SmolLM2 with random weights from the kit's config

Every step runs even when one before it failed; the exit status is 1 if any failed.
`--steps` runs some of them again (by number: `--steps 2,3`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    ROOT / "packages" / name / "src" for name in ("cortex-core", "neuron", "cortex-gateway", "cortex-cli")
]


def steps(python: str, model_folder: Path | None) -> list[tuple[str, list[str], float]]:
    bench = [python, str(ROOT / "bench" / "neuron.py"), "--device", "cuda", "--repeats", "1"]
    if model_folder is not None:
        bench += ["--model-folder", str(model_folder)]
    return [
        ("NCCL smoke", [python, "-m", "neuron.tp.smoke", "--devices", "0", "--backend", "nccl"], 60),
        (
            "CUDA tests",
            # Plugins named, not discovered: a GPU image's own pytest plugins may not load
            # beside the kit's pytest.
            [
                python,
                "-m",
                "pytest",
                "-q",
                "-s",
                "-m",
                "cuda",
                "-p",
                "no:cacheprovider",
                "-p",
                "pytest_asyncio.plugin",
                "tests/neuron",
            ],
            240,
        ),
        ("bench SmolLM2", [*bench, "--scenarios", "basic,mixed,arrival"], 120),
        (
            "bench Llama 1.2B random",
            [*bench, "--model", "llama-1b-random", "--scenarios", "basic,mixed,arrival"],
            120,
        ),
    ]


def install_kit(kit: Path, target: Path) -> None:
    """The kit's wheels into `target`, which then comes first on the steps' PYTHONPATH (so
    its versions win over the image's), without an index or dependency resolution: the kit
    holds the exact set."""
    wheels = sorted(str(path) for path in (kit / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: no wheels in {kit / 'wheels'}; pack them with bench/device_kit.py")
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--disable-pip-version-check", "--target", str(target), *wheels],
        check=True,
    )  # fmt: skip
    print(f"kit: {len(wheels)} wheels installed in {time.monotonic() - started:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kit", type=Path, help="a folder packed by bench/device_kit.py")
    parser.add_argument("--steps", help="comma-separated step numbers to run (default: all)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here; run it on a GPU host", file=sys.stderr)
        return 2
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
        f"{torch.cuda.mem_get_info(0)[1] / 2**30:.0f} GiB",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if args.kit is not None:
            site = Path(tmp) / "site"
            install_kit(args.kit.resolve(), site)
            # Our packages come from the kit's wheels, as a user installs them.
            paths = [str(site)]
            model_folder: Path | None = args.kit.resolve() / "smollm2"
        else:
            paths = list(map(str, SOURCES))
            model_folder = None
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        }
        every = steps(sys.executable, model_folder)
        chosen = [int(n) for n in args.steps.split(",")] if args.steps else range(1, len(every) + 1)
        return run_steps([every[n - 1] for n in chosen], env)


def run_steps(chosen: list[tuple[str, list[str], float]], env: dict[str, str]) -> int:
    failed: list[str] = []
    for name, command, timeout in chosen:
        print(f"\n=== {name}: {' '.join(command)}", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = -1
            print(f"=== {name}: timed out after {timeout:.0f} s", flush=True)
        print(f"=== {name}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    print(f"\ngpu_check: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
