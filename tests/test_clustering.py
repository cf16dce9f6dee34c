"""Stage 01 clustering: planted domains are recovered; metrics match independent maths."""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from scipy.special import comb

from rephelpers import RephelpersError
from rephelpers.artifacts import RunDir
from rephelpers.corpus.clustering import (
    ClusterResult, characterize_clusters, class_tfidf, cluster_corpus, load_clustering, npmi_coherence,
    project_2d, purity, save_clustering, stability, text_statistics, top_terms, validate_clusters,
)
from rephelpers.views.charts import cluster_domain_chart, cluster_map_chart, contingency_chart
from rephelpers.corpus.loaders import assign_splits
from rephelpers.corpus.demo import build_builtin_corpus
from rephelpers.corpus.embeddings import embed_texts
from rephelpers.views.explorers import cluster_explorer

DOMAINS = ("code", "legal", "markdown", "math")


@pytest.fixture(scope="module")
def planted():
    """Four planted domains of 15 real documents each, with short-context embeddings."""
    docs = build_builtin_corpus(docs_per_domain=15, seed=0, domains=DOMAINS)
    embeddings = embed_texts(docs["text"].tolist(), max_seq_length=64, cache=False, show_progress=False)
    return docs, embeddings


def ari(a, b) -> float:
    """Adjusted Rand index from pair counts (Hubert & Arabie 1985), independent of sklearn."""
    table = pd.crosstab(np.asarray(a), np.asarray(b)).to_numpy()
    index = comb(table, 2).sum()
    rows, cols = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
    expected = rows * cols / comb(table.sum(), 2)
    return float((index - expected) / ((rows + cols) / 2 - expected))


def random_baseline(reference, k: int, seed: int = 0) -> float:
    return ari(reference, np.random.default_rng(seed).integers(0, k, len(reference)))


# -- recovering planted domains ---------------------------------------------------------
# Bounds sit below what was measured on the pinned built-in corpus (the same documents on
# every machine set up by scripts/setup.sh) at corpus seeds 0-2; the fixture uses seed 0.
# Every bound is at least 0.35 above what random labels with as many clusters score (~0.05).
@pytest.mark.parametrize(
    "method, options, bound",
    [
        ("kmeans", {"n_clusters": 4}, 0.6),  # measured 0.72-0.87 (0.75 at seed 0)
        ("lda", {"n_clusters": 4}, 0.42),  # best of 5 restarts: 0.46-0.67 (0.46 at seed 0)
        ("bertopic", {"reducer": "pca", "min_cluster_size": 5}, 0.5),  # leaf selection: 0.54-0.75 (0.75)
        ("bertopic", {"reducer": "pca", "clusterer": "kmeans", "n_clusters": 4}, 0.45),  # 0.49-0.83 (0.83)
        ("bertopic", {"reducer": "pca", "min_cluster_size": 5, "seed_topics": [["def", "return"], ["license", "copyright"]]}, 0.45),  # 0.50-0.79 (0.79)
    ],
)
def test_methods_recover_planted_domains(planted, method, options, bound):
    docs, embeddings = planted
    result = cluster_corpus(docs, method=method, embeddings=embeddings, seed=0, show_progress=False, **options)
    assert ari(docs["domain"], result.labels) > bound > random_baseline(docs["domain"], result.n_clusters) + 0.35
    assert sorted(set(result.labels.tolist())) == list(range(result.n_clusters))
    assert (np.diff(result.sizes[: result.n_clusters - (result.outlier_cluster is not None)]) <= 0).all()
    assert len(result.names) == len(result.top_terms) == result.n_clusters


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPHELPERS_CACHE", str(tmp_path))
    return tmp_path


# Static embeddings (a word-piece table distilled from MiniLM on a quarter of the documents)
# and online LDA at the planted corpus's size; bounds below what was measured at corpus seeds
# 0-2 (the fixture uses seed 0), and at least `margin` above random labels.
@pytest.mark.parametrize(
    "method, options, bound, margin",
    [
        ("kmeans", {"n_clusters": 4, "embedding_method": "static"}, 0.75, 0.35),  # 0.83-0.96 (0.91); MiniLM 0.72-0.87
        ("bertopic", {"reducer": "pca", "clusterer": "kmeans", "n_clusters": 4, "embedding_method": "static"}, 0.75, 0.35),  # 0.83-0.96 (0.87)
        # Online LDA is meant for large corpora: here its one mini-batch per pass gives
        # 0.36-0.48 (0.46) where batch gives 0.46-0.67.
        ("lda", {"n_clusters": 4, "lda_learning": "online"}, 0.33, 0.25),
    ],
)
def test_fast_options_recover_planted_domains(planted, private_cache, method, options, bound, margin):
    docs, _ = planted
    result = cluster_corpus(docs, method=method, seed=0, show_progress=False, **options)
    assert ari(docs["domain"], result.labels) > bound > random_baseline(docs["domain"], result.n_clusters) + margin
    for name in ("embedding_method", "lda_learning"):
        if name in options:
            assert result.params[name] == options[name]


