"""Which fine-tune budget teaches every planted skill past notebook 07's floor (issue 25)?

The testbed's Φ* is only as good as what f_all learns: a planted skill f_all does not learn has a
null own cell, and no estimator can be scored on it. This fine-tunes f_all (the whole testbed
corpus, one seed) under each given variant of the budget and optimiser and prints its score on
every planted ability beside the floor (``skill_floor``, 0.6 in ``groundtruth.yaml``) and the
fine-tune's time. Fine-tunes go to the user cache under the same content key notebook 07 uses,
so a variant that notebook 07 then runs is not trained twice (and one already trained is read back:
its time is then the stored one).

    python -u benchmarks/bench_skill_floor.py '{}' '{"lr": 0.003}' '{"steps": 400}' '{"train_layers": 16}'

Each argument is a JSON object of :class:`~rephelpers.testbed.finetune.FineTuneConfig` fields that
replace ``groundtruth.yaml``'s (200 steps × 8 × 64 tokens, lr 3e-3, top 8 layers, seed 0), and
optionally ``"lines"``: statements per document for some skills, replacing
:data:`~rephelpers.testbed.planted.LINES_PER_DOCUMENT`'s ranges (``{"lines": {"facts": [18, 22]}}``):
each skill's share of the fixed token budget. Run it
alone: the times are only comparable within one quiet run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rephelpers.abilities.evaluation import evaluate_abilities
from rephelpers.abilities.suite import build_tasks
from rephelpers.paths import cache_subdir
from rephelpers.representations.models import load_model
from rephelpers.testbed import groundtruth as gt
from rephelpers.testbed.finetune import FineTuneConfig, cached_finetune, using_weights
from rephelpers.testbed import planted
from rephelpers.testbed.planted import PLANTED, planted_ability

BASE = {"steps": 200, "batch_size": 8, "block_tokens": 64, "lr": 3e-3, "train_layers": 8, "seed": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=["{}"], help="JSON objects of FineTuneConfig fields")
    parser.add_argument("--demo-docs-per-domain", type=int, default=20)
    parser.add_argument("--docs-per-skill", type=int, default=96)
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--floor", type=float, default=0.6)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    skills = list(PLANTED)
    default_lines = dict(planted.LINES_PER_DOCUMENT)
    abilities = [planted_ability(s) for s in skills]
    model = load_model("smollm2-135m")
    cache = cache_subdir("groundtruth")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = build_tasks(abilities, Path(tmp) / "tasks", items_per_task=args.items, seed=0)
        for text in args.variants:
            variant = json.loads(text)
            lines = {k: tuple(v) for k, v in variant.get("lines", {}).items()}
            unknown = sorted(set(lines) - set(default_lines))
            if unknown:
                raise SystemExit(f"unknown skills in lines: {unknown}; choose from {sorted(default_lines)}")
            planted.LINES_PER_DOCUMENT.clear()
            planted.LINES_PER_DOCUMENT.update({**default_lines, **lines})
            corpus = gt.testbed_corpus(args.demo_docs_per_domain, args.docs_per_skill, skills, 0)
            config = FineTuneConfig(**{**BASE, **{k: v for k, v in variant.items() if k != "lines"}})
            blocks, states = gt.training_blocks(model, corpus, config, cache / "states")
            trained, meta = cached_finetune(model, blocks, states, config, [], cache / "finetunes")
            started = time.time()
            with using_weights(model, trained):
                raw = evaluate_abilities(model, tasks, {"f_all": []}, progress=False)
            scores = raw.groupby("ability")["score"].mean()
            tokens = blocks.tokens_per_group()
            row = {"variant": variant, "tokens": {g: tokens[g] for g in sorted(tokens)},
                   "fine_tune_seconds": meta["seconds"], "scoring_seconds": round(time.time() - started, 1),
                   "first_loss": round(meta["first_loss"], 3), "last_loss": round(meta["last_loss"], 3),
                   **{a: round(float(scores[a]), 3) for a in abilities},
                   "below_floor": [a for a in abilities if scores[a] < args.floor]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
