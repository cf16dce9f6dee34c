"""Stage 01, part one: a corpus of documents, chunked to the model's budget and split.

A corpus is a ``pandas.DataFrame`` with one row per document and the columns

- ``id``: unique string id of the row (a chunk of a longer document gets ``<doc_id>#<n>``);
- ``doc_id``: the original document's id, shared by its chunks;
- ``text``: non-empty text;
- ``source``: where the text comes from (a file, a dataset, a package);
- ``domain``: a coarse provenance label (``code``, ``legal``, a Pile set name, ...).

``load_corpus("builtin")`` builds the multi-domain demo corpus of
:mod:`rephelpers.corpus.demo` (real text the pinned installation carries, the same on
every machine set up with ``scripts/setup.sh``); other specs load JSONL or Parquet files
and Hugging Face datasets.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import RephelpersError, require
from .demo import build_builtin_corpus
from .schema import CORPUS_COLUMNS



# -- loading any corpus ----------------------------------------------------------------
def load_corpus(
    spec: str | Path = "builtin",
    text_field: str = "text",
    max_documents: int | None = None,
    split: str = "train",
    seed: int = 0,
    docs_per_domain: int = 60,
    id_field: str = "id",
    domain_field: str | None = None,
    source_field: str | None = None,
    **builtin_options: Any,
) -> pd.DataFrame:
    """Load a corpus as a validated frame with :data:`CORPUS_COLUMNS` (plus any metadata).

    ``spec`` is one of

    - ``"builtin"``: :func:`rephelpers.corpus.demo.build_builtin_corpus` (``docs_per_domain``, ``seed`` and
      ``builtin_options`` are passed on); ``max_documents`` keeps a seeded sample;
    - a ``.jsonl`` / ``.json`` (one object per line) or ``.parquet`` file with a text
      column ``text_field``; nested objects are flattened to dotted columns, so
      ``domain_field="meta.pile_set_name"`` reads The Pile's set name;
    - ``"hf:<dataset_id>[:config]"``: a Hugging Face dataset, streamed (``split`` is the
      dataset split) and capped at ``max_documents``, which is required here;
    - a directory: a Hugging Face dataset on disk, either saved with ``save_to_disk``
      (``datasets.load_from_disk``; ``split`` picks from a ``DatasetDict``) or a folder of
      data files that ``datasets.load_dataset(folder)`` reads (JSON Lines, Parquet, CSV,
      text); no network either way. ``max_documents`` keeps the first rows.

    Missing ids become ``doc-000000``, ...; a missing domain falls back to the source, and
    a missing source to the file name or dataset id. Other columns are kept.
    """
    require(
        max_documents is None or (isinstance(max_documents, int) and max_documents >= 1),
        f"max_documents must be a positive int or None, got {max_documents!r}",
    )
    spec_text = str(spec)
    if spec_text == "builtin":
        frame = build_builtin_corpus(docs_per_domain=docs_per_domain, seed=seed, **builtin_options)
        if max_documents is not None and max_documents < len(frame):
            keep = np.sort(np.random.default_rng(seed).choice(len(frame), max_documents, replace=False))
            frame = frame.iloc[keep].reset_index(drop=True)
        return validate_corpus(frame)
    require(
        not builtin_options,
        f"options {sorted(builtin_options)} only apply to the builtin corpus, not {spec_text!r}",
    )
    if spec_text.startswith("hf:"):
        raw, default_source = _read_hf(spec_text[3:], split, max_documents), spec_text[3:]
    else:
        path = Path(spec_text).expanduser()
        require(
            path.exists(),
            f"corpus {spec_text!r} is neither 'builtin', an existing .jsonl/.parquet file or dataset folder, nor "
            "'hf:<dataset_id>[:config]'. Check the path.",
        )
        raw, default_source = (_read_local_dataset(path, split) if path.is_dir() else _read_file(path)), path.name
        if max_documents is not None:
            raw = raw.iloc[:max_documents]
    return validate_corpus(_standardise(raw, text_field, id_field, domain_field, source_field, default_source))


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            with path.open(encoding="utf-8") as fh:
                records = [json.loads(line) for line in fh if line.strip()]
            return pd.json_normalize(records) if records else pd.DataFrame()
        if suffix == ".parquet":
            return _flatten(pd.read_parquet(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RephelpersError(f"{path} is not valid JSON Lines ({err}): one JSON object per line.") from err
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise RephelpersError(f"{path} could not be read as Parquet ({err}).") from err
    raise RephelpersError(f"unsupported corpus file {path.name!r}: use .jsonl or .parquet")


def _read_local_dataset(path: Path, split: str) -> pd.DataFrame:
    """A Hugging Face dataset in a local folder: ``save_to_disk`` output, or data files for ``load_dataset``."""
    try:
        import datasets
    except ImportError as err:
        raise RephelpersError("reading a dataset folder needs the `datasets` package: pip install datasets") from err
    saved = any((path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))
    try:
        if saved:
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                require(split in data, f"{path} holds the splits {sorted(data)}, not {split!r}: pass split= one of them")
                data = data[split]
        else:
            data = datasets.load_dataset(str(path), split=split)
    except RephelpersError:
        raise
    except Exception as err:  # datasets raises many types for a folder it cannot read
        raise RephelpersError(
            f"{path} is a folder but not a dataset that `datasets` can read ({err.__class__.__name__}: {err}); "
            "pass a folder written by Dataset.save_to_disk, a folder of .jsonl/.parquet/.csv files, or one file."
        ) from err
    return _flatten(data.to_pandas())


def _flatten(frame: pd.DataFrame) -> pd.DataFrame:
    """Expand columns holding dicts (Parquet structs) into dotted columns, recursively."""
    for column in list(frame.columns):
        values = frame[column]
        if values.map(lambda v: isinstance(v, dict)).any():
            nested = pd.json_normalize([v if isinstance(v, dict) else {} for v in values])
            nested = _flatten(nested.add_prefix(f"{column}."))
            frame = pd.concat([frame.drop(columns=[column]).reset_index(drop=True), nested], axis=1)
    return frame


def _read_hf(name: str, split: str, max_documents: int | None) -> pd.DataFrame:
    dataset_id, _, config = name.partition(":")
    require(bool(dataset_id), "write a Hugging Face corpus as 'hf:<dataset_id>[:config]'")
    require(
        max_documents is not None,
        f"hf:{name} is streamed: pass max_documents (e.g. 10_000) to cap how many documents are read.",
    )
    try:
        import datasets

        stream = datasets.load_dataset(dataset_id, config or None, split=split, streaming=True)
        records = [record for record, _ in zip(stream, range(max_documents))]
    except ImportError as err:
        raise RephelpersError("reading hf: corpora needs the `datasets` package: pip install datasets") from err
    except Exception as err:  # datasets raises many types: connection, missing config, auth
        raise RephelpersError(
            f"could not stream the Hugging Face dataset {dataset_id!r}"
            f"{f' (config {config!r})' if config else ''}, split {split!r}: {err.__class__.__name__}: {err}. "
            "It must be reachable or already in the local HF cache (offline: set HF_DATASETS_OFFLINE=1 "
            "after caching it); otherwise export it to .jsonl/.parquet and pass that path."
        ) from err
    return pd.json_normalize(records) if records else pd.DataFrame()


def _standardise(
    raw: pd.DataFrame,
    text_field: str,
    id_field: str,
    domain_field: str | None,
    source_field: str | None,
    default_source: str,
) -> pd.DataFrame:
    require(len(raw) > 0, "the corpus has zero documents: check the file or dataset split.")
    require(
        text_field in raw.columns,
        f"the corpus has no text column {text_field!r}; its columns are {sorted(raw.columns)}. "
        "Pass text_field= with the right name.",
    )
    for option, field in (("domain_field", domain_field), ("source_field", source_field)):
        require(
            field is None or field in raw.columns,
            f"{option}={field!r} is not a column; the corpus has {sorted(raw.columns)} "
            "(nested fields are flattened with dots, e.g. 'meta.pile_set_name').",
        )
    frame = raw.rename(columns={text_field: "text"}).reset_index(drop=True)
    if id_field in frame.columns:
        frame["id"] = frame.pop(id_field).astype(str)
    else:
        frame["id"] = [f"doc-{i:06d}" for i in range(len(frame))]
    if "doc_id" not in frame.columns:
        frame["doc_id"] = frame["id"]
    if source_field is not None:
        frame["source"] = frame[source_field].astype(str)
    elif "source" not in frame.columns:
        frame["source"] = default_source
    if domain_field is not None:
        frame["domain"] = frame[domain_field].astype(str)
    elif "domain" not in frame.columns:
        frame["domain"] = frame["source"].astype(str)
    frame["doc_id"] = frame["doc_id"].astype(str)
    rest = [c for c in frame.columns if c not in CORPUS_COLUMNS]
    return frame[list(CORPUS_COLUMNS) + rest]


def validate_corpus(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` unchanged if it is a usable corpus, else raise a clear error.

    Checks: the :data:`CORPUS_COLUMNS` exist, there is at least one document, every
    text is a non-blank string, and ids are unique.
    """
    missing = [c for c in CORPUS_COLUMNS if c not in frame.columns]
    require(
        not missing,
        f"the corpus lacks column(s) {missing}; load it with load_corpus() or add them "
        f"(needed: {', '.join(CORPUS_COLUMNS)}).",
    )
    require(len(frame) > 0, "the corpus has zero documents.")
    texts = frame["text"]
    blank = ~texts.map(lambda t: isinstance(t, str) and bool(t.strip()))
    if blank.any():
        ids = frame.loc[blank, "id"].astype(str).tolist()
        raise RephelpersError(
            f"{len(ids)} document(s) have empty or non-string text, e.g. ids {ids[:5]}. "
            "Drop them first, e.g. df = df[df['text'].str.strip().astype(bool)]."
        )
    duplicated = frame["id"].duplicated(keep=False)
    if duplicated.any():
        ids = sorted(frame.loc[duplicated, "id"].astype(str).unique())
        raise RephelpersError(
            f"{len(ids)} id(s) occur more than once, e.g. {ids[:5]}. Ids must be unique: "
            "deduplicate the corpus or drop the id column to number documents automatically."
        )
    return frame


