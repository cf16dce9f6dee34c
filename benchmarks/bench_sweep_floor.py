"""Stage 05's cost per config against the floor of a plain forward pass over the same tokens.

Evaluates the demo's log-likelihood abilities (arithmetic, code, icl; 60 items each, seed 0)
through the shared-prefix sweep (``evaluate_abilities(fast=True)``) with the baseline and 2,
then 10, random 32-dimension ablations at layer 15; the difference over 8 configs is the
marginal seconds of one config. The floor: a plain HF decoder forward
(``model.hf.model``, no nnsight, no interventions, no output head) over exactly the rows the
sweep packed (same tokens, right-padded, batch 8, longest first), halved, since a config runs
only the layers above the intervention layer (15 of 30). A ratio near 1 says the sweep's
remaining time is the model's own arithmetic, not this package's overhead.

    python benchmarks/bench_sweep_floor.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from rephelpers.abilities import forward
from rephelpers.abilities.evaluation import evaluate_abilities
from rephelpers.abilities.suite import build_tasks
from rephelpers.interventions.intervene import Intervention
from rephelpers.interventions.edits import Ablate
from rephelpers.representations.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()

    model = load_model("smollm2-135m")
    tasks = build_tasks(["arithmetic", "code", "icl"], tempfile.mkdtemp(), items_per_task=args.items, seed=0)
    packed: list = []
    pack = forward._pack_requests

    def recording(*a, **k):  # the rows the sweep runs, for the floor below
        rows, targets = pack(*a, **k)
        packed.append(rows)
        return rows, targets

    forward._pack_requests = recording
    rng = np.random.default_rng(0)

    def configs(n: int) -> dict:
        ablations = (tuple(sorted(rng.choice(model.d_model, 32, replace=False).tolist())) for _ in range(n))
        return {"baseline": [], **{f"ablate{i}": [Intervention(Ablate(dims), args.layer)] for i, dims in enumerate(ablations)}}

    seconds = {}
    for n in (2, 10):
        packed.clear()
        started = time.time()
        evaluate_abilities(model, tasks, configs(n), batch_size=8, progress=False, fast=True)
        seconds[n] = time.time() - started
        print(f"baseline + {n} configs: {seconds[n]:.1f} s", flush=True)
    per_config = (seconds[10] - seconds[2]) / 8
    rows = sorted((r for calls in packed for r in calls), key=lambda r: -len(r.tokens))

    started = time.time()
    with torch.inference_mode():
        for i in range(0, len(rows), 8):
            batch = rows[i : i + 8]
            width = max(len(r.tokens) for r in batch)
            ids = torch.full((len(batch), width), model.tokenizer.pad_token_id or 0)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, r in enumerate(batch):
                ids[j, : len(r.tokens)], mask[j, : len(r.tokens)] = torch.tensor(r.tokens), 1
            model.hf.model(input_ids=ids, attention_mask=mask)
    full = time.time() - started
    share = (model.n_layers - args.layer) / model.n_layers
    print(f"{len(rows)} packed rows, {sum(len(r.tokens) for r in rows)} tokens")
    print(f"one more config: {per_config:.2f} s; plain forward of the same rows {full:.2f} s, "
          f"its layers {args.layer}+ ≈ {full * share:.2f} s; ratio {per_config / (full * share):.2f}")


if __name__ == "__main__":
    main()
