"""Stage 01, part two: cluster a corpus, check the clusters, and describe them.

One entry point, :func:`cluster_corpus`, with pluggable methods (as in BERTopic):

- ``"kmeans"``: k-means on L2-normalised sentence embeddings (cosine geometry);
- ``"domain"``: the corpus's own metadata (``domain`` column) as clusters;
- ``"bertopic"``: BERTopic on the same embeddings (UMAP + HDBSCAN, or k-means), with
  topic reduction, guided (seed words), semi-supervised and manual (given labels) modes;
- ``"lda"``: Latent Dirichlet Allocation on word counts (scikit-learn).

Every method ends in contiguous cluster ids ``0..K-1`` (largest cluster first; for
``"domain"`` sorted by name; a kept outlier cluster last) and the same description of each
cluster: its top c-TF-IDF terms. :func:`validate_clusters` scores a clustering
(silhouette, purity, NMI, ARI, NPMI coherence), :func:`stability` re-runs it under other
seeds, and :func:`characterize_clusters` summarises each cluster's text.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from ..artifacts import RunDir
from ..errors import RephelpersError, require
from .embeddings import DEFAULT_EMBEDDER, embed_texts, load_embedder, resolve_embedding_method

METHODS = ("kmeans", "domain", "bertopic", "lda")
OUTLIER_MODES = ("reassign", "keep")
BERTOPIC_CLUSTERERS = ("hdbscan", "kmeans")
CLUSTER_SELECTIONS = ("leaf", "eom")
REDUCERS = ("umap", "pca")
HDBSCAN_MAX_MIN_SAMPLES = 100
UMAP_LIMIT = 20_000
"""``reducer="auto"`` uses UMAP up to this many documents and PCA above: BERTopic with UMAP
took about a minute at 20,000 short documents on 2 cores and UMAP's neighbour search grows
faster than the corpus; PCA takes seconds and one copy of the embeddings."""
LDA_LEARNING = ("auto", "batch", "online")
LDA_BATCH_SIZE = 4096
LDA_ONLINE_PASSES = 5
LDA_ONLINE_THRESHOLD = 20_000
"""``lda_learning="auto"`` switches from batch to online variational Bayes above this many
documents (see :func:`lda_labels`)."""
SUPERVISION_MODES = ("semi", "manual")
DOCUMENT_COLUMNS = ("id", "doc_id", "text", "source", "domain", "split", "cluster")
OUTLIER_NAME = "outliers"
# Words of two or more characters that start with a letter: identifiers such as ``self``
# count as words (they characterise code), numbers and one-letter names do not.
TERM_PATTERN = r"(?u)\b[^\W\d_]\w+\b"


@dataclass
class ClusterResult:
    """A clustering of ``len(labels)`` documents into ``K = len(names)`` clusters.

    ``labels[i]`` in ``0..K-1`` is document ``i``'s cluster, ``names[k]`` a readable name,
    ``top_terms[k]`` the cluster's highest c-TF-IDF terms. ``n_outliers`` counts documents
    the method left unassigned (BERTopic's ``-1``), whether they were then reassigned to
    the nearest topic or kept as the cluster ``outlier_cluster``.
    """

    labels: np.ndarray
    names: list[str]
    method: str
    params: dict[str, Any]
    top_terms: list[list[str]]
    n_outliers: int = 0
    outlier_cluster: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.n_clusters)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the labels (which live in ``documents.parquet``), JSON-able."""
        return {
            "method": self.method,
            "params": self.params,
            "n_clusters": self.n_clusters,
            "names": self.names,
            "sizes": self.sizes.tolist(),
            "top_terms": self.top_terms,
            "n_outliers": self.n_outliers,
            "outlier_cluster": self.outlier_cluster,
            "extras": self.extras,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], labels: Sequence[int]) -> "ClusterResult":
        labels = np.asarray(labels, dtype=np.int64)
        require(
            len(labels) == sum(data["sizes"]) and labels.max(initial=-1) < data["n_clusters"],
            "the saved clusters.json does not match these labels: re-run notebook 01.",
        )
        return cls(
            labels=labels,
            names=list(data["names"]),
            method=data["method"],
            params=dict(data["params"]),
            top_terms=[list(t) for t in data["top_terms"]],
            n_outliers=int(data["n_outliers"]),
            outlier_cluster=data["outlier_cluster"],
            extras=dict(data.get("extras", {})),
        )