def corpus_fingerprint(frame: pd.DataFrame) -> str:
    """A short hash of the corpus content (ids, texts, sources, domains) for cache keys."""
    h = hashlib.sha256()
    for column in CORPUS_COLUMNS:
        h.update(pd.util.hash_pandas_object(frame[column].astype(str), index=False).values.tobytes())
    return h.hexdigest()[:16]


# -- chunking and splits ---------------------------------------------------------------
def chunk_documents(frame: pd.DataFrame, tokenizer: Any, max_tokens: int) -> pd.DataFrame:
    """Split documents longer than ``max_tokens`` tokens into consecutive chunks.

    A document of n tokens becomes ``c = ⌈n / b⌉`` chunks of about ``n / c`` tokens each
    (b the budget after special tokens), not ``c − 1`` full ones and a remainder: a
    remainder can be a single token, and a representation mean-pooled over one token is
    noise that stage 03 would weigh like any other document.

    The budget counts the special tokens ``tokenizer`` adds (BOS/CLS/SEP...), so the
    model stage, which encodes each text with the same tokenizer and truncates at
    ``max_tokens``, sees every chunk whole. A chunk is the exact character span of its
    tokens (offset mapping of fast tokenizers; slow ones decode the token slice). Chunks
    keep ``doc_id`` and every other column, get ids ``<doc_id>#<n>``, and a column
    ``n_tokens`` (with special tokens) is added. Documents that fit keep their id.
    """
    validate_corpus(frame)
    special = tokenizer.num_special_tokens_to_add(pair=False)
    budget = max_tokens - special
    require(
        isinstance(max_tokens, int) and budget >= 8,
        f"max_tokens={max_tokens!r} leaves {budget} tokens after {special} special token(s): use at least {special + 8}.",
    )
    rows: list[dict[str, Any]] = []
    for record in frame.to_dict("records"):
        pieces = _token_spans(record["text"], tokenizer, budget)
        for n, (text, count) in enumerate(pieces):
            row = dict(record)
            row["text"] = text
            row["n_tokens"] = count + special
            if len(pieces) > 1:
                row["id"] = f"{record['doc_id']}#{n}"
            rows.append(row)
    return validate_corpus(pd.DataFrame(rows, columns=list(frame.columns) + ["n_tokens"]))


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_spans(text: str, tokenizer: Any, budget: int) -> list[tuple[str, int]]:
    """``(chunk text, token count)`` pairs covering ``text`` with at most ``budget`` tokens each."""
    if tokenizer.is_fast:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        n_tokens = len(offsets)

        def span(a: int, b: int) -> str:
            return text[offsets[a][0] : offsets[b - 1][1]]

    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_tokens = len(ids)

        def span(a: int, b: int) -> str:
            return tokenizer.decode(ids[a:b])

    if n_tokens <= budget:
        return [(text, n_tokens)]
    size = math.ceil(n_tokens / math.ceil(n_tokens / budget))  # balanced: no short remainder
    spans: list[tuple[str, int]] = []
    start = 0
    while start < n_tokens:
        end = min(start + size, n_tokens)
        piece = span(start, end)
        count = _count(tokenizer, piece)
        # Re-tokenising a span can merge differently at its edges; shrink until it fits.
        while count > budget and end - start > 1:
            end -= max(1, count - budget)
            piece = span(start, end)
            count = _count(tokenizer, piece)
        if piece.strip():
            spans.append((piece, count))
        start = end
    return spans


