"""Stage 04's control arms run with the draws all at once and in rounds (counts, no timing).

    python benchmarks/bench_specificity_rounds.py runs/demo/specificity.parquet [--rounds 5] [--json out.json]

Stage 04 (:func:`rephelpers.perturbations.specificity.specificity_report`) runs, per cluster and
setting, the perturbation and its control draws over the same texts; each control arm costs about
the same, so the control arms run are its cost beyond the fixed part (the unperturbed pass, the
perturbation, the edit norms). With ``control_rounds`` R a cluster stops drawing once its verdict
is settled (:func:`rephelpers.perturbations.specificity.draws_settled`). Draw j is the same control
either way, so a report that drew every control says exactly what rounds would have run:
:func:`rephelpers.perturbations.specificity.replay_rounds` walks its draws round by round. Prints
the arms before (every distinct draw) and after, per cluster and setting and in all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from rephelpers.perturbations.specificity import MIN_GAP, MIN_RATIO, control_arms_run, replay_rounds


def compare(report: pd.DataFrame, rounds: int, min_gap: float = MIN_GAP, min_ratio: float = MIN_RATIO) -> dict:
    """``{"rounds", "arms_before", "arms_after", "settings": [...]}`` for one report of all draws."""
    replay = replay_rounds(report, rounds, min_gap, min_ratio)
    return {"rounds": rounds, "arms_before": control_arms_run(report), "arms_after": int(replay["arms_run"].sum()),
            "settings": json.loads(replay.to_json(orient="records"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a specificity.parquet drawn with control_rounds = None")
    parser.add_argument("--rounds", type=int, default=5, help="control_rounds: draws per round")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = compare(pd.read_parquet(args.report), args.rounds)
    print(pd.DataFrame(result["settings"]).to_string(index=False))
    print(f"control arms: {result['arms_before']} all at once, {result['arms_after']} in rounds of {args.rounds}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
