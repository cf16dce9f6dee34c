"""What the influence-function choices do to the testbed's agreement with Φ* (issue 26).

On a finished known-answer run (``python -m rephelpers run papermill_params/groundtruth.yaml``),
recompute the influence-function document scores on f_all for other choices of curvature
(``strategy``: identity, K-FAC, EK-FAC) and document sample (``docs_per_cluster``), aggregate them
over the run's discovered clusters exactly as notebook 07 does, and score each against the run's Φ*
with the agreement table's own figures (ρ with its interval, diagonal recovery, false positives),
beside each choice's wall time and peak memory. The run directory is only read: the scores of
each choice go to ``--out`` (factors to the user cache, as usual).

    python -u benchmarks/bench_testbed_influence.py runs/groundtruth --out influence_choices.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

from rephelpers.abilities.suite import build_tasks
from rephelpers.estimators.aggregate import cluster_phi, permutation_pvalues
from rephelpers.estimators.influence_functions import influence_scores
from rephelpers.estimators.items import ability_items
from rephelpers.estimators.run import measured
from rephelpers.representations.models import load_model
from rephelpers.testbed import groundtruth as gt
from rephelpers.testbed.planted import planted_ability

CHOICES = [("identity", 32), ("kfac", 32), ("ekfac", 16)]  # ekfac at 32 per cluster: the run itself


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished notebook-07 run (holds agreement.json and chain/)")
    parser.add_argument("--out", default="influence_choices.json")
    parser.add_argument("--choices", default=",".join(f"{s}:{n}" for s, n in CHOICES),
                        help="strategy:docs_per_cluster pairs (docs_per_cluster 0: all chunks)")
    args = parser.parse_args()
    run = Path(args.run_dir)
    summary = json.loads((run / "agreement.json").read_text())
    stars, mapping = pd.DataFrame(summary["phi_star"]), pd.DataFrame(summary["cluster_mapping"])
    documents = pd.read_parquet(run / "chain" / "_shared" / "documents.parquet")
    labels = documents.set_index(documents["id"].astype(str))["cluster"]
    # what the run received: the chain's model folder (f_all) and the testbed's items, rebuilt byte for byte
    model_dir = json.loads((run / "chain" / "_shared" / "status.json").read_text())["received"]["02_representations"]["model_name"]
    received = json.loads((run / "status.json").read_text())["received"]["07_ground_truth"]
    abilities = [planted_ability(s) for s in received["skills"]] + list(received["extra_abilities"])
    model = load_model(str(model_dir))
    with tempfile.TemporaryDirectory() as folder:
        items = ability_items(build_tasks(abilities, folder, items_per_task=received["items_per_skill"],
                                          seed=received["seed"]))
    rows = []
    for choice in args.choices.split(","):
        strategy, n = choice.split(":")
        per_cluster = int(n) or None
        scores, cost = measured(lambda: influence_scores(model, documents, items, strategy=strategy,
                                                         docs_per_cluster=per_cluster, labels=labels.to_dict(),
                                                         seed=0))
        phi = cluster_phi(scores, labels, "influence_functions")
        tests = permutation_pvalues(scores, labels, n_permutations=999, seed=0)
        phi = phi.merge(tests[["cluster", "ability", "p_adjusted"]], on=["cluster", "ability"])
        phi = phi.assign(setting=f"influence_functions ({strategy}, {per_cluster or 'all'} per cluster)",
                         flagged=phi["p_adjusted"] < 0.05)
        row = gt.estimator_agreement(phi, stars, mapping, "discovered").iloc[0].to_dict()
        row.update(strategy=strategy, docs_per_cluster=per_cluster, **cost)
        rows.append(row)
        print({k: row[k] for k in ("setting", "spearman_rho", "spearman_low", "spearman_high", "diagonal_recovery",
                                   "off_diagonal_false_positives", "seconds", "peak_rss_mb")}, flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
