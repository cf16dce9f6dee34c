"""False-positive rate and power of every stage-06 test on simulated tables (run by hand).

    python benchmarks/bench_calibration.py --json calibration.json [--n-sims 50] [--n-controls 19]
        [--design-sims 500] [--from-run runs/demo] [--quick]

Each null is simulated with the package's own functions (rephelpers.influence.calibration) and read
by rephelpers.influence.stats exactly as notebook 06 reads a run; a test holds its α when its
false-positive rate is at most α (the CI-sized version, tests/test_calibration.py, allows
α + 0.03). Power: the same tables with Φ − Φ_control = 0.1, 0.2, 0.3 planted on a few cells, read
by the same rejection rule. Tests marked "legacy"/"rejected" are not reported by stage 06: they are
run to show why they were replaced.

The "design:" rows compare ways of testing Φ against its controls on the demo's design (5 clusters
× 3 abilities, 60 items): today's 20-draw rank p, a primary family, more draws, Besag–Clifford
sequential draws, each with FPR, power and the draws it costs per cluster. The controls' spread is
DEMO_SPREAD (an assumption, see rephelpers/influence/calibration.py) unless --from-run reads it from
a run's influence.parquet: the mean control loss is the median phi_control over readable cells, and
the between-draw spread draw_sd = sqrt(max(0, control_sd² − c(1 − c)/n_right)) with the item
(binomial) part of control_sd taken out, medians over readable cells.

--quick: a handful of simulations on a small grid, seconds, for tests/test_calibration.py: it checks
the schema and that FPR and power come from the same code path, not the numbers.

The estimators' permutation test over documents (rephelpers.estimators.calibration) is run
too: its FPR on three nulls and its power on planted cluster shifts (tests/test_estimators.py runs
it CI-sized).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rephelpers.estimators.calibration import permutation_calibration
from rephelpers.influence.calibration import DEFAULT_GRID, DEMO_SPREAD, calibrate, calibration_frame, design_study

QUICK = {"n_sims": 1, "grid": {"n_clusters": (3,), "items": (20,), "baseline": (0.7,)}, "ace_clusters": (8,),
         "design": {"n_sims": 3}}


def spread_from_run(run_dir: str | Path) -> dict[str, float]:
    """``control_effect`` and ``draw_sd`` of the controls in a run's influence.parquet (see the module note)."""
    table = pd.read_parquet(Path(run_dir) / "influence.parquet")
    cells = table[table["readable"] & table["control_sd"].notna()]
    if cells.empty:
        raise SystemExit(f"{run_dir}/influence.parquet has no readable cell with a control spread")
    c = np.clip(cells["phi_control"].to_numpy(float), 0, 1)
    item_var = c * (1 - c) / np.maximum(1, np.round(cells["baseline_score"] * cells["n_items"]))
    draw_sd = np.sqrt(np.maximum(0.0, cells["control_sd"].to_numpy(float) ** 2 - item_var))
    return {"control_effect": float(max(0.0, np.median(c))), "draw_sd": float(np.median(draw_sd))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write {'tests': [...]} here")
    parser.add_argument("--n-sims", type=int, default=50, help="simulations per null (and planted effect) and grid point")
    parser.add_argument("--n-controls", type=int, default=19, help="random-control draws per perturbation")
    parser.add_argument("--design-sims", type=int, default=500, help="simulations per effect of the demo-design study")
    parser.add_argument("--design-items", type=int, default=None, help="items per ability in the design study (demo: 60)")
    parser.add_argument("--from-run", default=None, help="take the controls' spread from this run's influence.parquet")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-permutations", type=int, default=999,
                        help="label shuffles of the estimators' permutation test over documents (issue 26)")
    # 60 simulations put the permutation test's FWER on the normal null at 0.100 (SE 0.03); 400 put it at
    # 0.028: the test is cheap (about 1 s a simulation), so it gets enough to tell α + 0.03 from noise.
    parser.add_argument("--permutation-sims", type=int, default=400,
                        help="simulated tables per null and effect for the estimators' permutation test")
    parser.add_argument("--quick", action="store_true", help="a few simulations, seconds (schema checks)")
    parser.add_argument("--design-only", action="store_true",
                        help="only the demo-design study (the 'design:' rows), e.g. with --from-run's spread")
    parser.add_argument("--clusters", type=int, nargs="+", default=None, help="grid: cluster counts (default 3 5 8)")
    parser.add_argument("--items", type=int, nargs="+", default=None, help="grid: items per task (default 20 40)")
    parser.add_argument("--baselines", type=float, nargs="+", default=None, help="grid: baseline accuracies (default 0.5 0.8)")
    args = parser.parse_args()
    spread = spread_from_run(args.from_run) if args.from_run else dict(DEMO_SPREAD)
    started = time.time()
    if args.design_only:
        study = design_study(n_sims=args.design_sims, alpha=args.alpha, seed=args.seed, **spread,
                             **({"items": args.design_items} if args.design_items else {}))
        study["seconds"] = round(time.time() - started, 1)
        study["spread_source"] = f"{args.from_run}/influence.parquet" if args.from_run else "DEMO_SPREAD (assumed)"
        for test in study["tests"]:
            print(f"{test['name']:48s} FWER {test['fpr_familywise']:.3f} fpr {test['fpr']:.3f} power "
                  + " / ".join(f"{v:.2f}" for v in test["power"].values())
                  + f"  draws/cluster {test['mean_draws_per_cluster']}  per-ability cost "
                  + f"{test.get('mean_cost_per_cluster_per_ability')}")
        print(f"spread {spread} ({study['spread_source']}); {study['seconds']} s")
        if args.json:
            Path(args.json).write_text(json.dumps(study, indent=2))
        return
    if args.quick:
        options = {**QUICK, "design": {**QUICK["design"], **spread}}
    else:
        grid = dict(DEFAULT_GRID)
        for key, value in (("n_clusters", args.clusters), ("items", args.items), ("baseline", args.baselines)):
            grid[key] = tuple(value) if value else grid[key]
        design = {"n_sims": args.design_sims, **spread, **({"items": args.design_items} if args.design_items else {})}
        options = {"n_sims": args.n_sims, "grid": grid, "design": design}
    result = calibrate(alpha=args.alpha, n_controls=args.n_controls, seed=args.seed, **options)
    result["seconds"] = round(time.time() - started, 1)
    result["spread_source"] = f"{args.from_run}/influence.parquet" if args.from_run else "DEMO_SPREAD (assumed)"
    result["quick"] = bool(args.quick)
    frame = calibration_frame(result)
    frame["power"] = [", ".join(f"{k}: {v:.2f}" for k, v in p.items()) if isinstance(p, dict) else "–" for p in frame["power"]]
    columns = ["name", "null", "reported", "alpha", "fpr", "power", "n_tests", "n_sims", "holds"]
    print(frame[columns].to_string(index=False))
    designs = frame[frame["name"].str.startswith("design:")]
    if len(designs):
        print(designs[["name", "fpr_familywise", "mean_draws_per_cluster", "mean_cost_per_cluster_per_ability"]].to_string(index=False))
    print(f"grid {result['grid']}, {args.n_controls} control draws; design spread {spread} "
          f"({result['spread_source']}); {result['seconds']} s")
    # The estimators' permutation test (repsim, bm25, influence functions): FPR on nulls, power on planted shifts,
    # at the demo's design (5 clusters of ~60 documents, 3 abilities, 20 items).
    started = time.time()
    n_permutations = 99 if args.quick else args.n_permutations
    permutation = permutation_calibration(n_sims=QUICK["n_sims"] if args.quick else args.permutation_sims, alpha=args.alpha,
                                          n_permutations=n_permutations, seed=args.seed)
    print(permutation.to_string(index=False))
    print(f"permutation test: {n_permutations} shuffles, {round(time.time() - started, 1)} s")
    result["permutation_test"] = permutation.to_dict(orient="records")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
