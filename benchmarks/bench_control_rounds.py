"""Stage 05's configs evaluated with the controls drawn all at once and in sequential rounds (counts, no timing).

    python benchmarks/bench_control_rounds.py [--n-sims 20] [--cap 100] [--rounds 5] [--h 2]
        [--planted 0.2] [--from-run runs/demo] [--scores runs/demo/scores.parquet]
        [--shares arithmetic=4895,code=7140,icl=7496] [--json out.json] [--quick]

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

Cost in config-equivalents (``cost``): a config's forward passes cost about the tokens of the abilities it
is evaluated on, so a config evaluated on ability a costs a's share w_a of one config's tokens
(:func:`rephelpers.abilities.evaluation.evaluation_cost`; --shares, default the demo's measured stage-05
tokens, rephelpers.influence.calibration.DEMO_TOKEN_SHARES). Both round designs are replayed on the same
tables: ``whole_cluster`` evaluates every late draw on every ability while any cell of the cluster is in the
tail (the configs count, each costing 1); ``per_ability`` evaluates a late draw only on the abilities whose
cells are still in the tail (what stage 05 does; the same p for every cell). All at once, n configs cost n.

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

from rephelpers.abilities.evaluation import evaluate_in_rounds, evaluation_cost
from rephelpers.errors import require
from rephelpers.influence.calibration import DEMO_DESIGN, DEMO_SPREAD, DEMO_TOKEN_SHARES
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


def replayed(scores: pd.DataFrame, rounds: int, h: int | None, shares: dict[str, float]) -> dict[str, dict]:
    """What :func:`evaluate_in_rounds` asks for when ``scores`` holds every config's answers on every ability,
    with whole-cluster and with per-ability late rounds: ``{design: {"configs", "cost"}}`` (cost in
    config-equivalents weighted by the abilities' token ``shares``)."""
    def evaluate(_round, configs, _meta, abilities):
        rows = scores[scores["config_id"].isin(list(configs))]
        return (rows if abilities is None else rows[rows["ability"].isin(list(abilities))]).reset_index(drop=True)

    out = {}
    for design, per_ability in (("whole_cluster", False), ("per_ability", True)):
        got = evaluate_in_rounds(evaluate, *configs_of(scores), control_rounds=rounds, stop_after_exceedances=h,
                                 progress=False, per_ability=per_ability)
        out[design] = {"configs": int(got["config_id"].nunique()), "cost": evaluation_cost(got, shares)}
    return out


def _summary(values: list) -> dict:
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "min": min(values),
            "max": max(values), "counts": values}


def simulated(n_sims: int, cap: int, rounds: int, h: int, planted: float, spread: dict, clusters: int,
              items: int, seed: int, shares: dict[str, float]) -> tuple[dict, dict]:
    """``(configs per scenario as whole-cluster rounds ask them, cost per scenario and round design)``."""
    abilities = list(DEMO_DESIGN["baselines"])
    scenarios = ("null", f"planted_{planted:g}")
    counts: dict[str, list] = {name: [] for name in scenarios}
    costs: dict[str, dict[str, list]] = {name: {"whole_cluster": [], "per_ability": []} for name in scenarios}
    for sim in progress_bar(range(n_sims), desc="simulations"):
        for name, plant in zip(scenarios, (None, {(k, abilities[k % len(abilities)]): planted for k in (0, 1)})):
            scores = simulate_scores({(k, a): 0.0 for k in range(clusters) for a in abilities}, DEMO_DESIGN["baselines"],
                                     items_per_task=items, magnitudes=(1.0,), n_controls=cap,
                                     target_like_control=True, planted=plant, seed=seed + sim, **spread)
            got = replayed(scores, rounds, h, shares)
            counts[name].append(got["whole_cluster"]["configs"])
            for design, entry in got.items():
                costs[name][design].append(entry["cost"])
    return ({name: _summary(c) for name, c in counts.items()},
            {name: {design: _summary(c) for design, c in per.items()} for name, per in costs.items()})


def parse_shares(text: str) -> dict[str, float]:
    """``"arithmetic=4895,code=7140,icl=7496"`` → ``{ability: tokens}`` (any positive weights; normalised later)."""
    shares = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        require(bool(sep) and name.strip(), f"--shares takes ability=tokens pairs separated by commas, got {part!r}")
        try:
            shares[name.strip()] = float(value)
        except ValueError:
            require(False, f"--shares: {value!r} (for {name.strip()!r}) is not a number")
    require(len(shares) > 0, "--shares names no ability: give ability=tokens pairs, e.g. arithmetic=4895,code=7140,icl=7496")
    return shares


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
    parser.add_argument("--shares", default=",".join(f"{a}={n}" for a, n in DEMO_TOKEN_SHARES.items()),
                        help="each ability's stage-05 tokens (ability=tokens,...); default the demo's measured ones")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shares = parse_shares(args.shares)
    clusters, items = DEMO_DESIGN["n_clusters"], DEMO_DESIGN["items"]
    if args.quick:
        args.n_sims, args.cap, clusters, items = 2, 10, 2, 20
    settings = 1  # demo.yaml: one kind, one magnitude
    result = {"design": {"clusters": clusters, "items": items, "control_rounds": args.rounds,
                         "stop_after_exceedances": args.h, "cap": args.cap},
              "token_shares": {a: n / sum(shares.values()) for a, n in shares.items()},
              "all_at_once": {f"n_controls={args.today} (today)": 1 + clusters * settings * (1 + args.today),
                              f"n_controls={args.cap} (the cap)": 1 + clusters * settings * (1 + args.cap)}}
    if args.scores:
        scores = pd.read_parquet(args.scores)
        result["scores"] = str(args.scores)
        result["all_at_once"] = {"in the file": int(scores["config_id"].nunique())}
        got = replayed(scores, args.rounds, args.h, shares)
        result["sequential"] = {"replayed": got["whole_cluster"]["configs"]}
        result["cost"] = {"replayed": {design: entry["cost"] for design, entry in got.items()}}
    else:
        spread = spread_from_run(args.from_run) if args.from_run else dict(DEMO_SPREAD)
        result["spread"] = spread
        result["sequential"], result["cost"] = simulated(args.n_sims, args.cap, args.rounds, args.h, args.planted,
                                                         spread, clusters, items, args.seed, shares)
    for name, n in result["all_at_once"].items():
        print(f"all at once, {name}: {n} configs (= config-equivalents)")
    for name, summary in result["sequential"].items():
        text = (f"{summary['mean']:.1f} mean, {summary['median']:.0f} median, {summary['min']}-{summary['max']}"
                if isinstance(summary, dict) else f"{summary}")
        print(f"rounds of {args.rounds}, h = {args.h}, cap {args.cap}, {name}: {text} configs")
    for name, per in result["cost"].items():
        text = ", ".join(f"{design} {entry['mean'] if isinstance(entry, dict) else entry:.1f}" for design, entry in per.items())
        print(f"rounds of {args.rounds}, h = {args.h}, cap {args.cap}, {name}: cost in config-equivalents "
              f"(token shares {', '.join(f'{a} {w:.2f}' for a, w in result['token_shares'].items())}): {text}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