def test_auto_choices_switch_at_their_thresholds(planted, private_cache, monkeypatch):
    """Above a (here lowered) corpus size, 'auto' picks static embeddings, PCA and online LDA,
    exactly as if they had been asked for."""
    from rephelpers.corpus import clustering, embeddings
    from rephelpers.corpus.clustering import resolve_lda_learning, resolve_reducer

    docs, _ = planted
    assert resolve_reducer("auto", clustering.UMAP_LIMIT) == "umap" and resolve_reducer("auto", clustering.UMAP_LIMIT + 1) == "pca"
    assert resolve_lda_learning("auto", clustering.LDA_ONLINE_THRESHOLD) == "batch"
    assert resolve_lda_learning("auto", clustering.LDA_ONLINE_THRESHOLD + 1) == "online"
    monkeypatch.setattr(embeddings, "STATIC_THRESHOLD", 59)
    monkeypatch.setattr(clustering, "UMAP_LIMIT", 59)
    monkeypatch.setattr(clustering, "LDA_ONLINE_THRESHOLD", 59)
    common = dict(n_clusters=4, show_progress=False)
    auto = cluster_corpus(docs, "bertopic", clusterer="kmeans", **common)
    chosen = cluster_corpus(docs, "bertopic", clusterer="kmeans", embedding_method="static", reducer="pca", **common)
    assert auto.params["embedding_method"] == "static" and auto.params["reducer"] == "pca"
    assert np.array_equal(auto.labels, chosen.labels)
    lda = cluster_corpus(docs, "lda", **common)
    assert lda.params["lda_learning"] == "online"
    assert np.array_equal(lda.labels, cluster_corpus(docs, "lda", lda_learning="online", **common).labels)


def test_domain_method_uses_metadata_sorted_by_name(planted):
    docs, _ = planted
    result = cluster_corpus(docs, method="domain", show_progress=False)
    assert result.names == sorted(DOMAINS)
    assert np.array_equal(result.labels, docs["domain"].map(sorted(DOMAINS).index).to_numpy())


def test_bertopic_outliers_are_counted_and_either_kept_or_reassigned(planted):
    docs, embeddings = planted
    common = dict(method="bertopic", embeddings=embeddings, reducer="pca", min_cluster_size=5, show_progress=False)
    kept = cluster_corpus(docs, outliers="keep", **common)
    reassigned = cluster_corpus(docs, outliers="reassign", **common)
    assert kept.n_outliers > 0 and kept.n_outliers == reassigned.n_outliers
    assert kept.outlier_cluster == kept.n_clusters - 1 and kept.names[-1] == "outliers"
    assert kept.sizes[kept.outlier_cluster] == kept.n_outliers
    assert reassigned.outlier_cluster is None and reassigned.n_clusters == kept.n_clusters - 1
    # Documents that had a topic keep it when outliers are reassigned.
    inliers = kept.labels != kept.outlier_cluster
    assert ari(kept.labels[inliers], reassigned.labels[inliers]) == pytest.approx(1.0)
    # Measured 0.37-0.47 at corpus seeds 0-2 (leaf selection, 13-20 outliers). At seed 0 it is
    # 0.445 in a fresh process and 0.478 after the tests above: HDBSCAN's outlier set moves by
    # two documents with float-level differences in the PCA input (BLAS threading state).
    assert ari(docs["domain"], kept.labels) > 0.4


def test_bertopic_topic_reduction_counts_real_topics(planted):
    docs, embeddings = planted
    for outliers, expected in (("reassign", 3), ("keep", 4)):
        result = cluster_corpus(docs, method="bertopic", embeddings=embeddings, reducer="pca", min_cluster_size=5,
                                nr_topics=3, outliers=outliers, show_progress=False)
        assert result.n_clusters == expected


