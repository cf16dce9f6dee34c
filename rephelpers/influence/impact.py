"""Capability impact of cluster perturbations: AIS, the influence matrix Φ, ACE.

Input is the ``scores.parquet`` of stage 05: one row per perturbation config × task ×
item, with the per-item score of the model under that config. The unperturbed model is
the config with ``cluster == -1``; a config with ``control == True`` is the matched
random control of that cluster's perturbation (same kind, magnitude and layer, random
dimensions). Items are paired across configs by ``(task, item)``.

Notation, following the research proposals:

* ``M(f, a)``: performance of model ``f`` on ability ``a``, the mean item score over all
  items of the ability's tasks.
* ``f̂_{k,θ}``: the model with the representations of cluster ``k`` perturbed under
  configuration ``θ = (kind, magnitude, layer, …)``; Θ_k is the set of configs of ``k``.
* ``AIS(k, a, θ) = s_a · (M(f, a) − M(f̂_{k,θ}, a)) / M(f, a)``: the relative loss, with
  ``s_a = +1`` for a higher-is-better metric and ``−1`` for a lower-is-better one (read
  from the task's ``higher_is_better``), so a positive AIS always means the ability got
  worse. It is only read where ``M(f, a)`` clears a floor above chance
  (:func:`baseline_floor`): a relative loss of a near-chance score is noise.
* ``Φ_{k,a} = (1/|Θ_k|) Σ_θ AIS(k, a, θ)``: the Data Influence Matrix.
* ``ACE(k, T, θ) = E_{x∼T}[f_T(h) − f_T(h_pert)]``: the average causal effect on task
  ``T``, in score units (and in log-likelihood margin units).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..dimensions.components import ClusterComponents, as_components
from ..errors import RephelpersError, require
from ..phi import config_mean, relative_loss  # noqa: F401  (impact.relative_loss / impact.config_mean: Φ's formulas)
from ..setting import BASELINE_CLUSTER, Setting

SCORE_COLUMNS = (
    "config_id", "cluster", "control", "kind", "magnitude", "layer",
    "task", "ability", "item", "score",
)
CONFIG_COLUMNS = ("cluster", "control", "kind", "magnitude", "layer", "draw")
FLOOR_MARGIN = 0.1
"""Default readable-baseline margin: ``M(f, a)`` must exceed chance by this much."""
# 05 may add the item text; when it does, the item explorer shows it.
ITEM_TEXT_COLUMNS = ("prompt", "target")
STAGE_05 = "notebook 05_capability_impact"


# -- validation ----------------------------------------------------------------------------
def validate_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Check ``scores`` against the stage-05 schema and return it with clean dtypes.

    Raises a :class:`~rephelpers.errors.RephelpersError` that names the fix when a column
    is missing, the baseline is absent or ambiguous, a (config, task, item) row repeats,
    a config's descriptors vary between its rows, a task belongs to two abilities, a
    score is not finite, or a config does not cover exactly the baseline's items of an
    ability it was evaluated on (items must pair for AIS, Wilcoxon and the bootstrap).
    """
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    require(not missing, f"scores is missing columns {missing}; it must be the scores.parquet of {STAGE_05}.")
    require(len(scores) > 0, f"scores is empty: {STAGE_05} evaluated nothing; re-run it.")
    df = scores.copy()
    df["config_id"] = df["config_id"].astype(str)
    if "draw" not in df.columns:  # scores written before draws were recorded: number them by id
        df["draw"] = _draws_from_ids(df)
    df["draw"] = df["draw"].fillna(0).astype(int)
    if "higher_is_better" not in df.columns:
        df["higher_is_better"] = True
    df["higher_is_better"] = df["higher_is_better"].fillna(True).astype(bool)
    if "chance" not in df.columns:
        df["chance"] = 0.0
    df["chance"] = df["chance"].fillna(0.0).astype(float)
    df["cluster"] = df["cluster"].astype(int)
    df["control"] = df["control"].astype(bool)
    df["score"] = df["score"].astype(float)
    if "margin" not in df.columns:
        df["margin"] = np.nan
    df["margin"] = df["margin"].astype(float)

    baseline_ids = df.loc[df.cluster == BASELINE_CLUSTER, "config_id"].unique()
    require(
        len(baseline_ids) == 1,
        f"scores needs exactly one unperturbed config (cluster == {BASELINE_CLUSTER}), found "
        f"{len(baseline_ids)} {list(baseline_ids)[:5]}; keep one baseline or re-run {STAGE_05}.",
    )
    require(
        not df.loc[df.cluster == BASELINE_CLUSTER, "control"].any(),
        "the baseline config (cluster -1) is marked control=True; a control belongs to a cluster.",
    )
    bad_clusters = sorted(set(df.loc[df.cluster < BASELINE_CLUSTER, "cluster"]))
    require(not bad_clusters, f"cluster ids must be >= 0 (or -1 for the baseline), got {bad_clusters}.")

    dup = df.duplicated(["config_id", "task", "item"])
    if dup.any():
        raise RephelpersError(
            f"{int(dup.sum())} rows repeat a (config_id, task, item), e.g. "
            f"{df.loc[dup, ['config_id', 'task', 'item']].iloc[0].tolist()}; scores must hold one row per "
            "config × task × item (drop duplicates or re-run 05)."
        )
    per_config = df.groupby("config_id")[list(CONFIG_COLUMNS)].nunique(dropna=False)
    varying = per_config.columns[(per_config > 1).any()].tolist()
    require(not varying, f"config descriptors {varying} vary within one config_id; each config_id must be one θ.")
    abilities_per_task = df.groupby("task")["ability"].nunique()
    split = abilities_per_task[abilities_per_task > 1].index.tolist()
    require(not split, f"tasks {split} belong to several abilities; map each task to one ability family.")
    directions = df.groupby("ability")["higher_is_better"].nunique()
    mixed = directions[directions > 1].index.tolist()
    require(
        not mixed,
        f"abilities {mixed} mix higher-is-better and lower-is-better metrics; an ability's relative loss "
        "needs one direction: split it into two abilities.",
    )
    bad = ~np.isfinite(df["score"].to_numpy())
    if bad.any():
        raise RephelpersError(
            f"{int(bad.sum())} item scores are NaN/inf (e.g. config {df.loc[bad, 'config_id'].iloc[0]!r}); "
            "scores must be finite per item: fix the metric or drop the task."
        )

    # Items pair with the baseline iff a config has no item outside the baseline's and as
    # many items per ability (rows are unique, checked above).
    baseline_id = baseline_ids[0]
    keys = ["ability", "task", "item"]
    base_keys = df.loc[df.config_id == baseline_id, keys]
    outside = df[keys].merge(base_keys.assign(in_baseline=True), on=keys, how="left")["in_baseline"].isna().to_numpy()
    if outside.any():
        row = df.loc[outside].iloc[0]
        raise RephelpersError(
            f"config {row['config_id']!r} has {int(outside.sum())} (task, item) rows the baseline lacks, e.g. "
            f"{row['task']!r} item {row['item']!r} of ability {row['ability']!r}; items must pair with the baseline: "
            f"re-run {STAGE_05} with the baseline on every task, or drop them."
        )
    counts = df.groupby(["config_id", "ability"]).size().rename("n").reset_index()
    counts = counts.merge(base_keys.groupby("ability").size().rename("n_base").reset_index(), on="ability")
    short = counts[counts["n"] < counts["n_base"]]
    if len(short):
        row = short.iloc[0]
        raise RephelpersError(
            f"config {row['config_id']!r} covers {row['n']}/{row['n_base']} baseline items of ability {row['ability']!r}; "
            f"items must pair with the baseline: re-run {STAGE_05} for the missing items or drop the config."
        )
    return df


