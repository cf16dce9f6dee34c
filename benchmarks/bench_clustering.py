"""Benchmark stage 01 at scale: embed and cluster many short documents, beside the MiniLM baseline.

Generates ``--n`` short documents (random 100-300 character windows of the builtin corpus's
domains, so each has a known domain) and measures, each step in a fresh Python process so
that its peak resident memory (``ru_maxrss``, which only grows) is its own:

- ``embed``: the package default for this many texts (``embedding_method="auto"``: static
  above 10,000 texts) into a private, empty cache, so the time includes distilling the
  word-piece table (MiniLM on the sample, each sampled word piece alone through MiniLM);
- ``baseline``: exact MiniLM (``embedding_method="transformer"``, today's path) on the
  first ``--baseline-n`` documents in another empty cache, with its rate extrapolated to
  ``--n``, and k-means ARI of MiniLM and of the static vectors on those same documents;
- one process per clustering method at ``--n``: k-means, BERTopic (``reducer="auto"``:
  PCA above 20,000 documents; HDBSCAN with ``min_cluster_size = n // 200``, and k-means),
  LDA online (the ``"auto"`` choice above 20,000 documents) and, with ``--lda-batch``, LDA
  batch. Each embeds again from the now warm cache (as a re-run would) and clusters;
  its row gives the cold embedding time of ``embed``, the clustering time, their sum and
  the process's peak RSS, and ARI against the generating domains.

``--demo`` adds, in one more process, every method's ARI on the demo corpus (builtin, 60
documents per domain, 128-token chunks, 5 clusters) with exact MiniLM embeddings (the
baseline: notebook 01's default there) and with static ones, at each ``--demo-seeds``
(clustering seeds; the corpus is the seed-0 demo corpus).

    python benchmarks/bench_clustering.py --n 100000 --demo            # the issue-12 figures
    python benchmarks/bench_clustering.py --n 20000 --lda-batch --demo-seeds 0 1 2 --demo
    python benchmarks/bench_clustering.py --n 0 --demo                 # only the demo corpus's ARI
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rephelpers

METHODS = {
    # step name -> cluster_corpus options (n_clusters and seed come from the command line)
    "kmeans": dict(method="kmeans"),
    "bertopic (hdbscan)": dict(method="bertopic", clusterer="hdbscan"),
    "bertopic (kmeans)": dict(method="bertopic", clusterer="kmeans"),
    "lda (online)": dict(method="lda", lda_learning="online"),
    "lda (batch)": dict(method="lda", lda_learning="batch"),
}


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


def ari(reference: Any, labels: Any) -> float:
    from sklearn.metrics import adjusted_rand_score

    return round(float(adjusted_rand_score(reference, labels)), 3)


# -- the steps, each run in its own process ----------------------------------------------
def step_embed(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Cold embedding of all documents with the package default for their number."""
    from rephelpers.corpus.embeddings import embed_texts, resolve_embedding_method

    texts = pd.read_parquet(work / "docs.parquet")["text"].tolist()
    start = time.perf_counter()
    embeddings = embed_texts(texts, method=args.embedding_method, show_progress=False)
    seconds = time.perf_counter() - start
    return {
        "embedding_method": resolve_embedding_method(args.embedding_method, len(set(texts))), "embed_s": round(seconds, 1),
        "docs_per_s": round(len(texts) / seconds), "dim": embeddings.shape[1],
    }