def test_bertopic_supervision_from_domain_labels(planted):
    docs, embeddings = planted
    manual = cluster_corpus(docs, method="bertopic", embeddings=embeddings, guided_labels="domain",
                            supervision="manual", show_progress=False)
    assert ari(docs["domain"], manual.labels) == pytest.approx(1.0)
    half = [d if i % 2 else None for i, d in enumerate(docs["domain"])]
    semi = cluster_corpus(docs, method="bertopic", embeddings=embeddings, guided_labels=half, reducer="pca",
                          min_cluster_size=5, show_progress=False)
    assert ari(docs["domain"], semi.labels) > 0.6  # measured 0.54-0.75 at seeds 0-2 (0.75 at seed 0)
    with pytest.raises(RephelpersError, match="every document needs one"):
        cluster_corpus(docs, method="bertopic", embeddings=embeddings, guided_labels=half, supervision="manual")


@pytest.mark.slow
def test_bertopic_with_default_umap_and_hdbscan(planted):
    docs, embeddings = planted
    result = cluster_corpus(docs, method="bertopic", embeddings=embeddings, min_cluster_size=5, show_progress=False)
    assert ari(docs["domain"], result.labels) > 0.5


def test_stability_is_the_mean_pairwise_ari_over_seeds(planted):
    docs, embeddings = planted
    value = stability(docs, "kmeans", seeds=(0, 1, 2), embeddings=embeddings, n_clusters=4)
    runs = [cluster_corpus(docs, "kmeans", 4, seed=s, embeddings=embeddings).labels for s in (0, 1, 2)]
    assert value == pytest.approx(np.mean([ari(a, b) for a, b in combinations(runs, 2)]))
    assert stability(docs, "domain") == pytest.approx(1.0)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"method": "spectral"}, "unknown cluster method"),
        ({"method": "kmeans", "n_clusters": 60}, "n_clusters must be an int in 2..59"),
        ({"method": "kmeans", "embeddings": np.zeros((3, 8))}, r"shape \[n_documents=60"),
        ({"method": "kmeans", "nr_topics": 3}, "only apply to method='bertopic'"),
        ({"method": "bertopic", "clusterer": "dbscan"}, "clusterer must be one of"),
        ({"method": "bertopic", "seed_topics": ["def"]}, "seed_topics must be a list"),
        ({"method": "bertopic", "guided_labels": "topic"}, "not a column"),
        ({"method": "kmeans", "outliers": "drop"}, "outliers must be one of"),
        ({"method": "kmeans", "embedding_method": "fast"}, "embedding method must be one of"),
        ({"method": "bertopic", "reducer": "tsne"}, "reducer must be 'auto' or one of"),
        ({"method": "lda", "lda_learning": "stream"}, "lda_learning must be one of"),
    ],
)
def test_bad_options_fail_before_any_compute(planted, options, match):
    docs, embeddings = planted
    options = {"embeddings": embeddings, **options}
    with pytest.raises(RephelpersError, match=match):
        cluster_corpus(docs, **options)


def test_domain_method_needs_a_domain_column(planted):
    docs, _ = planted
    with pytest.raises(RephelpersError, match="needs a 'domain' column"):
        cluster_corpus(docs.drop(columns=["domain"]), method="domain")


# -- c-TF-IDF, validation metrics and coherence against independent computations --------
TOY_TEXTS = [
    "apple banana apple cherry",
    "banana apple fruit salad",
    "python code function return",
    "code function python class return",
    "court law judge ruling",
    "law court appeal judge",
]
TOY_LABELS = np.array([0, 0, 1, 1, 2, 2])


def test_class_tfidf_matches_the_formula_and_bertopic():
    scores, vocabulary = class_tfidf(TOY_TEXTS, TOY_LABELS)
    counts = [Counter(w for t, l in zip(TOY_TEXTS, TOY_LABELS) if l == k for w in t.split()) for k in range(3)]
    words_per_class = [sum(c.values()) for c in counts]
    average = np.mean(words_per_class)
    for k in range(3):
        for j, word in enumerate(vocabulary):
            total = sum(c[word] for c in counts)
            expected = counts[k][word] / words_per_class[k] * math.log(1 + average / total)
            assert scores[k, j] == pytest.approx(expected)
    # Same ranking as BERTopic's own transformer (it rounds A down to an int).
    from bertopic.vectorizers import ClassTfidfTransformer
    from rephelpers.corpus.clustering import term_vectorizer

    per_class = term_vectorizer(vocabulary=list(vocabulary)).fit_transform([" ".join(t for t, l in zip(TOY_TEXTS, TOY_LABELS) if l == k) for k in range(3)])
    bertopic_scores = ClassTfidfTransformer().fit_transform(per_class).toarray()
    assert (np.argmax(bertopic_scores, axis=1) == np.argmax(scores.toarray(), axis=1)).all()
    assert top_terms(TOY_TEXTS, TOY_LABELS, 2)[2] == ["court", "judge"]


