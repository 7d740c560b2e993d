"""Put a model folder into a Hugging Face hub cache the way huggingface-hub lays it out.

`<cache>/models--{org}--{name}/blobs/<sha256>` holds the bytes, `snapshots/<revision>/<file>`
are relative symlinks to the blobs, and `refs/main` names the revision - so the neuron's hub
path can be exercised offline, exactly as on a host whose cache was filled by `hf download`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_to_hf_cache(
    cache_dir: Path,
    repo_id: str,
    source: Path,
    *,
    files: Iterable[str] | None = None,
    revision: str = REVISION,
) -> Path:
    """Copy `files` (default: all) of `source` into the cache as `repo_id`; return the snapshot folder."""
    storage = cache_dir / ("models--" + repo_id.replace("/", "--"))
    blobs = storage / "blobs"
    snapshot = storage / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    names = sorted(files) if files is not None else sorted(p.name for p in source.iterdir() if p.is_file())
    for name in names:
        data = (source / name).read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(revision)
    return snapshot
