"""The influence table (``influence.parquet``): every statistic of a cell (k, a) and what it may be reported as.

* :func:`influence_table`: one row per cluster (or cluster × setting) × ability: Φ with its
  bootstrap interval, the random controls and the test against them, the paired Wilcoxon
  test, power, stage 04's specificity for exactly the settings the Φ averages, and the
  :func:`cell_verdict`;
* :func:`setting_units`: which settings a row's Φ averages (one row per cluster, unless stage
  04 judged its settings differently);
* :func:`influence_summary`: the same in a few sentences, for the notebook and the report.

The tests themselves are :mod:`rephelpers.influence.stats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import is_positive_integer, require
from ..sequential import distinct_draws
from .impact import BASELINE_CLUSTER, FLOOR_MARGIN, ais, influence_matrix, selectivity, validate_scores
from .stats import (
    CORRECTIONS,
    adjust_pvalues,
    bootstrap_ci,
    cell_wilcoxon,
    control_distribution_test,
    minimum_detectable_ais,
    minimum_detectable_difference,
    primary_cells,
)

VERDICTS = (
    "cluster-specific finding",
    "finding (specificity not checked)",
    "non-specific damage",
    "within random controls",
    "no effect",
    "baseline below floor",
)




# -- verdicts --------------------------------------------------------------------------------
def cell_verdict(readable: bool, significant: bool, exceeds_controls: bool, specific: bool | None) -> str:
    """What one cell (k, a) may be reported as, one of :data:`VERDICTS`.

    In order: a baseline below the floor is not read; a Φ the paired test cannot tell from
    0 is "no effect"; a perturbation that stage 04 found not specific to its cluster
    (it hurts the other clusters' text as much) is "non-specific damage", whatever the
    abilities did, because it says nothing about cluster k's data; a Φ inside the
    distribution of random edits of its size is "within random controls"; what is left
    is a finding, "cluster-specific" when stage 04 checked it.
    """
    if not readable:
        return "baseline below floor"
    if not significant:
        return "no effect"
    if specific is False:
        return "non-specific damage"
    if not exceeds_controls:
        return "within random controls"
    return "cluster-specific finding" if specific else "finding (specificity not checked)"


def cell_specificity(specificity: pd.DataFrame | None) -> pd.DataFrame | None:
    """Stage 04's verdict per (cluster, kind, magnitude, layer) reduced to one per cluster:
    ``specific`` is True only if every setting of the cluster was specific."""
    if specificity is None or len(specificity) == 0:
        return None
    require("specific" in specificity.columns,
            "the specificity table has no `specific` column: re-run notebook 04 (specificity.specificity_verdicts).")
    rows = specificity[specificity["arm"] == "perturbation"] if "arm" in specificity.columns else specificity
    out = rows.groupby("cluster").agg(specific=("specific", "all"),
                                      specificity_verdict=("specificity_verdict", lambda v: "; ".join(sorted(set(v)))))
    if {"arm", "edit_ratio"} <= set(specificity.columns):
        # How much the controls change the state relative to the perturbation (stage 04's edit
        # ‖ĥ − h‖): a control that changes it much less controls for size poorly.
        controls = specificity[specificity["arm"] == "control"]
        out = out.join(controls.groupby("cluster")["edit_ratio"].median().rename("control_edit_ratio"))
        if "edit_matched" in controls.columns:
            out = out.join(controls.groupby("cluster")["edit_matched"].mean().rename("controls_matched_share"))
    return out.reset_index()


SETTING_KEYS = ("kind", "magnitude", "layer")
"""What names a perturbation setting in both stage 04's table and stage 05's scores (with the cluster)."""


def setting_label(kind: str, magnitude: float, layer: int, component: str | None = None) -> str:
    """``kind:m<magnitude>@L<layer>`` (``/component`` when stage 04 names one): a setting in a verdict."""
    text = f"{kind}:m{float(magnitude):g}@L{int(layer)}"
    return f"{text}/{component}" if isinstance(component, str) and component else text


def setting_specificity(specificity: pd.DataFrame | None) -> pd.DataFrame | None:
    """Stage 04's verdict per perturbation setting: one row per (cluster, kind, magnitude, layer).

    ``specific`` is True only if every row of the setting (e.g. several components) was
    specific; ``specificity_verdict`` joins their verdicts; ``setting`` is its
    :func:`setting_label`. With the controls' rows, ``control_edit_ratio`` is their median
    edit ‖ĥ − h‖ relative to the perturbation's and ``controls_matched_share`` the share
    within stage 04's tolerance. None without stage 04; a table without the setting columns
    (hand-made, or older) gives None too, and :func:`cell_specificity` gates per cluster.
    """
    if specificity is None or len(specificity) == 0 or not set(SETTING_KEYS) <= set(specificity.columns):
        return None
    require("specific" in specificity.columns,
            "the specificity table has no `specific` column: re-run notebook 04 (specificity.specificity_verdicts).")
    keys = ["cluster", *SETTING_KEYS]
    frame = specificity.assign(magnitude=specificity["magnitude"].astype(float).round(9),
                               layer=specificity["layer"].astype(int), cluster=specificity["cluster"].astype(int))
    rows = frame[frame["arm"] == "perturbation"] if "arm" in frame.columns else frame
    # The component is named only where stage 04 checked several: scores do not record it.
    several = "component" in rows.columns and rows["component"].nunique() > 1
    component = rows["component"] if several else pd.Series(None, index=rows.index)
    rows = rows.assign(setting=[setting_label(k, m, l, c) for k, m, l, c in
                                zip(rows["kind"], rows["magnitude"], rows["layer"], component)])
    out = rows.groupby(keys).agg(specific=("specific", lambda v: bool(v.astype(bool).all())),
                                 specificity_verdict=("specificity_verdict", lambda v: "; ".join(sorted(set(v)))),
                                 setting=("setting", lambda v: "; ".join(sorted(set(v)))))
    if {"arm", "edit_ratio"} <= set(frame.columns):
        controls = frame[frame["arm"] == "control"]
        out = out.join(controls.groupby(keys)["edit_ratio"].median().rename("control_edit_ratio"))
        if "edit_matched" in controls.columns:
            out = out.join(controls.groupby(keys)["edit_matched"].mean().rename("controls_matched_share"))
    return out.reset_index()


@dataclass(frozen=True)
class SettingUnits:
    """How stage 06 groups a cluster's settings into rows of the influence table.

    A cluster whose perturbation settings stage 04 judged alike (or did not judge) is one
    unit: its Φ averages AIS over all of Θ_k. A cluster whose settings got different
    verdicts is split, one unit per setting, so that each row's Φ comes only from
    settings with the one verdict that gates it. ``unit`` maps (cluster, kind, magnitude,
    layer) to the unit id the computation carries in the ``cluster`` column (a split
    cluster's settings get ids above every cluster id); ``rows`` describes each unit:
    ``unit``, ``cluster``, ``phi_settings`` (the settings its Φ comes from), ``specific``,
    ``specificity_verdict`` (naming the settings) and the control-edit columns.
    """

    unit: dict[tuple[int, str, float, int], int]
    rows: pd.DataFrame


def setting_units(scores: pd.DataFrame, specificity: pd.DataFrame | None) -> SettingUnits:
    """The units of :class:`SettingUnits` for the perturbation settings in ``scores`` (validated)."""
    pert = scores[(scores["cluster"] != BASELINE_CLUSTER)].drop_duplicates(["cluster", *SETTING_KEYS])
    settings = pd.DataFrame({"cluster": pert["cluster"].astype(int), "kind": pert["kind"].astype(str),
                             "magnitude": pert["magnitude"].astype(float).round(9), "layer": pert["layer"].astype(int)})
    settings["label"] = [setting_label(k, m, l) for k, m, l in zip(settings.kind, settings.magnitude, settings.layer)]
    gate = setting_specificity(specificity)
    if gate is not None:
        settings = settings.merge(gate, on=["cluster", *SETTING_KEYS], how="left")
        unchecked = settings["specificity_verdict"].isna()
        settings.loc[unchecked, "specificity_verdict"] = "not checked"
        settings.loc[unchecked, "setting"] = settings.loc[unchecked, "label"]
        settings["specific"] = [None if u else bool(v) for u, v in zip(unchecked, settings["specific"])]
    else:
        per_cluster = cell_specificity(specificity)
        if per_cluster is not None:
            settings = settings.merge(per_cluster, on="cluster", how="left")
            settings["specificity_verdict"] = settings["specificity_verdict"].fillna("")
            settings["specific"] = [None if isinstance(v, float) and np.isnan(v) else bool(v) for v in settings["specific"]]
        else:
            settings["specific"], settings["specificity_verdict"] = None, ""
        settings["setting"] = settings["label"]
    for column in ("control_edit_ratio", "controls_matched_share"):
        if column not in settings.columns:
            settings[column] = np.nan
    settings = settings.sort_values(["cluster", "kind", "layer", "magnitude"]).reset_index(drop=True)
    next_id = int(settings["cluster"].max()) + 1 if len(settings) else 0
    unit: dict[tuple[int, str, float, int], int] = {}
    rows = []
    for cluster, group in settings.groupby("cluster", sort=True):
        split = group["specificity_verdict"].nunique() > 1
        parts = [group.iloc[[i]] for i in range(len(group))] if split else [group]
        for part in parts:
            uid = next_id if split else int(cluster)
            next_id += int(split)
            unit.update({(int(cluster), r.kind, float(r.magnitude), int(r.layer)): uid for r in part.itertuples(index=False)})
            specific = list(part["specific"])
            verdicts = sorted(set(part["specificity_verdict"]))
            named = "; ".join(part["setting"])
            rows.append({
                "unit": uid, "cluster": int(cluster), "phi_settings": "; ".join(part["label"]),
                "specific": None if any(v is None for v in specific) else all(specific),
                "specificity_verdict": f"{'; '.join(verdicts)} ({named})" if verdicts != [""] else "",
                "control_edit_ratio": float(part["control_edit_ratio"].median()),
                "controls_matched_share": float(part["controls_matched_share"].mean()),
            })
    return SettingUnits(unit=unit, rows=pd.DataFrame(rows))


# -- the influence table ---------------------------------------------------------------------
# Part of stage 06's cache key: a change here must not be served from an older influence.parquet.
INFLUENCE_VERSION = "setting-gate-3"


def distinct_control_draws(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``scores`` without control draws that repeat an earlier draw of the same cluster, and per
    cell (cluster, ability) ``n_draws_requested`` / ``n_draws_distinct``.

    A draw is the set of its configs' interventions over Θ. Magnitude-matched controls can
    have no freedom left: when R_k holds the layer's largest dimensions, the only dimensions
    outside R_k of matching size are the next largest, and every "random" draw picks the same
    set. Counting such repeats as separate draws would let one control masquerade as a
    distribution (20 copies of it allow a rank p of 1/21); they are counted once. Draws are
    compared only where the scores record real perturbation parameters. Counts are per ability:
    stage 05's per-ability rounds evaluate a cluster's late draws only on the abilities still in
    the tail, so the abilities of one cluster may hold different numbers of draws.
    """
    control = scores["control"].astype(bool)
    cells = ["cluster", "ability"]
    requested = scores[control].groupby(cells)["draw"].nunique().rename("n_draws_requested")
    keep = distinct_draws(scores[control])  # the same rule as stage 05's stop (rephelpers.sequential)
    if keep is None:
        counts = requested.to_frame().assign(n_draws_distinct=requested)
        return scores, counts.reset_index()
    drop = control & ~pd.Series(list(zip(scores.cluster.astype(int), scores.draw.astype(int))), index=scores.index).isin(keep)
    distinct = scores[control & ~drop].groupby(cells)["draw"].nunique().rename("n_draws_distinct")
    counts = requested.to_frame().join(distinct)
    return scores[~drop].reset_index(drop=True), counts.reset_index()


def influence_table(
    scores: pd.DataFrame,
    n_boot: int = 1000,
    alpha: float = 0.05,
    correction: str = "holm",
    seed: int = 0,
    *,
    control_correction: str = "bh",
    specificity: pd.DataFrame | None = None,
    floor_margin: float = FLOOR_MARGIN,
    power: float = 0.8,
    primary: str | Sequence | Mapping | None = None,
    stop_after_exceedances: int | None = None,
    draw_cap: int | None = None,
) -> pd.DataFrame:
    """The artifact ``influence.parquet``: one row per cluster × ability.

    Columns: ``phi`` (Φ_{k,a}, positive = worse) with its bootstrap CI ``phi_low``/
    ``phi_high``; ``delta`` (the same loss in score units); the random controls' mean
    ``phi_control`` (CI over items), ``phi_minus_control`` with a CI over items *and*
    control draws; the control distribution (:func:`control_distribution_test`:
    ``n_draws``, ``control_sd``, ``control_q95``, ``z_vs_controls``, ``p_vs_controls``,
    adjusted across cells with ``control_correction`` into ``p_vs_controls_adjusted``,
    and ``exceeds_controls`` = adjusted p < α and Φ > Φ_control); ``p_value`` (paired
    Wilcoxon, Φ ≠ 0) adjusted with ``correction`` into ``p_adjusted`` and ``significant``;
    ``p_control``/``control_significant`` (Φ_control ≠ 0); ``baseline_score`` (M(f, a)),
    ``floor``, ``readable``, ``higher_is_better``, ``mde_ais`` (:func:`minimum_detectable_ais`
    at ``power`` for this ability's items and baseline, Holm over the table's cells);
    ``phi_settings`` (the perturbation settings, kind:m<magnitude>@L<layer>, whose AIS the row's Φ
    averages: all of Θ_k, unless stage 04 judged the cluster's settings differently, in which
    case the cluster has one row per setting, :func:`setting_units`);
    ``specific`` and ``specificity_verdict`` from stage 04 for exactly those settings, the
    verdict naming them (None/"" without stage 04), with the
    controls' median edit relative to the perturbation's (``control_edit_ratio``) and the share
    within stage 04's tolerance (``controls_matched_share``; NaN without stage 04), and the
    ``verdict`` (:func:`cell_verdict`); the cluster's ``selectivity``/``top_ability``.

    Cells whose baseline is below the floor keep ``delta`` but have NaN Φ and are left out
    of every correction. With ``n`` control draws the smallest ``p_vs_controls`` is
    ``1/(n + 1)``; ``min_p_vs_controls`` records it, so a reader sees when too few draws
    make a finding impossible after the correction. Draws that repeat an earlier draw's
    interventions count once (:func:`distinct_control_draws`): ``n_draws`` is the number of
    distinct draws, ``n_draws_requested`` the number drawn, both per cell (stage 05's per-ability
    rounds give the abilities of one cluster different numbers of draws; a cell's p and
    ``phi_control`` are read over the draws it has).

    ``primary`` (:func:`primary_cells`: ``"diagonal"``, ``{cluster: ability}`` or a list of
    cells) states the hypotheses of interest before the data: their rank p-values are
    adjusted among themselves, the rest among the rest (``family``: primary/exploratory;
    "all" without it). ``mde_vs_controls`` is the smallest Φ − Φ_control the rank test
    detects at ``power`` with the cell's draws, between-draw spread and family size
    (:func:`minimum_detectable_difference`; NaN when too few draws let no p pass).
    ``stop_after_exceedances = h`` reads ``p_vs_controls`` as Besag–Clifford's sequential p
    (:func:`sequential_p`, the draws present as the cap; ``n_draws_used`` the draws it read),
    the p for controls drawn in rounds that stop a cell at its h-th exceedance; None (the
    default) keeps the rank p over all draws (``n_draws_used = n_draws``). ``draw_cap``: the most
    draws stage 05's rounds give a cell that stays in the tail (its ``control_cap``); a cell that
    stopped early could have drawn that many had its Φ been larger, so ``min_p_vs_controls`` is
    ``1/(cap + 1)`` and ``mde_vs_controls`` is computed at the cap (what the design can detect),
    not at the draws an unremarkable Φ needed. None: the draws present.
    """
    require(correction in CORRECTIONS, f"correction must be one of {CORRECTIONS}, got {correction!r}")
    require(control_correction in CORRECTIONS, f"control_correction must be one of {CORRECTIONS}, got {control_correction!r}")
    require(0 < alpha < 1, f"alpha must lie in (0, 1), got {alpha!r}")
    require(int(n_boot) >= 1, f"n_boot must be a positive integer, got {n_boot!r}")
    require(stop_after_exceedances is None or int(stop_after_exceedances) >= 1,
            f"stop_after_exceedances must be None or a positive integer, got {stop_after_exceedances!r}")
    require(draw_cap is None or is_positive_integer(draw_cap),
            f"draw_cap must be None or a positive integer (stage 05's control_cap), got {draw_cap!r}")
    df, draw_counts = distinct_control_draws(validate_scores(scores))
    # A bad primary family is refused before the bootstrap, not after it.
    chosen = primary_cells(primary, df.loc[df["cluster"] != BASELINE_CLUSTER, "cluster"].unique(), df["ability"].unique())
    units = setting_units(df, specificity)
    df = _by_unit(df, units)
    ais_df = ais(df, floor_margin)
    phi = influence_matrix(ais_df)
    base = ais_df.groupby("ability").agg(
        baseline_score=("baseline_score", "first"), n_items=("n_items", "first"), floor=("floor", "first"),
        readable=("readable", "first"), higher_is_better=("higher_is_better", "first"),
    )
    table = phi.merge(base.reset_index(), on="ability")
    boot = bootstrap_ci(df, n_boot, alpha, seed, floor_margin).phi.drop(columns="dropped")
    table = table.merge(boot, on=["cluster", "ability"], how="left")
    table = table.merge(control_distribution_test(ais_df, stop_after_exceedances), on=["cluster", "ability"], how="left")
    if "n_draws_used" not in table.columns:
        table["n_draws_used"] = table["n_draws"]

    table = _paired_tests(table, df, correction, alpha)
    table = _control_families(table, units, chosen, control_correction, alpha)

    table = table.rename(columns={"cluster": "unit"}).merge(units.rows, on="unit", how="left").drop(columns="unit")
    table = table.merge(draw_counts[["cluster", "ability", "n_draws_requested"]], on=["cluster", "ability"], how="left")
    table["min_p_vs_controls"] = 1.0 / (_draws_possible(table, draw_cap) + 1)
    table = _power(table, alpha, power, draw_cap)
    table["verdict"] = [
        cell_verdict(bool(r.readable), bool(r.significant), bool(r.exceeds_controls),
                     None if r.specific is None or (isinstance(r.specific, float) and np.isnan(r.specific)) else bool(r.specific))
        for r in table.itertuples(index=False)
    ]
    table = table.merge(selectivity(phi).rename(columns={"cluster": "unit"}).assign(
        cluster=lambda f: f["unit"].map(units.rows.set_index("unit")["cluster"]),
        phi_settings=lambda f: f["unit"].map(units.rows.set_index("unit")["phi_settings"])).drop(columns="unit"),
        on=["cluster", "phi_settings"], how="left").drop(columns="n_abilities")
    table["alpha"], table["correction"], table["control_correction"], table["n_boot"] = (
        float(alpha), correction, control_correction, int(n_boot))
    columns = [
        "cluster", "phi_settings", "ability", "baseline_score", "floor", "readable", "higher_is_better", "n_items", "mde_ais",
        "n_configs", "n_control_configs", "phi", "phi_low", "phi_high", "delta", "delta_control",
        "phi_control", "phi_control_low", "phi_control_high",
        "phi_minus_control", "phi_minus_control_low", "phi_minus_control_high",
        "n_draws", "n_draws_requested", "n_draws_used", "control_sd", "control_q95", "z_vs_controls", "p_vs_controls",
        "family", "p_vs_controls_adjusted", "min_p_vs_controls", "exceeds_controls", "mde_vs_controls",
        "p_value", "p_adjusted", "significant", "p_control", "p_control_adjusted", "control_significant",
        "specific", "specificity_verdict", "control_edit_ratio", "controls_matched_share", "verdict",
        "selectivity", "selectivity_entropy", "top_ability", "alpha", "correction", "control_correction", "n_boot",
    ]
    return table[columns].sort_values(["cluster", "phi_settings", "ability"]).reset_index(drop=True)


def _paired_tests(table: pd.DataFrame, df: pd.DataFrame, correction: str, alpha: float) -> pd.DataFrame:
    """The paired Wilcoxon tests of Φ ≠ 0 and Φ_control ≠ 0, adjusted with ``correction`` across the
    readable cells (an unreadable cell is not read, so not counted in the family)."""
    tests = cell_wilcoxon(df).pivot(index=["cluster", "ability"], columns="comparison", values="p_value")
    tests = tests.rename(columns={"perturbation": "p_value", "control": "p_control"})[["p_value", "p_control"]]
    table = table.merge(tests.reset_index(), on=["cluster", "ability"], how="left")
    unread = ~table["readable"].to_numpy(bool)
    for column in ("p_value", "p_control", "p_vs_controls"):
        table.loc[unread, column] = np.nan
    table["p_adjusted"] = adjust_pvalues(table["p_value"].to_numpy(), correction)
    table["p_control_adjusted"] = adjust_pvalues(table["p_control"].to_numpy(), correction)
    table["significant"] = table["p_adjusted"] < alpha
    table["control_significant"] = table["p_control_adjusted"] < alpha
    return table


def _draws_possible(table: pd.DataFrame, draw_cap: int | None) -> pd.Series:
    """The distinct draws a cell's p could have read: its own, or the sequential design's cap where
    larger, except where its draws repeat one another (controls with no freedom: more draws would
    repeat them again, and the rounds stop there, so its own distinct draws are its cap)."""
    n = table["n_draws"].fillna(0)
    if draw_cap is None:
        return n
    requested = table["n_draws_requested"].fillna(n) if "n_draws_requested" in table.columns else n
    return pd.Series(np.where(requested > n, n, np.maximum(n, int(draw_cap))), index=table.index)


def _control_families(table: pd.DataFrame, units: "SettingUnits", chosen: set, control_correction: str,
                      alpha: float) -> pd.DataFrame:
    """The rank p against the controls adjusted per family (primary / exploratory, or all), and
    ``exceeds_controls`` = adjusted p < α and Φ beyond the controls' mean."""
    in_primary = np.array([(int(c), a) in chosen for c, a in zip(
        table["cluster"].map(units.rows.set_index("unit")["cluster"]), table["ability"])], dtype=bool)
    table["family"] = np.where(in_primary, "primary", "exploratory") if chosen else "all"
    table["p_vs_controls_adjusted"] = np.nan
    for family in table["family"].unique():
        # A stated primary family is corrected on its own: its cells do not pay for the exploratory rest.
        rows = (table["family"] == family).to_numpy()
        table.loc[rows, "p_vs_controls_adjusted"] = adjust_pvalues(table.loc[rows, "p_vs_controls"].to_numpy(),
                                                                   control_correction)
    table["exceeds_controls"] = (table["p_vs_controls_adjusted"] < alpha) & (table["phi_minus_control"] > 0)
    return table


def _power(table: pd.DataFrame, alpha: float, power: float, draw_cap: int | None = None) -> pd.DataFrame:
    """``mde_ais`` (Φ ≠ 0, Holm over the readable cells) and ``mde_vs_controls`` (Φ − Φ_control, the
    cell's draws or the design's cap, spread and family size) at ``power``."""
    n_tests = max(1, int(table["readable"].sum()))
    mde = {row.ability: (minimum_detectable_ais(int(row.n_items), float(row.baseline_score), alpha, power, n_tests)
                         if row.readable else np.nan)
           for row in table.drop_duplicates("ability").itertuples(index=False)}
    table["mde_ais"] = table["ability"].map(mde)
    family_size = table.groupby("family")["p_vs_controls"].transform(lambda v: max(1, int(v.notna().sum())))
    table["mde_vs_controls"] = [
        minimum_detectable_difference(sd, int(n), alpha, power, int(m)) if np.isfinite(sd) and n > 0 else np.nan
        for sd, n, m in zip(table["control_sd"].astype(float), _draws_possible(table, draw_cap), family_size)
    ]
    return table


def _by_unit(scores: pd.DataFrame, units: SettingUnits) -> pd.DataFrame:
    """``scores`` with each config's cluster replaced by its unit (:class:`SettingUnits`), so that
    every per-cluster computation of Φ, its controls, tests and bootstrap runs per unit."""
    if all(uid == key[0] for key, uid in units.unit.items()):
        return scores
    out = scores.copy()
    keys = zip(out["cluster"].astype(int), out["kind"].astype(str), out["magnitude"].astype(float).round(9),
               out["layer"].astype(int))
    out["cluster"] = [c if c == BASELINE_CLUSTER else units.unit[(c, k, m, l)] for c, k, m, l in
                      ((int(a), b, float(c_), int(d)) for a, b, c_, d in keys)]
    return out


def influence_summary(table: pd.DataFrame, top: int = 3) -> str:
    """A few plain sentences on an influence table: what the cells may be reported as, and the strongest."""
    alpha, correction = table["alpha"].iloc[0], table["correction"].iloc[0]
    counts = table["verdict"].value_counts()
    lines = [
        f"{int(table['significant'].sum())} of {len(table)} cluster × ability cells have Φ ≠ 0 at adjusted "
        f"p < {alpha:g} ({correction}, paired Wilcoxon); {int(table['exceeds_controls'].sum())} lie beyond the "
        f"distribution of their random controls ({table['control_correction'].iloc[0]}-adjusted rank p; "
        f"{_draws_text(table)}, smallest possible p {table['min_p_vs_controls'].min():.3g}).",
        "Verdicts: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS if counts.get(v, 0)) + ".",
    ]
    per_cluster = table.drop_duplicates("cluster")
    if "controls_matched_share" in table.columns:
        for row in per_cluster[per_cluster["controls_matched_share"] < 1].itertuples(index=False):
            lines.append(
                f"cluster {row.cluster}: its controls change the state {row.control_edit_ratio:.2f}× as much as its "
                f"perturbation (stage 04; {row.controls_matched_share:.0%} within the edit tolerance), so \"beyond its "
                "controls\" compares it with smaller edits there."
            )
    # Per cell: under per-ability rounds a cluster's abilities hold different numbers of draws.
    repeated = table[table["n_draws"].notna() & (table["n_draws"] < table["n_draws_requested"])].drop_duplicates("cluster")
    for row in repeated.itertuples(index=False):
        lines.append(
            f"cluster {row.cluster}: {int(row.n_draws_requested)} control draws requested, {int(row.n_draws)} distinct "
            f"(the magnitude-matched controls had no freedom: R_k holds the layer's largest dimensions), so its "
            f"smallest possible rank p is {row.min_p_vs_controls:.3g}."
        )
    lines.extend(_gated_draw_lines(table))
    unread = table[~table["readable"]].drop_duplicates("ability")
    for row in unread.itertuples(index=False):
        lines.append(f"{row.ability}: baseline {row.baseline_score:.3f} is below the floor {row.floor:.3f}; "
                     "its relative loss is not read (Δ in score units is still reported).")
    mde = table[table["readable"]].drop_duplicates("ability")
    if len(mde):
        lines.append("Smallest AIS detectable with 80% power (pure loss, Holm over the cells): " + ", ".join(
            f"{r.ability} {r.mde_ais:.2f}" for r in mde.itertuples(index=False)) + ".")
    lines.extend(_control_power_lines(table))
    strongest = table[table["significant"]].sort_values("phi", ascending=False).head(top)
    split = set(table.loc[table.duplicated(["cluster", "ability"], keep=False), "cluster"]) if "phi_settings" in table else set()
    for row in strongest.itertuples(index=False):
        where = f" ({row.phi_settings})" if row.cluster in split else ""
        lines.append(
            f"cluster {row.cluster}{where} → {row.ability}: Φ = {row.phi:+.3f} [{row.phi_low:+.3f}, {row.phi_high:+.3f}], "
            f"random controls {row.phi_control:+.3f} ± {row.control_sd:.3f} (p = {row.p_vs_controls_adjusted:.3g}), "
            f"adjusted p = {row.p_adjusted:.3g}: {row.verdict}."
        )
    return "\n".join(lines)


def _gated_draw_lines(table: pd.DataFrame) -> list[str]:
    """Cells of settings stage 04 judged not specific that hold fewer control draws than the table's most:
    stage 05 stops drawing for them (``stop_non_specific``, issue 27f; or their h-th exceedance), which is
    no defect, since :func:`cell_verdict` calls them "non-specific damage" whatever their p."""
    if "specific" not in table.columns or table["n_draws_requested"].isna().all():
        return []
    most = int(table["n_draws_requested"].max())
    gated = table["specific"].map(lambda v: isinstance(v, (bool, np.bool_)) and not v)
    short = table[gated & (table["n_draws_requested"] < most)]
    if short.empty:
        return []
    return [f"{len(short)} cells of settings stage 04 judged not specific hold fewer control draws "
            f"({int(short['n_draws_requested'].min())}-{int(short['n_draws_requested'].max())}) than the most any "
            f"cell has ({most}): stage 05 stops drawing for them (stop_non_specific, or their h-th exceedance), as "
            "their verdict is non-specific damage whatever the controls show; their p is over the draws they have."]


def _draws_text(table: pd.DataFrame) -> str:
    """The draws the table's cells read, and the cap a sequential design could have drawn to where larger."""
    drawn = int(table["n_draws"].max()) if table["n_draws"].notna().any() else 0
    possible = int(round(1 / table["min_p_vs_controls"].min() - 1)) if table["min_p_vs_controls"].notna().any() else drawn
    return f"{drawn} draws" if possible <= drawn else f"up to {drawn} draws read, a cap of {possible} for cells in the tail"


def _control_power_lines(table: pd.DataFrame) -> list[str]:
    """What the control comparison can detect: ``mde_vs_controls``, or the draws a lone finding needs."""
    if "mde_vs_controls" not in table.columns:
        return []
    cells = table[table["readable"] & table["p_vs_controls"].notna()]
    if cells.empty:
        return []
    alpha = float(table["alpha"].iloc[0])
    lines = []
    for family, group in cells.groupby("family"):
        m = len(group)
        where = "" if family == "all" else f" ({family} family)"
        if group["mde_vs_controls"].notna().any():
            lines.append(f"Smallest Φ − Φ_control detectable with 80% power against the control draws{where}, "
                         f"a lone effect under {table['control_correction'].iloc[0]} over {m} cells: "
                         f"{group['mde_vs_controls'].min():.3g} to {group['mde_vs_controls'].max():.3g}.")
        else:
            needed = int(np.floor(m / alpha + 1e-9))  # (n + 1)·α/m > 1
            lines.append(f"No Φ − Φ_control can be detected on its own{where}: with {_draws_text(group)}, "
                         f"the smallest rank p is {group['min_p_vs_controls'].min():.3g}, and a lone cell among "
                         f"{m} needs p below {alpha / m:.3g}, i.e. at least {needed} draws"
                         + (" (or fewer cells: a `primary` family)." if family == "all" else "."))
    return lines
