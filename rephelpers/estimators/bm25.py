"""The text-only floor: BM25 between an item's text and each document (``bm25s``).

With the document ``d`` as the corpus entry and the item's ``context + answer`` as the
query ``q`` (both lower-cased, split into words of two or more characters, optionally
without English stop words), Lucene's BM25 is

    score(d, q) = Σ_{t ∈ q} idf(t) · tf(t, d) / (tf(t, d) + k1 · (1 − b + b · |d| / avgdl)),
    idf(t) = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))

(Lucene 8's form, without the constant factor k1 + 1 of the textbook formula, which
changes no ranking),

over the query's words that occur in the corpus (a repeated query word counts each
time). A method that looks inside the model must beat this ranking: documents that
share an item's words are the ones a text-only search would name as its source.
Rank evidence only (no causal scale).
"""

from __future__ import annotations

import bm25s
import numpy as np
import pandas as pd

from ..errors import require
from ..progress import progress_bar


def bm25_scores(
    documents: pd.DataFrame,
    items: pd.DataFrame,
    *,
    k1: float = 1.5,
    b: float = 0.75,
    stopwords: str | None = "en",
    progress: bool = True,
) -> pd.DataFrame:
    """Document-level scores (``id, ability, item_id, score``): BM25 of every document for every item's query.

    ``documents`` needs ``id`` and ``text``; ``items`` the columns of
    :func:`rephelpers.estimators.items.ability_items`. ``stopwords="en"`` drops bm25s's
    English stop words from both sides (``None`` keeps every word).
    """
    require({"id", "text"} <= set(documents.columns), "bm25_scores: documents need the columns id and text.")
    require({"ability", "item_id", "context", "answer"} <= set(items.columns),
            "bm25_scores: items need the columns ability, item_id, context, answer (ability_items).")
    require(len(documents) > 0 and len(items) > 0, "bm25_scores: no documents or no items.")
    require(k1 >= 0 and 0 <= b <= 1, f"bm25_scores: need k1 ≥ 0 and 0 ≤ b ≤ 1, got k1={k1}, b={b}.")
    corpus = bm25s.tokenize(documents["text"].astype(str).tolist(), stopwords=stopwords, show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(corpus, show_progress=False)
    vocab = corpus.vocab
    queries = bm25s.tokenize((items["context"] + items["answer"]).astype(str).tolist(), stopwords=stopwords,
                             show_progress=False, return_ids=False)
    ids = documents["id"].astype(str).to_numpy()
    block = np.zeros((len(items), len(ids)), dtype=np.float64)
    for row, words in enumerate(progress_bar(queries, desc="bm25", unit="item", disable=not progress)):
        known = [w for w in words if w in vocab and w != ""]
        if known:
            block[row] = retriever.get_scores(known)
    return pd.DataFrame({
        "id": np.tile(ids, len(items)),
        "ability": np.repeat(items["ability"].to_numpy(), len(ids)),
        "item_id": np.repeat(items["item_id"].astype(str).to_numpy(), len(ids)),
        "score": block.ravel(),
    })
