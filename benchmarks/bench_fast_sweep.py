"""Shared-prefix sweep vs one run per config: wall time and identical scores.

Sixteen perturbation configs (zero-ablation of 32 random dimensions each, as a stage-03
R_k with ``top_k=32`` would give) at one middle layer of the demo model, evaluated on
two groups of abilities: the demo's log-likelihood abilities (multiple choice) and the
suite's generation abilities (greedy decoding). Each group runs
``evaluate_abilities(fast=False)`` (every config runs the whole model through lm-eval) and
``fast=True`` (layers below the intervention layer once per batch, configs stacked above
it; multiple-choice contexts once for all their choices; generation decoded for every config
of a batch together on the shared prompt's KV cache); the log-likelihood group also runs
``fast=True, pack_choices=False``. Target (issue 12): ≤ 0.35 × naive, generation
included, same scores.

    python benchmarks/bench_fast_sweep.py                # 16 configs, layer 15, 20 items/task
    python benchmarks/bench_fast_sweep.py --items 8 --configs 4   # quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from rephelpers.abilities.suite import build_tasks
from rephelpers.abilities.evaluation import evaluate_abilities
from rephelpers.interventions.intervene import Intervention
from rephelpers.representations.models import load_model
from rephelpers.interventions.edits import Ablate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=int, default=16, help="perturbation configs besides the baseline")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--dims", type=int, default=32, help="ablated dimensions per config")
    parser.add_argument("--items", type=int, default=20, help="items per task")
    parser.add_argument("--loglikelihood", nargs="+", default=["arithmetic", "code", "icl"],
                        help="multiple-choice abilities (the demo's)")
    parser.add_argument("--generation", nargs="+", default=["reasoning", "instruction"],
                        help="generation abilities (empty: none)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = load_model()
    rng = np.random.default_rng(args.seed)
    configs = {"baseline": []}
    for c in range(args.configs):
        dims = tuple(sorted(rng.choice(model.d_model, size=args.dims, replace=False).tolist()))
        configs[f"ablate{c:02d}"] = [Intervention(Ablate(dims), args.layer)]
    groups = {
        "log-likelihood": (args.loglikelihood, {
            "naive": dict(fast=False),
            "shared layers": dict(fast=True, pack_choices=False),
            "shared layers + packed choices": dict(fast=True, pack_choices=True),
        }),
        "generation": (args.generation, {"naive": dict(fast=False), "shared layers + stacked decoding": dict(fast=True)}),
    }
    print(f"{len(configs)} configs ({args.configs} × ablate {args.dims} dims at layer {args.layer} + baseline), "
          f"{args.items} items per task, batch size {args.batch_size}")
    totals: dict[str, float] = {"naive": 0.0, "fast": 0.0}
    with tempfile.TemporaryDirectory() as task_dir:
        for group, (abilities, paths) in groups.items():
            if not abilities:
                continue
            tasks = build_tasks(abilities, task_dir, items_per_task=args.items, seed=args.seed)
            timings, results = {}, {}
            for name, options in paths.items():
                start = time.perf_counter()
                results[name] = evaluate_abilities(
                    model, tasks, configs, batch_size=args.batch_size, progress=False, **options
                ).sort_values(["config_id", "task", "item"]).reset_index(drop=True)
                timings[name] = time.perf_counter() - start
            naive = results["naive"]
            print(f"\n{group}: {', '.join(abilities)}")
            for name, seconds in timings.items():
                other = results[name]
                same = bool((naive.score.to_numpy() == other.score.to_numpy()).all())
                same_text = bool((naive.response.to_numpy() == other.response.to_numpy()).all())
                margin = np.abs(naive.margin - other.margin)
                margin_text = f"max |Δ margin| {np.nanmax(margin):.1e}" if margin.notna().any() else "no margins (generation)"
                print(f"  {name:<34} {seconds:8.1f} s  ratio to naive {seconds / timings['naive']:.2f}  "
                      f"scores identical {same}  responses identical {same_text}  {margin_text}")
            totals["naive"] += timings["naive"]
            totals["fast"] += timings[list(paths)[-1]]
            print("  mean score per config (naive):", naive.groupby("config_id").score.mean().round(3).to_dict())
    print(f"\nall groups: naive {totals['naive']:.1f} s, fast {totals['fast']:.1f} s, "
          f"ratio {totals['fast'] / totals['naive']:.2f} (target ≤ 0.35 × naive, issue 12)")


if __name__ == "__main__":
    main()