def _draws_from_ids(df: pd.DataFrame) -> pd.Series:
    """Control draw index from setting ids (``…:control`` is 0, ``…:control3`` is 3); hand-made ids count as draw 0."""
    found = df["config_id"].astype(str).str.extract(r"control(\d*)$")[0]
    return pd.to_numeric(found.fillna("0").replace("", "0")).astype(int)


def baseline_floor(chance: float, higher_is_better: bool = True, margin: float = FLOOR_MARGIN) -> float:
    """The least ``M(f, a)`` whose relative loss is read: ``chance + margin`` for a
    higher-is-better metric, ``margin`` for a lower-is-better one (the denominator of AIS
    must stay clear of 0)."""
    return float(chance) + float(margin) if higher_is_better else float(margin)


def configs(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per config: ``config_id`` with its cluster, control flag, kind, magnitude, layer."""
    return (
        scores.drop_duplicates("config_id")[["config_id", *CONFIG_COLUMNS]]
        .sort_values(["cluster", "control", "kind", "layer", "magnitude", "config_id"])
        .reset_index(drop=True)
    )


def baseline_config(scores: pd.DataFrame) -> str:
    """``config_id`` of the unperturbed model."""
    ids = scores.loc[scores.cluster == BASELINE_CLUSTER, "config_id"].unique()
    require(len(ids) == 1, f"expected one baseline config (cluster -1), found {len(ids)}.")
    return str(ids[0])


def paired_items(scores: pd.DataFrame, columns: Sequence[str] = ("score",)) -> pd.DataFrame:
    """Each perturbed config's items joined to the baseline's.

    One row per (config, task, item) of a perturbed config, with ``<column>_base`` (the
    unperturbed model's value on the same item) and ``<column>_pert`` for each of ``columns``.
    """
    base_id = baseline_config(scores)
    base = scores.loc[scores.config_id == base_id, ["task", "item", *columns]]
    pert = scores[scores.config_id != base_id]
    keep = ["config_id", *CONFIG_COLUMNS, "ability", "task", "item", *columns]
    return pert[keep].merge(base, on=["task", "item"], suffixes=("_pert", "_base"), validate="many_to_one")


def item_matrix(scores: pd.DataFrame, ability: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The item scores of one ability as a matrix, for paired tests and the bootstrap.

    Returns ``(config_table, Y, task_of_item)``: ``Y[c, i]`` is config ``c``'s score on item
    ``i`` (columns are the baseline's (task, item) pairs, the same for every config, as
    :func:`validate_scores` guarantees), ``config_table`` describes the rows of ``Y`` and
    ``task_of_item`` the task of each column.
    """
    sub = scores[scores["ability"] == ability]
    require(len(sub) > 0, f"ability {ability!r} not in scores (have {sorted(scores.ability.unique())}).")
    wide = sub.pivot(index="config_id", columns=["task", "item"], values="score")
    table = configs(sub).set_index("config_id").loc[wide.index].reset_index()
    return table, wide.to_numpy(dtype=float), wide.columns.get_level_values("task").to_numpy()


# -- M(f, a), AIS, Φ -----------------------------------------------------------------------
def ability_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """``M(f, a)`` per config × ability: the mean item score over the ability's items.

    ``M(f, a) = (1/|I_a|) Σ_{(T, x) ∈ I_a} score_T(x)``, every item weighted equally (a task
    with more items weighs more, as lm-eval's size-weighted group aggregate does).
    """
    df = validate_scores(scores)
    grouped = df.groupby(["config_id", "ability"], sort=False)
    out = grouped["score"].agg(score="mean", n_items="size").reset_index()
    out = configs(df).merge(out, on="config_id")
    return out.sort_values(["cluster", "control", "ability", "kind", "layer", "magnitude"]).reset_index(drop=True)


def ais(scores: pd.DataFrame, floor_margin: float = FLOOR_MARGIN) -> pd.DataFrame:
    """Ablation Impact Score of every perturbed config on every ability.

    ``AIS(k, a, θ) = s_a · (M(f, a) − M(f̂_{k,θ}, a)) / M(f, a)`` with ``s_a = +1`` for a
    higher-is-better metric and ``−1`` for a lower-is-better one, computed for the
    cluster's perturbations and for their matched random controls alike (``control``
    tells them apart). Positive = the ability got worse. ``delta = s_a · (M(f, a) −
    M(f̂, a))`` is the same loss in score units, reported beside AIS.

    AIS is NaN, and ``note`` says why, where the baseline is below
    :func:`baseline_floor` (``chance + floor_margin``): with 6 of 40 items right, one item
    more or less moves AIS by 0.17, so the relative loss says nothing. ``readable`` flags
    the abilities that pass.
    """
    require(0 <= floor_margin < 1, f"floor_margin must lie in [0, 1), got {floor_margin!r}")
    df = validate_scores(scores)
    ab = ability_scores(df)
    info = df.groupby("ability").agg(higher_is_better=("higher_is_better", "first"), chance=("chance", "max"))
    base_id = baseline_config(ab)
    base = ab.loc[ab.config_id == base_id, ["ability", "score"]].rename(columns={"score": "baseline_score"})
    pert = ab[ab.config_id != base_id].rename(columns={"score": "perturbed_score"})
    out = pert.merge(base, on="ability").merge(info.reset_index(), on="ability")
    sign = np.where(out["higher_is_better"].to_numpy(), 1.0, -1.0)
    m_base = out["baseline_score"].to_numpy()
    out["floor"] = [baseline_floor(c, h, floor_margin) for c, h in zip(out["chance"], out["higher_is_better"])]
    out["readable"] = (m_base >= out["floor"].to_numpy()) & (m_base > 0)
    out["delta"] = sign * (m_base - out["perturbed_score"].to_numpy())
    out["ais"] = np.where(out["readable"], relative_loss(m_base, out["perturbed_score"].to_numpy(), sign), np.nan)
    out["note"] = np.where(
        out["readable"], "",
        [f"baseline M(f,a)={b:.3g} below the floor {f:.3g} (chance {c:.3g} + {floor_margin:g}): AIS not read"
         for b, f, c in zip(m_base, out["floor"], out["chance"])],
    )
    columns = ["config_id", *CONFIG_COLUMNS, "ability", "n_items", "higher_is_better", "chance", "floor", "readable",
               "baseline_score", "perturbed_score", "delta", "ais", "note"]
    return out[columns].reset_index(drop=True)


def _config_mean_of(values: pd.Series) -> float:
    return float(config_mean(values.to_numpy()[None, :])[0])


def influence_matrix(ais_df: pd.DataFrame) -> pd.DataFrame:
    """The Data Influence Matrix, long form: one row per cluster × ability.

    ``Φ_{k,a} = (1/|Θ_k|) Σ_{θ∈Θ_k} AIS(k, a, θ)`` over the cluster's perturbation configs
    (``phi``), the same mean over its random controls (``phi_control``), and
    ``phi_minus_control = Φ − Φ_control``: the effect beyond what perturbing as many
    random dimensions does. Configs with undefined AIS (baseline 0) are left out of the
    mean; a cell with none left is NaN (:func:`config_mean`). ``delta``/``delta_control``
    are the same means of the absolute loss in score units (:func:`ais`).
    """
    require("ais" in ais_df.columns, "influence_matrix expects the output of impact.ais(scores).")
    grouped = ais_df.groupby(["cluster", "ability", "control"])
    means = grouped["ais"].agg(_config_mean_of).unstack("control")
    counts = grouped.size().unstack("control")
    deltas = grouped["delta"].agg(_config_mean_of).unstack("control") if "delta" in ais_df.columns else None
    out = pd.DataFrame(index=means.index)
    out["phi"] = means.get(False, np.nan)
    out["phi_control"] = means.get(True, np.nan)
    out["phi_minus_control"] = out["phi"] - out["phi_control"]
    if deltas is not None:
        out["delta"] = deltas.get(False, np.nan)
        out["delta_control"] = deltas.get(True, np.nan)
    out["n_configs"] = counts.get(False, 0)
    out["n_control_configs"] = counts.get(True, 0)
    out = out.fillna({"n_configs": 0, "n_control_configs": 0}).astype({"n_configs": int, "n_control_configs": int})
    return out.reset_index()


def control_draws(ais_df: pd.DataFrame) -> pd.DataFrame:
    """Φ of every random-control draw: one row per cluster × ability × draw.

    ``Φ^{(j)}_{k,a} = (1/|Θ_k|) Σ_θ AIS(control draw j of k, a, θ)``: draw j is one random
    dimension set (or subspace) evaluated at every θ, so these are samples of what a
    random edit of the same size does to ability a, the distribution Φ_{k,a} is judged against.
    """
    controls = ais_df[ais_df["control"].astype(bool)]
    out = controls.groupby(["cluster", "ability", "draw"])["ais"].agg(_config_mean_of).rename("phi_draw").reset_index()
    return out.sort_values(["cluster", "ability", "draw"]).reset_index(drop=True)


def phi_wide(phi: pd.DataFrame, value: str = "phi") -> pd.DataFrame:
    """Φ as a clusters × abilities matrix (rows: cluster, columns: ability)."""
    return phi.pivot(index="cluster", columns="ability", values=value)


def selectivity(phi: pd.DataFrame, value: str = "phi") -> pd.DataFrame:
    """Cross-ability specificity of each cluster: is its effect concentrated on one ability?

    With ``Φ⁺_{k,a} = max(Φ_{k,a}, 0)`` (only losses count) and ``p_a = Φ⁺_{k,a} / Σ_b Φ⁺_{k,b}``:

    * ``selectivity = max_a p_a`` ∈ [1/|A|, 1]: 1 when a single ability carries all the loss,
      1/|A| when the loss is spread evenly;
    * ``selectivity_entropy = 1 − H(p) / log|A|`` ∈ [0, 1], the same idea through the
      normalised Shannon entropy (NaN with a single ability).

    Both are NaN when the cluster hurts no ability (Σ Φ⁺ = 0). ``top_ability`` is the
    argmax of Φ⁺.
    """
    require(value in phi.columns, f"selectivity: column {value!r} not in Φ (have {list(phi.columns)}).")
    rows = []
    for cluster, g in phi.groupby("cluster"):
        loss = np.clip(np.nan_to_num(g[value].to_numpy(dtype=float), nan=0.0), 0.0, None)
        total = loss.sum()
        n = len(loss)
        if total <= 0:
            rows.append((cluster, None, np.nan, np.nan, n))
            continue
        share = loss / total
        nz = share[share > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        normalised = 1.0 - entropy / np.log(n) if n > 1 else np.nan
        rows.append((cluster, g["ability"].iloc[int(share.argmax())], float(share.max()), normalised, n))
    return pd.DataFrame(rows, columns=["cluster", "top_ability", "selectivity", "selectivity_entropy", "n_abilities"])


# -- ACE -------------------------------------------------------------------------------------
def ace(scores: pd.DataFrame) -> pd.DataFrame:
    """Average causal effect of every perturbed config on every task.

    ``ACE(k, T, θ) = E_{x∼T}[f_T(h) − f_T(h_pert)] = (1/n_T) Σ_x (s_x − ŝ_x)`` on the paired
    per-item scores (``ace``, positive = worse), and the same on the per-item
    log-likelihood margins (``ace_margin``; mean over items whose margin is finite under
    both configs, NaN when there are none).
    """
    df = validate_scores(scores)
    pairs = paired_items(df, ("score", "margin"))
    pairs["effect"] = pairs["score_base"] - pairs["score_pert"]
    pairs["margin_effect"] = pairs["margin_base"] - pairs["margin_pert"]
    keys = ["config_id", *CONFIG_COLUMNS, "ability", "task"]
    out = (
        pairs.groupby(keys, sort=False)
        .agg(
            n_items=("effect", "size"),
            baseline_score=("score_base", "mean"),
            perturbed_score=("score_pert", "mean"),
            ace=("effect", "mean"),
            ace_margin=("margin_effect", "mean"),
            n_margin_items=("margin_effect", "count"),
        )
        .reset_index()
    )
    return out.sort_values(["cluster", "control", "task", "kind", "layer", "magnitude"]).reset_index(drop=True)


def ace_covariates(
    ace_df: pd.DataFrame,
    cluster_size: Mapping[int, float] | pd.Series | None = None,
    probe_accuracy: Mapping[Any, float] | pd.Series | None = None,
) -> pd.DataFrame:
    """The perturbation rows of ``ace_df`` with the covariates of the ACE regression.

    ``cluster_size`` maps cluster → number of documents (e.g.
    ``documents.cluster.value_counts()``); ``probe_accuracy`` maps cluster → accuracy,
    or ``(layer, cluster)`` → accuracy when it was measured per layer. ``layer`` and
    ``magnitude`` are already columns. Controls are left out: the regression asks what
    makes a *cluster's* perturbation matter.
    """
    rows = ace_df[~ace_df["control"].astype(bool)].copy()
    if cluster_size is not None:
        rows["cluster_size"] = rows["cluster"].map(dict(cluster_size)).astype(float)
    if probe_accuracy is not None:
        lookup = dict(probe_accuracy)
        per_layer = bool(lookup) and all(isinstance(k, tuple) for k in lookup)
        keys = zip(rows["layer"], rows["cluster"]) if per_layer else rows["cluster"]
        rows["probe_accuracy"] = [lookup.get(tuple(map(int, k)) if per_layer else int(k), np.nan) for k in keys]
    return rows.reset_index(drop=True)


def probe_accuracy(components: Sequence[ClusterComponents]) -> dict[tuple[int, int], float]:
    """Held-out probe accuracy per ``(layer, cluster)`` from stage 03's cluster components.

    The linear probe's accuracy where one was fit, else the selecting probe's
    (``selector_accuracy``); entries with neither are left out.
    """
    accuracy = {}
    for entry in map(as_components, components):
        value = entry.probe.accuracy if entry.probe is not None else None
        value = entry.selector_accuracy if value is None else value
        if value is not None:
            accuracy[(entry.layer, entry.cluster)] = float(value)
    return accuracy


# -- dose-response and items -----------------------------------------------------------------
def dose_response(scores: pd.DataFrame, magnitude_col: str = "magnitude") -> pd.DataFrame:
    """Ability score against perturbation magnitude, perturbation and matched control together.

    ``magnitude_col`` names the dose: ``magnitude`` by default, or any column of
    ``scores`` that is constant within a config (e.g. a noise ``sigma``). One row per cluster × ability × (kind, layer) × arm × magnitude, where ``arm`` is
    ``"perturbation"`` or ``"control"``; ``score`` is ``M(f̂_{k,θ}, a)`` (averaged over
    configs that share every descriptor, e.g. several control seeds), ``ais`` the matching
    AIS, and ``baseline_score`` is ``M(f, a)`` on every row, so one frame draws the curve,
    the control curve and the unperturbed reference line.
    """
    df = validate_scores(scores)
    require(magnitude_col in df.columns, f"dose_response: no column {magnitude_col!r} in the scores.")
    require(
        bool((df.groupby("config_id")[magnitude_col].nunique(dropna=False) == 1).all()),
        f"dose_response: {magnitude_col!r} varies within a config; the dose must be one value per config.",
    )
    table = ais(df)
    if magnitude_col not in table.columns:
        table = table.merge(df.drop_duplicates("config_id")[["config_id", magnitude_col]], on="config_id")
    table["arm"] = np.where(table["control"], "control", "perturbation")
    keys = ["cluster", "ability", "kind", "layer", "arm", magnitude_col]
    out = (
        table.groupby(keys, dropna=False)
        .agg(score=("perturbed_score", "mean"), ais=("ais", "mean"), baseline_score=("baseline_score", "first"),
             n_configs=("config_id", "nunique"))
        .reset_index()
    )
    return out.sort_values(keys).reset_index(drop=True)


def flipped_items(
    scores: pd.DataFrame,
    cluster: int,
    ability: str,
    theta: str | Mapping[str, Any] | None = None,
    control: bool = False,
    only_changed: bool = True,
) -> pd.DataFrame:
    """The items of ``ability`` whose score changed when cluster ``cluster`` was perturbed.

    ``theta`` picks the config(s): a ``config_id``, a mapping of descriptors (e.g.
    ``{"magnitude": 2.0}``) that must all match, or None for every config of the cluster.
    Rows carry the baseline and perturbed score and margin, ``change = perturbed − baseline``
    and ``direction`` ("lost" / "gained" / "same"); with ``only_changed`` only flipped items
    are kept. Item text columns (``prompt``, ``target``) come along when 05 wrote them.
    """
    df = validate_scores(scores)
    every = configs(df)
    chosen = every[(every.cluster == int(cluster)) & (every.control == bool(control))]
    if isinstance(theta, str):
        chosen = chosen[chosen.config_id == theta]
    elif theta is not None:
        unknown = set(theta) - set(CONFIG_COLUMNS)
        require(not unknown, f"theta keys {sorted(unknown)} unknown; use config_id or {list(CONFIG_COLUMNS)}.")
        for key, value in theta.items():
            chosen = chosen[chosen[key] == value]
    if chosen.empty:
        raise RephelpersError(
            f"no {'control' if control else 'perturbation'} config of cluster {cluster} matches theta={theta!r}; "
            f"available: {every.loc[every.cluster == int(cluster), 'config_id'].tolist()}"
        )
    require(ability in set(df["ability"]), f"ability {ability!r} not in scores (have {sorted(df.ability.unique())}).")
    sub = df[df.ability == ability]
    base = sub[sub.config_id == baseline_config(df)]
    text = [c for c in ITEM_TEXT_COLUMNS if c in sub.columns]
    pert = sub[sub.config_id.isin(chosen.config_id)]
    out = pert[["config_id", "kind", "magnitude", "layer", "task", "item", "score", "margin"]].merge(
        base[["task", "item", "score", "margin", *text]], on=["task", "item"], suffixes=("", "_base")
    )
    out = out.rename(columns={"score": "score_perturbed", "margin": "margin_perturbed",
                              "score_base": "score_baseline", "margin_base": "margin_baseline"})
    out["change"] = out["score_perturbed"] - out["score_baseline"]
    out["direction"] = np.select([out["change"] < 0, out["change"] > 0], ["lost", "gained"], "same")
    if only_changed:
        out = out[out["direction"] != "same"]
    order = ["config_id", "kind", "magnitude", "layer", "task", "item", "direction", "score_baseline",
             "score_perturbed", "change", "margin_baseline", "margin_perturbed", *text]
    return out[order].sort_values(["config_id", "task", "item"]).reset_index(drop=True)


# -- synthetic scores ----------------------------------------------------------------------
def simulate_scores(
    effects: Mapping[tuple[int, str], float],
    baseline_accuracy: Mapping[str, float],
    tasks_per_ability: int = 1,
    items_per_task: int = 20,
    magnitudes: Sequence[float] = (1.0, 2.0),
    control_effect: float = 0.0,
    kind: str = "ablate",
    layer: int = 15,
    seed: int = 0,
    *,
    n_controls: int = 1,
    draw_sd: float = 0.0,
    target_like_control: bool = False,
    flip_rate: float = 0.0,
    higher_is_better: Mapping[str, bool] | None = None,
    chance: Mapping[str, float] | None = None,
    planted: Mapping[tuple[int, str], float] | None = None,
) -> pd.DataFrame:
    """A planted-effect ``scores`` frame in the stage-05 schema, to check stage 06 without a model.

    Each item is answered correctly by the baseline with probability
    ``baseline_accuracy[a]``. Under the perturbation of cluster ``k`` at magnitude ``m``,
    each correct item is lost with probability ``min(1, effects[(k, a)] · m / max(magnitudes))``
    (so the planted AIS at the largest magnitude is ``effects[(k, a)]``); under control
    draw ``j`` with probability ``c_j · m / max(magnitudes)``, where
    ``c_j = max(0, control_effect + draw_sd · z_j)``, ``z_j ~ N(0, 1)``: random dimension
    sets differ in how much they hurt, and ``draw_sd`` is that between-draw spread.
    ``target_like_control=True`` makes the cluster's own perturbation one more such draw
    (the null "R_k is just another random set"), whatever ``effects`` says; ``planted``
    then adds a cluster-specific effect on top of that draw: cell (k, a) loses with
    probability ``c_target + planted[(k, a)]`` (so Φ − E[Φ_control] ≈ ``planted[(k, a)]``
    where ``c`` stays above 0), the power benchmark's alternative. ``flip_rate``
    f makes answers of every perturbed config change without a systematic effect: a right
    answer is lost with probability ``f·(1 − p_a)`` and a wrong one gained with ``f·p_a``. Clusters are the ``k`` of
    ``effects``; a missing (k, a) pair has no effect. Margins are the score plus noise.
    """
    require(bool(effects) and bool(baseline_accuracy), "simulate_scores needs effects and baseline_accuracy.")
    require(int(n_controls) >= 1, f"n_controls must be ≥ 1, got {n_controls!r}")
    require(not planted or target_like_control,
            "planted effects sit on top of a target drawn like a control: pass target_like_control=True.")
    rng = np.random.default_rng(seed)
    abilities = list(baseline_accuracy)
    clusters = sorted({k for k, _ in effects})
    top = max(magnitudes)
    items = [(a, f"{a}_{t}", i) for a in abilities for t in range(tasks_per_ability) for i in range(items_per_task)]
    base = np.array([rng.random() < baseline_accuracy[a] for a, _, _ in items], dtype=float)
    directions = {a: True for a in abilities} | dict(higher_is_better or {})
    guess = {a: 0.0 for a in abilities} | dict(chance or {})

    def frame(config_id: str, cluster: int, control: bool, kind_: str, magnitude: float, drop: dict[str, float],
              draw: int = 0):
        lost = np.array([rng.random() < min(1.0, drop.get(a, 0.0)) for a, _, _ in items])
        score = np.where(lost, 0.0, base)
        if flip_rate > 0 and cluster != BASELINE_CLUSTER:
            # Lose a right answer with probability f·(1 − p), gain a wrong one with f·p: the
            # expected number of losses and gains is equal, so M(f̂, a) = M(f, a) in expectation.
            p = np.array([baseline_accuracy[a] for a, _, _ in items])
            u = rng.random(len(items))
            flips = np.where(score == 1.0, u < flip_rate * (1 - p), u < flip_rate * p)
            score = np.where(flips, 1.0 - score, score)
        ivs = [] if cluster == BASELINE_CLUSTER else [{"kind": kind_, "magnitude": magnitude, "layer": layer}]
        return pd.DataFrame({
            "config_id": config_id, "cluster": cluster, "control": control, "kind": kind_,
            "magnitude": magnitude, "layer": layer if ivs else -1, "draw": draw, "interventions": json.dumps(ivs),
            "task": [t for _, t, _ in items], "ability": [a for a, _, _ in items],
            "item": [i for _, _, i in items], "metric": "acc",
            "higher_is_better": [directions[a] for a, _, _ in items], "chance": [guess[a] for a, _, _ in items],
            "score": score, "margin": score - 0.5 + rng.normal(0, 0.3, len(items)),
        })

    def draw_effect() -> float:
        return max(0.0, control_effect + (draw_sd * rng.standard_normal() if draw_sd > 0 else 0.0))

    frames = [frame(Setting.baseline().id, BASELINE_CLUSTER, False, "none", 0.0, {})]
    for k in clusters:
        target = draw_effect() if target_like_control else None
        controls = [draw_effect() for _ in range(int(n_controls))]
        for m in magnitudes:
            if target is None:
                drop = {a: effects.get((k, a), 0.0) * m / top for a in abilities}
            else:
                drop = {a: (target + dict(planted or {}).get((k, a), 0.0)) * m / top for a in abilities}
            setting = Setting(k, kind, m)
            frames.append(frame(setting.id, k, False, kind, m, drop))
            for j, c in enumerate(controls):
                ctrl = {a: c * m / top for a in abilities}
                frames.append(frame(setting.control_draw(j).id, k, True, kind, m, ctrl, draw=j))
    return pd.concat(frames, ignore_index=True)
