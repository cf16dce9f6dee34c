"""Statistics of the influence matrix: paired tests, multiple comparisons, bootstrap, regression.

Every test pairs items: the unperturbed and the perturbed model answer the same
questions, so the unit of evidence is the per-item difference ``d_x = s_x − ŝ_x``
(positive = the perturbation lost the item).

* :func:`paired_wilcoxon`: Wilcoxon signed-rank test of ``d`` per config (k, a, θ).
* :func:`cell_wilcoxon`: the same per cell (k, a) on ``d`` averaged over Θ_k, which is
  the numerator of Φ, against the baseline and against the matched random control.
* :func:`adjust_pvalues`: Holm (family-wise error) and Benjamini–Hochberg (false
  discovery rate), in numpy.
* :func:`bootstrap_ci`: paired, task-stratified percentile bootstrap of AIS and Φ.
* :func:`ace_regression`: OLS of ACE on cluster size, probe accuracy and layer.
* :func:`influence_table`: all of it, one row per cluster × ability (``influence.parquet``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from .errors import require
from .impact import (
    BASELINE_CLUSTER,
    CONFIG_COLUMNS,
    ais,
    influence_matrix,
    item_matrix,
    selectivity,
    validate_scores,
)

CORRECTIONS = ("holm", "bh")
ALTERNATIVES = ("two-sided", "greater", "less")
ZERO_METHODS = ("wilcox", "pratt", "zsplit")
DEFAULT_COVARIATES = ("cluster_size", "probe_accuracy", "layer")


# -- Wilcoxon --------------------------------------------------------------------------------
def signed_rank(differences: np.ndarray, alternative: str = "two-sided", zero_method: str = "wilcox") -> tuple[float, float, str]:
    """Wilcoxon signed-rank test that the paired differences are centred at 0.

    Returns ``(statistic, p_value, note)`` from :func:`scipy.stats.wilcoxon`. When no
    difference is non-zero the data carry no evidence of an effect: ``p = 1`` and the note
    says so, instead of scipy's warning and a 0/0 statistic.
    """
    require(alternative in ALTERNATIVES, f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    require(zero_method in ZERO_METHODS, f"zero_method must be one of {ZERO_METHODS}, got {zero_method!r}")
    d = np.asarray(differences, dtype=float)
    require(d.ndim == 1 and len(d) > 0, "signed_rank needs a non-empty 1-D array of paired differences.")
    if not np.any(d != 0):
        return 0.0, 1.0, "no item changed: p = 1"
    with warnings.catch_warnings():
        # Ties and zeros make scipy fall back to the normal approximation, with a warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        result = sps.wilcoxon(d, zero_method=zero_method, alternative=alternative)
    return float(result.statistic), float(result.pvalue), ""


def paired_wilcoxon(scores: pd.DataFrame, alternative: str = "two-sided", zero_method: str = "wilcox") -> pd.DataFrame:
    """Per (k, a, θ): signed-rank test of ``d_x = s_x(baseline) − s_x(f̂_{k,θ})`` over the items of ``a``.

    ``alternative="greater"`` tests that the perturbation lowers scores. One row per
    perturbed config (controls included, flagged) × ability with ``n_items``,
    ``n_changed`` (items with ``d ≠ 0``), ``mean_difference``, ``statistic``, ``p_value``
    and ``note``.
    """
    df = validate_scores(scores)
    rows = []
    for ability in sorted(df["ability"].unique()):
        table, y, _ = item_matrix(df, ability)
        base = y[(table["cluster"] == BASELINE_CLUSTER).to_numpy()][0]
        for row, values in zip(table.itertuples(index=False), y):
            if row.cluster == BASELINE_CLUSTER:
                continue
            d = base - values
            statistic, p, note = signed_rank(d, alternative, zero_method)
            rows.append({
                "config_id": row.config_id, **{c: getattr(row, c) for c in CONFIG_COLUMNS}, "ability": ability,
                "n_items": len(d), "n_changed": int(np.count_nonzero(d)), "mean_difference": float(d.mean()),
                "statistic": statistic, "p_value": p, "note": note,
            })
    return pd.DataFrame(rows)


def cell_wilcoxon(scores: pd.DataFrame, alternative: str = "two-sided", zero_method: str = "wilcox") -> pd.DataFrame:
    """Per cell (k, a): signed-rank tests on item differences averaged over the configs of k.

    With ``p̄_x = (1/|Θ_k|) Σ_θ ŝ_{k,θ}(x)`` and ``c̄_x`` the same over the controls:

    * ``perturbation``: ``d_x = s_x − p̄_x``; its mean over items divided by ``M(f, a)`` is
      exactly ``Φ_{k,a}``, so this tests Φ ≠ 0;
    * ``control``: ``d_x = s_x − c̄_x`` (tests Φ_control ≠ 0);
    * ``perturbation_vs_control``: ``d_x = c̄_x − p̄_x`` (positive = the cluster's
      perturbation loses more than random dimensions do; tests Φ ≠ Φ_control).

    Long form: one row per cluster × ability × comparison; a comparison without configs
    (no control was run) has NaN p and a note.
    """
    df = validate_scores(scores)
    rows = []
    for ability in sorted(df["ability"].unique()):
        table, y, _ = item_matrix(df, ability)
        base = y[(table["cluster"] == BASELINE_CLUSTER).to_numpy()][0]
        for cluster in sorted(c for c in table["cluster"].unique() if c != BASELINE_CLUSTER):
            in_cluster = (table["cluster"] == cluster).to_numpy()
            pert = y[in_cluster & ~table["control"].to_numpy()]
            ctrl = y[in_cluster & table["control"].to_numpy()]
            mean_pert = pert.mean(axis=0) if len(pert) else None
            mean_ctrl = ctrl.mean(axis=0) if len(ctrl) else None
            pairs = {
                "perturbation": (base, mean_pert),
                "control": (base, mean_ctrl),
                "perturbation_vs_control": (mean_ctrl, mean_pert),
            }
            for comparison, (reference, treated) in pairs.items():
                if reference is None or treated is None:
                    statistic, p, note = np.nan, np.nan, "no configs for this comparison"
                    d = np.full(len(base), np.nan)
                else:
                    d = reference - treated
                    statistic, p, note = signed_rank(d, alternative, zero_method)
                rows.append({
                    "cluster": int(cluster), "ability": ability, "comparison": comparison, "n_items": len(base),
                    "mean_difference": float(np.mean(d)), "statistic": statistic, "p_value": p, "note": note,
                })
    return pd.DataFrame(rows)


# -- multiple comparisons --------------------------------------------------------------------
def adjust_pvalues(p: Sequence[float] | np.ndarray, method: str = "holm") -> np.ndarray:
    """Adjust a family of p-values for multiple comparisons; NaNs stay NaN and are not counted.

    With the m finite p-values sorted ascending, ``p_(1) ≤ … ≤ p_(m)``:

    * Holm (controls the family-wise error rate):
      ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j))``;
    * Benjamini–Hochberg (controls the false discovery rate):
      ``p̃_(i) = min_{j ≥ i} min(1, m / j · p_(j))``.

    Rejecting where ``p̃ < α`` is the corresponding step-down / step-up procedure.
    """
    require(method in CORRECTIONS, f"correction must be one of {CORRECTIONS}, got {method!r}")
    p = np.asarray(p, dtype=float)
    finite = ~np.isnan(p)
    require(np.all((p[finite] >= 0) & (p[finite] <= 1)), "p-values must lie in [0, 1].")
    out = np.full(p.shape, np.nan)
    values = p[finite]
    m = len(values)
    if m == 0:
        return out
    order = np.argsort(values, kind="mergesort")
    ranked = values[order]
    rank = np.arange(1, m + 1)
    if method == "holm":
        adjusted = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * ranked))
    else:
        adjusted = np.minimum.accumulate(np.minimum(1.0, m / rank * ranked)[::-1])[::-1]
    result = np.empty(m)
    result[order] = adjusted
    out[finite] = result
    return out


# -- bootstrap -------------------------------------------------------------------------------
def bootstrap_weights(strata: Sequence, n_boot: int, seed: int = 0) -> np.ndarray:
    """How often each item is drawn in each of ``n_boot`` stratified resamples.

    Within every stratum (task) of ``n_t`` items, ``n_t`` items are drawn with replacement;
    ``W[b, i]`` counts item ``i`` in resample ``b``, so a resampled mean is
    ``(W @ y) / n`` and every config sees the same resample (a paired bootstrap).
    """
    require(int(n_boot) >= 1, f"n_boot must be a positive integer, got {n_boot!r}")
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    weights = np.zeros((int(n_boot), len(strata)))
    for stratum in pd.unique(strata):
        members = np.flatnonzero(strata == stratum)
        n_t = len(members)
        draws = rng.integers(0, n_t, size=(int(n_boot), n_t)) + n_t * np.arange(int(n_boot))[:, None]
        weights[:, members] = np.bincount(draws.ravel(), minlength=int(n_boot) * n_t).reshape(int(n_boot), n_t)
    return weights


def percentile_interval(replicates: np.ndarray, alpha: float = 0.05, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``(α/2, 1 − α/2)`` percentiles of bootstrap replicates along ``axis`` (NaN replicates ignored)."""
    require(0 < alpha < 1, f"alpha must lie in (0, 1), got {alpha!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN cell gives a NaN interval
        low, high = np.nanpercentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=axis)
    return low, high


