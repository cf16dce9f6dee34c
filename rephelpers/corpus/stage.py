"""Stage 01 as one cached step: cluster the chunks, check and describe the clusters, split them.

Notebook ``01_corpus_clusters`` calls :func:`cached_clustering`, which goes through
:meth:`rephelpers.artifacts.RunDir.cached`: ``documents.parquet`` and ``clusters.json`` are
written together under one key of the stage's parameters and the corpus fingerprint, loaded
when fresh, and a result made from other inputs moves to ``.history/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from ..artifacts import RunDir
from .clustering import (
    ClusterResult,
    characterize_clusters,
    cluster_corpus,
    load_clustering,
    save_clustering,
    stability,
    validate_clusters,
)
from .loaders import assign_splits

ARTIFACTS = ("documents.parquet", "clusters.json")
"""What stage 01 writes, under one key."""


@dataclass(frozen=True, eq=False)
class Clustering:
    """Stage 01's result: the chunks with ``cluster`` and ``split`` (``documents``), the
    clustering (``result``) and ``clusters.json``'s content (``report``: the result, its
    validation, one characterisation per cluster, the corpus and the splits)."""

    documents: pd.DataFrame
    result: ClusterResult
    report: dict[str, Any]

    @property
    def validation(self) -> dict[str, Any]:
        return self.report["validation"]

    @property
    def characterization(self) -> pd.DataFrame:
        return pd.DataFrame(self.report["clusters"])


def cluster_stage(
    chunks: pd.DataFrame,
    embeddings: np.ndarray,
    tokenizer: Any,
    *,
    method: str,
    n_clusters: int,
    seed: int,
    outliers: str,
    nr_topics: int | None,
    embedding_method: str,
    heldout_fraction: float,
    corpus: Mapping[str, Any],
) -> Clustering:
    """Cluster ``chunks`` (:func:`cluster_corpus`), validate the clusters against the metadata
    domains with a two-seed stability ARI (:func:`validate_clusters`, :func:`stability`),
    characterise them (:func:`characterize_clusters`) and hold out whole documents
    (:func:`assign_splits`); ``corpus`` is recorded in the report as it is given."""
    options = dict(n_clusters=n_clusters, outliers=outliers, nr_topics=nr_topics, embedding_method=embedding_method)
    result = cluster_corpus(chunks, method=method, seed=seed, embeddings=embeddings, **options)
    validation = {
        **validate_clusters(result.labels, embeddings, reference=chunks["domain"], texts=chunks["text"],
                            top_terms_per_cluster=result.top_terms, seed=seed),
        "stability_ari": stability(chunks, method, seeds=(seed, seed + 1), embeddings=embeddings, **options),
    }
    characterization = characterize_clusters(chunks, result.labels, embeddings, tokenizer, names=result.names)
    documents = assign_splits(chunks.assign(cluster=result.labels), heldout_fraction=heldout_fraction, seed=seed)
    report = {
        **result.to_dict(),
        "validation": validation,
        "clusters": characterization.to_dict("records"),
        "corpus": dict(corpus),
        "splits": documents["split"].value_counts().to_dict(),
    }
    return Clustering(documents, result, report)


def cached_clustering(run: RunDir, compute: Any, params: Mapping[str, Any]) -> Clustering:
    """``compute()`` (a :class:`Clustering`) through ``run.cached``, keyed by ``params`` (the
    stage's parameters and the corpus fingerprint); loaded from the run directory when fresh."""
    def save(value: Clustering, key: str) -> None:
        save_clustering(run, value.documents, value.report, key)

    return run.cached(list(ARTIFACTS), compute, params=dict(params), save=save,
                      load=lambda: Clustering(*load_clustering(run)))


__all__ = ["ARTIFACTS", "Clustering", "cached_clustering", "cluster_stage"]
