"""Where things live: the user cache (models, embeddings, activations) and run directories."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root.

    ``$REPHELPERS_CACHE`` if set, else ``$XDG_CACHE_HOME/rephelpers``, else
    ``~/.cache/rephelpers``. Never inside the repository, so weights and caches are never
    committed by accident.
    """
    override = os.environ.get("REPHELPERS_CACHE")
    if override:
        root = Path(override).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rephelpers"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_subdir(name: str) -> Path:
    path = cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
