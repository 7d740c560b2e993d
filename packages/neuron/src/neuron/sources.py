"""Where a model's files come from: hub repositories, operator mirrors, local folders, `.gguf` files.

A model id is one of
  * `org/name`            - a repository on the default source (the Hugging Face hub unless
                            neuron.toml says otherwise), fetched through huggingface-hub into
                            its cache (`HF_HUB_CACHE` / `HF_HOME` conventions, offline honoured);
  * `scheme:org/name`     - a repository on the operator mirror `[sources.<scheme>]`;
  * `/path/to/folder`     - a local Hugging Face folder (also `./`, `../`, `~/`);
  * `/path/to/file.gguf`  - a local GGUF file, dequantised by transformers on load.

Deciding which files a model needs is a pure function of the repository listing
(`plan_files`), so it is table-tested; fetching is the side effect at the edge. Only those
files are downloaded: config, generation config, tokenizer files, the three chat-template
carriers, and the weights (every shard named by the index, or the one GGUF that matches
`quant`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cortex_core.config.neuron import DEFAULT_HF_ENDPOINT, NeuronConfig
from cortex_core.errors import ApiError
from cortex_core.limits import echoed

log = logging.getLogger(__name__)

HUGGINGFACE = "huggingface"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
# Small files a model may need besides weights; absent ones are simply skipped.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_PATH_PREFIXES = ("/", "./", "../", "~")


# --- model ids ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubModelId:
    """`[scheme:]org/name`; `scheme` is None when the caller left it to the default source."""

    org: str
    name: str
    scheme: str | None = None

    @property
    def repo_id(self) -> str:
        return f"{self.org}/{self.name}"

    def __str__(self) -> str:
        return f"{self.scheme}:{self.repo_id}" if self.scheme else self.repo_id


def parse_hub_id(text: str) -> HubModelId:
    """Parse `[scheme:]org/name` (the scheme is split at the first ':', org at the first '/')."""

    def bad(problem: str) -> ApiError:
        return ApiError(400, problem, code="invalid_model_id", param="model_id")

    if not text:
        raise bad("empty model id")
    scheme: str | None = None
    rest = text
    if ":" in text:
        scheme, rest = text.split(":", 1)
        if not scheme:
            raise bad(f"model id '{text}' has an empty scheme before ':'")
        if "/" in scheme:
            raise bad(f"model id '{text}' has a scheme containing '/' which is reserved for org/name")
    if "/" not in rest:
        raise bad(
            f"model id '{text}' is missing the '/' between org and name "
            "(use org/name, scheme:org/name, an absolute folder path or a .gguf file path)"
        )
    org, name = rest.split("/", 1)
    if not org:
        raise bad(f"model id '{text}' has an empty org")
    if not name:
        raise bad(f"model id '{text}' has an empty name")
    if ":" in name:
        raise bad(f"model id '{text}' has a name containing ':' which is reserved for the scheme prefix")
    return HubModelId(org=org, name=name, scheme=scheme)


@dataclass(frozen=True)
class LocalModel:
    """A folder on this host; `gguf_file` names the GGUF inside it when the id was a .gguf path."""

    folder: Path
    gguf_file: str | None = None


def is_local_path(model_id: str) -> bool:
    return model_id.startswith(_PATH_PREFIXES)


def allowed_roots(config: NeuronConfig, sources: Mapping[str, HubSource]) -> tuple[Path, ...]:
    """Where local models may be loaded from: the sources' caches, `model_roots`, and the
    local paths `default_models` names (the operator wrote those). Symlinks resolved."""
    named = [spec.model_id for spec in config.default_models if is_local_path(spec.model_id)]
    candidates: list[str | Path] = [*(s.cache_dir for s in sources.values()), *config.model_roots, *named]
    return tuple(Path(os.path.realpath(Path(root).expanduser())) for root in candidates)


def confine_local(model_id: str, roots: Iterable[Path]) -> None:
    """Refuse (403) a local path outside every allowed root, before anything there is read.

    The load API is reachable from the gateway's admin routes: without this, a request
    could make the neuron open any file it can read. The refusal names the rule, never
    what is (or is not) at the path.
    """
    path = Path(os.path.realpath(Path(model_id).expanduser()))
    if any(path == root or path.is_relative_to(root) for root in roots):
        return
    raise ApiError(
        403,
        f"model '{echoed(model_id)}' is a local path outside the directories this neuron loads "
        "models from (the Hugging Face cache and model_roots in neuron.toml)",
        type="permission_error",
        code="model_path_forbidden",
        param="model_id",
    )


def resolve_local(model_id: str) -> LocalModel:
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return LocalModel(folder=path.parent.resolve(), gguf_file=path.name)
    if path.is_dir():
        return LocalModel(folder=path.resolve())
    if path.exists():
        raise ApiError(
            422,
            f"model '{model_id}' is a file but not a .gguf file; give a Hugging Face model folder or a .gguf file",
            code="unsupported_model_path",
        )
    raise ApiError(
        404,
        f"model '{model_id}' looks like a path but nothing exists there on this host",
        code="model_not_found",
    )


# --- sources --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    """One Hugging Face-compatible registry: where to fetch, with what token, into which cache."""

    scheme: str
    endpoint: str
    cache_dir: Path
    token: str | None = field(default=None, repr=False)


def default_hf_cache(config_cache_dir: str | None, env: Mapping[str, str]) -> Path:
    """Explicit cache_dir -> $HF_HUB_CACHE -> $HF_HOME/hub -> ~/.cache/huggingface/hub (hub's order)."""
    if config_cache_dir:
        return Path(config_cache_dir).expanduser()
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def effective_sources(config: NeuronConfig, env: Mapping[str, str] | None = None) -> dict[str, HubSource]:
    """Operator mirrors plus the hub itself (unless the operator redefined `huggingface`)."""
    environ = os.environ if env is None else env
    sources: dict[str, HubSource] = {}
    for scheme, source in config.sources.items():
        token = environ.get(source.auth_env) if source.auth_env else None
        if source.cache_dir:
            cache = Path(source.cache_dir).expanduser()
        elif scheme == HUGGINGFACE:
            cache = default_hf_cache(config.cache_dir, environ)
        else:
            # A mirror's files are not the hub's: keep them apart so one cannot shadow the other.
            cache = default_hf_cache(None, environ).parent / f"hub-{scheme}"
        sources[scheme] = HubSource(scheme, source.endpoint.rstrip("/"), cache, token or None)
    if HUGGINGFACE not in sources:
        sources[HUGGINGFACE] = HubSource(
            HUGGINGFACE,
            environ.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT).rstrip("/"),
            default_hf_cache(config.cache_dir, environ),
            environ.get("HF_TOKEN") or None,
        )
    return sources


