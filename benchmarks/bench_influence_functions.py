"""Influence functions (kronfluence) at demo size: wall time and peak memory, factors and scores apart.

The demo's inputs: its corpus (the builtin corpus, 60 documents per domain, chunked to 128
tokens: 675 chunks), its three abilities (arithmetic, code, icl) with ``--items`` items each
(the demo's 60), and SmolLM2-135M. Per strategy (``--strategies``), two phases run in one fresh
child process each, so that each phase's peak RSS is its own:

- **factors**: :func:`fit_factors` into an empty factor cache (covariances, eigenvectors and,
  for EK-FAC, the re-fitted eigenvalues; nothing for identity);
- **scores**: :func:`influence_scores` on every item, the factors read from that cache.

``--docs-per-cluster N`` scores (and fits on) a seeded sample of N chunks per cluster, with the
corpus's domains standing in for the demo's clusters. Prints one line per phase (wall seconds,
peak RSS in MiB, documents, items, tracked layers) and, at the end, a table. Run alone on a
quiet machine (the timings are the point):

    python benchmarks/bench_influence_functions.py [--strategies ekfac kfac identity] [--layers 28 29]
        [--docs-per-cluster 40] [--items 60] [--batch 4]

``--tiny`` is a smoke run (a few chunks and items, identity and kfac, the top layer): it proves the
script works, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ABILITIES = ("arithmetic", "code", "icl")


def demo_inputs(n_docs: int | None, n_items: int, tokens: int = 128):
    """The demo's chunks (``id``, ``text``, ``domain``) and items (``ability``, ``item_id``, ``context``, ``answer``)."""
    import pandas as pd

    from rephelpers.abilities.suite import ABILITIES as SPECS
    from rephelpers.abilities.suite import build_tasks, read_items
    from rephelpers.corpus.loaders import chunk_documents, load_corpus
    from rephelpers.representations.models import load_model

    model = load_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chunks = chunk_documents(load_corpus("builtin", docs_per_domain=60, seed=0), model.tokenizer, tokens)
    if n_docs is not None:
        chunks = chunks.groupby("domain", group_keys=False).head(max(1, n_docs // chunks["domain"].nunique()))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for ability, info in build_tasks(list(ABILITIES), folder, items_per_task=n_items, seed=0).items():
            delimiter = SPECS[ability].target_delimiter
            for item in read_items(info):
                gold = item["gold"] if isinstance(item["gold"], int) else item["choices"].index(item["gold"])
                rows.append({"ability": ability, "item_id": item["id"], "context": item["prompt"],
                             "answer": delimiter + item["choices"][gold]})
    return model, chunks.reset_index(drop=True), pd.DataFrame(rows)


def phase(args: argparse.Namespace, strategy: str, which: str, cache: str) -> dict:
    """One phase in this process: returns wall seconds and peak RSS (MiB)."""
    from rephelpers.estimators.influence_functions import fit_factors, influence_scores, sample_documents

    model, docs, items = demo_inputs(args.docs, args.items)
    labels = dict(zip(docs["id"].astype(str), docs["domain"].astype("category").cat.codes.astype(int)))
    if args.docs_per_cluster is not None:
        docs = sample_documents(docs, labels, args.docs_per_cluster, seed=0)
    start = time.perf_counter()
    if which == "factors":
        fit_factors(model, docs, strategy=strategy, layers=args.layers, cache_dir=Path(cache), batch_size=args.batch)
        n_items = 0
    else:
        out = influence_scores(model, docs, items, strategy=strategy, layers=args.layers, cache_dir=Path(cache),
                               batch_size=args.batch)
        n_items = int(len(items))
        assert out["id"].nunique() == len(docs)
    wall = time.perf_counter() - start
    return {"strategy": strategy, "phase": which, "wall_s": round(wall, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "documents": int(len(docs)), "items": n_items, "layers": args.layers or "default"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", nargs="+", default=["ekfac", "kfac", "identity"])
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers tracked (default: top 2)")
    parser.add_argument("--docs-per-cluster", type=int, default=None)
    parser.add_argument("--items", type=int, default=60, help="items per ability (the demo's 60)")
    parser.add_argument("--docs", type=int, default=None, help="keep only about this many chunks (default: all 675)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="smoke run: 6 chunks, 2 items per ability, top layer")
    parser.add_argument("--_phase", nargs=3, help=argparse.SUPPRESS)  # strategy, phase, cache: run in a child
    args = parser.parse_args()
    if args.tiny:
        args.docs, args.items, args.layers = 6, 2, args.layers or [-1]
        if args.strategies == parser.get_default("strategies"):
            args.strategies = ["identity", "kfac"]
    if args._phase:
        print("RESULT " + json.dumps(phase(args, *args._phase)))
        return

    results = []
    passthrough = [a for a in sys.argv[1:] if a != "--_phase"]
    for strategy in args.strategies:
        with tempfile.TemporaryDirectory() as cache:  # an empty factor cache for each strategy
            for which in ("factors", "scores"):
                child = subprocess.run([sys.executable, __file__, *passthrough, "--_phase", strategy, which, cache],
                                       capture_output=True, text=True, check=False)
                lines = [ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")]
                if child.returncode != 0 or not lines:
                    sys.exit(f"{strategy} {which} failed:\n{child.stderr[-4000:]}")
                results.append(json.loads(lines[-1].removeprefix("RESULT ")))
                print(results[-1], flush=True)
    print(f"\n{'strategy':10} {'phase':8} {'wall s':>8} {'peak MiB':>9} {'docs':>5} {'items':>5}  layers")
    for r in results:
        print(f"{r['strategy']:10} {r['phase']:8} {r['wall_s']:8.1f} {r['peak_rss_mib']:9d} {r['documents']:5d} "
              f"{r['items']:5d}  {r['layers']}")


if __name__ == "__main__":
    main()
