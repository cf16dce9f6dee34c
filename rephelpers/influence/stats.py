"""Statistics of the influence matrix: paired tests, multiple comparisons, bootstrap, regression.

Every test pairs items: the unperturbed and the perturbed model answer the same
questions, so the unit of evidence is the per-item difference ``d_x = s_x − ŝ_x``
(positive = the perturbation lost the item).

* :func:`paired_wilcoxon`: Wilcoxon signed-rank test of ``d`` per config (k, a, θ).
* :func:`cell_wilcoxon`: the same per cell (k, a) on ``d`` averaged over Θ_k, which is
  the numerator of Φ, against the baseline (does this perturbation change scores?).
* :func:`control_distribution_test`: is Φ_{k,a} beyond what random edits of the same
  size do? The unit of randomness of a control is the random draw of dimensions, not
  the item, so Φ is ranked among the n control draws' Φ^{(j)}: the empirical p-value
  ``(1 + #{j : Φ^{(j)} ≥ Φ}) / (n + 1)``, exact (super-uniform) whenever R_k is itself a
  draw from the controls' distribution. (An item-level paired test of the perturbation
  against the mean control treats the one R_k as fixed, ignores the between-draw
  variation, and fires far above α under that null: see ``benchmarks/bench_calibration.py``.)
* :func:`adjust_pvalues`: Holm (family-wise error) and Benjamini–Hochberg (false
  discovery rate), in numpy.
* :func:`bootstrap_ci`: paired, task-stratified percentile bootstrap of AIS and Φ.
* :func:`ace_regression`: OLS of ACE on cluster-level covariates, one row per cluster
  (:func:`cluster_ace_rows`), so that covariates are not pseudo-replicated over tasks and θ.
* :func:`minimum_detectable_ais`: the smallest AIS the paired test detects with 80% power.

The influence table that puts these together, one row per cluster × ability with its
verdict, is :mod:`rephelpers.influence.table`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from ..errors import require
from ..sequential import sequential_p
from .impact import (
    BASELINE_CLUSTER,
    CONFIG_COLUMNS,
    FLOOR_MARGIN,
    baseline_floor,
    config_mean,
    control_draws,
    influence_matrix,
    item_matrix,
    relative_loss,
    validate_scores,
)

CORRECTIONS = ("holm", "bh")
ALTERNATIVES = ("two-sided", "greater", "less")
ZERO_METHODS = ("wilcox", "pratt", "zsplit")
DEFAULT_COVARIATES = ("cluster_size", "probe_accuracy", "layer")
MIN_RESIDUAL_DF = 3
"""The ACE regression reports p-values only with at least this many residual degrees of freedom."""
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


def mean_difference_t(differences: np.ndarray, alternative: str = "two-sided") -> tuple[float, float, str]:
    """One-sample t-test that the paired differences have mean 0 (:func:`scipy.stats.ttest_1samp`).

    ``p = 1`` with a note when every difference is 0 or there are fewer than two."""
    require(alternative in ALTERNATIVES, f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    d = np.asarray(differences, dtype=float)
    if not np.any(d):
        return 0.0, 1.0, "no item changed: p = 1"
    if len(d) < 2 or np.all(d == d[0]):
        return float("nan"), float("nan"), "no spread in the differences: the t-test is undefined"
    result = sps.ttest_1samp(d, 0.0, alternative=alternative)
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
    * ``control``: ``d_x = s_x − c̄_x`` (tests Φ_control ≠ 0). Averaged over many draws, these
      differences are continuous and skewed even when their mean is 0 (right answers can
      only be lost, wrong ones only gained), which breaks the signed-rank test's symmetry
      assumption, so this comparison uses the paired t-test of the mean difference;
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
                    if comparison == "control":
                        statistic, p, note = mean_difference_t(d, alternative)
                    else:
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


MAX_DROPPED = 0.01
"""A bootstrap interval is reported only if at most this share of its replicates is undefined."""


def bootstrap_ci(
    scores: pd.DataFrame, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, floor_margin: float = FLOOR_MARGIN
) -> BootstrapCI:
    """Paired, task-stratified percentile bootstrap of AIS, Φ and Φ − Φ_control.

    Resample ``b`` redraws the items of every task with replacement (the same draw for
    the baseline and every config, so differences stay paired) and recomputes
    ``M*_b(·, a)``, ``AIS*_b(k, a, θ)`` and ``Φ*_b``. For ``Φ − Φ_control`` it also redraws
    the n control draws with replacement, ``Φ*_b − (1/n) Σ_j Φ^{(j)*}_b`` over the
    redrawn draws, so the interval carries the between-draw variation of the control
    mean as well as the item noise. Abilities are resampled independently (the i-th in
    sorted order with ``seed + i``); abilities whose baseline is below the floor
    (:func:`rephelpers.influence.impact.baseline_floor`) get no interval. A replicate whose
    baseline mean is 0 has undefined AIS; ``dropped`` reports their share, and an
    interval with more than :data:`MAX_DROPPED` of them is NaN rather than an interval
    of the lucky resamples.
    """
    df = validate_scores(scores)
    ais_rows, phi_rows = [], []
    draw_rng = np.random.default_rng([int(seed), 7919])
    for offset, ability in enumerate(sorted(df["ability"].unique())):
        table, y, tasks = item_matrix(df, ability)
        sub = df[df["ability"] == ability]
        higher = bool(sub["higher_is_better"].iloc[0])
        sign = 1.0 if higher else -1.0
        weights = bootstrap_weights(tasks, n_boot, seed + offset)
        replicates = weights @ y.T / y.shape[1]  # [n_boot, n_configs]: M*(config, a)
        is_base = (table["cluster"] == BASELINE_CLUSTER).to_numpy()
        base_index = int(np.flatnonzero(is_base)[0])
        m_base = float(y[base_index].mean())
        readable = m_base >= baseline_floor(float(sub["chance"].max()), higher, floor_margin) and m_base > 0
        ais_star = relative_loss(replicates[:, [base_index]], replicates, sign)
        dropped = float(np.mean(replicates[:, base_index] == 0))
        usable = readable and dropped <= MAX_DROPPED
        ais_hat = relative_loss(m_base, y.mean(axis=1), sign)
        low, high = percentile_interval(ais_star, alpha)
        for i, row in enumerate(table.itertuples(index=False)):
            if not is_base[i]:
                ais_rows.append({"config_id": row.config_id, **{c: getattr(row, c) for c in CONFIG_COLUMNS},
                                 "ability": ability, "ais": ais_hat[i] if readable else np.nan,
                                 "ais_low": low[i] if usable else np.nan, "ais_high": high[i] if usable else np.nan,
                                 "dropped": dropped})
        control = table["control"].to_numpy()
        draw = table["draw"].to_numpy()
        for cluster in sorted(c for c in table["cluster"].unique() if c != BASELINE_CLUSTER):
            in_cluster = (table["cluster"] == cluster).to_numpy()
            phi_star = config_mean(ais_star, np.flatnonzero(in_cluster & ~control))
            draws = sorted(set(draw[in_cluster & control]))
            per_draw = np.stack([config_mean(ais_star, np.flatnonzero(in_cluster & control & (draw == j)))
                                 for j in draws], axis=1) if draws else np.full((len(phi_star), 1), np.nan)
            ctrl_star = np.nanmean(per_draw, axis=1) if draws else per_draw[:, 0]
            picks = draw_rng.integers(0, per_draw.shape[1], size=per_draw.shape)
            resampled_ctrl = np.nanmean(np.take_along_axis(per_draw, picks, axis=1), axis=1) if draws else ctrl_star
            row = {"cluster": int(cluster), "ability": ability, "dropped": dropped}
            for name, reps in (("phi", phi_star), ("phi_control", ctrl_star),
                               ("phi_minus_control", phi_star - resampled_ctrl)):
                low_, high_ = percentile_interval(reps, alpha) if usable else (np.nan, np.nan)
                row[f"{name}_low"], row[f"{name}_high"] = float(low_), float(high_)
            phi_rows.append(row)
    return BootstrapCI(ais=pd.DataFrame(ais_rows), phi=pd.DataFrame(phi_rows))


# -- the control distribution ----------------------------------------------------------------
def empirical_p(target: float, controls: np.ndarray) -> float:
    """``(1 + #{j : c_j ≥ t}) / (n + 1)``: the rank p-value of ``t`` among ``n`` control draws.

    Exact (P(p ≤ α) ≤ α) when ``t`` is exchangeable with the draws, whatever their
    distribution; ties count against the target, so discrete scores only make it more
    conservative. The smallest attainable value is ``1 / (n + 1)``. NaN without draws.
    """
    controls = np.asarray(controls, dtype=float)
    controls = controls[~np.isnan(controls)]
    if len(controls) == 0 or not np.isfinite(target):
        return float("nan")
    return float((1 + np.sum(controls >= target)) / (len(controls) + 1))


def prediction_t_p(target: float, controls: np.ndarray) -> float:
    """One-sided p of ``t`` as a new draw from a normal control distribution:
    ``T = (t − c̄) / (s · √(1 + 1/n))`` against Student's t with ``n − 1`` degrees of freedom.

    Exact when the draws are normal and ``t`` is exchangeable with them; unlike the rank
    p-value its smallest value is not bounded by ``1/(n + 1)``, so it can pass a
    multiple-comparison correction with 20 draws. But control draws' Φ are neither normal
    nor continuous (a floor at 0, item granularity), and on the simulated nulls of
    ``benchmarks/bench_calibration.py`` this test rejects about twice as often as α, so
    stage 06 does not use it; it stays here, measured, as the reason. NaN with fewer than
    3 draws or no spread.
    """
    controls = np.asarray(controls, dtype=float)
    controls = controls[~np.isnan(controls)]
    n = len(controls)
    if n < 3 or not np.isfinite(target):
        return float("nan")
    sd = float(np.std(controls, ddof=1))
    if sd == 0:
        return 1.0 if target <= controls[0] else float("nan")
    t = (target - controls.mean()) / (sd * np.sqrt(1 + 1 / n))
    return float(sps.t.sf(t, df=n - 1))


def control_distribution_test(ais_df: pd.DataFrame, stop_after_exceedances: int | None = None) -> pd.DataFrame:
    """Per cell (k, a): Φ against the distribution of its control draws' Φ^{(j)}.

    Columns ``n_draws``, ``control_mean``, ``control_sd`` (between-draw standard deviation),
    ``control_q95``, ``z_vs_controls = (Φ − mean) / sd`` (descriptive) and ``p_vs_controls``
    (:func:`empirical_p`, one-sided: does the cluster's perturbation hurt more than random
    edits of its size?). With ``stop_after_exceedances = h`` the p is Besag–Clifford's
    (:func:`sequential_p`) over the draws in draw order, the draws present being the cap:
    the p-value a design that draws controls in rounds and stops a cell at its h-th
    exceedance needs (a rank p over draws stopped that way would not be valid), and
    ``n_draws_used`` says how many draws it read.
    """
    phi = influence_matrix(ais_df)[["cluster", "ability", "phi"]]
    draws = control_draws(ais_df)
    rows = []
    for row in phi.itertuples(index=False):
        values = draws.loc[(draws.cluster == row.cluster) & (draws.ability == row.ability), "phi_draw"].to_numpy(float)
        finite = values[~np.isnan(values)]
        sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else np.nan
        rows.append({
            "cluster": int(row.cluster), "ability": row.ability, "n_draws": int(len(finite)),
            "control_mean": float(np.mean(finite)) if len(finite) else np.nan, "control_sd": sd,
            "control_q95": float(np.quantile(finite, 0.95)) if len(finite) else np.nan,
            "z_vs_controls": (row.phi - np.mean(finite)) / sd if len(finite) > 1 and sd > 0 else np.nan,
            "p_vs_controls": empirical_p(row.phi, finite),
        })
        if stop_after_exceedances is not None:
            # control_draws sorts by draw: the order the rounds drew them in.
            rows[-1]["p_vs_controls"], rows[-1]["n_draws_used"] = sequential_p(row.phi, finite, stop_after_exceedances)
    return pd.DataFrame(rows)


def primary_cells(primary: str | Sequence | Mapping | None, clusters: Sequence[int], abilities: Sequence[str]) -> set:
    """The (cluster, ability) cells of a user-stated ``primary`` family, tested with their own correction.

    ``"diagonal"``: the i-th cluster with the i-th ability, both sorted (a known design, e.g.
    stage 07's planted skills; needs as many clusters as abilities); a mapping
    ``{cluster: ability or [abilities]}`` (each cluster's pre-registered abilities); or a
    list of ``(cluster, ability)`` pairs. None: no primary family (every cell in one).
    """
    clusters, abilities = sorted(set(int(c) for c in clusters)), sorted(set(abilities))
    if primary is None:
        return set()
    if isinstance(primary, str):
        require(primary == "diagonal", f"primary must be 'diagonal', a {{cluster: ability}} mapping or a list of "
                                       f"(cluster, ability) pairs, got {primary!r}")
        require(len(clusters) == len(abilities),
                f"primary='diagonal' pairs the i-th cluster with the i-th ability, but there are {len(clusters)} "
                f"clusters and {len(abilities)} abilities; list the (cluster, ability) pairs instead.")
        return set(zip(clusters, abilities))
    pairs = ([(k, a) for k, v in primary.items() for a in ([v] if isinstance(v, str) else v)]
             if isinstance(primary, Mapping) else [tuple(p) for p in primary])
    cells = {(int(k), str(a)) for k, a in pairs}
    unknown = sorted(c for c in cells if c[0] not in clusters or c[1] not in abilities)
    require(not unknown, f"primary cells {unknown} are not in the table (clusters {clusters}, abilities {abilities}).")
    require(bool(cells), "primary is empty: give at least one (cluster, ability) cell, or None.")
    return cells


# -- power -----------------------------------------------------------------------------------
def rank_test_power(effect: float, control_sd: float, n_draws: int, alpha: float = 0.05, n_tests: int = 1) -> float:
    """Power of the rank p-value against ``n`` control draws at level ``α' = α / n_tests``.

    Model: the draws' Φ^{(j)} ~ N(μ, s²) and the cluster's Φ ~ N(μ + δ, s²), ``s`` the
    between-draw standard deviation (``control_sd``, item noise included). The rank p
    ``(1 + E)/(n + 1)``, ``E = #{j : Φ^{(j)} ≥ Φ}``, is below α' iff ``E ≤ e = ⌈α'(n + 1)⌉ − 2``
    (strictly below); given Φ = μ + δ + s·z, ``E ~ Binomial(n, q)``, ``q = 1 − Φ_N(δ/s + z)``, so
    ``power = E_z[P(Binomial(n, q(z)) ≤ e)]`` (Gauss–Hermite, 80 nodes). 0 when ``e < 0``.
    """
    e = int(np.ceil(alpha / max(1, int(n_tests)) * (int(n_draws) + 1))) - 2
    if e < 0 or not (control_sd > 0):
        return 0.0 if e < 0 else float(effect > 0)
    q = sps.norm.sf(effect / control_sd + _GH_NODES)
    return float(np.sum(_GH_WEIGHTS * sps.binom.cdf(e, int(n_draws), q)) / np.sqrt(2 * np.pi))


_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(80)


def minimum_detectable_difference(
    control_sd: float, n_draws: int, alpha: float = 0.05, power: float = 0.8, n_tests: int = 1
) -> float:
    """The smallest Φ − Φ_control the rank test against ``n_draws`` detects with ``power``
    (:func:`rank_test_power`, ``n_tests`` > 1 the Bonferroni level a lone effect needs
    under Holm or BH), in Φ units, to 0.001·s (bisection: power grows with δ). NaN when no p
    can pass (``(n_draws + 1)·α / n_tests ≤ 1``), the spread is unknown, or δ = 20·s falls short."""
    if not (np.isfinite(control_sd) and control_sd > 0) or int(np.ceil(alpha / max(1, n_tests) * (n_draws + 1))) < 2:
        return float("nan")
    low, high = 0.0, 20.0
    if rank_test_power(high * control_sd, control_sd, n_draws, alpha, n_tests) < power:
        return float("nan")
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (low, mid) if rank_test_power(mid * control_sd, control_sd, n_draws, alpha, n_tests) >= power else (mid, high)
    return float(high * control_sd)


def minimum_detectable_ais(
    n_items: int, baseline: float, alpha: float = 0.05, power: float = 0.8, n_tests: int = 1
) -> float:
    """The smallest AIS the paired Wilcoxon test detects with probability ``power``.

    Assumes the most favourable kind of effect, a pure loss: each of the
    ``n_c = round(baseline · n_items)`` items the unperturbed model gets right is lost
    independently with probability q, and nothing is gained (AIS = q). The signed-rank
    p-value of ``L`` lost items out of ``n_items`` is computed exactly with
    :func:`signed_rank`, and the power at q is ``P(p(L) < α / n_tests)``, L ~ Binomial(n_c, q)
    (``n_tests`` > 1 gives the Bonferroni bound of a Holm-corrected family). Returns the
    least q on a 0.005 grid with power ≥ ``power``; NaN if even q = 1 falls short.
    """
    require(n_items >= 1 and 0 < baseline <= 1, f"need n_items ≥ 1 and 0 < baseline ≤ 1, got {n_items}, {baseline}")
    n_correct = int(round(baseline * n_items))
    level = alpha / max(1, int(n_tests))
    rejects = np.zeros(n_correct + 1, dtype=bool)
    for lost in range(1, n_correct + 1):
        d = np.zeros(n_items)
        d[:lost] = 1.0
        rejects[lost] = signed_rank(d)[1] < level
    counts = np.arange(n_correct + 1)
    for q in np.arange(0.005, 1.0001, 0.005):
        if sps.binom.pmf(counts, n_correct, q)[rejects].sum() >= power:
            return float(round(q, 3))
    return float("nan")


# -- regression ------------------------------------------------------------------------------
def cluster_ace_rows(rows: pd.DataFrame, response: str = "ace") -> pd.DataFrame:
    """One row per cluster: the mean of ``response`` over its tasks and settings θ, with the
    cluster-level covariates (constant within a cluster) carried along.

    The covariates of the proposals' regression (cluster size, probe accuracy) vary only
    between clusters; regressing the cluster × task × θ rows on them counts each cluster
    many times and makes its p-values far too small (pseudo-replication).
    """
    require("cluster" in rows.columns and response in rows.columns,
            f"cluster_ace_rows needs the columns cluster and {response!r} (impact.ace_covariates output).")
    numeric = [c for c in rows.columns if c not in ("cluster",) and pd.api.types.is_numeric_dtype(rows[c])
               and not pd.api.types.is_bool_dtype(rows[c])]
    return rows.groupby("cluster")[numeric].mean().reset_index()


def ace_regression(
    rows: pd.DataFrame, response: str = "ace", predictors: Sequence[str] | None = None, per_cluster: bool = True
) -> pd.DataFrame:
    """OLS of ACE on cluster-level covariates: ``ACE_k = β₀ + Σ_j β_j x_{k,j} + ε_k``.

    ``rows`` is e.g. :func:`rephelpers.influence.impact.ace_covariates`; with ``per_cluster`` (the
    default) they are first averaged to one row per cluster (:func:`cluster_ace_rows`),
    the unit the covariates describe. ``predictors`` default: those of cluster size, probe
    accuracy and layer that are present and vary across the rows (a constant covariate is
    collinear with the intercept); given explicitly, each must be present and vary.
    Returns a tidy table, one row per term (``const`` first): ``estimate``, ``std_error``,
    ``t_value``, ``p_value``, ``ci_low``, ``ci_high``, with ``n_obs``, ``r_squared``,
    ``df_resid``, ``unit`` and a ``note`` in ``.attrs``. With fewer than
    :data:`MIN_RESIDUAL_DF` residual degrees of freedom (5 clusters and 3 covariates leave
    1) the estimates are kept but p-values and intervals are NaN and the note says why.
    """
    import statsmodels.api as sm

    require(response in rows.columns, f"ace_regression: response column {response!r} not in rows ({list(rows.columns)}).")
    data = cluster_ace_rows(rows, response) if per_cluster and "cluster" in rows.columns else rows
    if predictors is None:
        predictors = [c for c in DEFAULT_COVARIATES if c in data.columns and data[c].nunique(dropna=True) > 1]
        require(
            bool(predictors),
            f"ace_regression: none of {DEFAULT_COVARIATES} is present and varies across the "
            f"{'clusters' if per_cluster else 'rows'}; add covariates with impact.ace_covariates (several "
            "clusters, layers) or pass predictors=.",
        )
    predictors = list(predictors)
    missing = [c for c in predictors if c not in data.columns]
    require(not missing, f"ace_regression: predictors {missing} are not columns of rows; add them (impact.ace_covariates).")
    data = data[[response, *predictors]].apply(pd.to_numeric, errors="coerce").dropna()
    constant = [c for c in predictors if data[c].nunique() < 2]
    require(not constant, f"ace_regression: predictors {constant} are constant across the rows; drop them.")
    n_params = len(predictors) + 1
    if per_cluster and "cluster" in rows.columns and len(data) <= n_params:
        # Too few clusters to fit at all: say so in the table rather than stop the notebook.
        table = pd.DataFrame({"term": ["const", *predictors]}).assign(
            estimate=np.nan, std_error=np.nan, t_value=np.nan, p_value=np.nan, ci_low=np.nan, ci_high=np.nan)
        table.attrs.update(n_obs=int(len(data)), r_squared=float("nan"), response=response, predictors=predictors,
                           df_resid=int(len(data)) - n_params, unit="cluster",
                           note=f"too few clusters to fit: {len(data)} clusters for {n_params} parameters "
                                f"(intercept + {predictors}); add clusters or use fewer covariates.")
        return table
    require(
        len(data) > n_params,
        f"ace_regression: {len(data)} complete {'clusters' if per_cluster else 'rows'} for {n_params} parameters "
        f"(intercept + {predictors}); OLS needs more observations than parameters: add clusters or use fewer predictors.",
    )
    fit = sm.OLS(data[response].to_numpy(float), sm.add_constant(data[predictors].to_numpy(float), has_constant="add")).fit()
    ci = fit.conf_int()
    table = pd.DataFrame({
        "term": ["const", *predictors], "estimate": fit.params, "std_error": fit.bse, "t_value": fit.tvalues,
        "p_value": fit.pvalues, "ci_low": ci[:, 0], "ci_high": ci[:, 1],
    })
    df_resid = int(round(fit.df_resid))
    note = ""
    if df_resid < MIN_RESIDUAL_DF:
        table[["p_value", "ci_low", "ci_high"]] = np.nan
        note = (f"too few clusters for inference: {len(data)} clusters and {len(predictors)} covariates leave "
                f"{df_resid} residual degree(s) of freedom (need ≥ {MIN_RESIDUAL_DF}); estimates only.")
    table.attrs.update(n_obs=int(fit.nobs), r_squared=float(fit.rsquared), response=response, predictors=predictors,
                       df_resid=df_resid, unit="cluster" if per_cluster else "row", note=note)
    return table
