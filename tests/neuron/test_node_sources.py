"""Model ids, sources and which files a model needs: pure functions, table-driven."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.fake_hf_cache import REVISION, add_to_hf_cache

from cortex_core.config.neuron import NeuronConfig, SourceConfig
from cortex_core.errors import ApiError
from neuron.sources import (
    HubModelId,
    cached_snapshot,
    choose_gguf,
    default_hf_cache,
    effective_sources,
    gguf_quant_token,
    is_local_path,
    parse_hub_id,
    pick_source,
    plan_files,
    resolve_local,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Qwen/Qwen3-8B", HubModelId("Qwen", "Qwen3-8B")),
        ("helexa:Qwen/Qwen3-8B", HubModelId("Qwen", "Qwen3-8B", "helexa")),
        ("org/name/with/slashes", HubModelId("org", "name/with/slashes")),
    ],
)
def test_parse_hub_id(text: str, expected: HubModelId) -> None:
    assert parse_hub_id(text) == expected
    assert str(parse_hub_id(text)) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty model id"),
        ("justname", "missing the '/'"),
        (":org/name", "empty scheme"),
        ("a/b:org/name", "scheme containing '/'"),
        ("/name", "empty org"),
        ("org/", "empty name"),
        ("s:org/na:me", "name containing ':'"),
    ],
)
def test_parse_hub_id_errors_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_hub_id(text)
    assert caught.value.status == 400
    assert fragment in caught.value.message


@pytest.mark.parametrize(
    ("model_id", "local"),
    [
        ("/models/x", True),
        ("./x", True),
        ("../x", True),
        ("~/x", True),
        ("org/name", False),
        ("s:org/n", False),
    ],
)
def test_paths_are_told_apart_from_hub_ids(model_id: str, local: bool) -> None:
    assert is_local_path(model_id) is local


def test_resolve_local_folder_and_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"GGUF")
    assert resolve_local(str(tmp_path)).gguf_file is None
    gguf = resolve_local(str(tmp_path / "m.Q8_0.gguf"))
    assert (gguf.folder, gguf.gguf_file) == (tmp_path.resolve(), "m.Q8_0.gguf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ApiError) as not_gguf:
        resolve_local(str(tmp_path / "notes.txt"))
    assert not_gguf.value.status == 422
    with pytest.raises(ApiError) as absent:
        resolve_local(str(tmp_path / "nope"))
    assert absent.value.status == 404


@pytest.mark.parametrize(
    ("filename", "token"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "q4_1"),
        ("qwen3-0.6b-q8_0.gguf", "q8_0"),
        ("Qwen3-8B-Q4_K_M.gguf", "q4_k_m"),
        ("sub/dir/model-F16.gguf", "f16"),
    ],
)
def test_gguf_quant_token(filename: str, token: str) -> None:
    assert gguf_quant_token(filename) == token


def test_choose_gguf_matches_quant_and_suggests_the_nearest() -> None:
    files = ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-Q6_K.gguf"]
    assert choose_gguf("o/m", files, "q8_0") == "m-Q8_0.gguf"
    assert choose_gguf("o/m", ["only.gguf"], None) == "only.gguf"
    with pytest.raises(ApiError) as caught:
        choose_gguf("o/m", files, "q6k")
    assert caught.value.status == 422
    assert "did you mean 'q6_k'" in caught.value.message
    with pytest.raises(ApiError) as ambiguous:
        choose_gguf("o/m", files, None)
    assert "choose one with quant" in ambiguous.value.message


SIDECARS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]


@pytest.mark.parametrize(
    ("files", "quant", "sidecars", "weights", "index", "gguf"),
    [
        # single safetensors file; README and extra files are never fetched
        (
            [*SIDECARS, "model.safetensors", "README.md", "onnx/model.onnx"],
            None,
            SIDECARS,
            ["model.safetensors"],
            None,
            None,
        ),
        # sharded: the index is fetched with the small files, shards come from it later
        (
            [
                *SIDECARS,
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "consolidated.safetensors",
            ],
            None,
            [*SIDECARS, "model.safetensors.index.json"],
            [],
            "model.safetensors.index.json",
            None,
        ),
        # GGUF-only repo: the matching file only
        (
            ["config.json", "m-Q4_K_M.gguf", "m-Q8_0.gguf"],
            "Q8_0",
            ["config.json"],
            ["m-Q8_0.gguf"],
            None,
            "m-Q8_0.gguf",
        ),
        # mixed repo with a quant: the GGUF
        (["model.safetensors", "m-Q8_0.gguf"], "q8_0", [], ["m-Q8_0.gguf"], None, "m-Q8_0.gguf"),
        # mixed repo without a quant: the dense weights
        (
            ["config.json", "model.safetensors", "m-Q8_0.gguf"],
            None,
            ["config.json"],
            ["model.safetensors"],
            None,
            None,
        ),
    ],
)
def test_plan_files(
    files: list[str],
    quant: str | None,
    sidecars: list[str],
    weights: list[str],
    index: str | None,
    gguf: str | None,
) -> None:
    plan = plan_files("o/m", files, quant)
    assert sorted(plan.sidecars) == sorted(sidecars)
    assert list(plan.weights) == weights
    assert plan.index_file == index
    assert plan.gguf_file == gguf


@pytest.mark.parametrize(
    ("files", "quant", "code"),
    [
        (["config.json", "tokenizer.json"], None, "no_weights"),
        (["config.json", "model.safetensors"], "q4_k_m", "quant_not_found"),
    ],
)
def test_plan_files_refusals(files: list[str], quant: str | None, code: str) -> None:
    with pytest.raises(ApiError) as caught:
        plan_files("o/m", files, quant)
    assert (caught.value.status, caught.value.code) == (422, code)


@pytest.mark.parametrize(
    ("config_dir", "env", "expected"),
    [
        ("/explicit", {"HF_HUB_CACHE": "/hub", "HF_HOME": "/home"}, "/explicit"),
        (None, {"HF_HUB_CACHE": "/hub", "HF_HOME": "/home"}, "/hub"),
        (None, {"HF_HOME": "/home"}, "/home/hub"),
        (None, {"XDG_CACHE_HOME": "/xdg"}, "/xdg/huggingface/hub"),
    ],
)
def test_hf_cache_follows_the_hub_conventions(
    config_dir: str | None, env: dict[str, str], expected: str
) -> None:
    assert default_hf_cache(config_dir, env) == Path(expected)


def test_effective_sources_synthesise_the_hub_and_read_tokens_from_named_variables() -> None:
    config = NeuronConfig(
        sources={
            "mirror": SourceConfig(
                endpoint="https://mirror.example/", auth_env="MIRROR_TOKEN", cache_dir="/m"
            )
        }
    )
    env = {"HF_HUB_CACHE": "/hub", "MIRROR_TOKEN": "secret", "HF_TOKEN": "hf"}
    sources = effective_sources(config, env)
    assert sources["mirror"].endpoint == "https://mirror.example"
    assert sources["mirror"].token == "secret"
    assert sources["mirror"].cache_dir == Path("/m")
    assert sources["huggingface"].cache_dir == Path("/hub")
    assert sources["huggingface"].token == "hf"
    assert "secret" not in repr(sources["mirror"])
    assert pick_source(parse_hub_id("mirror:o/m"), "huggingface", sources).scheme == "mirror"
    assert pick_source(parse_hub_id("o/m"), "huggingface", sources).scheme == "huggingface"
    with pytest.raises(ApiError) as caught:
        pick_source(parse_hub_id("other:o/m"), "huggingface", sources)
    assert "[sources.other]" in caught.value.message


def test_cached_snapshot_follows_refs_main(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    snapshot = add_to_hf_cache(tmp_path / "cache", "org/name", source)
    assert cached_snapshot(tmp_path / "cache", "org/name") == snapshot
    assert snapshot.name == REVISION
    assert cached_snapshot(tmp_path / "cache", "org/other") is None
