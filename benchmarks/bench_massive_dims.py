"""Massive activations at the demo layers, and what the sink-aware statistics change in R_k.

Builds the demo clusters the way notebook 01 does (papermill_params/demo.yaml by default),
extracts the demo layers with ``skip_first`` 0 (the old plain mean) and 1 (the default)
plus their token statistics, and prints per layer:

- the massive dimensions (max ``|h_i| / median_j |h_j|`` over all tokens > threshold),
  their largest ratio and ``|h|``, and whether they peak at a document's first token;
- which massive dimensions R_k (top_k by raw S) contains under the old behaviour
  (skip_first=0, massive dims allowed), with skip_first=1 alone, and by default
  (skip_first=1, massive dims excluded: none, by construction);
- per cluster, how many of R_k's dimensions change between raw S on pooled vectors and
  token-level raw S (both skip_first=1, massive dims excluded): ``|R_pooled ∖ R_token|``;
- for the dimension with the largest ratio, the correlation of its pooled value with
  1/T (T: the chunk's token count) and the largest |S(i,k)| over all dimensions, for
  skip_first 0 and 1 (how much pooled S tracks chunk length through the sink).

    python benchmarks/bench_massive_dims.py                      # demo.yaml, skip_first=1 only
    python benchmarks/bench_massive_dims.py --skip0 --per-cluster 40   # + the old mean, 40 docs per cluster
    python benchmarks/bench_massive_dims.py --params papermill_params/ci.yaml --layers 15 --skip0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import yaml

from rephelpers.representations.activations import extract_activations
from rephelpers.dimensions.association import find_cluster_components
from rephelpers.corpus.clustering import cluster_corpus
from rephelpers.corpus.loaders import assign_splits, chunk_documents, load_corpus
from rephelpers.corpus.embeddings import embed_texts
from rephelpers.representations.models import load_model
from rephelpers.representations.tokenstats import massive_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="papermill_params/demo.yaml")
    parser.add_argument("--layers", type=int, nargs="*", help="default: the file's layers")
    parser.add_argument("--threshold", type=float, default=100.0)
    parser.add_argument("--per-cluster", type=int, default=0,
                        help="extract only this many documents per cluster (seeded sample; 0: all)")
    parser.add_argument("--skip0", action="store_true", help="also extract with skip_first=0 (the old mean)")
    args = parser.parse_args()
    p = yaml.safe_load(open(args.params))["parameters"]
    layers = args.layers or p["layers"]
    top_k, seed = int(p["top_k"]), int(p["seed"])

    model = load_model(p["model_name"])
    documents = load_corpus(p["corpus"], seed=seed, docs_per_domain=p["docs_per_domain"])
    chunks = chunk_documents(documents, model.tokenizer, p["max_tokens"])
    result = cluster_corpus(chunks, method=p["cluster_method"], n_clusters=p["n_clusters"], seed=seed,
                            embeddings=embed_texts(chunks["text"].tolist()))
    docs = assign_splits(chunks.assign(cluster=result.labels), heldout_fraction=0.2, seed=seed)
    if args.per_cluster:
        shuffled = docs.sample(frac=1.0, random_state=seed)
        docs = shuffled[shuffled.groupby("cluster").cumcount() < args.per_cluster].sort_index()
    labels, split = docs.cluster.to_numpy(), docs.split.to_numpy()
    texts = docs.text.tolist()
    print(f"{len(docs)} chunks, {result.n_clusters} clusters, layers {layers}, top_k {top_k}")

    runs = {}
    for skip in ((0, 1) if args.skip0 else (1,)):
        started = time.time()
        runs[skip] = extract_activations(model, texts, layers, batch_size=p["batch_size"], max_length=p["max_tokens"],
                                         skip_first=skip, return_stats=True, progress=False)
        print(f"skip_first={skip}: extracted in {time.time() - started:.0f}s")
    common = dict(top_k=top_k, seed=seed, with_probe=False, with_leace=False, progress=False,
                  massive_threshold=args.threshold)

    def components(skip, **kw):
        acts, stats = runs[skip]
        return find_cluster_components(acts, labels, split, token_stats=stats, **common, **kw)[1]

    old = components(0, keep_massive=True) if args.skip0 else []
    skip_only = components(1, keep_massive=True)
    pooled = components(1)
    token = components(1, token_level=True)
    n_tokens = runs[1][1][layers[0]].count + 1  # counted tokens + the skipped first one
    train = split == "train"
    for layer in layers:
        stats = runs[1][1][layer]
        table = massive_table(stats, threshold=args.threshold, top=4)
        print(f"\n== layer {layer}")
        print(table.round(1).to_string(index=False))
        massive = set(table.dim[table.massive])
        for name, subs in (("old (skip 0, massive kept)", old), ("skip 1, massive kept", skip_only),
                           ("default (skip 1, excluded)", pooled)):
            if not subs:
                continue
            hits = {s.cluster: sorted(set(s.dims) & massive) for s in subs if s.layer == layer}
            print(f"massive dims in R_k, {name}: {hits}")
        at = {s.cluster: s for s in pooled if s.layer == layer}
        tk = {s.cluster: s for s in token if s.layer == layer}
        changed = {k: len(set(at[k].dims) - set(tk[k].dims)) for k in sorted(at)}
        print(f"R_k dims that differ, pooled raw S vs token-level raw S (of {top_k}): {changed}")
        top = int(table.dim.iloc[0])
        for skip in sorted(runs):
            A = runs[skip][0][layer][train, top].astype(np.float64)
            r = np.corrcoef(A, 1.0 / n_tokens[train])[0, 1]
            S = [np.abs(np.array(s.mean_in) - np.array(s.mean_out)).max() for s in (old if skip == 0 else skip_only)
                 if s.layer == layer]
            print(f"skip_first={skip}: corr(A_{top}(d), 1/T_d) = {r:+.2f}; largest |S(i,k)| = {max(S):.2f}")

if __name__ == "__main__":
    main()
