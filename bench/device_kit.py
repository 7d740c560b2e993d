"""Pack what the GPU check needs on a GPU machine that reaches no package index.

A lent GPU machine has its own Python with a CUDA build of torch (and transformers, numpy,
pillow, ...) but no network, and takes at most 64 MiB of files along with the working
tree. This packs, into `.device-kit/` (git-ignored, about 45 MB):

- `wheels/`: our four wheels, plus every package they and the CUDA tests need (pytest,
  pytest-asyncio, the SDKs some test modules import) at the exact versions of this dev
  environment, for the machine's Python and platform (`--python-version`, default 3.12).
  Left out: torch and its CUDA libraries (the machine's build is the point), and the large
  compiled packages its image already holds (`IMAGE_HOLDS`).
- `smollm2/`: the embedded SmolLM2's config and tokenizer without its weights; the
  benchmark builds random weights of the same shapes from it (same speed, no 100 MB wheel).

Then, on the machine (the device tool's `run`, carrying `.device-kit`):

    python3 bench/gpu_check.py --kit .device-kit 2>&1 | tee $OUT/gpu_check.log

Run this with the dev environment's interpreter (`.venv/bin/python bench/device_kit.py`):
the versions are read from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

# Run as a script, this file's folder comes first on sys.path, where bench/neuron.py would
# shadow the `neuron` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".device-kit"
# Test tools the CUDA tests' modules import, beside our packages' own dependencies.
TEST_ROOTS = ("pytest", "pytest-asyncio", "openai", "anthropic")
# Large compiled packages the GPU machine's image holds at versions our floors accept;
# carrying them would only spend the 64 MiB.
IMAGE_HOLDS = re.compile(r"^(numpy|pillow|hf-xet)$")
# The model files the benchmark reads besides weights.
SMOLLM2_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
# pip matches a manylinux tag's glibc version exactly: name every one a wheel may carry.
PLATFORMS = [
    *(f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 38, 39)),
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def rpm_build() -> ModuleType:
    """rpm/build.py, which knows how to build our wheels and list what they depend on."""
    spec = importlib.util.spec_from_file_location("rpm_build", ROOT / "rpm" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def third_party_pins(build: ModuleType) -> list[str]:
    excluded = re.compile(f"{build.EXCLUDED.pattern}|{IMAGE_HOLDS.pattern}")
    names = build.dependency_closure(
        [*build.PACKAGES, *TEST_ROOTS], build.installed_requires, excluded=excluded
    )
    return [f"{name}=={build.installed_version(name)}" for name in sorted(names - build.OURS)]


def pack(kit: Path, python_version: str) -> None:
    build = rpm_build()
    if kit.exists():
        shutil.rmtree(kit)
    wheels = kit / "wheels"
    build.build_wheels(wheels)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp", *platforms,
            "--dest", wheels, *third_party_pins(build),
        ],
        check=True,
    )  # fmt: skip
    from neuron.embedded import ensure_embedded_model

    embedded, model = ensure_embedded_model(), kit / "smollm2"
    model.mkdir()
    for name in SMOLLM2_FILES:
        shutil.copy2(embedded / name, model)
    size = sum(path.stat().st_size for path in kit.rglob("*") if path.is_file())
    print(f"{kit}: {len(list(wheels.iterdir()))} wheels and SmolLM2's tokenizer, {size / 2**20:.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=KIT, help="the kit's folder (default: .device-kit)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: 3.12)")
    args = parser.parse_args()
    pack(args.out.resolve(), args.python_version)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