def assign_splits(
    frame: pd.DataFrame,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    stratify: str | None = "cluster",
) -> pd.DataFrame:
    """Add a ``split`` column, ``"train"`` or ``"heldout"``, deterministic for ``seed``.

    Whole documents (``doc_id`` groups) go to one side, so no chunk of a held-out document
    is trained on. Within each stratum (the group's most common ``stratify`` value) the
    ``round(heldout_fraction * g)`` groups with the smallest ``sha256(seed:doc_id)`` are
    held out, at least one and at most ``g - 1`` when the stratum has ``g >= 2`` groups.
    Hash order keeps splits stable: adding documents moves few existing ones across.
    """
    require(
        0.0 < heldout_fraction < 1.0,
        f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction!r}",
    )
    require(
        stratify is None or stratify in frame.columns,
        f"cannot stratify by {stratify!r}: not a column of the frame (columns: {sorted(frame.columns)}). "
        "Cluster the corpus first or pass stratify=None.",
    )
    groups = frame.groupby("doc_id", sort=True)
    strata = groups[stratify].agg(lambda s: s.mode().iloc[0]) if stratify else pd.Series(0, index=sorted(frame["doc_id"].unique()))
    order = {doc: hashlib.sha256(f"{seed}:{doc}".encode()).hexdigest() for doc in strata.index}
    heldout: set[str] = set()
    for _, docs in strata.groupby(strata, sort=True):
        g = len(docs)
        if g < 2:
            continue
        n_heldout = min(g - 1, max(1, round(heldout_fraction * g)))
        heldout.update(sorted(docs.index, key=order.__getitem__)[:n_heldout])
    result = frame.copy()
    result["split"] = np.where(result["doc_id"].isin(heldout), "heldout", "train")
    return result
