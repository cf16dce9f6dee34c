"""Shared-prefix sweep vs one run per config: wall time and identical scores.

Sixteen perturbation configs (zero-ablation of 32 random dimensions each, as a stage-03
R_k with ``top_k=32`` would give) at one middle layer of the demo model, evaluated on
the multiple-choice abilities twice: ``evaluate_abilities(fast=False)`` (every config
runs the whole model through lm-eval) and ``fast=True`` (layers below the intervention
layer once per batch, the rest per config). Target: fast ≤ 0.6 × naive, same scores.

    python benchmarks/bench_fast_sweep.py                # 16 configs, layer 15, 20 items/task
    python benchmarks/bench_fast_sweep.py --items 8 --configs 4   # quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from rephelpers.abilities import build_tasks
from rephelpers.evaluation import evaluate_abilities
from rephelpers.intervene import Intervention
from rephelpers.models import load_model
from rephelpers.perturbations import Ablate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=int, default=16, help="perturbation configs besides the baseline")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--dims", type=int, default=32, help="ablated dimensions per config")
    parser.add_argument("--items", type=int, default=20, help="items per task")
    parser.add_argument("--abilities", nargs="+", default=["icl", "code", "factual"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = load_model()
    rng = np.random.default_rng(args.seed)
    configs = {"baseline": []}
    for c in range(args.configs):
        dims = tuple(sorted(rng.choice(model.d_model, size=args.dims, replace=False).tolist()))
        configs[f"ablate{c:02d}"] = [Intervention(Ablate(dims), args.layer)]
    with tempfile.TemporaryDirectory() as task_dir:
        tasks = build_tasks(args.abilities, task_dir, items_per_task=args.items, seed=args.seed)
        timings, results = {}, {}
        for fast in (False, True):
            start = time.perf_counter()
            results[fast] = evaluate_abilities(
                model, tasks, configs, batch_size=args.batch_size, progress=False, fast=fast
            ).sort_values(["config_id", "task", "item"]).reset_index(drop=True)
            timings[fast] = time.perf_counter() - start

    naive, fast = results[False], results[True]
    n_items = len(naive) // len(configs)
    same = bool((naive.score.to_numpy() == fast.score.to_numpy()).all())
    print(f"{len(configs)} configs ({args.configs} × ablate {args.dims} dims at layer {args.layer} + baseline), "
          f"{n_items} items ({', '.join(args.abilities)}), batch size {args.batch_size}")
    print(f"naive (one lm-eval run per config): {timings[False]:8.1f} s")
    print(f"fast  (shared layers < {args.layer}):       {timings[True]:8.1f} s")
    print(f"ratio fast / naive: {timings[True] / timings[False]:.2f}  (target ≤ 0.60)")
    print(f"scores identical: {same}; max |Δ margin| = {np.nanmax(np.abs(naive.margin - fast.margin)):.2e}")
    print("mean score per config (naive):",
          naive.groupby("config_id").score.mean().round(3).to_dict())


if __name__ == "__main__":
    main()
