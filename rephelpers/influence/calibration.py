"""Calibration of stage 06's tests on simulated nulls, through the package's own functions.

A test holds its α when, on data where its null hypothesis is true, it rejects at most a
share α of the time. Each null here is built with :func:`rephelpers.influence.impact.simulate_scores`
and read with :func:`rephelpers.influence.findings.influence_table` (or :func:`~rephelpers.influence.stats.ace_regression`),
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

Power is measured the same way, by the same functions: ``random_sets`` tables with a
cluster-specific effect planted on a few cells (``planted``: the target is a control-like
draw plus Φ − Φ_control = δ, :data:`EFFECTS`) are read by ``influence_table`` and the same
rejection rule is applied to the planted cells (:func:`_table_rejections`).

:func:`calibrate` returns ``{"tests": [{"name", "alpha", "fpr", "power": {"0.1", "0.2",
"0.3"}, "n_sims", "n_tests", "reported", "null"}]}``; ``fpr`` is the share of rejections
among the tests run under the null (per cell for cell-level tests, per simulated table
for family-wise ones), ``power`` the share of planted cells rejected (None where the
test has no planted alternative here).

:func:`design_study` compares designs of the control comparison on the demo's own
design (:data:`DEMO_DESIGN`: 5 clusters × 3 abilities, 60 items, 20 draws), at the level
of Φ: today's rank p with 20 draws, a ``primary`` family, Besag–Clifford sequential
draws up to a cap (:func:`rephelpers.influence.stats.sequential_p`), each with its FPR,
power and the control draws it costs per cluster.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import require
from . import findings, impact, stats

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
    rejected = _table_rejections(findings.influence_table(scores, n_boot=1, alpha=alpha), alpha)
    _count(rejections, "wilcoxon_phi_nonzero", rejected["wilcoxon_phi_nonzero"])
    _count(rejections, "wilcoxon_phi_nonzero_holm_familywise", [bool(rejected["wilcoxon_phi_nonzero_holm_familywise"].any())])
    _count(rejections, "wilcoxon_control_nonzero", rejected["wilcoxon_control_nonzero"])


EFFECTS = (0.1, 0.2, 0.3)
"""Planted Φ − Φ_control of the power simulations."""
PLANTED_CELLS = ((0, "math"), (1, "code"))
"""Where the power simulations plant their effect (the cells that exist: one with a single cluster)."""


def _table_rejections(table: pd.DataFrame, alpha: float) -> dict[str, np.ndarray]:
    """Per cell of an influence table, whether each reported cell-level test rejects: the one
    rule both the false-positive rate (null cells) and the power (planted cells) are read with."""
    return {
        "wilcoxon_phi_nonzero": (table["p_value"] < alpha).to_numpy(),
        "wilcoxon_phi_nonzero_holm_familywise": table["significant"].to_numpy(bool),
        "wilcoxon_control_nonzero": (table["p_control"] < alpha).to_numpy(),
        "control_distribution_rank": (table["p_vs_controls"] < alpha).to_numpy(),
        "control_distribution_rank_bh_familywise": table["exceeds_controls"].to_numpy(bool),
    }


def _random_sets_table(rng_seed: int, n_clusters: int, items: int, baseline: float, n_controls: int, alpha: float,
                       planted: dict[tuple[int, str], float] | None = None) -> pd.DataFrame:
    scores = impact.simulate_scores(
        {(k, "math"): 0.0 for k in range(n_clusters)}, _abilities(baseline), items_per_task=items,
        magnitudes=(0.5, 1.0), n_controls=n_controls, control_effect=0.2, draw_sd=0.1,
        target_like_control=True, planted=planted, seed=rng_seed,
    )
    return findings.influence_table(scores, n_boot=1, alpha=alpha)


def _sim_planted(rng_seed: int, n_clusters: int, items: int, baseline: float, n_controls: int, alpha: float,
                 effect: float, power: dict[str, dict[str, list[bool]]]) -> None:
    cells = [c for c in PLANTED_CELLS if c[0] < n_clusters]
    table = _random_sets_table(rng_seed, n_clusters, items, baseline, n_controls, alpha, {c: effect for c in cells})
    hit = np.array([(int(k), a) in cells for k, a in zip(table["cluster"], table["ability"])])
    for name, rejected in _table_rejections(table, alpha).items():
        if name != "wilcoxon_control_nonzero":  # nothing is planted on the controls
            power.setdefault(name, {}).setdefault(f"{effect:g}", []).extend(rejected[hit].tolist())


def _sim_random_sets(rng_seed: int, n_clusters: int, items: int, baseline: float, n_controls: int, alpha: float,
                     rejections: dict[str, list[bool]]) -> None:
    table = _random_sets_table(rng_seed, n_clusters, items, baseline, n_controls, alpha)
    rejected = _table_rejections(table, alpha)
    _count(rejections, "control_distribution_rank", rejected["control_distribution_rank"])
    _count(rejections, "control_distribution_rank_bh_familywise",
           [bool(rejected["control_distribution_rank_bh_familywise"].any())])
    scores = impact.simulate_scores(
        {(k, "math"): 0.0 for k in range(n_clusters)}, _abilities(baseline), items_per_task=items,
        magnitudes=(0.5, 1.0), n_controls=n_controls, control_effect=0.2, draw_sd=0.1,
        target_like_control=True, seed=rng_seed,
    )
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
    effects: Sequence[float] = EFFECTS,
    design: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``n_sims`` simulations per null and grid point; the false-positive rate of every test.

    ``grid`` (default :data:`DEFAULT_GRID`) crosses cluster counts, items per task and
    baseline accuracies. Seeds are fixed (``seed``, the point and the simulation index),
    so the same call gives the same table on every machine. ``effects`` are the planted
    Φ − Φ_control of the power simulations (one planted table per effect, point and
    simulation). ``design`` (keyword arguments of :func:`design_study`, e.g.
    ``{"n_sims": 200}``; None: not run) adds the demo-design comparison, its rows marked
    ``"design": True``.
    """
    require(int(n_sims) >= 1, f"n_sims must be ≥ 1, got {n_sims!r}")
    grid = dict(DEFAULT_GRID if grid is None else grid)
    rejections: dict[str, list[bool]] = {}
    power: dict[str, dict[str, list[bool]]] = {}
    points = list(itertools.product(grid["n_clusters"], grid["items"], grid["baseline"]))
    for p, (k, items, baseline) in enumerate(points):
        for i in range(int(n_sims)):
            s = int(seed) * 1_000_003 + p * 10_007 + i
            _sim_no_effect(s, int(k), int(items), float(baseline), int(n_controls), alpha, rejections)
            _sim_random_sets(s, int(k), int(items), float(baseline), int(n_controls), alpha, rejections)
            for effect in effects:
                _sim_planted(s + 500_009, int(k), int(items), float(baseline), int(n_controls), alpha, float(effect),
                             power)
    for k in ace_clusters:
        for i in range(int(n_sims) * len(points)):
            _sim_ace(int(seed) * 1_000_003 + 7 * int(k) + 31 * i, int(k), alpha, rejections)
    tests = []
    for name, values in rejections.items():
        tests.append({
            "name": name, "alpha": float(alpha), "fpr": float(np.mean(values)) if values else float("nan"),
            "power": ({e: float(np.mean(v)) for e, v in power[name].items()} if name in power else None),
            "n_sims": int(n_sims) * (len(points) if not name.startswith(("ace", "legacy_ace")) else len(points) * len(ace_clusters)),
            "n_tests": len(values), "reported": name in REPORTED, "null": REPORTED.get(name, LEGACY.get(name, "")),
        })
    result = {"tests": tests, "grid": {k: list(v) for k, v in grid.items()}, "n_controls": int(n_controls),
              "alpha": float(alpha), "seed": int(seed), "effects": [float(e) for e in effects],
              "planted_cells": [list(c) for c in PLANTED_CELLS]}
    if design is not None:
        study = design_study(**{"alpha": alpha, "effects": effects, "seed": seed, **design})
        result["tests"].extend(study["tests"])
        result["design"] = {k: v for k, v in study.items() if k != "tests"}
    return result


