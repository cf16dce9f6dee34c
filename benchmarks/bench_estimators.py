"""Wall time and peak memory of each document-scored estimator on a finished run (issue 26).

Reads a run directory that went through notebooks 01-05 (e.g. ``runs/demo``) and computes
each estimator's document-level scores the way notebook 06 does (same items, same
documents, same options), without reading or writing the run's cached artifacts. The model
load is timed on its own. Prints seconds and the process's peak resident memory while each
estimator ran (``rephelpers.estimators.run.measured``). Run alone on a quiet machine:

    python benchmarks/bench_estimators.py runs/demo [--estimators repsim bm25] [--batch-size 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rephelpers.artifacts import RunDir  # noqa: E402
from rephelpers.estimators.run import DOCUMENT_SCORERS, check_estimators, measured, stage_inputs  # noqa: E402
from rephelpers.representations.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--estimators", nargs="+", default=list(DOCUMENT_SCORERS))
    parser.add_argument("--model-name", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--abilities", nargs="+", default=["arithmetic", "code", "icl"],
                        help="when the run has no scores.parquet yet (stopped after notebook 04): the abilities whose "
                             "task folders (every item) notebook 05 would evaluate")
    args = parser.parse_args()
    names = [n for n in check_estimators(args.estimators) if n != "perturbation"]
    run = RunDir(args.run_dir)
    if (run.root / "scores.parquet").exists():
        scores = run.load_parquet("scores.parquet", stage="notebook 05_capability_impact")
        abilities, item_ids = sorted(scores.ability.unique()), scores.groupby("ability").item.unique().to_dict()
    else:  # every item of the tasks folder: what notebook 05 evaluates at its items_per_task
        abilities, item_ids = list(args.abilities), None
        print(f"{args.run_dir} has no scores.parquet: items from its task folders for {abilities}")
    model, load_cost = measured(lambda: load_model(args.model_name))
    print(f"model load: {load_cost['seconds']:.1f} s, peak {load_cost['peak_rss_mb']:.0f} MB")
    inputs = stage_inputs(run, names, abilities, lambda: model,
                          params={"repsim": {"batch_size": args.batch_size, "progress": False, "use_cache": False},
                                  "bm25": {"progress": False}},
                          item_ids=item_ids)
    print(f"{len(inputs.documents)} documents × {len(inputs.items)} items")
    results = {"model_load": load_cost, "documents": len(inputs.documents), "items": len(inputs.items)}
    for name in names:
        frame, cost = measured(lambda: DOCUMENT_SCORERS[name](inputs))
        results[name] = cost
        print(f"{name}: {len(frame):,} scores in {cost['seconds']:.2f} s, peak {cost['peak_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
