"""Stage 05's configs evaluated with the controls drawn all at once and in sequential rounds (counts, no timing).

    python benchmarks/bench_control_rounds.py [--n-sims 20] [--cap 100] [--rounds 5] [--h 2]
        [--planted 0.2] [--from-run runs/demo] [--scores runs/demo/scores.parquet] [--json out.json] [--quick]

Stage 05 evaluates the baseline, every cluster's perturbation and its control draws; a config's cost is
about the same whichever it is, so the number of configs is stage 05's cost. Today's demo
(papermill_params/demo.yaml) evaluates 1 + K·(|Θ| + |Θ|·n_controls) configs, 106 for K = 5 clusters, one
setting and 20 draws. With ``control_rounds`` R and ``stop_after_exceedances`` h
(:func:`rephelpers.abilities.evaluation.evaluate_in_rounds`) a cluster stops once each of its cells has
h draws with Φ^(j) ≥ Φ, so the count depends on the data: this script replays simulated score tables of
the demo's design (rephelpers.influence.calibration.DEMO_DESIGN: 5 clusters, arithmetic/code/icl at 60
items; the controls' spread DEMO_SPREAD, or --from-run's, as bench_calibration.py reads it) through the
very function stage 05 runs, with an evaluator that serves the table's rows, and counts the configs it
asks for: under the null (R_k one more random set) and with Φ − Φ_control = --planted on each of
clusters 0 and 1's pre-registered ability (the (k mod 3)-th), as bench_calibration's design study plants.

--scores replays a real run's scores.parquet (its own draws as the cap) instead of simulating.
--quick: two small simulations, seconds (tests/test_sequential.py runs it for the schema).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rephelpers.abilities.evaluation import evaluate_in_rounds
from rephelpers.influence.calibration import DEMO_DESIGN, DEMO_SPREAD
from rephelpers.influence.impact import simulate_scores
from rephelpers.progress import progress_bar
from rephelpers.setting import Setting

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calibration import spread_from_run  # noqa: E402  (a sibling script, not a package)


def configs_of(scores: pd.DataFrame) -> tuple[dict, dict]:
    """``(configs, config_meta)`` of a score table, as cluster_configs gave them to stage 05."""
    rows = scores.drop_duplicates("config_id")
    meta = {r.config_id: Setting(int(r.cluster), str(r.kind), float(r.magnitude), int(r.layer),
                                 control=bool(r.control), draw=int(r.draw))
            for r in rows.itertuples(index=False)}
    return {cid: [] for cid in meta}, meta


def replayed_count(scores: pd.DataFrame, rounds: int, h: int | None) -> int:
    """Configs :func:`evaluate_in_rounds` asks for when ``scores`` holds every config's answers."""
    asked: list[str] = []

    def evaluate(_round, configs, _meta):
        asked.extend(configs)
        return scores[scores["config_id"].isin(list(configs))].reset_index(drop=True)

    evaluate_in_rounds(evaluate, *configs_of(scores), control_rounds=rounds, stop_after_exceedances=h, progress=False)
    return len(asked)


def simulated(n_sims: int, cap: int, rounds: int, h: int, planted: float, spread: dict, clusters: int,
              items: int, seed: int) -> dict:
    abilities = list(DEMO_DESIGN["baselines"])
    counts = {"null": [], f"planted_{planted:g}": []}
    for sim in progress_bar(range(n_sims), desc="simulations"):
        for name, plant in (("null", None),
                            (f"planted_{planted:g}", {(k, abilities[k % len(abilities)]): planted for k in (0, 1)})):
            scores = simulate_scores({(k, a): 0.0 for k in range(clusters) for a in abilities}, DEMO_DESIGN["baselines"],
                                     items_per_task=items, magnitudes=(1.0,), n_controls=cap,
                                     target_like_control=True, planted=plant, seed=seed + sim, **spread)
            counts[name].append(replayed_count(scores, rounds, h))
    return {name: {"mean": float(np.mean(c)), "median": float(np.median(c)), "min": int(np.min(c)),
                   "max": int(np.max(c)), "counts": c} for name, c in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-sims", type=int, default=20)
    parser.add_argument("--cap", type=int, default=100, help="n_controls, the cap on draws per cluster")
    parser.add_argument("--rounds", type=int, default=5, help="control_rounds: draws per round")
    parser.add_argument("--h", type=int, default=2, help="stop_after_exceedances")
    parser.add_argument("--today", type=int, default=20, help="today's n_controls (demo.yaml)")
    parser.add_argument("--planted", type=float, default=0.2, help="Φ − Φ_control planted for the alternative")
    parser.add_argument("--from-run", default=None, help="take the controls' spread from RUN/influence.parquet")
    parser.add_argument("--scores", default=None, help="replay this scores.parquet instead of simulating")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    clusters, items = DEMO_DESIGN["n_clusters"], DEMO_DESIGN["items"]
    if args.quick:
        args.n_sims, args.cap, clusters, items = 2, 10, 2, 20
    settings = 1  # demo.yaml: one kind, one magnitude
    result = {"design": {"clusters": clusters, "items": items, "control_rounds": args.rounds,
                         "stop_after_exceedances": args.h, "cap": args.cap},
              "all_at_once": {f"n_controls={args.today} (today)": 1 + clusters * settings * (1 + args.today),
                              f"n_controls={args.cap} (the cap)": 1 + clusters * settings * (1 + args.cap)}}
    if args.scores:
        scores = pd.read_parquet(args.scores)
        result["scores"] = str(args.scores)
        result["all_at_once"] = {"in the file": int(scores["config_id"].nunique())}
        result["sequential"] = {"replayed": replayed_count(scores, args.rounds, args.h)}
    else:
        spread = spread_from_run(args.from_run) if args.from_run else dict(DEMO_SPREAD)
        result["spread"] = spread
        result["sequential"] = simulated(args.n_sims, args.cap, args.rounds, args.h, args.planted, spread,
                                         clusters, items, args.seed)
    for name, n in result["all_at_once"].items():
        print(f"all at once, {name}: {n} configs")
    for name, summary in result["sequential"].items():
        text = (f"{summary['mean']:.1f} mean, {summary['median']:.0f} median, {summary['min']}-{summary['max']}"
                if isinstance(summary, dict) else f"{summary}")
        print(f"rounds of {args.rounds}, h = {args.h}, cap {args.cap}, {name}: {text} configs")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
