"""The unperturbed model on every ability: score, chance, items and the smallest detectable AIS.

Stage 06 reads an ability only where the unperturbed model scores at least
``chance + floor_margin`` (0.1), and an AIS (relative loss) is only visible if there are
enough items: this prints, per ability, the baseline score of the embedded model on the
items a run would build (``build_tasks(ability, items_per_task=n, seed=s)``), its chance
rate, the number of items and the minimum detectable AIS at 80% power
(:func:`rephelpers.influence.stats.minimum_detectable_ais`, α = 0.05 per cell, and with Holm over
``--cells`` cells, the bound notebook 06 prints for a table of that many readable cells).
Target of the default suite: a baseline in [0.4, 0.9] and a per-cell MDE ≤ 0.3. The
last column is the wall time of the unperturbed evaluation of that ability (one config).

    python benchmarks/bench_ability_baselines.py                        # every ability, 40 items, seed 0
    python benchmarks/bench_ability_baselines.py --abilities arithmetic code icl --items 80 --seeds 0 1 2
    python benchmarks/bench_ability_baselines.py --json                 # one JSON object per ability
    python benchmarks/bench_ability_baselines.py --abilities arithmetic code icl --cost-configs 8   # + stage 05 cost
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from rephelpers.abilities.suite import ABILITIES, build_tasks
from rephelpers.abilities.evaluation import evaluate_abilities
from rephelpers.interventions.intervene import Intervention
from rephelpers.representations.models import load_model
from rephelpers.interventions.edits import Ablate
from rephelpers.influence.stats import minimum_detectable_ais


def main() -> None:
    suite = [name for name in ABILITIES if not name.startswith("planted_")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--abilities", nargs="+", default=suite, help="abilities of the suite (default: all but planted_*)")
    parser.add_argument("--items", type=int, default=None, help="items per task (default: each ability's default size)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="build seeds; the score is pooled over them")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cells", type=int, default=15, help="readable cells of the Holm family (demo: 5 clusters × 3 abilities)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per ability instead of a table")
    parser.add_argument("--cost-configs", type=int, default=0,
                        help="also time stage 05 on these abilities together: the baseline plus this many "
                             "configs (zero-ablation of 32 random dimensions at --layer, as the demo's R_k), fast path")
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()

    model = load_model(args.model)
    if not args.json:
        print(f"{'ability':<12} {'metric':<15} {'chance':>6} {'n':>4} {'score':>6} {'in':>3} {'MDE':>5} "
              f"{'MDE/Holm' + str(args.cells):>11} {'s/config':>8}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as task_dir:
        for name in args.abilities:
            spec = ABILITIES[name]
            n = args.items or spec.size
            scores = []
            start = time.perf_counter()
            for seed in args.seeds:
                tasks = build_tasks([name], f"{task_dir}/s{seed}", items_per_task=n, seed=seed)
                rows = evaluate_abilities(model, tasks, {"baseline": []}, batch_size=args.batch_size,
                                          progress=False, fast=True)
                scores += rows.score.tolist()
            seconds = (time.perf_counter() - start) / len(args.seeds)
            score = sum(scores) / len(scores)
            # A lower-is-better metric (bias) has no "loss of ability" to detect; its MDE is left out.
            mde = minimum_detectable_ais(n, score) if spec.metric != "pct_stereotype" and score > 0 else float("nan")
            mde_holm = (minimum_detectable_ais(n, score, n_tests=args.cells)
                        if spec.metric != "pct_stereotype" and score > 0 else float("nan"))
            results.append({
                "ability": name, "metric": spec.metric, "type": spec.output_type, "chance": spec.chance,
                "n_items": n, "seeds": args.seeds, "score": round(score, 4),
                "in_range": 0.4 <= score <= 0.9, "readable": score >= spec.chance + 0.1,
                "mde_ais": mde, "mde_ais_holm": mde_holm, "seconds_per_config": round(seconds, 1),
            })
            r = results[-1]
            print(json.dumps(r) if args.json else
                  f"{r['ability']:<12} {r['metric']:<15} {r['chance']:>6.2f} {r['n_items']:>4} {r['score']:>6.3f} "
                  f"{'yes' if r['in_range'] else 'no':>3} {r['mde_ais']:>5.2f} {r['mde_ais_holm']:>11.2f} "
                  f"{r['seconds_per_config']:>8.1f}", flush=True)
        if args.cost_configs:
            rng = np.random.default_rng(0)
            configs = {"baseline": []}
            for c in range(args.cost_configs):
                dims = tuple(sorted(rng.choice(model.d_model, size=32, replace=False).tolist()))
                configs[f"ablate{c:02d}"] = [Intervention(Ablate(dims), args.layer)]
            tasks = build_tasks(args.abilities, f"{task_dir}/cost", items_per_task=args.items or 40, seed=args.seeds[0])
            start = time.perf_counter()
            evaluate_abilities(model, tasks, configs, batch_size=args.batch_size, progress=False, fast=True)
            total = time.perf_counter() - start
            cost = {"cost_configs": len(configs), "abilities": args.abilities, "seconds": round(total, 1),
                    "seconds_per_config": round(total / len(configs), 1)}
            print(json.dumps(cost) if args.json else
                  f"stage 05 cost: {len(configs)} configs × {', '.join(args.abilities)} "
                  f"({args.items or 'default'} items): {total:.0f} s, {total / len(configs):.1f} s per config", flush=True)
    if not args.json:
        print(f"seeds {args.seeds}; MDE: minimum detectable AIS at 80% power, α = 0.05 per cell "
              f"(MDE/Holm: Holm over {args.cells} cells); in: baseline in [0.4, 0.9]")


if __name__ == "__main__":
    main()
