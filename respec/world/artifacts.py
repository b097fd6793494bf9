"""The artifact cache: built policies and drafters live in directories keyed by the config that built them.

A directory is used only if it holds the marker file written last, after the atomic rename, so a run killed
mid-build never leaves a cache entry that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from respec.engine.checkpoint import atomic_write_text, cache_root

__all__ = ["MARKER", "cache_key", "cache_path", "cache_root", "discard_partial", "is_complete", "mark_complete"]

MARKER = "RESPEC_COMPLETE"


def cache_key(key: dict) -> str:
    """Returns a short stable hash of a JSON-able config dict."""
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cache_path(kind: str, key: dict) -> Path:
    """Returns the cache directory of an artifact of `kind` ("policy", "drafter") built from `key`."""
    return cache_root() / f"{kind}-{cache_key(key)}"


def is_complete(path: Path) -> bool:
    """Returns whether `path` is a finished artifact (its marker exists)."""
    return (Path(path) / MARKER).is_file()


def mark_complete(path: Path, key: dict) -> None:
    """Writes the marker (holding the key, for humans) into a finished artifact directory."""
    atomic_write_text(Path(path) / MARKER, json.dumps(key, sort_keys=True, indent=2, default=str) + "\n")


def discard_partial(path: Path) -> None:
    """Removes an artifact directory that lacks its marker (a build that was interrupted)."""
    path = Path(path)
    if path.exists() and not is_complete(path):
        shutil.rmtree(path, ignore_errors=True)
