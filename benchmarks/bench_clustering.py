"""Benchmark stage 01 at scale: embed and cluster many short documents.

Generates ``--n`` short documents (random 100-300 character windows of the builtin corpus's
domains, so each has a known domain), embeds them with MiniLM into a private, empty cache,
reads them back from that cache, and clusters them with k-means, LDA (on the first
``--lda-n`` documents) and BERTopic (on the first ``--bertopic-n`` documents). Reports wall time and peak resident memory (``ru_maxrss``)
after each step, ARI against the generating domains, and, with ``--demo``, the ARI of every
method on the demo corpus (builtin, 60 documents per domain, chunked to 128 tokens) against
its domains.

    python benchmarks/bench_clustering.py --n 100000      # LDA and BERTopic on the first 20,000
    python benchmarks/bench_clustering.py --n 20000 --bertopic-n 10000 --demo
    python benchmarks/bench_clustering.py --n 0 --demo    # only the demo corpus's ARI per method
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import numpy as np
import pandas as pd


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def short_documents(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` distinct 100-300 character windows (cut at spaces) of the builtin domains' text."""
    from rephelpers.corpus.demo import build_builtin_corpus

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small domains warn that they hold fewer documents
        pool = build_builtin_corpus(docs_per_domain=max(200, n // 50), seed=seed)
    rng = np.random.default_rng(seed)
    by_domain = {d: g["text"].tolist() for d, g in pool.groupby("domain")}
    domains = sorted(by_domain)
    texts: dict[str, str] = {}
    while len(texts) < n:
        domain = domains[int(rng.integers(len(domains)))]
        source = by_domain[domain][int(rng.integers(len(by_domain[domain])))]
        length = int(rng.integers(100, 301))
        start = int(rng.integers(0, max(1, len(source) - length)))
        window = " ".join(source[start : start + length].split()[1:-1])  # drop partial words
        if len(window) >= 60:
            texts.setdefault(window, domain)
    return pd.DataFrame({"id": [f"short-{i:06d}" for i in range(n)], "text": list(texts), "domain": list(texts.values())})


def timed(
    label: str,
    results: list[dict[str, Any]],
    action: Callable[[], Any],
    describe: Callable[[Any], dict[str, Any]] | None = None,
    **extra: Any,
) -> Any:
    """Run ``action``, append and print its row; ``describe(value)`` adds untimed columns (e.g. ARI)."""
    start = time.perf_counter()
    value = action()
    row = {"step": label, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb()), **extra}
    if describe is not None:
        row.update(describe(value))
    results.append(row)
    print(json.dumps(row), flush=True)
    return value


def ari_against(domains: pd.Series) -> Callable[[Any], dict[str, Any]]:
    """Columns describing a clustering result: ARI against ``domains``, cluster and outlier counts."""
    from sklearn.metrics import adjusted_rand_score

    def describe(result: Any) -> dict[str, Any]:
        row = {"ari_vs_domains": round(float(adjusted_rand_score(domains, result.labels)), 3), "clusters": result.n_clusters}
        return row | ({"outliers": result.n_outliers} if result.n_outliers else {})

    return describe


def demo_ari(seed: int) -> dict[str, float]:
    """ARI against the domains of every method on the demo corpus (notebook 01's defaults)."""
    from sklearn.metrics import adjusted_rand_score

    from rephelpers.corpus.clustering import cluster_corpus
    from rephelpers.corpus.loaders import chunk_documents, load_corpus
    from rephelpers.corpus.embeddings import embed_texts
    from rephelpers.representations.models import load_model

    chunks = chunk_documents(load_corpus("builtin", docs_per_domain=60, seed=seed), load_model().tokenizer, 128)
    embeddings = embed_texts(chunks["text"].tolist())
    runs = {
        "kmeans": dict(method="kmeans"),
        "domain": dict(method="domain"),
        "lda": dict(method="lda"),
        "bertopic (umap+hdbscan)": dict(method="bertopic"),
        "bertopic (umap+kmeans)": dict(method="bertopic", clusterer="kmeans"),
    }
    scores = {}
    for name, options in runs.items():
        labels = cluster_corpus(chunks, n_clusters=5, seed=seed, embeddings=embeddings, show_progress=False, **options).labels
        scores[name] = round(float(adjusted_rand_score(chunks["domain"], labels)), 3)
        print(json.dumps({"demo_ari": name, "ari": scores[name], "clusters": int(labels.max()) + 1}), flush=True)
    return scores


def at_scale(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """Embed ``args.n`` generated short documents, then cluster them (the steps go into ``results``)."""
    from rephelpers.corpus.clustering import cluster_corpus
    from rephelpers.corpus.embeddings import embed_texts

    docs = timed("generate documents", results, lambda: short_documents(args.n, args.seed), n=args.n)
    mean_chars = float(docs["text"].str.len().mean())
    previous_cache = os.environ.get("REPHELPERS_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["REPHELPERS_CACHE"] = cache  # an empty cache: measure real embedding work
        texts = docs["text"].tolist()
        embeddings = timed(
            "embed (MiniLM, cold cache)", results,
            lambda: embed_texts(texts, batch_size=args.batch_size, show_progress=False),
            n=args.n, mean_chars=round(mean_chars),
        )
        results[-1]["docs_per_second"] = round(args.n / results[-1]["seconds"], 1)
        again = timed("embed (warm cache)", results, lambda: embed_texts(texts, show_progress=False), n=args.n)
        assert np.array_equal(again, embeddings)
        del again
    if previous_cache is None:
        del os.environ["REPHELPERS_CACHE"]
    else:
        os.environ["REPHELPERS_CACHE"] = previous_cache

    timed(
        "k-means", results,
        lambda: cluster_corpus(docs, "kmeans", args.n_clusters, seed=args.seed, embeddings=embeddings, show_progress=False),
        ari_against(docs["domain"]), n=args.n,
    )
    if args.lda_n:
        m = min(args.lda_n, args.n)
        subset = docs.iloc[:m]
        timed(
            "LDA (5 restarts)", results,
            lambda: cluster_corpus(subset, "lda", args.n_clusters, seed=args.seed, show_progress=False),
            ari_against(subset["domain"]), n=m,
        )
    if args.bertopic_n:
        m = min(args.bertopic_n, args.n)
        subset = docs.iloc[:m]
        timed(
            "BERTopic (UMAP + HDBSCAN)", results,
            lambda: cluster_corpus(subset, "bertopic", seed=args.seed, embeddings=embeddings[:m],
                                   min_cluster_size=max(10, m // 200), show_progress=False),
            ari_against(subset["domain"]), n=m,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="short documents to embed and cluster (0: none)")
    parser.add_argument("--bertopic-n", type=int, default=20_000, help="documents BERTopic clusters (0: skip)")
    parser.add_argument("--lda-n", type=int, default=20_000, help="documents LDA clusters (0: skip)")
    parser.add_argument("--n-clusters", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo", action="store_true", help="also report ARI of every method on the demo corpus")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    results: list[dict[str, Any]] = []
    print(json.dumps({"cpus": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads(), "n": args.n}), flush=True)
    if args.n > 0:
        at_scale(args, results)
    summary: dict[str, Any] = {"n": args.n, "steps": results}
    if args.demo:
        summary["demo_ari"] = demo_ari(args.seed)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