def bootstrap_mean_ci(
    values: np.ndarray, strata: Sequence | None = None, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over the last axis of ``values`` with a stratified percentile bootstrap CI.

    ``values[..., n]`` may stack many samples of the same ``n`` items (all resampled with the
    same draws); ``strata`` (length ``n``, default one stratum) keeps resamples within
    strata. Returns ``(mean, low, high)`` with the shape of ``values[..., 0]``.
    """
    values = np.asarray(values, dtype=float)
    strata = np.zeros(values.shape[-1], dtype=int) if strata is None else np.asarray(strata)
    require(len(strata) == values.shape[-1], "strata must have one entry per item (the last axis of values).")
    weights = bootstrap_weights(strata, n_boot, seed)
    replicates = np.tensordot(weights, values, axes=([1], [-1])) / values.shape[-1]
    low, high = percentile_interval(replicates, alpha, axis=0)
    return values.mean(axis=-1), low, high


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile intervals of AIS per config (``ais``) and of Φ per cell (``phi``)."""

    ais: pd.DataFrame
    phi: pd.DataFrame


def _relative_loss(m_base: np.ndarray, m_pert: np.ndarray) -> np.ndarray:
    """``(M_base − M_pert) / M_base``, NaN where ``M_base = 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m_base == 0, np.nan, (m_base - m_pert) / np.where(m_base == 0, 1.0, m_base))


def _mean_rows(replicates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """NaN-skipping mean of the selected config columns, NaN where none is defined."""
    chosen = replicates[:, rows]
    count = np.sum(~np.isnan(chosen), axis=1)
    total = np.nansum(chosen, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap_ci(scores: pd.DataFrame, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> BootstrapCI:
    """Paired, task-stratified percentile bootstrap of AIS and Φ.

    Resample ``b`` redraws the items of every task with replacement (the same draw for
    the baseline and every config, so differences stay paired) and recomputes
    ``M*_b(·, a)``, ``AIS*_b(k, a, θ)``, ``Φ*_b`` and ``Φ*_b − Φ*_control,b``; the interval is
    the ``(α/2, 1 − α/2)`` percentile range of the ``n_boot`` replicates. A resample whose
    baseline mean is 0 has undefined AIS and is left out of that interval. Abilities are
    resampled independently (the i-th in sorted order with ``seed + i``).
    """
    df = validate_scores(scores)
    ais_rows, phi_rows = [], []
    for offset, ability in enumerate(sorted(df["ability"].unique())):
        table, y, tasks = item_matrix(df, ability)
        weights = bootstrap_weights(tasks, n_boot, seed + offset)
        replicates = weights @ y.T / y.shape[1]  # [n_boot, n_configs]: M*(config, a)
        is_base = (table["cluster"] == BASELINE_CLUSTER).to_numpy()
        base_index = int(np.flatnonzero(is_base)[0])
        ais_star = _relative_loss(replicates[:, [base_index]], replicates)
        ais_hat = _relative_loss(y[base_index].mean(), y.mean(axis=1))
        low, high = percentile_interval(ais_star, alpha)
        for i, row in enumerate(table.itertuples(index=False)):
            if not is_base[i]:
                ais_rows.append({"config_id": row.config_id, **{c: getattr(row, c) for c in CONFIG_COLUMNS},
                                 "ability": ability, "ais": ais_hat[i], "ais_low": low[i], "ais_high": high[i]})
        control = table["control"].to_numpy()
        for cluster in sorted(c for c in table["cluster"].unique() if c != BASELINE_CLUSTER):
            in_cluster = (table["cluster"] == cluster).to_numpy()
            phi_star = _mean_rows(ais_star, np.flatnonzero(in_cluster & ~control))
            ctrl_star = _mean_rows(ais_star, np.flatnonzero(in_cluster & control))
            row = {"cluster": int(cluster), "ability": ability}
            for name, reps in (("phi", phi_star), ("phi_control", ctrl_star), ("phi_minus_control", phi_star - ctrl_star)):
                low_, high_ = percentile_interval(reps, alpha)
                row[f"{name}_low"], row[f"{name}_high"] = float(low_), float(high_)
            phi_rows.append(row)
    return BootstrapCI(ais=pd.DataFrame(ais_rows), phi=pd.DataFrame(phi_rows))


# -- regression ------------------------------------------------------------------------------
def ace_regression(
    rows: pd.DataFrame, response: str = "ace", predictors: Sequence[str] | None = None
) -> pd.DataFrame:
    """OLS of ACE on cluster-level covariates: ``ACE = β₀ + Σ_j β_j x_j + ε``.

    ``rows`` is one row per (cluster, task, θ), e.g. :func:`rephelpers.impact.ace_covariates`.
    ``predictors`` default: those of cluster size, probe accuracy and layer that are present
    and vary across the rows (a constant covariate is collinear with the intercept); given
    explicitly, each must be present and vary. Rows with a missing value are dropped.
    Returns a tidy table, one row per term (``const`` first): ``estimate``, ``std_error``,
    ``t_value``, ``p_value``, ``ci_low``, ``ci_high``, with ``n_obs``, ``r_squared`` and the
    predictors in ``.attrs``.
    """
    import statsmodels.api as sm

    require(response in rows.columns, f"ace_regression: response column {response!r} not in rows ({list(rows.columns)}).")
    if predictors is None:
        predictors = [c for c in DEFAULT_COVARIATES if c in rows.columns and rows[c].nunique(dropna=True) > 1]
        require(
            bool(predictors),
            f"ace_regression: none of {DEFAULT_COVARIATES} is present and varies across the rows; add "
            "covariates with impact.ace_covariates (several clusters, layers) or pass predictors=.",
        )
    predictors = list(predictors)
    missing = [c for c in predictors if c not in rows.columns]
    require(not missing, f"ace_regression: predictors {missing} are not columns of rows; add them (impact.ace_covariates).")
    data = rows[[response, *predictors]].apply(pd.to_numeric, errors="coerce").dropna()
    constant = [c for c in predictors if data[c].nunique() < 2]
    require(not constant, f"ace_regression: predictors {constant} are constant across the rows; drop them.")
    n_params = len(predictors) + 1
    require(
        len(data) > n_params,
        f"ace_regression: {len(data)} complete rows for {n_params} parameters (intercept + {predictors}); "
        "OLS needs more rows than parameters: add clusters, tasks or configs, or fewer predictors.",
    )
    fit = sm.OLS(data[response].to_numpy(float), sm.add_constant(data[predictors].to_numpy(float), has_constant="add")).fit()
    ci = fit.conf_int()
    table = pd.DataFrame({
        "term": ["const", *predictors], "estimate": fit.params, "std_error": fit.bse, "t_value": fit.tvalues,
        "p_value": fit.pvalues, "ci_low": ci[:, 0], "ci_high": ci[:, 1],
    })
    table.attrs.update(n_obs=int(fit.nobs), r_squared=float(fit.rsquared), response=response, predictors=predictors)
    return table


# -- the influence table ---------------------------------------------------------------------
def influence_table(
    scores: pd.DataFrame, n_boot: int = 1000, alpha: float = 0.05, correction: str = "holm", seed: int = 0
) -> pd.DataFrame:
    """The artifact ``influence.parquet``: one row per cluster × ability.

    Columns: ``phi`` (Φ_{k,a}) with its bootstrap CI ``phi_low``/``phi_high``; the same for
    the random controls (``phi_control*``) and for ``phi_minus_control`` (Φ − Φ_control);
    ``baseline_score`` (M(f, a)), ``n_items``, ``n_configs``, ``n_control_configs``;
    ``p_value`` (Wilcoxon, Φ ≠ 0), ``p_control`` (Φ_control ≠ 0) and ``p_vs_control``
    (Φ ≠ Φ_control) from :func:`cell_wilcoxon`, each adjusted across the table's cells with
    ``correction`` (``*_adjusted``); ``significant`` (``p_adjusted < alpha``),
    ``control_significant`` and ``exceeds_control`` (``p_vs_control_adjusted < alpha`` and
    Φ > Φ_control); the cluster's ``selectivity``/``selectivity_entropy``/``top_ability``
    (:func:`rephelpers.impact.selectivity`); and the ``alpha``, ``correction`` and
    ``n_boot`` that produced it.
    """
    require(correction in CORRECTIONS, f"correction must be one of {CORRECTIONS}, got {correction!r}")
    require(0 < alpha < 1, f"alpha must lie in (0, 1), got {alpha!r}")
    require(int(n_boot) >= 1, f"n_boot must be a positive integer, got {n_boot!r}")
    df = validate_scores(scores)
    ais_df = ais(df)
    phi = influence_matrix(ais_df)
    base = ais_df.groupby("ability").agg(baseline_score=("baseline_score", "first"), n_items=("n_items", "first"))
    table = phi.merge(base.reset_index(), on="ability")
    table = table.merge(bootstrap_ci(df, n_boot, alpha, seed).phi, on=["cluster", "ability"], how="left")

    tests = cell_wilcoxon(df).pivot(index=["cluster", "ability"], columns="comparison", values="p_value")
    tests = tests.rename(columns={"perturbation": "p_value", "control": "p_control",
                                  "perturbation_vs_control": "p_vs_control"}).reset_index()
    table = table.merge(tests, on=["cluster", "ability"], how="left")
    for column in ("p_value", "p_control", "p_vs_control"):
        adjusted = "p_adjusted" if column == "p_value" else f"{column}_adjusted"
        table[adjusted] = adjust_pvalues(table[column].to_numpy(), correction)
    table["significant"] = table["p_adjusted"] < alpha
    table["control_significant"] = table["p_control_adjusted"] < alpha
    table["exceeds_control"] = (table["p_vs_control_adjusted"] < alpha) & (table["phi_minus_control"] > 0)
    table = table.merge(selectivity(phi), on="cluster", how="left").drop(columns="n_abilities")
    table["alpha"], table["correction"], table["n_boot"] = float(alpha), correction, int(n_boot)
    columns = [
        "cluster", "ability", "baseline_score", "n_items", "n_configs", "n_control_configs",
        "phi", "phi_low", "phi_high", "phi_control", "phi_control_low", "phi_control_high",
        "phi_minus_control", "phi_minus_control_low", "phi_minus_control_high",
        "p_value", "p_adjusted", "significant", "p_control", "p_control_adjusted", "control_significant",
        "p_vs_control", "p_vs_control_adjusted", "exceeds_control",
        "selectivity", "selectivity_entropy", "top_ability", "alpha", "correction", "n_boot",
    ]
    return table[columns].sort_values(["cluster", "ability"]).reset_index(drop=True)


def influence_summary(table: pd.DataFrame, top: int = 3) -> str:
    """A few plain sentences on an influence table: how many cells are significant, which are strongest."""
    alpha, correction = table["alpha"].iloc[0], table["correction"].iloc[0]
    lines = [
        f"{int(table['significant'].sum())} of {len(table)} cluster × ability cells have Φ ≠ 0 at adjusted "
        f"p < {alpha:g} ({correction}, paired Wilcoxon); {int(table['exceeds_control'].sum())} exceed their "
        f"random control; {int(table['control_significant'].sum())} random controls are themselves significant."
    ]
    strongest = table[table["significant"]].sort_values("phi", ascending=False).head(top)
    for row in strongest.itertuples(index=False):
        lines.append(
            f"cluster {row.cluster} → {row.ability}: Φ = {row.phi:+.3f} [{row.phi_low:+.3f}, {row.phi_high:+.3f}], "
            f"Φ_control = {row.phi_control:+.3f}, adjusted p = {row.p_adjusted:.3g}, selectivity = {row.selectivity:.2f}."
        )
    return "\n".join(lines)
