"""The run directory: artifacts flow one way, 01 → 06, keyed by what produced them.

Every artifact is written atomically (to a temporary name, then renamed) together with
a manifest entry recording the *key* (a hash of the inputs and parameters that made
it). A stage asks :meth:`RunDir.is_fresh` before recomputing; when a key changes, the
previous file is moved to ``.history/`` rather than overwritten, so no result on disk is
ever lost or silently replaced by a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .errors import RephelpersError, require

MANIFEST = "manifest.json"


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hash of JSON-able parts (dicts sorted, numpy arrays and data frames by content), for cache keys.

    Arrays and frames count by their bytes wherever they sit, inside a dict or list too: a
    nested one must never be hashed by its (truncated) printed form.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str(part.dtype).encode() + str(part.shape).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, pd.DataFrame):
            h.update(pd.util.hash_pandas_object(part, index=False).values.tobytes())
            h.update(",".join(map(str, part.columns)).encode())
        else:
            h.update(json.dumps(_jsonable(part), sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def _array_digest(array: np.ndarray) -> str:
    h = hashlib.sha256(str(array.dtype).encode() + str(array.shape).encode())
    if array.dtype == object:
        h.update(json.dumps(array.tolist(), default=str).encode())
    else:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _jsonable(part: Any) -> Any:
    if isinstance(part, dict):
        return {k: _jsonable(v) for k, v in part.items()}
    if isinstance(part, (list, tuple)):
        return [_jsonable(v) for v in part]
    if isinstance(part, np.ndarray):
        return {"__array__": _array_digest(part)}
    if isinstance(part, (pd.DataFrame, pd.Series)):
        frame = part.to_frame() if isinstance(part, pd.Series) else part
        return {"__frame__": stable_hash(frame, length=64)}
    return part


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The checkout a notebook runs from: ``$REPHELPERS_PROJECT_ROOT``, else the nearest
    ancestor of ``start`` (default: the working directory) holding ``pyproject.toml`` and
    ``notebooks/``, else the working directory itself.

    Papermill and nbmake execute notebooks with ``notebooks/`` as working directory while
    the CLI runs from the root; resolving ``runs/demo`` against the project root makes
    both land in the same place.
    """
    env = os.environ.get("REPHELPERS_PROJECT_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(start or os.getcwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").exists() and (candidate / "notebooks").is_dir():
            return candidate
    return here