# -- clustering ------------------------------------------------------------------------
def cluster_corpus(
    df: pd.DataFrame,
    method: str = "kmeans",
    n_clusters: int = 5,
    seed: int = 0,
    embeddings: np.ndarray | None = None,
    outliers: str = "reassign",
    nr_topics: int | str | None = None,
    seed_topics: list[list[str]] | None = None,
    guided_labels: str | Sequence[Any] | None = None,
    supervision: str = "semi",
    clusterer: str = "hdbscan",
    reducer: str = "auto",
    min_cluster_size: int = 10,
    cluster_selection: str = "leaf",
    embedder: str = DEFAULT_EMBEDDER,
    embedding_method: str = "auto",
    lda_learning: str = "auto",
    n_terms: int = 10,
    show_progress: bool = True,
) -> ClusterResult:
    """Cluster the documents of ``df`` (a corpus frame with ``text`` and ``domain``).

    - ``n_clusters``: K for ``"kmeans"`` and ``"lda"`` and for BERTopic with
      ``clusterer="kmeans"``; HDBSCAN finds its own number (``min_cluster_size``).
    - ``embeddings``: precomputed ``[n, d]`` sentence embeddings from ``embedder`` (else
      computed through the on-disk cache) for ``"kmeans"`` and ``"bertopic"``.
    - ``embedding_method``: how ``embedder`` embeds the texts, ``"transformer"`` (exact),
      ``"static"`` (a word-piece table distilled from it, thousands of texts a second) or
      ``"auto"`` (static above ``embeddings.STATIC_THRESHOLD`` distinct texts); see
      :func:`~rephelpers.corpus.embeddings.embed_texts`. With precomputed ``embeddings`` it
      is only recorded, so pass the method that made them.
    - ``outliers``: BERTopic's unassigned documents are ``"reassign"``-ed to the most
      similar topic (``reduce_outliers``, embedding strategy) or ``"keep"``-t as their own
      cluster, named ``"outliers"``, with the last id.
    - ``reducer``: BERTopic's dimensionality reduction before clustering, ``"umap"``
      (BERTopic's default), ``"pca"`` (linear, deterministic, no JIT compilation, little
      memory) or ``"auto"``: UMAP up to :data:`UMAP_LIMIT` documents, PCA above.
    - ``cluster_selection``: how HDBSCAN picks clusters from its tree, ``"leaf"`` (the
      finest clusters of at least ``min_cluster_size`` documents, the default) or ``"eom"``
      (excess of mass, BERTopic's default: the most persistent clusters, often a few large
      ones). On the built-in corpus (4 domains × 15 documents, PCA or UMAP) ``"eom"`` put
      code, licenses and READMEs in one topic at two of three seeds (ARI 0.32); ``"leaf"``
      found 3-5 topics (ARI 0.50-0.79). On large corpora raise ``min_cluster_size`` or use
      ``nr_topics`` to merge leaves.
    - ``nr_topics``: BERTopic topic reduction to at most this many topics, not counting
      outliers (an int), or ``"auto"`` (merge similar topics).
    - ``seed_topics``: guided BERTopic, a list of seed-word lists (embedded with ``embedder``).
    - ``guided_labels``: per-document labels (or a column name such as ``"domain"``;
      missing values mean unlabelled) for BERTopic: ``supervision="semi"`` steers UMAP
      with them, ``"manual"`` uses them as the topics and only describes them.
    - ``lda_learning``: LDA's variational Bayes, ``"batch"`` (every pass over all
      documents), ``"online"`` (mini-batches) or ``"auto"``: batch up to
      :data:`LDA_ONLINE_THRESHOLD` documents, online above (:func:`lda_labels`).
    """
    require(method in METHODS, f"unknown cluster method {method!r}: use one of {', '.join(METHODS)}")
    require(
        nr_topics is None or nr_topics == "auto" or (isinstance(nr_topics, int) and nr_topics >= 2),
        f"nr_topics must be None, 'auto' or an int >= 2, got {nr_topics!r}",
    )
    require(outliers in OUTLIER_MODES, f"outliers must be one of {OUTLIER_MODES}, got {outliers!r}")
    require(isinstance(df, pd.DataFrame) and "text" in df.columns, "cluster_corpus() needs a corpus frame with a 'text' column")
    n = len(df)
    require(n >= 3, f"need at least 3 documents to cluster, got {n}")
    texts = df["text"].astype(str).tolist()
    uses_k = method in ("kmeans", "lda") or (method == "bertopic" and clusterer == "kmeans")
    if uses_k:
        require(
            isinstance(n_clusters, int) and 2 <= n_clusters < n,
            f"n_clusters must be an int in 2..{n - 1} for {n} documents, got {n_clusters!r}",
        )
    if method == "domain":
        require("domain" in df.columns, "method='domain' needs a 'domain' column in the corpus")
    embedding_method = resolve_embedding_method(embedding_method, len(set(texts)))
    lda_learning = resolve_lda_learning(lda_learning, n)
    if method == "bertopic":
        reducer = _check_bertopic_options(n, clusterer, reducer, supervision, min_cluster_size, cluster_selection, seed_topics)
    else:
        unused = {"seed_topics": seed_topics, "guided_labels": guided_labels, "nr_topics": nr_topics}
        given = sorted(k for k, v in unused.items() if v is not None)
        require(not given, f"{', '.join(given)} only apply to method='bertopic', not {method!r}")
    labels_for_guidance = _guidance(df, guided_labels) if guided_labels is not None else None
    if labels_for_guidance is not None and supervision == "manual":
        require(
            (labels_for_guidance >= 0).all(),
            "supervision='manual' makes the given labels the topics, so every document needs one; "
            "use supervision='semi' for partially labelled corpora.",
        )
    if method in ("kmeans", "bertopic"):
        if embeddings is None:
            embeddings = embed_texts(texts, model=embedder, method=embedding_method, show_progress=show_progress)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        require(
            embeddings.ndim == 2 and embeddings.shape[0] == n,
            f"embeddings must have shape [n_documents={n}, dim], got {embeddings.shape}",
        )

    params = _clustering_params(method, uses_k, seed, n_terms, n_clusters, embedder, embedding_method, lda_learning,
                                reducer, clusterer, outliers, nr_topics, seed_topics, guided_labels, supervision,
                                min_cluster_size, cluster_selection)
    extras: dict[str, Any] = {}
    if method == "kmeans":
        raw = kmeans_labels(embeddings, n_clusters, seed)
    elif method == "domain":
        raw = df["domain"].astype(str).to_numpy()
    elif method == "lda":
        raw, extras = lda_labels(texts, n_clusters, seed, n_terms, learning=lda_learning)
    else:
        raw, extras = bertopic_labels(
            texts, embeddings, seed=seed, outliers=outliers, nr_topics=nr_topics,
            seed_topics=seed_topics, guided=labels_for_guidance, supervision=supervision,
            clusterer=clusterer, reducer=reducer, n_clusters=n_clusters, min_cluster_size=min_cluster_size,
            cluster_selection=cluster_selection, embedder=embedder, n_terms=n_terms,
        )
    return _finish(texts, raw, method, params, extras, n_terms)