def test_purity_nmi_ari_and_silhouette_match_independent_maths():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    reference = np.where(rng.random(40) < 0.7, labels, rng.integers(0, 3, 40))
    embeddings = rng.normal(size=(40, 6)) + labels[:, None]
    report = validate_clusters(labels, embeddings, reference)
    table = pd.crosstab(labels, reference).to_numpy()
    assert report["purity"] == pytest.approx(table.max(axis=1).sum() / 40) == purity(labels, reference)
    # Splitting a class over two clusters keeps purity at 1; merging two classes does not.
    assert purity([0, 0, 1, 1, 2, 2], list("aaaabb")) == 1.0
    assert purity([0, 0, 0, 0, 1, 1], list("aabbcc")) == pytest.approx(4 / 6)
    assert report["ari"] == pytest.approx(ari(reference, labels))
    p = table / 40
    independent = np.outer(p.sum(1), p.sum(0))
    mutual = sum(p[i, j] * np.log(p[i, j] / independent[i, j]) for i, j in zip(*np.nonzero(p)))
    entropy = lambda q: -np.sum(q[q > 0] * np.log(q[q > 0]))  # noqa: E731
    assert report["nmi"] == pytest.approx(mutual / ((entropy(p.sum(1)) + entropy(p.sum(0))) / 2))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distance = 1 - unit @ unit.T
    silhouettes = []
    for i in range(40):
        same = (labels == labels[i]) & (np.arange(40) != i)
        a = distance[i, same].mean()
        b = min(distance[i, labels == k].mean() for k in set(labels.tolist()) - {labels[i]})
        silhouettes.append((b - a) / max(a, b))
    assert report["silhouette"] == pytest.approx(np.mean(silhouettes), abs=1e-6)
    assert report["coherence_npmi"] is None


def test_npmi_coherence_matches_brute_force():
    topics = [["apple", "banana", "fruit"], ["python", "code", "judge"], ["law"]]
    documents = [set(t.split()) for t in TOY_TEXTS]
    n = len(documents)

    def npmi(a: str, b: str) -> float:
        both = sum(a in d and b in d for d in documents) / n
        if both == 0:
            return -1.0
        if both == 1:
            return 1.0
        pa, pb = (sum(w in d for d in documents) / n for w in (a, b))
        return math.log(both / (pa * pb)) / -math.log(both)

    scores = npmi_coherence(TOY_TEXTS, topics)
    for topic, score in zip(topics[:2], scores[:2]):
        assert score == pytest.approx(np.mean([npmi(a, b) for a, b in combinations(topic, 2)]))
    assert math.isnan(scores[2])
    assert scores[0] > scores[1]  # a coherent topic beats one with an intruder
    report = validate_clusters(TOY_LABELS, texts=TOY_TEXTS, top_terms_per_cluster=topics)
    assert report["coherence_npmi"] == pytest.approx(np.mean(scores[:2]))