class RunDir:
    """A run directory such as ``runs/demo``; notebooks share one through ``run_dir``.

    A relative ``root`` is resolved against :func:`project_root`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        if isinstance(root, RunDir):
            root = root.root
        path = Path(root).expanduser()
        if not path.is_absolute():
            path = project_root() / path
        self.root = path.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- manifest -----------------------------------------------------------------------
    def _manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RephelpersError(
                f"{path} is corrupt ({err}). Move it aside and re-run the chain; the "
                "artifacts themselves are untouched."
            ) from err

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, self.root / MANIFEST)

    def key_of(self, name: str) -> str | None:
        return self._manifest().get(name, {}).get("key")

    def path(self, name: str) -> Path:
        return self.root / name

    def meta_of(self, name: str) -> dict[str, Any]:
        """The manifest entry of ``name`` (its key, when it was written, and what its writer recorded)."""
        return dict(self._manifest().get(name, {}))

    def exists(self, name: str) -> bool:
        return self.path(name).exists() and name in self._manifest()

    def is_fresh(self, name: str, key: str) -> bool:
        """True when ``name`` exists and was produced from inputs with this ``key``."""
        return self.exists(name) and self.key_of(name) == key

    def require(self, name: str, stage: str) -> Path:
        """Path of an earlier stage's artifact, or a clear error naming the notebook to run."""
        path = self.path(name)
        require(
            path.exists(),
            f"{path} is missing: run {stage} first with the same run_dir ({self.root}).",
        )
        return path

    # -- a stage's cached result ---------------------------------------------------------
    def key_for(self, name: str, params: Any, upstream: Sequence[str] = ()) -> str:
        """The key of artifact ``name``: ``stable_hash(name, params, {u: key of u for u in upstream})``.

        ``upstream`` names the earlier artifacts in this run directory that the result is
        computed from; their recorded keys enter this one, so when an earlier stage re-runs
        with other inputs, this artifact is recomputed without the notebook listing what
        made those inputs. An upstream artifact without a recorded key is an error.
        """
        manifest = self._manifest()
        missing = [u for u in upstream if u not in manifest or not self.path(u).exists()]
        require(
            not missing,
            f"{name} is computed from {missing}, which {self.root} does not hold: run the stage that "
            "writes them first, with the same run_dir.",
        )
        return stable_hash(name, params, {u: manifest[u].get("key") for u in upstream})

    def cached(
        self,
        name: str | Sequence[str],
        compute: Callable[[], Any],
        *,
        params: Any,
        upstream: Sequence[str] = (),
        save: Callable[[Any, str], Any] | None = None,
        load: Callable[[], Any] | None = None,
        **meta: Any,
    ) -> Any:
        """The artifact ``name``, loaded if fresh, else ``compute()``d and saved under its key.

        The key is :meth:`key_for` ``(name, params, upstream)``: ``params`` holds every
        parameter the result depends on (put a version string in it when the computation
        changes), ``upstream`` the run directory's artifacts it reads. A ``.parquet`` or
        ``.json`` name is saved and loaded as such; other artifacts (a folder, several files
        written together: then ``name`` is a list and all must be fresh) pass
        ``save(value, key)`` and ``load()``. A stale artifact is moved to ``.history/`` by the
        save, never overwritten in place.
        """
        names = [name] if isinstance(name, str) else list(name)
        require(names, "cached: give at least one artifact name")
        first = names[0]
        if save is None or load is None:
            require(len(names) == 1 and first.endswith((".parquet", ".json")),
                    f"cached({names}): pass save= and load= for artifacts other than one .parquet or .json file")
        key = self.key_for(first, params, upstream)
        if all(self.is_fresh(n, key) for n in names):
            print(f"{', '.join(names)}: up to date (key {key})")
            return load() if load is not None else (
                self.load_parquet(first) if first.endswith(".parquet") else self.load_json(first))
        print(f"{', '.join(names)}: computing (key {key})")
        value = compute()
        if save is not None:
            save(value, key)
        elif first.endswith(".parquet"):
            self.save_parquet(first, value, key, **meta)
        else:
            self.save_json(first, value, key, **meta)
        return value

    # -- writing ------------------------------------------------------------------------
    def save(self, name: str, key: str, writer: Callable[[Path], None], **meta: Any) -> Path:
        """Write artifact ``name`` through ``writer(tmp_path)``, atomically.

        A previous artifact made from other inputs is moved into ``.history/`` first.
        """
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        writer(tmp)
        manifest = self._manifest()
        old = manifest.get(name)
        if target.exists():
            if old is None or old.get("key") != key:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                dest = self.root / ".history" / f"{name.replace('/', '__')}.{(old or {}).get('key', 'unkeyed')}.{stamp}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(target), dest)
            elif target.is_dir():
                shutil.rmtree(target)
        os.replace(tmp, target)
        manifest[name] = {"key": key, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
        self._write_manifest(manifest)
        return target

    def save_parquet(self, name: str, df: pd.DataFrame, key: str, **meta: Any) -> Path:
        return self.save(name, key, lambda p: df.to_parquet(p, index=False), **meta)

    def save_json(self, name: str, obj: Any, key: str, **meta: Any) -> Path:
        return self.save(
            name, key, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default)), **meta
        )

    def save_text(self, name: str, text: str, key: str, **meta: Any) -> Path:
        return self.save(name, key, lambda p: p.write_text(text), **meta)

    # -- reading ------------------------------------------------------------------------
    def load_parquet(self, name: str, stage: str = "the stage that writes it") -> pd.DataFrame:
        path = self.require(name, stage)
        try:
            return pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise RephelpersError(
                f"{path} is unreadable ({err}). Delete it and re-run {stage}."
            ) from err

    def load_json(self, name: str, stage: str = "the stage that writes it") -> Any:
        path = self.require(name, stage)
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RephelpersError(f"{path} is corrupt ({err}). Delete it and re-run {stage}.") from err


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
