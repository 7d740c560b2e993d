"""Fetching from a Hugging Face-compatible registry into its cache (the side-effect half of sources).

Everything here blocks (network, disk) and is run in a thread by the caller. Offline mode
(`HF_HUB_OFFLINE=1`) is honoured by listing and fetching from the cache only; when the
registry cannot be reached the cached snapshot is used, so a warm cache loads with no
network. Failures become ApiErrors that say what to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cortex_core.errors import ApiError
from neuron.sources import HubModelId, HubSource, cached_snapshot, list_local_files

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def hub_offline() -> bool:
    """Read at call time: huggingface-hub fixes the flag from the environment at import."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class RepoListing:
    files: dict[str, int | None]  # path -> size in bytes (None when unknown)
    # Commit to fetch, so that every file of one load comes from the same revision.
    revision: str
    from_cache: bool


class HubClient:
    def __init__(self, source: HubSource) -> None:
        self.source = source

    def storage_dir(self, repo_id: str) -> Path:
        return self.source.cache_dir / ("models--" + repo_id.replace("/", "--"))

    def _not_cached(self, model: HubModelId, why: str) -> ApiError:
        return ApiError(
            404,
            f"model '{model}' is not in the local cache {self.source.cache_dir} and {why}; download it on a "
            f"connected host (`hf download {model.repo_id}` with HF_HUB_CACHE={self.source.cache_dir}) or "
            "allow network access",
            code="model_not_cached",
        )

    def listing(self, model: HubModelId) -> RepoListing:
        """The repository's files at `main`: from the registry, or from the cache when offline."""
        if hub_offline():
            return self._cached_listing(model, "HF_HUB_OFFLINE is set")
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )

        api = HfApi(endpoint=self.source.endpoint, token=self.source.token or False)
        try:
            info = api.model_info(model.repo_id, files_metadata=True, timeout=30)
        except GatedRepoError as exc:
            raise ApiError(
                403,
                f"model '{model}' is gated on {self.source.endpoint}: accept its licence there and give this "
                f"neuron a token ({self._token_hint()})",
                code="gated_model",
            ) from exc
        except RepositoryNotFoundError as exc:
            raise ApiError(
                404,
                f"model '{model}' was not found on {self.source.endpoint} (check the name; a private "
                f"repository also needs a token: {self._token_hint()})",
                code="model_not_found",
            ) from exc
        except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
            # Registry unreachable or failing: a warm cache still loads (reference §13.9).
            log.warning("cannot list %s on %s (%s); trying the local cache", model, self.source.endpoint, exc)
            try:
                return self._cached_listing(model, f"{self.source.endpoint} could not be reached ({exc})")
            except ApiError as cache_miss:
                raise ApiError(
                    502,
                    f"failed to fetch repo info for '{model}' from {self.source.endpoint}: {exc}; "
                    "and it is not in the local cache",
                    code="repo_fetch_failed",
                ) from cache_miss
        files = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
        return RepoListing(files=files, revision=info.sha or "main", from_cache=False)

    def _cached_listing(self, model: HubModelId, why: str) -> RepoListing:
        snapshot = cached_snapshot(self.source.cache_dir, model.repo_id)
        if snapshot is None:
            raise self._not_cached(model, why)
        files: dict[str, int | None] = {
            name: (snapshot / name).stat().st_size for name in list_local_files(snapshot)
        }
        return RepoListing(files=files, revision=snapshot.name, from_cache=True)

    def _token_hint(self) -> str:
        if self.source.scheme == "huggingface":
            return "set HF_TOKEN or auth_env in [sources.huggingface]"
        return f"set the variable named by auth_env in [sources.{self.source.scheme}]"

    def fetch(self, model: HubModelId, listing: RepoListing, files: list[str]) -> Path:
        """Download exactly `files` (those the listing has) and return the snapshot folder."""
        wanted = [name for name in files if name in listing.files]
        if listing.from_cache:
            snapshot = cached_snapshot(self.source.cache_dir, model.repo_id, listing.revision)
            if snapshot is None:
                raise self._not_cached(model, "its snapshot disappeared")
            return snapshot
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            folder = snapshot_download(
                model.repo_id,
                revision=listing.revision,
                cache_dir=self.source.cache_dir,
                endpoint=self.source.endpoint,
                token=self.source.token or False,
                allow_patterns=wanted,
            )
        except LocalEntryNotFoundError as exc:
            raise self._not_cached(model, f"downloading failed ({exc})") from exc
        except (HfHubHTTPError, OSError) as exc:
            raise ApiError(
                502,
                f"downloading {wanted} of '{model}' from {self.source.endpoint} failed: {exc}",
                code="download_failed",
            ) from exc
        return Path(str(folder))


def _bytes_under(folder: Path) -> int:
    total = 0
    if folder.is_dir():
        for path in folder.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink():
                    total += path.stat().st_size
            except OSError:  # a file renamed away mid-scan (incomplete -> blob)
                continue
    return total


async def log_download_progress(
    label: str, storage_dir: Path, expected_bytes: int, *, interval: float = 5.0
) -> None:
    """Log how far a download has come until cancelled, by watching the cache's blobs grow.

    Watching the folder works whatever transport huggingface-hub picks (HTTP or xet) and
    gives one readable log line per interval instead of a progress bar in a service log.
    """
    blobs = storage_dir / "blobs"
    start_bytes = await asyncio.to_thread(_bytes_under, blobs)
    started = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        done = await asyncio.to_thread(_bytes_under, blobs) - start_bytes
        rate = done / max(time.monotonic() - started, 1e-3)
        total = f" of {expected_bytes / MIB:.0f} MiB" if expected_bytes else ""
        log.info("downloading %s: %.0f MiB%s (%.1f MiB/s)", label, done / MIB, total, rate / MIB)