def step_baseline(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Exact MiniLM on the first ``--baseline-n`` documents (cold), extrapolated to ``--n``."""
    from rephelpers.corpus.clustering import kmeans_labels
    from rephelpers.corpus.embeddings import embed_texts

    docs = pd.read_parquet(work / "docs.parquet")
    m = min(args.baseline_n, len(docs))
    texts = docs["text"].tolist()[:m]
    start = time.perf_counter()
    exact = embed_texts(texts, method="transformer", batch_size=args.batch_size, show_progress=False)
    seconds = time.perf_counter() - start
    rss = peak_rss_mb()
    os.environ["REPHELPERS_CACHE"] = str(work / "cache")  # the embed step's warm cache
    ours = embed_texts(docs["text"].tolist(), method=args.embedding_method, show_progress=False)[:m]
    reference = docs["domain"].iloc[:m]
    return {
        "n": m, "embed_s": round(seconds, 1), "docs_per_s": round(m / seconds, 1),
        "extrapolated_embed_s": round(len(docs) * seconds / m), "peak_rss_mb": round(rss),
        "kmeans_ari_minilm": [ari(reference, kmeans_labels(exact, args.n_clusters, s)) for s in args.demo_seeds],
        "kmeans_ari_ours": [ari(reference, kmeans_labels(ours, args.n_clusters, s)) for s in args.demo_seeds],
    }


def step_method(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One clustering method on all documents (embedding first, from the warm cache)."""
    from rephelpers.corpus.clustering import cluster_corpus
    from rephelpers.corpus.embeddings import embed_texts

    docs = pd.read_parquet(work / "docs.parquet")
    options = dict(METHODS[args.step])
    row: dict[str, Any] = {}
    embeddings = None
    if options["method"] != "lda":
        start = time.perf_counter()
        embeddings = embed_texts(docs["text"].tolist(), method=args.embedding_method, show_progress=False)
        options["embedding_method"] = args.embedding_method
        row["embed_warm_s"] = round(time.perf_counter() - start, 1)
    if options["method"] == "bertopic" and options["clusterer"] == "hdbscan":
        options["min_cluster_size"] = max(10, len(docs) // 200)
    start = time.perf_counter()
    result = cluster_corpus(docs, n_clusters=args.n_clusters, seed=args.seed, embeddings=embeddings, show_progress=False, **options)
    row["cluster_s"] = round(time.perf_counter() - start, 1)
    row.update(
        ari_vs_domains=ari(docs["domain"], result.labels), clusters=result.n_clusters,
        **({"outliers": result.n_outliers} if result.n_outliers else {}),
        params={k: v for k, v in result.params.items() if k in ("embedding_method", "reducer", "clusterer", "lda_learning", "min_cluster_size")},
    )
    return row


def step_demo(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """ARI against the domains of every method on the demo corpus, MiniLM and static embeddings."""
    from rephelpers.corpus.clustering import cluster_corpus
    from rephelpers.corpus.embeddings import embed_texts
    from rephelpers.corpus.loaders import chunk_documents, load_corpus
    from rephelpers.representations.models import load_model

    chunks = chunk_documents(load_corpus("builtin", docs_per_domain=60, seed=0), load_model().tokenizer, 128)
    texts = chunks["text"].tolist()
    runs = {
        "kmeans": dict(method="kmeans"),
        "bertopic (umap+hdbscan)": dict(method="bertopic"),
        "bertopic (umap+kmeans)": dict(method="bertopic", clusterer="kmeans"),
        "bertopic (pca+hdbscan)": dict(method="bertopic", reducer="pca"),
        "bertopic (pca+kmeans)": dict(method="bertopic", reducer="pca", clusterer="kmeans"),
    }
    table: dict[str, dict[str, list[float]]] = {}
    for embedding_method in ("transformer", "static"):
        embeddings = embed_texts(texts, method=embedding_method, show_progress=False)
        for name, options in runs.items():
            scores = [
                ari(chunks["domain"], cluster_corpus(
                    chunks, n_clusters=5, seed=seed, embeddings=embeddings, embedding_method=embedding_method,
                    show_progress=False, **options,
                ).labels)
                for seed in args.demo_seeds
            ]
            table.setdefault(name, {})[embedding_method] = scores
            print(json.dumps({"demo": name, "embedding_method": embedding_method, "ari_per_seed": scores}), flush=True)
    for name, options in {"lda": dict(method="lda"), "domain": dict(method="domain")}.items():
        table[name] = {"words": [ari(chunks["domain"], cluster_corpus(chunks, n_clusters=5, seed=seed, show_progress=False, **options).labels)
                                 for seed in args.demo_seeds]}
        print(json.dumps({"demo": name, "ari_per_seed": table[name]["words"]}), flush=True)
    return {"n_chunks": len(chunks), "seeds": args.demo_seeds, "ari": table}


STEPS = {"embed": step_embed, "baseline": step_baseline, "demo": step_demo, **{name: step_method for name in METHODS}}


# -- the driver --------------------------------------------------------------------------
def run_step(name: str, work: Path, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """``name`` in a fresh interpreter with ``cache`` as its user cache; its row plus wall time and peak RSS."""
    command = [
        sys.executable, __file__, "--step", name, "--work", str(work), "--n", str(args.n),
        "--n-clusters", str(args.n_clusters), "--seed", str(args.seed), "--baseline-n", str(args.baseline_n),
        "--batch-size", str(args.batch_size), "--embedding-method", args.embedding_method,
        "--demo-seeds", *map(str, args.demo_seeds),
    ]
    environment = {**os.environ, "REPHELPERS_CACHE": str(cache)}
    start = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"step": name, "error": done.returncode}
    for line in done.stdout.splitlines():
        if line.startswith('{"demo"'):
            print(line, flush=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"step": name, "process_wall_s": round(wall, 1), **row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="short documents to embed and cluster (0: none)")
    parser.add_argument("--baseline-n", type=int, default=2_000, help="documents exact MiniLM embeds for the baseline (0: skip)")
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "lda (batch)"], choices=list(METHODS))
    parser.add_argument("--lda-batch", action="store_true", help="also LDA with batch learning (slow at 100,000)")
    parser.add_argument("--n-clusters", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--embedding-method", default="auto", choices=["auto", "transformer", "static"],
                        help="how the --n documents are embedded (auto: static above 10,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo", action="store_true", help="also report ARI of every method on the demo corpus")
    parser.add_argument("--demo-seeds", type=int, nargs="+", default=[0, 1, 2], help="clustering seeds for the demo ARI and the baseline's k-means")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.step:  # a child: one step, its row as the last line
        row = STEPS[args.step](Path(args.work), args)
        row.setdefault("peak_rss_mb", round(peak_rss_mb()))
        print(json.dumps(row), flush=True)
        return 0

    import torch

    print(json.dumps({"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "n": args.n,
                      "load_average": os.getloadavg()}), flush=True)
    methods = list(args.methods) + (["lda (batch)"] if args.lda_batch and "lda (batch)" not in args.methods else [])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.n > 0:
            start = time.perf_counter()
            short_documents(args.n, args.seed).to_parquet(work / "docs.parquet")
            print(json.dumps({"step": "generate documents", "seconds": round(time.perf_counter() - start, 1)}), flush=True)
            plan = ["embed"] + (["baseline"] if args.baseline_n else []) + methods
            caches = {"baseline": work / "baseline-cache"}
            for name in plan:
                row = run_step(name, work, args, caches.get(name, work / "cache"))
                if name in METHODS and "cluster_s" in row:
                    embed = next((r for r in rows if r["step"] == "embed"), {})
                    if "embed_warm_s" in row:
                        row["embed_s"] = embed.get("embed_s")
                        row["total_s"] = round(row["embed_s"] + row["cluster_s"], 1)
                    else:
                        row["total_s"] = row["cluster_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.demo:
            rows.append(run_step("demo", work, args, _user_cache()))  # MiniLM's demo vectors may be cached there
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"n": args.n, "rows": rows}, fh, indent=2)
    return 0