DEMO_DESIGN = {"n_clusters": 5, "baselines": {"arithmetic": 0.57, "code": 0.83, "icl": 0.77}, "items": 60}
"""The demo's stage-06 design: papermill_params/demo.yaml (5 clusters, arithmetic/code/icl at 60 items,
20 control draws) with the baselines README gives (bench_ability_baselines.py, seed 0)."""
DEMO_TOKEN_SHARES = {"arithmetic": 4895, "code": 7140, "icl": 7496}
"""The demo's stage-05 tokens per ability (context + choice tokens of one config, 19,531 in all), measured on
the demo run: a config's cost on an ability is about its share of them, so per-ability rounds are costed
in config-equivalents weighted by these shares (:func:`rephelpers.abilities.evaluation.evaluation_cost`)."""
DEMO_SPREAD = {"control_effect": 0.05, "draw_sd": 0.05}
"""Loss probability of a control draw, ``max(0, control_effect + draw_sd·z)``, when no run is given.
An assumption, not a measurement: the demo's control draws are not stored in the repository. The
README's demo reading (random dimensions of R_k's size "cost icl nothing", Φ − Φ_control 0.32–0.47
with CIs clear of 0) puts the controls' mean loss near 0 and their spread well below 0.1;
``benchmarks/bench_calibration.py --from-run runs/demo`` takes both from a run's influence table."""


