"""Calibration of stage 06's tests on simulated nulls, through the package's own functions.

A test holds its α when, on data where its null hypothesis is true, it rejects at most a
share α of the time. Each null here is built with :func:`rephelpers.influence.impact.simulate_scores`
and read with :func:`rephelpers.influence.stats.influence_table` (or :func:`~rephelpers.influence.stats.ace_regression`),
exactly as notebook 06 reads a real run:

- ``no_effect``: no perturbation changes the model systematically; answers flip at random
  in both directions (``flip_rate``). Null of the paired Wilcoxon tests (Φ ≠ 0, Φ_control ≠ 0).
- ``random_sets``: R_k is just another random set of dimensions: the cluster's perturbation
  is one more draw from the distribution its controls come from, and random sets differ in
  how much they hurt (``draw_sd``). Null of "beyond its random controls". The item-level
  Wilcoxon of the perturbation against the mean control, which treats the one R_k as
  fixed, is run too (``legacy_item_wilcoxon_vs_control``, not reported by stage 06) to show
  why it was replaced, and so is a normal-theory prediction test against the draws
  (``rejected_prediction_t_vs_controls``), the reason stage 06 keeps the rank p-value.
- ``ace_null``: cluster-level ACE unrelated to cluster size; rows are cluster × task × θ
  with a random cluster effect, read per cluster (reported) and per row (the old,
  pseudo-replicated regression).

:func:`calibrate` returns ``{"tests": [{"name", "alpha", "fpr", "n_sims", "n_tests",
"reported", "null"}]}``; ``fpr`` is the share of rejections among the tests run under the
null (per cell for cell-level tests, per simulated table for family-wise ones).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import require
from . import impact, stats

DEFAULT_GRID = {"n_clusters": (3, 5, 8), "items": (20, 40), "baseline": (0.5, 0.8)}


def _abilities(baseline: float) -> dict[str, float]:
    return {"math": baseline, "code": min(0.95, baseline + 0.1)}


def _count(rejections: dict[str, list[bool]], name: str, values: Sequence[bool]) -> None:
    rejections.setdefault(name, []).extend(bool(v) for v in values)


def _sim_no_effect(rng_seed: int, n_clusters: int, items: int, baseline: float, n_controls: int, alpha: float,
                   rejections: dict[str, list[bool]]) -> None:
    scores = impact.simulate_scores(
        {(k, "math"): 0.0 for k in range(n_clusters)}, _abilities(baseline), items_per_task=items,
        magnitudes=(1.0,), n_controls=n_controls, flip_rate=0.05, seed=rng_seed,
    )
    table = stats.influence_table(scores, n_boot=1, alpha=alpha)
    _count(rejections, "wilcoxon_phi_nonzero", table["p_value"] < alpha)
    _count(rejections, "wilcoxon_phi_nonzero_holm_familywise", [bool(table["significant"].any())])
    _count(rejections, "wilcoxon_control_nonzero", table["p_control"] < alpha)


def _sim_random_sets(rng_seed: int, n_clusters: int, items: int, baseline: float, n_controls: int, alpha: float,
                     rejections: dict[str, list[bool]]) -> None:
    scores = impact.simulate_scores(
        {(k, "math"): 0.0 for k in range(n_clusters)}, _abilities(baseline), items_per_task=items,
        magnitudes=(0.5, 1.0), n_controls=n_controls, control_effect=0.2, draw_sd=0.1,
        target_like_control=True, seed=rng_seed,
    )
    table = stats.influence_table(scores, n_boot=1, alpha=alpha)
    _count(rejections, "control_distribution_rank", table["p_vs_controls"] < alpha)
    _count(rejections, "control_distribution_rank_bh_familywise", [bool(table["exceeds_controls"].any())])
    draws = impact.control_draws(impact.ais(scores))
    phi = impact.influence_matrix(impact.ais(scores))
    t_p = [stats.prediction_t_p(r.phi, draws.loc[(draws.cluster == r.cluster) & (draws.ability == r.ability),
                                                 "phi_draw"].to_numpy()) for r in phi.itertuples(index=False)]
    _count(rejections, "rejected_prediction_t_vs_controls", np.asarray(t_p) < alpha)
    legacy = stats.cell_wilcoxon(scores, alternative="two-sided")
    legacy = legacy[legacy["comparison"] == "perturbation_vs_control"]
    _count(rejections, "legacy_item_wilcoxon_vs_control", legacy["p_value"] < alpha)


def _sim_ace(rng_seed: int, n_clusters: int, alpha: float, rejections: dict[str, list[bool]]) -> None:
    rng = np.random.default_rng(rng_seed)
    tasks, thetas = 3, 2
    effect = rng.normal(0, 1, n_clusters)  # each cluster's own ACE level, unrelated to its size
    size = rng.integers(20, 200, n_clusters).astype(float)
    rows = pd.DataFrame([
        {"cluster": k, "task": t, "theta": j, "ace": effect[k] + rng.normal(0, 0.3), "cluster_size": size[k]}
        for k in range(n_clusters) for t in range(tasks) for j in range(thetas)
    ])
    per_cluster = stats.ace_regression(rows, predictors=["cluster_size"]).set_index("term")
    if np.isfinite(per_cluster.loc["cluster_size", "p_value"]):
        _count(rejections, "ace_regression_per_cluster", [per_cluster.loc["cluster_size", "p_value"] < alpha])
    per_row = stats.ace_regression(rows, predictors=["cluster_size"], per_cluster=False).set_index("term")
    _count(rejections, "legacy_ace_regression_per_row", [per_row.loc["cluster_size", "p_value"] < alpha])


REPORTED = {
    "wilcoxon_phi_nonzero": "no_effect", "wilcoxon_phi_nonzero_holm_familywise": "no_effect",
    "wilcoxon_control_nonzero": "no_effect", "control_distribution_rank": "random_sets",
    "control_distribution_rank_bh_familywise": "random_sets",
    "ace_regression_per_cluster": "ace_null",
}
LEGACY = {"legacy_item_wilcoxon_vs_control": "random_sets", "legacy_ace_regression_per_row": "ace_null",
          "rejected_prediction_t_vs_controls": "random_sets"}


def calibrate(
    n_sims: int = 20,
    alpha: float = 0.05,
    n_controls: int = 19,
    grid: dict[str, Sequence[Any]] | None = None,
    ace_clusters: Sequence[int] = (8, 12),
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``n_sims`` simulations per null and grid point; the false-positive rate of every test.

    ``grid`` (default :data:`DEFAULT_GRID`) crosses cluster counts, items per task and
    baseline accuracies. Seeds are fixed (``seed``, the point and the simulation index),
    so the same call gives the same table on every machine.
    """
    require(int(n_sims) >= 1, f"n_sims must be ≥ 1, got {n_sims!r}")
    grid = dict(DEFAULT_GRID if grid is None else grid)
    rejections: dict[str, list[bool]] = {}
    points = list(itertools.product(grid["n_clusters"], grid["items"], grid["baseline"]))
    for p, (k, items, baseline) in enumerate(points):
        for i in range(int(n_sims)):
            s = int(seed) * 1_000_003 + p * 10_007 + i
            _sim_no_effect(s, int(k), int(items), float(baseline), int(n_controls), alpha, rejections)
            _sim_random_sets(s, int(k), int(items), float(baseline), int(n_controls), alpha, rejections)
    for k in ace_clusters:
        for i in range(int(n_sims) * len(points)):
            _sim_ace(int(seed) * 1_000_003 + 7 * int(k) + 31 * i, int(k), alpha, rejections)
    tests = []
    for name, values in rejections.items():
        tests.append({
            "name": name, "alpha": float(alpha), "fpr": float(np.mean(values)) if values else float("nan"),
            "n_sims": int(n_sims) * (len(points) if not name.startswith(("ace", "legacy_ace")) else len(points) * len(ace_clusters)),
            "n_tests": len(values), "reported": name in REPORTED, "null": REPORTED.get(name, LEGACY.get(name, "")),
        })
    return {"tests": tests, "grid": {k: list(v) for k, v in grid.items()}, "n_controls": int(n_controls),
            "alpha": float(alpha), "seed": int(seed)}


def calibration_frame(result: dict[str, Any]) -> pd.DataFrame:
    """The ``tests`` of :func:`calibrate` as a table, with ``holds`` (fpr ≤ α + 0.03)."""
    frame = pd.DataFrame(result["tests"])
    frame["holds"] = frame["fpr"] <= frame["alpha"] + 0.03
    return frame


__all__ = ["calibrate", "calibration_frame", "REPORTED", "LEGACY", "DEFAULT_GRID"]