# -- characterisation ------------------------------------------------------------------
def test_text_statistics_by_hand():
    texts = ["The cat sat. The cat ran!", "x = {a: 1}; y = b_2"]
    stats = text_statistics(texts)
    assert stats["type_token_ratio"] == pytest.approx((4 / 6 + 5 / 5) / 2)  # 'the','cat','sat','ran' / 6; x,a,1,y,b_2
    words = ["the", "cat", "sat", "the", "cat", "ran", "x", "a", "1", "y", "b_2"]
    p = np.array(list(Counter(words).values())) / len(words)
    assert stats["word_entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert stats["mean_sentence_words"] == pytest.approx((3 + 3 + 5) / 3)
    visible = sum(not c.isspace() for c in "".join(texts))
    assert stats["code_char_share"] == pytest.approx(4 / visible)  # { } ; _
    assert stats["math_char_share"] == pytest.approx(4 / visible)  # = 1 = 2
    assert stats["punct_char_share"] == pytest.approx(3 / visible)  # . ! :


def test_characterize_clusters_reports_sizes_domains_and_central_documents(planted):
    docs, embeddings = planted
    labels = docs["domain"].map(sorted(DOMAINS).index).to_numpy()
    table = characterize_clusters(docs, labels, embeddings, n_examples=2)
    assert table["size"].tolist() == [15] * 4 and table["share"].sum() == pytest.approx(1.0)
    assert table["majority_domain"].tolist() == sorted(DOMAINS) and (table["majority_domain_share"] == 1.0).all()
    math_row = table.set_index("majority_domain").loc["math"]
    code_row = table.set_index("majority_domain").loc["code"]
    assert math_row["math_char_share"] > 3 * code_row["math_char_share"]
    assert code_row["code_char_share"] > 3 * math_row["code_char_share"]
    for k in range(4):  # representatives are the members closest (cosine) to the centroid
        members = np.flatnonzero(labels == k)
        unit = embeddings[members] / np.linalg.norm(embeddings[members], axis=1, keepdims=True)
        best = members[np.argsort(-(unit @ unit.mean(0)))[:2]]
        assert table.loc[k, "representative_ids"] == docs["id"].iloc[best].tolist()
    no_embeddings = characterize_clusters(docs, labels)
    assert all(len(ids) == 3 for ids in no_embeddings["representative_ids"])


# -- charts, widget, artifacts ---------------------------------------------------------
def test_charts_and_explorer_build_from_a_clustering(planted):
    docs, embeddings = planted
    result = cluster_corpus(docs, "kmeans", 4, embeddings=embeddings)
    coordinates = project_2d(embeddings, reducer="pca")
    assert coordinates.shape == (60, 2)
    bars = cluster_domain_chart(docs, result.labels, result.names).to_dict()
    assert sum(row["documents"] for row in bars["datasets"][next(iter(bars["datasets"]))]) == 60
    scatter = cluster_map_chart(docs, result.labels, result.names, coordinates).to_dict()
    assert len(scatter["hconcat"]) == 2
    heat = contingency_chart(result.labels, docs["domain"], result.names).to_dict()
    cells = heat["datasets"][next(iter(heat["datasets"]))]
    assert sum(c["documents"] for c in cells) == 60
    documents = docs.assign(cluster=result.labels)
    table = characterize_clusters(docs, result.labels, embeddings, names=result.names)
    explorer = cluster_explorer(documents, table)
    picker, view = explorer.children
    picker.value = 1
    assert ", ".join(table.loc[1, "top_terms"]) in view.value.replace("&#x27;", "'")
    assert table.loc[1, "representative_ids"][0] in view.value


def test_in_a_batch_run_the_cluster_explorer_is_its_first_card(planted, monkeypatch):
    """The runner's kernels (HEADLESS_ENV set) get the first cluster's card as HTML, no widgets."""
    from IPython.display import HTML

    from rephelpers.progress import HEADLESS_ENV

    docs, embeddings = planted
    result = cluster_corpus(docs, "kmeans", 4, embeddings=embeddings)
    documents = docs.assign(cluster=result.labels)
    table = characterize_clusters(docs, result.labels, embeddings, names=result.names)
    first = cluster_explorer(documents, table).children[1].value
    monkeypatch.setenv(HEADLESS_ENV, "1")
    card = cluster_explorer(documents, table)
    assert isinstance(card, HTML) and card.data == first
    assert table.loc[0, "representative_ids"][0] in card.data


def test_stage_artifacts_round_trip(planted, tmp_path):
    docs, embeddings = planted
    result = cluster_corpus(docs, "kmeans", 4, embeddings=embeddings)
    documents = assign_splits(docs.assign(cluster=result.labels))
    report = {**result.to_dict(), "validation": validate_clusters(result.labels, embeddings, docs["domain"])}
    run = RunDir(tmp_path / "run")
    save_clustering(run, documents, report, key="k1")
    loaded, again, saved = load_clustering(run)
    assert list(loaded.columns) == ["id", "doc_id", "text", "source", "domain", "split", "cluster"]
    assert np.array_equal(again.labels, result.labels) and again.names == result.names
    assert saved["validation"]["ari"] == pytest.approx(report["validation"]["ari"])
    assert run.is_fresh("documents.parquet", "k1") and run.is_fresh("clusters.json", "k1")
    with pytest.raises(RephelpersError, match="re-run notebook 01"):
        ClusterResult.from_dict(saved, result.labels[:10])