@dataclass(frozen=True)
class ControlDesign:
    """One way of comparing Φ with its control draws, for :func:`design_study`.

    ``draws``: the number of draws (the cap, when sequential); ``h``: None for today's rank
    p-value over all ``draws``, else Besag–Clifford draws in rounds of ``round_size`` that stop a
    cell at its ``h``-th exceedance (:func:`rephelpers.influence.stats.sequential_p`) and a cluster
    once all its cells stopped; ``primary``: each cluster's pre-registered ability (the
    (k mod |A|)-th) is a primary family corrected on its own, the other cells exploratory.
    """

    name: str
    draws: int
    h: int | None = None
    primary: bool = False
    round_size: int = 10


DESIGNS = (
    ControlDesign("rank_20_bh", 20),  # today's demo: 20 draws, BH over the 15 cells
    ControlDesign("rank_20_primary_bh", 20, primary=True),
    ControlDesign("rank_300_bh", 300),
    ControlDesign("rank_100_primary_bh", 100, primary=True),
    ControlDesign("sequential_h3_cap300_bh", 300, h=3),
    ControlDesign("sequential_h3_cap100_primary_bh", 100, h=3, primary=True),
    # The chosen one: as powerful as 100 draws for every cell, and under the null cheaper than today's 20.
    ControlDesign("sequential_h2_cap100_primary_bh_rounds5", 100, h=2, primary=True, round_size=5),
    ControlDesign("sequential_h3_cap200_primary_bh", 200, h=3, primary=True),
    ControlDesign("sequential_h5_cap1000_primary_bh", 1000, h=5, primary=True),
    # The demo's (papermill_params/demo.yaml): no stated family, so a lone cell must pass BH over all 15.
    ControlDesign("sequential_h3_cap300_bh_rounds5", 300, h=3, round_size=5),
)
CHOSEN_DESIGN = "sequential_h2_cap100_primary_bh_rounds5"
"""The design with power where the user states a primary family (``primary`` in notebook 06)."""
DEMO_CONTROL_DESIGN = "sequential_h3_cap300_bh_rounds5"
"""The demo's design (control_rounds 5, stop_after_exceedances 3, control_cap 300, no primary family)."""
REPORTED_DESIGNS = ("rank_20_bh", DEMO_CONTROL_DESIGN, CHOSEN_DESIGN)
"""The designs stage 06 reads a run with: every draw at once (``control_rounds`` None, the testbed's chain),
the demo's rounds, and rounds with a stated ``primary`` family; the other rows are the reasons for the choice."""


