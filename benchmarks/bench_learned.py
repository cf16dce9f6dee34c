"""Stage-04 specificity of the learned projection and multi-layer LEACE beside mean-difference R_k.

On a run directory whose stage 03 has finished (documents.parquet, subspaces.json,
activations/), fits the ``learned`` subspace of every cluster at ``--layer``
(:func:`rephelpers.perturbations.learned.with_learned`, cached under the run directory's
``cache/learned/``) and prints, per cluster, the stage-04 row of each kind: Δlog-ppl on the
cluster's held-out texts and on the rest's, the gap, the edit norm, the median control edit
ratio, the best control gap and the verdict; then the fits' own losses (fitted vs random U on
the training texts) and fitting time. Kinds: ``ablate`` (R_k), ``learned`` and, with
``--leace-layers``, multi-layer LEACE.

    python benchmarks/bench_learned.py --run /tmp/demo_copy                      # the demo's settings
    python benchmarks/bench_learned.py --run /tmp/demo_copy --clusters 0 --steps 5 --n-texts 4 --n-controls 1   # smoke
    python benchmarks/bench_learned.py --run /tmp/demo_copy --leace-layers 9 15 21 --csv /tmp/learned.csv

Never point it at a run directory someone else is writing: it adds ``cache/learned/`` to it.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from rephelpers.artifacts import RunDir
from rephelpers.dimensions.association import load_components
from rephelpers.perturbations.learned import LAMBDA, MAX_LENGTH, N_TEXTS, RANK, STEPS, TARGET, fit_table, with_learned
from rephelpers.perturbations.specificity import probe_activations, specificity_report, specificity_verdicts
from rephelpers.representations.models import load_model

COLUMNS = ["kind", "cluster", "dlogppl_target", "dlogppl_rest", "specificity_gap", "edit_norm", "control_edit_ratio",
           "best_control_gap", "specificity_verdict"]


def summary(report: pd.DataFrame) -> pd.DataFrame:
    """One row per (kind, cluster): the perturbation's numbers beside its controls'."""
    pert = report[report["arm"] == "perturbation"].set_index(["kind", "cluster"])
    controls = report[report["arm"] == "control"].groupby(["kind", "cluster"])
    pert["control_edit_ratio"] = controls["edit_ratio"].median()
    pert["best_control_gap"] = controls["specificity_gap"].max()
    return pert.reset_index()[COLUMNS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory with stages 01-03 done (a copy: it gets cache/learned/)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--clusters", type=int, nargs="*", default=None)
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lam", type=float, default=LAMBDA)
    parser.add_argument("--target", type=float, default=TARGET,
                        help="Δ, the rise of the cluster's loss (nats/token) the fit aims at; 0: the unbounded objective")
    parser.add_argument("--fit-texts", type=int, default=N_TEXTS, help="training texts per side in fitting")
    parser.add_argument("--fit-tokens", type=int, default=MAX_LENGTH, help="tokens per text in fitting")
    parser.add_argument("--n-texts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n-controls", type=int, default=5)
    parser.add_argument("--leace-layers", type=int, nargs="*", default=None)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()

    run = RunDir(args.run)
    docs = run.load_parquet("documents.parquet")
    components = load_components(run)
    model = load_model(args.model)
    probes = probe_activations(run, docs, args.layer)
    clusters = args.clusters if args.clusters is not None else sorted({c.cluster for c in components if c.layer == args.layer})
    pd.set_option("display.width", 200)
    parts, fits = [], {}
    for k in clusters:  # one cluster at a time, printed as it comes: a long run still says something
        start = time.perf_counter()
        learned, fit = with_learned(run, model, docs, components, args.layer, clusters=[k], rank=args.rank,
                                    steps=args.steps, lam=args.lam, target=args.target or None,
                                    max_length=args.fit_tokens, n_texts=args.fit_texts)
        fits |= fit
        print(f"cluster {k}: fitting took {time.perf_counter() - start:.0f} s (wall, this machine as loaded now)")
        common = dict(clusters=[k], n_texts=args.n_texts, max_length=args.max_tokens, n_controls=args.n_controls,
                      probes=probes, progress=False)
        reports = [specificity_report(model, docs, learned, kind, args.layer, **common) for kind in ("ablate", "learned")]
        if args.leace_layers:
            reports.append(specificity_report(model, docs, learned, "leace", args.layer, layers=args.leace_layers, **common))
        parts.append(specificity_verdicts(pd.concat(reports, ignore_index=True)))
        print(summary(parts[-1]).round(3).to_string(index=False))
        print(fit_table(fit).round(3).to_string(index=False), flush=True)
        if args.csv:
            pd.concat(parts, ignore_index=True).to_csv(args.csv, index=False)
    report = pd.concat(parts, ignore_index=True)
    print(summary(report).round(3).to_string(index=False))
    print(fit_table(fits).round(3).to_string(index=False))
    if args.csv:
        report.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
