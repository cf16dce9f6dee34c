"""Shared-prefix sweep vs one run per config: wall time and identical scores.

Sixteen perturbation configs (zero-ablation of 32 random dimensions each, as a stage-03
R_k with ``top_k=32`` would give) at one middle layer of the demo model, evaluated on
the demo's abilities three ways: ``evaluate_abilities(fast=False)`` (every config
runs the whole model through lm-eval), ``fast=True, pack_choices=False`` (layers below the intervention
layer once per batch, the rest per config), and the same with each multiple-choice
item's context run once for all its choices (``pack_choices``). Target (issue 12):
≤ 0.35 × naive, same scores.

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
from rephelpers.perturbations.intervene import Intervention
from rephelpers.representations.models import load_model
from rephelpers.perturbations.kinds import Ablate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=int, default=16, help="perturbation configs besides the baseline")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--dims", type=int, default=32, help="ablated dimensions per config")
    parser.add_argument("--items", type=int, default=20, help="items per task")
    parser.add_argument("--abilities", nargs="+", default=["arithmetic", "code", "icl"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = load_model()
    rng = np.random.default_rng(args.seed)
    configs = {"baseline": []}
    for c in range(args.configs):
        dims = tuple(sorted(rng.choice(model.d_model, size=args.dims, replace=False).tolist()))
        configs[f"ablate{c:02d}"] = [Intervention(Ablate(dims), args.layer)]
    paths = {
        "naive": dict(fast=False),
        "shared layers": dict(fast=True, pack_choices=False),
        "shared layers + packed choices": dict(fast=True, pack_choices=True),
    }
    with tempfile.TemporaryDirectory() as task_dir:
        tasks = build_tasks(args.abilities, task_dir, items_per_task=args.items, seed=args.seed)
        timings, results = {}, {}
        for name, options in paths.items():
            start = time.perf_counter()
            results[name] = evaluate_abilities(
                model, tasks, configs, batch_size=args.batch_size, progress=False, **options
            ).sort_values(["config_id", "task", "item"]).reset_index(drop=True)
            timings[name] = time.perf_counter() - start

    naive = results["naive"]
    n_items = len(naive) // len(configs)
    print(f"{len(configs)} configs ({args.configs} × ablate {args.dims} dims at layer {args.layer} + baseline), "
          f"{n_items} items ({', '.join(args.abilities)}), batch size {args.batch_size}")
    for name, seconds in timings.items():
        other = results[name]
        same = bool((naive.score.to_numpy() == other.score.to_numpy()).all())
        print(f"{name:<32} {seconds:8.1f} s  ratio to naive {seconds / timings['naive']:.2f}  "
              f"scores identical {same}  max |Δ margin| {np.nanmax(np.abs(naive.margin - other.margin)):.1e}")
    print("target: ≤ 0.35 × naive (issue 12)")
    print("mean score per config (naive):", naive.groupby("config_id").score.mean().round(3).to_dict())


if __name__ == "__main__":
    main()