def _design_rejections(target: np.ndarray, draws: np.ndarray, design: ControlDesign, primary: np.ndarray,
                       alpha: float, shares: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rejections per cell ``[K, A]``, control draws spent per cluster ``[K]`` with whole-cluster rounds
    and the same with per-ability rounds in draw-equivalents ``[K]`` of one design, given the cells' Φ
    (``target``), their draws' Φ in draw order (``draws [K, A, J]``) and the abilities' token ``shares``
    (``[A]``, summing to 1; None: equal)."""
    n_clusters, n_abilities, _ = draws.shape
    p = np.empty((n_clusters, n_abilities))
    used = np.zeros((n_clusters, n_abilities), dtype=int)
    for k in range(n_clusters):
        for a in range(n_abilities):
            pool = draws[k, a, :design.draws]
            if design.h is None:
                p[k, a], used[k, a] = stats.empirical_p(target[k, a], pool), design.draws
            else:
                p[k, a], used[k, a] = stats.sequential_p(target[k, a], pool, design.h)
    # A cluster's draw serves all its abilities at once; it is drawn in whole rounds, up to the cap.
    rounds = np.ceil(used.max(axis=1) / design.round_size) * design.round_size
    spent = np.minimum(rounds, design.draws) if design.h is not None else used.max(axis=1)
    # Per-ability rounds: round 0 on every ability, later rounds of an ability only while its cell is open,
    # so ability a costs its share of the rounds its own cell needed: Σ_a w_a · min(cap, R·max(1, ⌈L_a / R⌉)).
    shares = np.full(n_abilities, 1.0 / n_abilities) if shares is None else np.asarray(shares, dtype=float)
    own_rounds = np.maximum(1, np.ceil(used / design.round_size)) * design.round_size
    spent_per_ability = ((np.minimum(own_rounds, design.draws) if design.h is not None else used) * shares).sum(axis=1)
    adjusted = np.empty_like(p)
    for family in ((primary, ~primary) if design.primary else (np.ones_like(primary),)):
        adjusted[family] = stats.adjust_pvalues(p[family], "bh")
    mean_used = np.array([[draws[k, a, :used[k, a]].mean() for a in range(n_abilities)] for k in range(n_clusters)])
    return (adjusted < alpha) & (target > mean_used), spent, spent_per_ability


def design_study(
    n_sims: int = 200,
    alpha: float = 0.05,
    effects: Sequence[float] = EFFECTS,
    designs: Sequence[ControlDesign] = DESIGNS,
    control_effect: float = DEMO_SPREAD["control_effect"],
    draw_sd: float = DEMO_SPREAD["draw_sd"],
    n_clusters: int = DEMO_DESIGN["n_clusters"],
    baselines: dict[str, float] | None = None,
    items: int = DEMO_DESIGN["items"],
    seed: int = 0,
    token_shares: dict[str, float] | None = None,
) -> dict[str, Any]:
    """FPR, power and cost of each control design on the demo's design, simulated at the level of Φ.

    The model is :func:`rephelpers.influence.impact.simulate_scores`' ``random_sets`` model with
    one magnitude and no flips, drawn directly as Φ: ability a has ``n_a = round(b_a · items)``
    right answers; control draw j of cluster k loses each with probability
    ``c_j = max(0, control_effect + draw_sd·z_j)`` (one c_j for all abilities: one dimension
    set), so its Φ is ``Binomial(n_a, c_j) / n_a``; the cluster's own perturbation is one more
    such draw, plus ``δ`` on the planted cells (each cluster's pre-registered ability, for
    clusters 0 and 1). Every design reads the same draws in the same order. Per design:
    ``fpr`` (null cells of δ = 0 tables), ``fpr_familywise`` (any rejection in a δ = 0 table),
    ``power`` per δ (planted cells rejected) and ``mean_draws_per_cluster`` per δ (its cost;
    today's demo spends 20), and ``mean_cost_per_cluster_per_ability`` per δ: the same cost with
    per-ability late rounds (stage 05's: a draw is evaluated only on the abilities whose cells are still
    in the tail), in draws of every ability, each ability weighted by its share of the tokens
    (``token_shares``, ``{ability: tokens}``; None: :data:`DEMO_TOKEN_SHARES` for the demo's abilities,
    equal shares for others).
    """
    require(int(n_sims) >= 1, f"n_sims must be ≥ 1, got {n_sims!r}")
    baselines = dict(DEMO_DESIGN["baselines"] if baselines is None else baselines)
    names = sorted(baselines)
    if token_shares is None:
        token_shares = DEMO_TOKEN_SHARES if set(names) == set(DEMO_TOKEN_SHARES) else {a: 1.0 for a in names}
    missing = [a for a in names if a not in token_shares]
    require(not missing and all(float(token_shares[a]) > 0 for a in names),
            f"token_shares needs a positive share for every ability {names} (missing {missing}), got {token_shares}")
    shares = np.array([float(token_shares[a]) for a in names])
    shares = shares / shares.sum()
    n_right = np.array([max(1, int(round(baselines[a] * items))) for a in names])
    n_abilities, cap = len(names), max(d.draws for d in designs)
    primary = np.zeros((n_clusters, n_abilities), dtype=bool)
    primary[np.arange(n_clusters), np.arange(n_clusters) % n_abilities] = True
    planted = primary & (np.arange(n_clusters) < 2)[:, None]
    rng = np.random.default_rng([int(seed), 27])
    tally: dict[str, dict[str, list]] = {d.name: {"null": [], "family": [], "cost0": [], "ability_cost0": []}
                                         for d in designs}
    for effect in (0.0, *effects):
        for _ in range(int(n_sims)):
            loss = np.maximum(0.0, control_effect + draw_sd * rng.standard_normal((n_clusters, cap + 1)))
            draws = rng.binomial(n_right[None, :, None], np.minimum(1.0, loss[:, None, 1:])) / n_right[None, :, None]
            drop = np.minimum(1.0, loss[:, [0]] + effect * planted)
            target = rng.binomial(n_right[None, :], drop) / n_right[None, :]
            for design in designs:
                rejected, spent, per_ability = _design_rejections(target, draws, design, primary, alpha, shares)
                entry = tally[design.name]
                if effect == 0.0:
                    entry["null"].extend(rejected.ravel().tolist())
                    entry["family"].append(bool(rejected.any()))
                    entry["cost0"].extend(spent.tolist())
                    entry["ability_cost0"].extend(per_ability.tolist())
                else:
                    entry.setdefault(f"power{effect:g}", []).extend(rejected[planted].tolist())
                    entry.setdefault(f"cost{effect:g}", []).extend(spent.tolist())
                    entry.setdefault(f"ability_cost{effect:g}", []).extend(per_ability.tolist())
    tests = []
    for design in designs:
        entry = tally[design.name]
        tests.append({
            "name": f"design:{design.name}", "alpha": float(alpha), "fpr": float(np.mean(entry["null"])),
            "fpr_familywise": float(np.mean(entry["family"])),
            "power": {f"{e:g}": float(np.mean(entry[f"power{e:g}"])) for e in effects},
            "mean_draws_per_cluster": {"0": float(np.mean(entry["cost0"])),
                                       **{f"{e:g}": float(np.mean(entry[f"cost{e:g}"])) for e in effects}},
            "mean_cost_per_cluster_per_ability": {
                "0": float(np.mean(entry["ability_cost0"])),
                **{f"{e:g}": float(np.mean(entry[f"ability_cost{e:g}"])) for e in effects}},
            "n_sims": int(n_sims), "n_tests": len(entry["null"]), "reported": design.name in REPORTED_DESIGNS,
            "design": True, "null": "random_sets (Φ level, demo design)", "draws": design.draws, "h": design.h,
            "primary": design.primary, "round_size": design.round_size, "chosen": design.name == CHOSEN_DESIGN,
            "demo": design.name == DEMO_CONTROL_DESIGN,
        })
    return {"tests": tests, "control_effect": float(control_effect), "draw_sd": float(draw_sd),
            "n_clusters": int(n_clusters), "baselines": baselines, "items": int(items),
            "planted": "each cluster's pre-registered ability (the (k mod |A|)-th), clusters 0 and 1",
            "token_shares": dict(zip(names, shares.tolist()))}


def calibration_frame(result: dict[str, Any]) -> pd.DataFrame:
    """The ``tests`` of :func:`calibrate` as a table, with ``holds`` (fpr ≤ α + 0.03)."""
    frame = pd.DataFrame(result["tests"])
    frame["holds"] = frame["fpr"] <= frame["alpha"] + 0.03
    if "fpr_familywise" in frame.columns:  # a design holds when its family-wise error does too
        frame["holds"] &= frame["fpr_familywise"].fillna(0) <= frame["alpha"] + 0.03
    return frame


__all__ = ["calibrate", "calibration_frame", "design_study", "ControlDesign", "DESIGNS", "DEMO_DESIGN", "DEMO_SPREAD",
           "CHOSEN_DESIGN", "DEMO_TOKEN_SHARES", "EFFECTS", "REPORTED", "LEGACY", "DEFAULT_GRID"]