def _check_bertopic_options(n: int, clusterer: str, reducer: str, supervision: str, min_cluster_size: int,
                            cluster_selection: str, seed_topics: list[list[str]] | None) -> str:
    """:func:`cluster_corpus`'s checks of BERTopic's options for ``n`` documents; the resolved reducer."""
    require(clusterer in BERTOPIC_CLUSTERERS, f"clusterer must be one of {BERTOPIC_CLUSTERERS}, got {clusterer!r}")
    reducer = resolve_reducer(reducer, n)
    require(supervision in SUPERVISION_MODES, f"supervision must be one of {SUPERVISION_MODES}, got {supervision!r}")
    require(isinstance(min_cluster_size, int) and min_cluster_size >= 2, f"min_cluster_size must be an int >= 2, got {min_cluster_size!r}")
    require(cluster_selection in CLUSTER_SELECTIONS, f"cluster_selection must be one of {CLUSTER_SELECTIONS}, got {cluster_selection!r}")
    require(
        seed_topics is None or (isinstance(seed_topics, list) and all(isinstance(t, list) and t for t in seed_topics)),
        "seed_topics must be a list of non-empty lists of words, e.g. [['def', 'return'], ['license', 'warranty']]",
    )
    return reducer


def _clustering_params(method: str, uses_k: bool, seed: int, n_terms: int, n_clusters: int, embedder: str,
                       embedding_method: str, lda_learning: str, reducer: str, clusterer: str, outliers: str,
                       nr_topics: int | str | None, seed_topics: list[list[str]] | None,
                       guided_labels: str | Sequence[Any] | None, supervision: str, min_cluster_size: int,
                       cluster_selection: str) -> dict[str, Any]:
    """The options that shaped a clustering, and only those: what ``ClusterResult.params`` records."""
    params: dict[str, Any] = {"seed": seed, "n_terms": n_terms}
    if uses_k:
        params["n_clusters"] = n_clusters
    if method in ("kmeans", "bertopic"):
        params["embedder"] = embedder
        params["embedding_method"] = embedding_method
    if method == "lda":
        params["lda_learning"] = lda_learning
    if method == "bertopic":
        params.update(reducer=reducer, clusterer=clusterer, outliers=outliers, nr_topics=nr_topics, seed_topics=seed_topics)
        if not uses_k:
            params["min_cluster_size"] = min_cluster_size
            params["cluster_selection"] = cluster_selection
        if guided_labels is not None:
            params["guided_labels"] = guided_labels if isinstance(guided_labels, str) else "per-document labels"
            params["supervision"] = supervision
    return params


def _guidance(df: pd.DataFrame, guided_labels: str | Sequence[Any]) -> np.ndarray:
    """Integer codes for guiding labels; ``-1`` marks unlabelled documents."""
    if isinstance(guided_labels, str):
        require(guided_labels in df.columns, f"guided_labels={guided_labels!r} is not a column of the corpus")
        values = df[guided_labels]
    else:
        values = pd.Series(list(guided_labels))
        require(len(values) == len(df), f"guided_labels has {len(values)} entries for {len(df)} documents")
    unlabelled = values.isna() | values.astype(str).isin(["", "-1"])
    codes, _ = pd.factorize(values.where(~unlabelled), sort=True)
    require((codes >= 0).any(), "guided_labels has no labelled document")
    return codes.astype(np.int64)