def pick_source(model: HubModelId, default_scheme: str, sources: Mapping[str, HubSource]) -> HubSource:
    scheme = model.scheme or default_scheme
    if scheme not in sources:
        raise ApiError(
            400,
            f"no source configured for scheme '{scheme}' (model '{model}'); configured: {sorted(sources)}. "
            f"Add a [sources.{scheme}] block with endpoint = '...' to neuron.toml.",
            code="unknown_source",
            param="model_id",
        )
    return sources[scheme]


# --- which files a model needs (pure) -------------------------------------------------------


@dataclass(frozen=True)
class FilePlan:
    """The files to fetch, in two steps: small ones first (pre-flight reads them), weights after."""

    sidecars: tuple[str, ...]
    # The GGUF file to load, or None for safetensors.
    gguf_file: str | None = None
    # Weight files known from the listing; shards behind an index are added once it is read.
    weights: tuple[str, ...] = ()
    index_file: str | None = None


def gguf_quant_token(filename: str) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `q4_1`; `qwen3-0.6b-q8_0.gguf` -> `q8_0`."""
    stem = filename.rsplit("/", 1)[-1][: -len(".gguf")].lower()
    for separator in (".", "-"):
        stem = stem.rsplit(separator, 1)[-1]
    return stem


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def choose_gguf(model_id: str, ggufs: list[str], quant: str | None) -> str:
    """The first GGUF (sorted) whose name contains `quant`; with no quant, the only one there is."""
    ordered = sorted(ggufs)
    if not quant:
        if len(ordered) == 1:
            return ordered[0]
        raise ApiError(
            422,
            f"model '{model_id}' has {len(ordered)} GGUF files; choose one with quant, one of "
            f"{sorted({gguf_quant_token(f) for f in ordered})}",
            code="quant_required",
            param="quant",
        )
    wanted = quant.lower()
    for name in ordered:
        if wanted in name.lower():
            return name
    available = sorted({gguf_quant_token(f) for f in ordered})
    nearest = min(available, key=lambda token: _levenshtein(token, wanted))
    raise ApiError(
        422,
        f"no GGUF file in '{model_id}' matches quant '{quant}'; available: {available}; did you mean '{nearest}'?",
        code="quant_not_found",
        param="quant",
        extras={"available": available, "nearest": nearest},
    )


def plan_files(model_id: str, files: Iterable[str], quant: str | None) -> FilePlan:
    """Decide what to fetch from a repository listing (or a local folder's)."""
    listed = set(files)
    sidecars = tuple(name for name in SIDECAR_FILES if name in listed)
    ggufs = [name for name in listed if name.lower().endswith(".gguf")]
    has_safetensors = any(name.endswith(".safetensors") for name in listed)
    # `quant` on a single device selects a pre-quantised GGUF file (reference §5.2).
    if quant or (ggufs and not has_safetensors):
        if not ggufs:
            raise ApiError(
                422,
                f"quant '{quant}' was requested but '{model_id}' has no .gguf files; "
                "leave quant unset to load its safetensors weights",
                code="quant_not_found",
                param="quant",
            )
        chosen = choose_gguf(model_id, ggufs, quant)
        return FilePlan(sidecars=sidecars, gguf_file=chosen, weights=(chosen,))
    if INDEX_FILE in listed:
        return FilePlan(sidecars=(*sidecars, INDEX_FILE), index_file=INDEX_FILE)
    if SINGLE_WEIGHTS in listed:
        return FilePlan(sidecars=sidecars, weights=(SINGLE_WEIGHTS,))
    raise ApiError(
        422,
        f"model '{echoed(model_id)}' has no weights this neuron can load (no model.safetensors, no "
        f"{INDEX_FILE}, no .gguf among its {len(listed)} files)",
        code="no_weights",
    )


def shards_from_index(weight_map: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(sorted(set(weight_map.values())))


def list_local_files(folder: Path) -> list[str]:
    """Files under a folder as repository-relative paths (snapshot entries are symlinks to blobs)."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() or path.is_symlink()
    )


def cached_snapshot(cache_dir: Path, repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot folder the hub cache holds for `repo_id` at `revision`, if any."""
    storage = cache_dir / ("models--" + repo_id.replace("/", "--"))
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None