def _user_cache() -> Path:
    """The user cache (``$REPHELPERS_CACHE`` where set)."""
    from rephelpers.paths import cache_dir

    return cache_dir()


def print_table(rows: list[dict[str, Any]]) -> None:
    """The per-method figures beside the baseline, as a readable table."""
    lines = [f"{'step':<22}{'embed s':>9}{'cluster s':>11}{'total s':>9}{'peak RSS MB':>13}{'ARI':>7}"]
    for row in rows:
        if row["step"] == "demo":
            continue
        embed = row.get("extrapolated_embed_s", row.get("embed_s", ""))
        lines.append(
            f"{row['step']:<22}{embed!s:>9}{row.get('cluster_s', '')!s:>11}{row.get('total_s', '')!s:>9}"
            f"{row.get('peak_rss_mb', '')!s:>13}{row.get('ari_vs_domains', '')!s:>7}"
        )
        if row["step"] == "baseline":
            lines.append(f"{'':<22}(exact MiniLM: {row['docs_per_s']} docs/s over {row['embed_s']} s on {row['n']} docs, "
                         f"extrapolated to --n; k-means ARI on those docs, MiniLM {row['kmeans_ari_minilm']}, "
                         f"ours {row['kmeans_ari_ours']})")
    print("\n".join(lines))
    demo = next((r for r in rows if r["step"] == "demo"), None)
    if demo:
        print(f"demo corpus ({demo['n_chunks']} chunks), ARI per clustering seed {demo['seeds']}:")
        for name, by_embedding in demo["ari"].items():
            print(f"  {name:<26}" + "   ".join(f"{k}: {v}" for k, v in by_embedding.items()))


if __name__ == "__main__":
    sys.exit(main())