def kmeans_labels(embeddings: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means on unit-normalised rows: minimises ``sum_i ||e_i/|e_i| - mu_{c(i)}||^2``.

    On unit vectors squared distance is ``2 - 2 cos``, so this is spherical (cosine) k-means
    up to the centroids' norms. Ten seeded restarts; the lowest inertia wins.
    """
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import normalize

    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(normalize(embeddings))


def term_vectorizer(min_df: int = 1, max_df: float = 1.0, vocabulary: Sequence[str] | None = None, binary: bool = False) -> Any:
    """The one word tokenisation used for LDA, c-TF-IDF and coherence (English stop words removed)."""
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(
        lowercase=True, token_pattern=TERM_PATTERN, stop_words=None if vocabulary is not None else "english",
        min_df=min_df, max_df=max_df, vocabulary=vocabulary, binary=binary,
    )


def resolve_lda_learning(learning: str, n_documents: int) -> str:
    """``"batch"`` or ``"online"``: ``learning`` itself, or for ``"auto"`` online above
    :data:`LDA_ONLINE_THRESHOLD` documents."""
    require(learning in LDA_LEARNING, f"lda_learning must be one of {LDA_LEARNING}, got {learning!r}")
    if learning != "auto":
        return learning
    return "online" if n_documents > LDA_ONLINE_THRESHOLD else "batch"


def lda_labels(
    texts: Sequence[str], n_topics: int, seed: int = 0, n_terms: int = 10, n_init: int = 5, learning: str = "batch"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Each document's most probable topic ``argmax_k theta_{d,k}`` under variational LDA.

    Variational LDA converges to a local optimum that depends on its initialisation (on a
    few dozen documents, ARI against planted domains ranged 0.41–0.77 over single seeds), so
    like k-means it is fitted ``n_init`` times from seeded starts and the fit with the
    highest approximate log-likelihood (the ELBO, ``lda.score``) is kept.

    ``learning="batch"`` runs 50 passes, each updating the topics from all documents.
    ``"online"`` (Hoffman et al. 2010) updates them after every mini-batch of
    :data:`LDA_BATCH_SIZE` documents with step ``(10 + t)^-0.7``, for :data:`LDA_ONLINE_PASSES`
    passes: on many documents it converges in a few. On 20,000 short documents (2 shared
    cores, five restarts) batch took 340 s for ARI 0.45 against their domains, online 81 s
    for 0.43; on 100,000 online took 341 s, where batch would take about half an hour.

    Terms occurring in fewer than two documents (when the corpus has at least 20) or in
    more than 95% of them are dropped before fitting. ``extras["lda_top_terms"]`` holds the
    highest-weight words of each topic's ``beta_k`` (indexed by LDA topic).
    """
    from sklearn.decomposition import LatentDirichletAllocation

    require(learning in ("batch", "online"), f"learning must be 'batch' or 'online', got {learning!r}")
    require(n_init >= 1, f"n_init must be ≥ 1, got {n_init}")
    vectorizer = term_vectorizer(min_df=2 if len(texts) >= 20 else 1, max_df=0.95)
    try:
        counts = vectorizer.fit_transform(texts)
    except ValueError as err:  # scikit-learn: "empty vocabulary"
        raise RephelpersError(f"LDA found no usable words in the corpus ({err}); the texts may be too short or all stop words.") from err
    if learning == "online":
        schedule = dict(learning_method="online", batch_size=LDA_BATCH_SIZE, max_iter=LDA_ONLINE_PASSES, total_samples=counts.shape[0])
    else:
        schedule = dict(learning_method="batch", max_iter=50)
    best = None
    for restart in range(n_init):
        candidate = LatentDirichletAllocation(n_components=n_topics, random_state=seed * 1000 + restart, **schedule)
        candidate_theta = candidate.fit_transform(counts)
        likelihood = candidate.score(counts)
        if best is None or likelihood > best[0]:
            best = (likelihood, candidate, candidate_theta)
    _, lda, theta = best
    vocabulary = vectorizer.get_feature_names_out()
    topic_terms = [[str(vocabulary[i]) for i in np.argsort(-row)[:n_terms]] for row in lda.components_]
    return theta.argmax(axis=1), {"lda_top_terms": topic_terms, "lda_perplexity": float(lda.perplexity(counts))}


def bertopic_labels(
    texts: Sequence[str],
    embeddings: np.ndarray,
    seed: int = 0,
    outliers: str = "reassign",
    nr_topics: int | str | None = None,
    seed_topics: list[list[str]] | None = None,
    guided: np.ndarray | None = None,
    supervision: str = "semi",
    clusterer: str = "hdbscan",
    reducer: str = "umap",
    n_clusters: int = 5,
    min_cluster_size: int = 10,
    cluster_selection: str = "leaf",
    embedder: str = DEFAULT_EMBEDDER,
    n_terms: int = 10,
) -> tuple[np.ndarray, dict[str, Any]]:
    """BERTopic topic ids per document (``-1`` = outlier when kept) and the model's own terms.

    ``nr_topics`` merges topics after fitting (``reduce_topics``) down to that many real
    topics, or by similarity with ``"auto"``.

    UMAP (5-d, cosine, ``min_dist=0``, seeded) or PCA (5-d) then HDBSCAN
    (``min_cluster_size``, ``cluster_selection``) or k-means; manual supervision skips both and takes ``guided``
    as the topics.

    HDBSCAN's density uses each document's ``min_samples``-th nearest neighbour, with
    ``min_samples = min_cluster_size`` (HDBSCAN's default) up to :data:`UMAP_LIMIT` documents
    and ``min(min_cluster_size, HDBSCAN_MAX_MIN_SAMPLES)`` above: at 100,000 documents and
    ``min_cluster_size=500`` the neighbour lists alone took 1.6 GB and 53 s, with the cap 0.4 GB
    and 20 s (ARI against the domains 0.44 → 0.38). Smaller corpora cluster as they always did.
    """
    from bertopic import BERTopic

    n = len(texts)
    if guided is not None and supervision == "manual":
        from bertopic.cluster import BaseCluster
        from bertopic.dimensionality import BaseDimensionalityReduction

        reducer_model, grouper = BaseDimensionalityReduction(), BaseCluster()
    else:
        reducer_model = reduce_dimensions_model(reducer, n_components=max(2, min(5, n - 2)), n_documents=n, seed=seed)
        if clusterer == "kmeans":
            from sklearn.cluster import KMeans

            grouper = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
        else:
            from hdbscan import HDBSCAN

            size = min(min_cluster_size, max(2, n // 2))
            samples = min(size, HDBSCAN_MAX_MIN_SAMPLES) if n > UMAP_LIMIT else size
            grouper = HDBSCAN(min_cluster_size=size, min_samples=samples, prediction_data=True,
                              cluster_selection_method=cluster_selection)
    model = BERTopic(
        embedding_model=load_embedder(embedder), umap_model=reducer_model, hdbscan_model=grouper,
        vectorizer_model=term_vectorizer(), seed_topic_list=seed_topics, top_n_words=n_terms,
    )
    topics, _ = model.fit_transform(list(texts), embeddings=embeddings, y=None if guided is None else guided.tolist())
    if nr_topics is not None:
        # BERTopic counts the outlier topic -1 among nr_topics; ours counts real topics only.
        has_outliers = -1 in set(topics)
        target = nr_topics + int(has_outliers) if isinstance(nr_topics, int) else nr_topics
        model.reduce_topics(list(texts), nr_topics=target)
        topics = model.topics_
    topics = np.asarray(topics, dtype=np.int64)
    found = sorted(t for t in set(topics.tolist()) if t != -1)
    require(
        len(found) > 0,
        "BERTopic put every document in the outlier topic: lower min_cluster_size, or use "
        "clusterer='kmeans' (which has no outliers).",
    )
    n_outliers = int((topics == -1).sum())
    if n_outliers and outliers == "reassign":
        topics = np.asarray(
            model.reduce_outliers(list(texts), topics.tolist(), strategy="embeddings", embeddings=embeddings),
            dtype=np.int64,
        )
    bertopic_terms = {int(t): [w for w, _ in (model.get_topic(t) or [])] for t in found}
    return topics, {"n_outliers": n_outliers, "bertopic_terms": bertopic_terms}


def resolve_reducer(reducer: str, n_documents: int) -> str:
    """``"umap"`` or ``"pca"``: ``reducer`` itself, or for ``"auto"`` UMAP up to :data:`UMAP_LIMIT` documents."""
    require(reducer == "auto" or reducer in REDUCERS, f"reducer must be 'auto' or one of {REDUCERS}, got {reducer!r}")
    if reducer != "auto":
        return reducer
    return "pca" if n_documents > UMAP_LIMIT else "umap"


def reduce_dimensions_model(reducer: str, n_components: int, n_documents: int, seed: int = 0, n_neighbors: int = 15) -> Any:
    """An unfitted reducer: seeded cosine UMAP (``min_dist=0``, for clustering) or PCA."""
    require(reducer in REDUCERS, f"reducer must be one of {REDUCERS}, got {reducer!r}")
    if reducer == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=n_components, random_state=seed)
    from umap import UMAP

    return UMAP(
        n_neighbors=max(2, min(n_neighbors, n_documents - 1)), n_components=n_components,
        min_dist=0.0, metric="cosine", random_state=seed, n_jobs=1,  # seeded UMAP runs on one thread anyway
    )


def _finish(
    texts: Sequence[str], raw: np.ndarray, method: str, params: dict[str, Any], extras: dict[str, Any], n_terms: int
) -> ClusterResult:
    """Contiguous ids (largest first; by name for domains; outliers last), terms and names."""
    raw = np.asarray(raw)
    values, inverse, counts = np.unique(raw, return_inverse=True, return_counts=True)
    first_seen = np.full(len(values), len(raw))
    np.minimum.at(first_seen, inverse, np.arange(len(raw)))
    is_outlier = np.array([method == "bertopic" and v == -1 for v in values.tolist()])
    if method == "domain":
        order = np.arange(len(values))
    else:
        order = np.lexsort((first_seen, -counts, is_outlier))
    new_id = np.empty(len(values), dtype=np.int64)
    new_id[order] = np.arange(len(values))
    labels = new_id[inverse]
    require(
        len(values) >= 2,
        f"{method} produced a single cluster; the chain needs at least two. Use more documents, "
        "another method, or for BERTopic a smaller min_cluster_size or clusterer='kmeans'.",
    )
    terms = top_terms(texts, labels, n_terms)
    outlier_cluster = int(new_id[np.flatnonzero(is_outlier)[0]]) if is_outlier.any() else None
    if method == "domain":
        names = [str(values[i]) for i in order]
    else:
        names = [", ".join(t[:3]) or f"cluster {k}" for k, t in enumerate(terms)]
    if outlier_cluster is not None:
        names[outlier_cluster] = OUTLIER_NAME
    if method == "bertopic":
        # Which BERTopic topic became which cluster, for reading its own representations.
        extras["topic_of_cluster"] = [int(values[i]) for i in order]
    n_outliers = int(extras.pop("n_outliers", 0))
    return ClusterResult(labels, names, method, params, terms, n_outliers, outlier_cluster, extras)


# -- c-TF-IDF and top terms ------------------------------------------------------------
def class_tfidf(texts: Sequence[str], labels: Sequence[int]) -> tuple[sparse.csr_matrix, np.ndarray]:
    """c-TF-IDF of each class (Grootendorst 2022): ``W[c, t] = tf[c, t] * log(1 + A / f[t])``.

    ``tf[c, t]`` is term ``t``'s frequency in the concatenated documents of class ``c``,
    L1-normalised over terms; ``f[t] = sum_c`` (raw count) is its frequency over all
    classes; ``A`` is the mean number of words per class. Returns ``(W [K, V], vocabulary)``
    for classes ``0..K-1`` (``K = max(labels) + 1``).
    """
    labels = np.asarray(labels, dtype=np.int64)
    vectorizer = term_vectorizer()
    try:
        counts = vectorizer.fit_transform(texts)
    except ValueError:  # no word survives the stop list
        return sparse.csr_matrix((int(labels.max()) + 1, 0)), np.array([], dtype=object)
    n_classes = int(labels.max()) + 1
    membership = sparse.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(n_classes, len(labels)))
    per_class = (membership @ counts).astype(np.float64).tocsr()
    words_per_class = np.asarray(per_class.sum(axis=1)).ravel()
    term_frequency = np.asarray(per_class.sum(axis=0)).ravel()
    idf = np.log1p(words_per_class.mean() / term_frequency)
    tf = sparse.diags(1.0 / np.maximum(words_per_class, 1.0)) @ per_class
    return (tf @ sparse.diags(idf)).tocsr(), vectorizer.get_feature_names_out()


def top_terms(texts: Sequence[str], labels: Sequence[int], n_terms: int = 10) -> list[list[str]]:
    """The ``n_terms`` highest c-TF-IDF terms of each class (ties broken alphabetically)."""
    scores, vocabulary = class_tfidf(texts, labels)
    terms = []
    for row in scores.toarray():
        ranked = np.lexsort((vocabulary, -row)) if len(vocabulary) else np.array([], dtype=int)
        terms.append([str(vocabulary[i]) for i in ranked[:n_terms] if row[i] > 0])
    return terms


# -- validation ------------------------------------------------------------------------
def purity(labels: Sequence[Any], reference: Sequence[Any]) -> float:
    """``(1/n) * sum_k max_j |C_k ∩ R_j|``: share of documents in their cluster's majority class."""
    table = pd.crosstab(np.asarray(labels), np.asarray(reference))
    return float(table.max(axis=1).sum() / table.values.sum())


def npmi_coherence(texts: Sequence[str], terms_per_cluster: Sequence[Sequence[str]]) -> list[float]:
    """Mean NPMI over pairs of each cluster's top terms, from document co-occurrence.

    ``NPMI(a, b) = log(P(a, b) / (P(a) P(b))) / -log P(a, b)`` with ``P`` the share of
    documents containing the word(s); ``-1`` for pairs that never co-occur and ``1`` for a
    pair present in every document. Values lie in ``[-1, 1]``; clusters with fewer than two
    terms get ``nan``. (Document windows, not gensim's 10-word sliding windows.)
    """
    vocabulary = sorted({t for terms in terms_per_cluster for t in terms})
    if not vocabulary:
        return [float("nan")] * len(terms_per_cluster)
    occurs = term_vectorizer(vocabulary=vocabulary, binary=True).fit_transform(texts).tocsc().astype(np.float64)
    n_docs = occurs.shape[0]
    index = {t: i for i, t in enumerate(vocabulary)}
    together = (occurs.T @ occurs).toarray() / n_docs
    alone = np.diag(together)
    scores = []
    for terms in terms_per_cluster:
        pairs = list(combinations([index[t] for t in terms], 2))
        values = [_npmi(together[a, b], alone[a], alone[b]) for a, b in pairs]
        scores.append(float(np.mean(values)) if values else float("nan"))
    return scores


def _npmi(p_ab: float, p_a: float, p_b: float) -> float:
    if p_ab <= 0.0:
        return -1.0
    if p_ab >= 1.0:
        return 1.0
    return math.log(p_ab / (p_a * p_b)) / -math.log(p_ab)


def validate_clusters(
    labels: Sequence[int],
    embeddings: np.ndarray | None = None,
    reference: Sequence[Any] | None = None,
    texts: Sequence[str] | None = None,
    top_terms_per_cluster: Sequence[Sequence[str]] | None = None,
    n_terms: int = 10,
    sample_size: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Quality of a clustering; each metric is ``None`` when its input is missing.

    - ``silhouette``: mean cosine silhouette ``(b - a) / max(a, b)`` on ``embeddings``
      (a seeded sample of ``sample_size`` documents on larger corpora);
    - ``purity``, ``nmi`` (arithmetic normalisation), ``ari``: agreement with ``reference``
      labels, e.g. the metadata domains;
    - ``coherence_npmi``: mean of :func:`npmi_coherence` over clusters, with the per-cluster
      values in ``coherence_per_cluster`` (top terms from c-TF-IDF unless given).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    labels = np.asarray(labels)
    n = len(labels)
    n_clusters = len(np.unique(labels))
    report: dict[str, Any] = {
        "n_documents": n, "n_clusters": n_clusters, "silhouette": None, "purity": None,
        "nmi": None, "ari": None, "coherence_npmi": None, "coherence_per_cluster": None,
    }
    if embeddings is not None:
        embeddings = np.asarray(embeddings)
        require(embeddings.shape[0] == n, f"embeddings have {embeddings.shape[0]} rows for {n} labels")
        if 2 <= n_clusters < n:
            report["silhouette"] = float(
                silhouette_score(embeddings, labels, metric="cosine", sample_size=min(sample_size, n), random_state=seed)
            )
    if reference is not None:
        reference = np.asarray(reference)
        require(len(reference) == n, f"reference has {len(reference)} labels for {n} documents")
        report["purity"] = purity(labels, reference)
        report["nmi"] = float(normalized_mutual_info_score(reference, labels))
        report["ari"] = float(adjusted_rand_score(reference, labels))
    if texts is not None:
        require(len(texts) == n, f"texts has {len(texts)} entries for {n} labels")
        codes = pd.factorize(labels, sort=True)[0]
        terms = top_terms_per_cluster if top_terms_per_cluster is not None else top_terms(texts, codes, n_terms)
        per_cluster = npmi_coherence(texts, [list(t)[:n_terms] for t in terms])
        report["coherence_per_cluster"] = per_cluster
        finite = [v for v in per_cluster if not math.isnan(v)]
        report["coherence_npmi"] = float(np.mean(finite)) if finite else None
    return report


def stability(df: pd.DataFrame, method: str = "kmeans", seeds: Sequence[int] = (0, 1), **options: Any) -> float:
    """Mean pairwise ARI between clusterings of ``df`` that differ only in ``seed``.

    1.0 means the seed does not matter; values near 0 mean the clusters are an accident of
    initialisation. ``options`` go to :func:`cluster_corpus` (pass ``embeddings`` to avoid
    recomputing them).
    """
    from sklearn.metrics import adjusted_rand_score

    require(len(seeds) >= 2, f"stability needs at least two seeds, got {list(seeds)}")
    runs = [cluster_corpus(df, method=method, seed=s, show_progress=False, **options).labels for s in seeds]
    return float(np.mean([adjusted_rand_score(a, b) for a, b in combinations(runs, 2)]))


# -- characterisation ------------------------------------------------------------------
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
MATH_CHARS = frozenset("0123456789+*/=%^×÷−")
CODE_CHARS = frozenset("{}[]<>_#@\\|&~$;`")
PUNCT_CHARS = frozenset(string.punctuation) - MATH_CHARS - CODE_CHARS


def text_statistics(texts: Sequence[str], tokenizer: Any = None) -> dict[str, float]:
    """Surface statistics of a set of texts (one cluster).

    - ``type_token_ratio``: mean over documents of distinct words / words;
    - ``word_entropy_bits``: ``-sum_w p(w) log2 p(w)`` of the pooled word distribution;
    - ``mean_sentence_words``: words per sentence (sentences end at ``.!?`` or blank lines);
    - ``tokens_per_word``: tokenizer tokens / words (only with a ``tokenizer``);
    - ``code_char_share``, ``math_char_share``, ``punct_char_share``: shares of non-space
      characters in the disjoint sets :data:`CODE_CHARS` (brackets, ``_#@;`` ...),
      :data:`MATH_CHARS` (digits and ``+*/=%^``) and other ASCII punctuation.
    """
    ratios, words, sentence_lengths = [], [], []
    counts = {"code": 0, "math": 0, "punct": 0, "visible": 0}
    for text in texts:
        tokens = _WORD.findall(text.lower())
        if tokens:
            ratios.append(len(set(tokens)) / len(tokens))
        words.extend(tokens)
        sentence_lengths.extend(n for n in (len(_WORD.findall(s)) for s in _SENTENCE_END.split(text)) if n)
        for char in text:
            if char.isspace():
                continue
            counts["visible"] += 1
            counts["code"] += char in CODE_CHARS
            counts["math"] += char in MATH_CHARS
            counts["punct"] += char in PUNCT_CHARS
    frequencies = np.array(list(pd.Series(words).value_counts())) if words else np.array([1])
    p = frequencies / frequencies.sum()
    visible = max(counts["visible"], 1)
    stats = {
        "type_token_ratio": float(np.mean(ratios)) if ratios else 0.0,
        "word_entropy_bits": float(-(p * np.log2(p)).sum()) if words else 0.0,
        "mean_sentence_words": float(np.mean(sentence_lengths)) if sentence_lengths else 0.0,
        "code_char_share": counts["code"] / visible,
        "math_char_share": counts["math"] / visible,
        "punct_char_share": counts["punct"] / visible,
    }
    if tokenizer is not None:
        n_tokens = sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
        stats["tokens_per_word"] = n_tokens / max(len(words), 1)
    return stats


def representatives(vectors: np.ndarray, labels: np.ndarray, n_examples: int = 3) -> list[list[int]]:
    """Row indices of each cluster's ``n_examples`` members most cosine-similar to its centroid."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms > 0, norms, 1.0)
    chosen = []
    for k in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == k)
        centroid = unit[members].mean(axis=0)
        similarity = unit[members] @ centroid
        chosen.append(members[np.argsort(-similarity, kind="stable")[:n_examples]].tolist())
    return chosen


def characterize_clusters(
    df: pd.DataFrame,
    labels: Sequence[int],
    embeddings: np.ndarray | None = None,
    tokenizer: Any = None,
    n_terms: int = 10,
    n_examples: int = 3,
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per cluster ``0..K-1``: size, share, top terms, :func:`text_statistics`,
    the majority ``domain`` and its share (when the column exists), and the ids of the
    representative documents (closest to the centroid in embedding space, or in TF-IDF
    space without embeddings).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    labels = np.asarray(labels, dtype=np.int64)
    require(len(labels) == len(df), f"{len(labels)} labels for {len(df)} documents")
    texts = df["text"].astype(str).tolist()
    terms = top_terms(texts, labels, n_terms)
    if embeddings is None:
        vectors = TfidfVectorizer(token_pattern=TERM_PATTERN, stop_words="english").fit_transform(texts).toarray()
    else:
        vectors = np.asarray(embeddings, dtype=np.float64)
    examples = representatives(vectors, labels, n_examples)
    ids = df["id"].astype(str).to_numpy() if "id" in df.columns else np.arange(len(df)).astype(str)
    rows = []
    for k in range(int(labels.max()) + 1):
        members = labels == k
        row: dict[str, Any] = {
            "cluster": k,
            "name": names[k] if names is not None else ", ".join(terms[k][:3]),
            "size": int(members.sum()),
            "share": float(members.mean()),
            "top_terms": terms[k],
        }
        row.update(text_statistics([t for t, m in zip(texts, members) if m], tokenizer))
        if "domain" in df.columns:
            domains = df.loc[members, "domain"].astype(str).value_counts()
            row["majority_domain"] = str(domains.index[0])
            row["majority_domain_share"] = float(domains.iloc[0] / domains.sum())
        row["representative_ids"] = [str(ids[i]) for i in examples[k]]
        rows.append(row)
    return pd.DataFrame(rows)


# -- charts ----------------------------------------------------------------------------
def project_2d(embeddings: np.ndarray, seed: int = 0, reducer: str = "umap", n_neighbors: int = 15) -> np.ndarray:
    """Seeded 2-D coordinates of the embeddings for the cluster map (UMAP, or PCA)."""
    n = len(embeddings)
    require(n >= 4, f"a 2-D map needs at least 4 documents, got {n}")
    model = reduce_dimensions_model(reducer, n_components=2, n_documents=n, seed=seed, n_neighbors=n_neighbors)
    return np.asarray(model.fit_transform(np.asarray(embeddings, dtype=np.float32)))


# -- the interactive explorer ----------------------------------------------------------
# -- the stage's artifacts -------------------------------------------------------------
def save_clustering(run: RunDir, documents: pd.DataFrame, report: dict[str, Any], key: str) -> None:
    """Write ``documents.parquet`` (the :data:`DOCUMENT_COLUMNS`, plus ``n_tokens`` when
    present) and ``clusters.json`` (``report``) under one key."""
    missing = [c for c in DOCUMENT_COLUMNS if c not in documents.columns]
    require(not missing, f"documents lack column(s) {missing}: assign clusters and splits before saving")
    columns = list(DOCUMENT_COLUMNS) + (["n_tokens"] if "n_tokens" in documents.columns else [])
    frame = documents[columns].reset_index(drop=True).astype({"cluster": "int64"})
    run.save_parquet("documents.parquet", frame, key)
    run.save_json("clusters.json", report, key)


def load_clustering(run: RunDir) -> tuple[pd.DataFrame, ClusterResult, dict[str, Any]]:
    """``(documents, result, report)`` of a finished stage 01 in ``run``."""
    stage = "notebook 01_corpus_clusters"
    documents = run.load_parquet("documents.parquet", stage)
    report = run.load_json("clusters.json", stage)
    return documents, ClusterResult.from_dict(report, documents["cluster"].to_numpy()), report
