"""Wilcoxon, Holm/BH, bootstrap coverage, ACE regression and the influence table."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from rephelpers.abilities.evaluation import control_cap_draws
from rephelpers.influence import findings, impact, stats
from rephelpers.errors import RephelpersError

EFFECTS = {(0, "math"): 0.7, (1, "code"): 0.6}
BASE_ACCURACY = {"math": 0.7, "code": 0.6, "icl": 0.8}


@pytest.fixture(scope="module")
def scores() -> pd.DataFrame:
    return impact.simulate_scores(
        EFFECTS, BASE_ACCURACY, tasks_per_ability=2, items_per_task=40, control_effect=0.05, seed=1
    )


def item_vector(scores: pd.DataFrame, config_id: str, ability: str) -> np.ndarray:
    rows = scores[(scores.config_id == config_id) & (scores.ability == ability)].sort_values(["task", "item"])
    return rows["score"].to_numpy()


# -- Wilcoxon -----------------------------------------------------------------------------------
def test_paired_wilcoxon_matches_scipy(scores):
    result = stats.paired_wilcoxon(scores).set_index(["config_id", "ability"])
    checked = 0
    for config_id in ["k0:ablate:m1", "k0:ablate:m2", "k1:ablate:m2:control"]:
        for ability in BASE_ACCURACY:
            base, pert = item_vector(scores, "baseline", ability), item_vector(scores, config_id, ability)
            row = result.loc[(config_id, ability)]
            assert row["n_changed"] == np.count_nonzero(base - pert)
            if np.any(base != pert):
                expected = sps.wilcoxon(base, pert)
                assert row["p_value"] == pytest.approx(expected.pvalue)
                assert row["statistic"] == pytest.approx(expected.statistic)
                checked += 1
    assert checked >= 3
    strong = result.loc[("k0:ablate:m2", "math"), "p_value"]
    assert strong < 1e-3


def test_wilcoxon_all_zero_differences_gives_p_one_with_note():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        statistic, p, note = stats.signed_rank(np.zeros(12))
    assert p == 1.0 and "no item changed" in note
    with pytest.raises(RephelpersError, match="zero_method"):
        stats.signed_rank(np.ones(3), zero_method="drop")


def test_cell_wilcoxon_tests_the_theta_averaged_difference(scores):
    cells = stats.cell_wilcoxon(scores).set_index(["cluster", "ability", "comparison"])
    base = item_vector(scores, "baseline", "code")
    pert = np.mean([item_vector(scores, f"k1:ablate:m{m}", "code") for m in (1, 2)], axis=0)
    ctrl = np.mean([item_vector(scores, f"k1:ablate:m{m}:control", "code") for m in (1, 2)], axis=0)
    assert cells.loc[(1, "code", "perturbation"), "p_value"] == pytest.approx(sps.wilcoxon(base, pert).pvalue)
    assert cells.loc[(1, "code", "perturbation_vs_control"), "p_value"] == pytest.approx(sps.wilcoxon(ctrl, pert).pvalue)
    # mean θ-averaged difference / M(f, a) is exactly Φ
    phi = impact.influence_matrix(impact.ais(scores)).set_index(["cluster", "ability"])
    assert cells.loc[(1, "code", "perturbation"), "mean_difference"] / base.mean() == pytest.approx(phi.loc[(1, "code"), "phi"])


# -- multiple comparisons ---------------------------------------------------------------------
@pytest.mark.parametrize("method, reference", [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjust_pvalues_matches_statsmodels(method, reference):
    rng = np.random.default_rng(0)
    for size in (1, 5, 37):
        p = np.concatenate([rng.uniform(0, 0.05, size), rng.uniform(0, 1, size), [0.01, 0.01]])  # ties included
        expected = multipletests(p, method=reference)[1]
        np.testing.assert_allclose(stats.adjust_pvalues(p, method), expected, rtol=1e-12)


def test_adjust_pvalues_keeps_nan_out_of_the_family():
    p = np.array([0.01, np.nan, 0.04, 0.03])
    adjusted = stats.adjust_pvalues(p, "holm")
    assert np.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2, 3]], multipletests(p[[0, 2, 3]], method="holm")[1])
    with pytest.raises(RephelpersError, match="correction"):
        stats.adjust_pvalues(p, "bonferroni")


# -- bootstrap ----------------------------------------------------------------------------------
def test_bootstrap_weights_resample_within_strata():
    strata = np.array(["a"] * 3 + ["b"] * 5)
    w = stats.bootstrap_weights(strata, n_boot=50, seed=4)
    assert w.shape == (50, 8)
    np.testing.assert_array_equal(w[:, :3].sum(axis=1), 3)
    np.testing.assert_array_equal(w[:, 3:].sum(axis=1), 5)
    np.testing.assert_array_equal(w, stats.bootstrap_weights(strata, n_boot=50, seed=4))
    assert not np.array_equal(w, stats.bootstrap_weights(strata, n_boot=50, seed=5))


def test_bootstrap_mean_ci_covers_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    true_mean = 1.5
    samples = rng.normal(true_mean, 2.0, size=(200, 60))  # 200 independent data sets of 60 items
    strata = np.repeat([0, 1, 2], 20)
    mean, low, high = stats.bootstrap_mean_ci(samples, strata, n_boot=1000, alpha=0.05, seed=1)
    np.testing.assert_allclose(mean, samples.mean(axis=1))
    coverage = np.mean((low <= true_mean) & (true_mean <= high))
    assert 0.90 <= coverage <= 0.99, coverage


def test_bootstrap_ci_of_ais_covers_the_true_value():
    # Baseline scores every item 10; each cluster's perturbed items are N(8, 1) draws, so the
    # true AIS is 1 - 8/10 = 0.2 and each cluster is an independent data set.
    rng = np.random.default_rng(2)
    n_clusters, n_items = 200, 40
    rows = [pd.DataFrame({"config_id": "base", "cluster": -1, "score": np.full(n_items, 10.0), "item": range(n_items)})]
    for k in range(n_clusters):
        rows.append(pd.DataFrame({"config_id": f"k{k}", "cluster": k, "score": rng.normal(8, 1, n_items), "item": range(n_items)}))
    frame = pd.concat(rows, ignore_index=True).assign(
        control=False, kind="noise", magnitude=1.0, layer=15, task="t", ability="a", interventions="[]", metric="x"
    )
    boot = stats.bootstrap_ci(frame, n_boot=1000, alpha=0.05, seed=0)
    phi = boot.phi.set_index("cluster")
    coverage = np.mean((phi["phi_low"] <= 0.2) & (0.2 <= phi["phi_high"]))
    assert 0.90 <= coverage <= 0.99, coverage
    # AIS point estimates equal impact.ais; the single θ makes the AIS and Φ intervals equal
    merged = boot.ais.merge(impact.ais(frame), on="config_id", suffixes=("", "_hat"))
    np.testing.assert_allclose(merged["ais"], merged["ais_hat"])
    np.testing.assert_allclose(boot.ais.set_index("cluster")["ais_low"].sort_index(), phi["phi_low"].sort_index())
    assert phi["phi_control_low"].isna().all()  # no controls were run


# -- regression ---------------------------------------------------------------------------------
def planted_rows(n: int = 150, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = pd.DataFrame({
        "cluster_size": rng.integers(20, 400, n).astype(float),
        "probe_accuracy": rng.uniform(0.5, 1.0, n),
        "layer": rng.choice([3, 9, 15, 21], n).astype(float),
    })
    rows["ace"] = 0.05 + 0.001 * rows.cluster_size - 0.3 * rows.probe_accuracy + 0.01 * rows.layer + rng.normal(0, 0.02, n)
    return rows


def test_ace_regression_recovers_planted_coefficients():
    rows = planted_rows()
    table = stats.ace_regression(rows).set_index("term")
    planted = {"const": 0.05, "cluster_size": 0.001, "probe_accuracy": -0.3, "layer": 0.01}
    for term, value in planted.items():
        assert abs(table.loc[term, "estimate"] - value) < 4 * table.loc[term, "std_error"], term
        assert table.loc[term, "ci_low"] < table.loc[term, "estimate"] < table.loc[term, "ci_high"]
    X = np.column_stack([np.ones(len(rows)), rows[["cluster_size", "probe_accuracy", "layer"]].to_numpy()])
    beta, *_ = np.linalg.lstsq(X, rows["ace"].to_numpy(), rcond=None)
    np.testing.assert_allclose(table["estimate"].to_numpy(), beta, rtol=1e-8)
    assert table.attrs["n_obs"] == len(rows) and table.attrs["r_squared"] > 0.9


def test_ace_regression_refuses_too_few_rows_and_constant_predictors():
    rows = planted_rows(n=4)
    with pytest.raises(RephelpersError, match="more observations than parameters"):
        stats.ace_regression(rows)
    rows = planted_rows().assign(layer=15.0)
    assert stats.ace_regression(rows).term.tolist() == ["const", "cluster_size", "probe_accuracy"]
    with pytest.raises(RephelpersError, match="constant"):
        stats.ace_regression(rows, predictors=["cluster_size", "layer"])
    with pytest.raises(RephelpersError, match="not columns"):
        stats.ace_regression(rows, predictors=["size"])


# -- the influence table ----------------------------------------------------------------------
def test_influence_table_flags_the_planted_cells(scores):
    table = findings.influence_table(scores, n_boot=300, alpha=0.05, correction="holm", seed=0)
    assert len(table) == 2 * 3 and not table.duplicated(["cluster", "ability"]).any()
    cell = table.set_index(["cluster", "ability"])
    assert cell.loc[(0, "math"), "significant"] and cell.loc[(1, "code"), "significant"]
    assert cell.loc[(0, "math"), "phi_low"] > 0 and cell.loc[(0, "math"), "phi_low"] <= cell.loc[(0, "math"), "phi"] <= cell.loc[(0, "math"), "phi_high"]
    assert cell.loc[(0, "math"), "phi_minus_control"] > 0
    # One control draw cannot rank Φ below p = 1/2: never "beyond the controls".
    assert not table["exceeds_controls"].any() and (table["min_p_vs_controls"] == 0.5).all()
    assert not cell.loc[(0, "icl"), "significant"] and not cell.loc[(1, "math"), "significant"]
    assert cell.loc[(0, "math"), "top_ability"] == "math" and cell.loc[(1, "code"), "top_ability"] == "code"
    np.testing.assert_allclose(table["p_adjusted"], multipletests(table["p_value"], method="holm")[1])
    phi = impact.influence_matrix(impact.ais(scores)).set_index(["cluster", "ability"])
    np.testing.assert_allclose(cell["phi"], phi.loc[cell.index, "phi"])
    np.testing.assert_allclose(cell["phi_minus_control"], cell["phi"] - cell["phi_control"])
    bh = findings.influence_table(scores, n_boot=50, correction="bh")
    np.testing.assert_allclose(bh["p_adjusted"], multipletests(bh["p_value"], method="fdr_bh")[1])


def test_influence_table_validates_parameters(scores):
    with pytest.raises(RephelpersError, match="correction"):
        findings.influence_table(scores, correction="bonferroni")
    with pytest.raises(RephelpersError, match="alpha"):
        findings.influence_table(scores, alpha=1.5)


def test_exceeds_controls_needs_the_effect_beyond_the_draw_distribution():
    scores = impact.simulate_scores({(0, "math"): 0.8, (1, "math"): 0.0}, {"math": 0.8}, items_per_task=60,
                                    magnitudes=(1.0,), n_controls=59, control_effect=0.1, draw_sd=0.05, seed=4)
    table = findings.influence_table(scores, n_boot=50).set_index("cluster")
    assert table.loc[0, "p_vs_controls"] == pytest.approx(1 / 60) and table.loc[0, "exceeds_controls"]
    assert not table.loc[1, "exceeds_controls"] and table.loc[1, "p_vs_controls"] > 0.5
    draws = impact.control_draws(impact.ais(scores))
    k0 = draws[draws.cluster == 0]["phi_draw"]
    assert table.loc[0, "control_sd"] == pytest.approx(k0.std(ddof=1))
    assert table.loc[0, "verdict"] == "finding (specificity not checked)"
    gate = pd.DataFrame({"cluster": [0, 1], "arm": "perturbation", "specific": [False, True],
                         "specificity_verdict": ["non-specific damage", "specific"]})
    gated = findings.influence_table(scores, n_boot=50, specificity=gate).set_index("cluster")
    assert gated.loc[0, "verdict"] == "non-specific damage"


def test_lower_is_better_metric_reads_a_worse_model_as_positive_ais():
    scores = impact.simulate_scores({(0, "bias"): 0.5}, {"bias": 0.6}, items_per_task=80, magnitudes=(1.0,),
                                    higher_is_better={"bias": False}, chance={"bias": 0.5}, seed=2)
    # In the simulation the perturbation lowers the score; for a lower-is-better metric that is an improvement.
    table = impact.ais(scores)
    row = table[~table.control].iloc[0]
    assert row["perturbed_score"] < row["baseline_score"]
    assert row["ais"] < 0 and row["delta"] < 0
    assert row["ais"] == pytest.approx((row["perturbed_score"] - row["baseline_score"]) / row["baseline_score"])
    influence = findings.influence_table(scores, n_boot=50)
    assert influence["phi"].iloc[0] < 0 and influence["phi_low"].iloc[0] < 0
    assert np.isnan(impact.selectivity(impact.influence_matrix(table))["selectivity"].iloc[0])


def test_baselines_below_the_floor_are_not_read():
    scores = impact.simulate_scores({(0, "math"): 0.5}, {"math": 0.3, "code": 0.8}, items_per_task=40,
                                    chance={"math": 0.25, "code": 0.25}, seed=1)
    table = findings.influence_table(scores, n_boot=100).set_index("ability")
    assert not table.loc["math", "readable"] and table.loc["math", "floor"] == pytest.approx(0.35)
    assert np.isnan(table.loc["math", "phi"]) and np.isnan(table.loc["math", "phi_low"])
    assert np.isnan(table.loc["math", "p_adjusted"]) and table.loc["math", "verdict"] == "baseline below floor"
    assert np.isfinite(table.loc["math", "delta"])
    assert table.loc["code", "readable"] and np.isfinite(table.loc["code", "phi"])
    assert "below the floor" in findings.influence_summary(findings.influence_table(scores, n_boot=20))


def test_ace_regression_is_per_cluster_and_says_when_clusters_are_too_few():
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"cluster": k, "task": t, "ace": rng.normal(), "cluster_size": float(10 + k),
                          "probe_accuracy": rng.uniform()} for k in range(5) for t in range(6)])
    table = stats.ace_regression(rows)
    assert table.attrs["n_obs"] == 5 and table.attrs["unit"] == "cluster"
    assert table.attrs["df_resid"] == 2 and "too few clusters" in table.attrs["note"]
    assert table["p_value"].isna().all() and table["estimate"].notna().all()
    means = rows.groupby("cluster")[["ace", "cluster_size", "probe_accuracy"]].mean()
    X = np.column_stack([np.ones(5), means[["cluster_size", "probe_accuracy"]].to_numpy()])
    beta, *_ = np.linalg.lstsq(X, means["ace"].to_numpy(), rcond=None)
    np.testing.assert_allclose(table["estimate"].to_numpy(), beta, rtol=1e-8)


def test_ace_regression_with_fewer_clusters_than_parameters_reports_instead_of_failing():
    rows = pd.DataFrame([{"cluster": k, "task": t, "ace": float(k + t), "cluster_size": float(10 + k),
                          "probe_accuracy": 0.5 + 0.1 * k * k} for k in range(3) for t in range(2)])
    table = stats.ace_regression(rows)
    assert table["estimate"].isna().all() and table.attrs["n_obs"] == 3
    assert "too few clusters to fit" in table.attrs["note"]


def test_repeated_control_draws_count_once():
    """Three draws requested for cluster 0, two of them the same dimension set: the control
    distribution has two members, so the smallest rank p is 1/3, not 1/4."""
    import json

    scores = impact.simulate_scores({(0, "math"): 0.0, (1, "math"): 0.0}, {"math": 0.7}, items_per_task=40,
                                    magnitudes=(1.0,), n_controls=3, seed=3)

    def recorded(row) -> str:
        if row.cluster < 0:
            return "[]"
        dims = [row.cluster] if not row.control else ([100, 101] if row.cluster == 0 and row.draw < 2 else [200 + row.draw])
        return json.dumps([{"layer": 15, "component": "resid", "positions": "all",
                            "perturbation": {"kind": "ablate", "dims": dims, "strength": 1.0}}])

    configs = scores.drop_duplicates("config_id")
    by_config = {r.config_id: recorded(r) for r in configs.itertuples(index=False)}
    scores = scores.assign(interventions=scores["config_id"].map(by_config))
    kept, counts = findings.distinct_control_draws(scores)
    counts = counts.set_index(["cluster", "ability"])[["n_draws_requested", "n_draws_distinct"]]  # per cell
    assert counts.loc[(0, "math")].tolist() == [3, 2] and counts.loc[(1, "math")].tolist() == [3, 3]
    assert sorted(kept[kept.control & (kept.cluster == 0)].draw.unique()) == [0, 2]
    assert len(kept) == len(scores) - scores[scores.control & (scores.cluster == 0) & (scores.draw == 1)].shape[0]
    table = findings.influence_table(scores, n_boot=50).set_index("cluster")
    assert (table.loc[0, "n_draws"], table.loc[0, "n_draws_requested"]) == (2, 3)
    assert table.loc[0, "min_p_vs_controls"] == pytest.approx(1 / 3) and table.loc[1, "n_draws"] == 3
    assert "cluster 0: 3 control draws requested, 2 distinct" in findings.influence_summary(findings.influence_table(scores, n_boot=50))
    # placeholders that identify nothing (hand-made tables) are never merged
    untouched, _ = findings.distinct_control_draws(scores.assign(interventions="[]"))
    assert len(untouched) == len(scores)
    untouched, _ = findings.distinct_control_draws(scores.drop(columns="interventions"))  # not a required column
    assert len(untouched) == len(scores)


def test_controls_smaller_than_their_perturbation_are_named_next_to_the_numbers():
    scores = impact.simulate_scores({(0, "math"): 0.0, (1, "math"): 0.0}, {"math": 0.7}, items_per_task=30,
                                    magnitudes=(1.0,), n_controls=2, seed=1)
    rows = []
    for cluster, ratios in {0: [0.66, 0.66], 1: [1.05, 0.95]}.items():
        rows.append({"cluster": cluster, "arm": "perturbation", "specific": False,
                     "specificity_verdict": "non-specific damage", "edit_ratio": 1.0, "edit_matched": True})
        rows += [{"cluster": cluster, "arm": "control", "specific": False, "specificity_verdict": "non-specific damage",
                  "edit_ratio": r, "edit_matched": 0.8 <= r <= 1.25} for r in ratios]
    table = findings.influence_table(scores, n_boot=50, specificity=pd.DataFrame(rows))
    by_cluster = table.drop_duplicates("cluster").set_index("cluster")
    assert by_cluster.loc[0, "control_edit_ratio"] == pytest.approx(0.66) and by_cluster.loc[0, "controls_matched_share"] == 0
    assert by_cluster.loc[1, "controls_matched_share"] == 1
    summary = findings.influence_summary(table)
    assert "cluster 0: its controls change the state 0.66× as much" in summary and "cluster 1: its controls" not in summary
    assert findings.influence_table(scores, n_boot=50)["controls_matched_share"].isna().all()


def test_each_cell_is_gated_by_the_specificity_of_the_settings_its_phi_comes_from():
    """Cluster 0: stage 04 finds its magnitude-1 setting specific and its magnitude-2 setting
    non-specific; its Φ is split into one row per setting, each gated by its own verdict.
    Cluster 1's two settings are both specific: one row, Φ over all of Θ_1."""
    scores = impact.simulate_scores({(0, "math"): 0.8, (1, "math"): 0.8}, {"math": 0.8}, items_per_task=60,
                                    magnitudes=(1.0, 2.0), n_controls=59, control_effect=0.05, draw_sd=0.02, seed=4)
    rows = []
    for cluster, verdicts in {0: {1.0: "specific", 2.0: "non-specific damage"}, 1: {1.0: "specific", 2.0: "specific"}}.items():
        for magnitude, verdict in verdicts.items():
            rows.append({"cluster": cluster, "kind": "ablate", "magnitude": magnitude, "layer": 15, "component": "resid",
                         "arm": "perturbation", "specific": verdict == "specific", "specificity_verdict": verdict})
    table = findings.influence_table(scores, n_boot=50, specificity=pd.DataFrame(rows))
    assert len(table) == 3
    k0 = table[table.cluster == 0].set_index("phi_settings")
    assert list(k0.index) == ["ablate:m1@L15", "ablate:m2@L15"]
    assert k0.loc["ablate:m1@L15", "specificity_verdict"] == "specific (ablate:m1@L15)"
    assert k0.loc["ablate:m2@L15", "specificity_verdict"] == "non-specific damage (ablate:m2@L15)"
    assert k0.loc["ablate:m1@L15", "verdict"] == "cluster-specific finding"
    assert k0.loc["ablate:m2@L15", "verdict"] == "non-specific damage"
    assert "cluster 0 (ablate:m2@L15) → math" in findings.influence_summary(table)
    # Each split row's Φ and control draws are those of its own setting only (a plain mean of AIS).
    a = impact.ais(scores)
    for magnitude, setting in ((1.0, "ablate:m1@L15"), (2.0, "ablate:m2@L15")):
        mine = a[(a.cluster == 0) & (a.magnitude == magnitude)]
        assert k0.loc[setting, "phi"] == pytest.approx(mine.loc[~mine.control, "ais"].mean())
        assert k0.loc[setting, "phi_control"] == pytest.approx(mine.loc[mine.control, "ais"].mean())
        assert k0.loc[setting, "n_draws"] == 59 and k0.loc[setting, "n_configs"] == 1
    k1 = table[table.cluster == 1].iloc[0]
    assert k1["phi_settings"] == "ablate:m1@L15; ablate:m2@L15" and k1["verdict"] == "cluster-specific finding"
    assert k1["specificity_verdict"] == "specific (ablate:m1@L15; ablate:m2@L15)"
    assert k1["phi"] == pytest.approx(impact.influence_matrix(a).set_index("cluster").loc[1, "phi"])
    # A setting stage 04 did not check is named as such, and its cluster split from the checked one.
    partial = findings.influence_table(scores, n_boot=20, specificity=pd.DataFrame(rows[:1] + rows[2:]))
    unchecked = partial[(partial.cluster == 0) & (partial.phi_settings == "ablate:m2@L15")].iloc[0]
    assert unchecked["specificity_verdict"] == "not checked (ablate:m2@L15)" and unchecked["specific"] is None
    assert unchecked["verdict"] == "finding (specificity not checked)"


def test_a_primary_family_is_corrected_on_its_own_and_mde_vs_controls_is_reported():
    scores = impact.simulate_scores({(k, a): 0.0 for k in range(3) for a in ("arith", "code", "icl")},
                                    {"arith": 0.7, "code": 0.8, "icl": 0.75}, items_per_task=20, magnitudes=(1.0,),
                                    n_controls=79, control_effect=0.1, draw_sd=0.05, seed=6)
    plain = findings.influence_table(scores, n_boot=10)
    assert (plain["family"] == "all").all()
    np.testing.assert_allclose(plain["p_vs_controls_adjusted"],
                               multipletests(plain["p_vs_controls"], method="fdr_bh")[1])
    table = findings.influence_table(scores, n_boot=10, primary="diagonal")
    diagonal = {(0, "arith"), (1, "code"), (2, "icl")}
    is_primary = [(r.cluster, r.ability) in diagonal for r in table.itertuples(index=False)]
    assert list(table["family"]) == ["primary" if p else "exploratory" for p in is_primary]
    for family, rows in table.groupby("family"):
        np.testing.assert_allclose(rows["p_vs_controls_adjusted"], multipletests(rows["p_vs_controls"], method="fdr_bh")[1])
    assert stats.primary_cells({0: "arith", 1: "code", 2: ["icl"]}, [0, 1, 2], ["arith", "code", "icl"]) == diagonal
    # 79 draws: no p passes among 9 cells (needs 180), but it can among the 3 primary ones (needs 60).
    assert plain["mde_vs_controls"].isna().all() and "at least 180 draws" in findings.influence_summary(plain)
    primary = table[table.family == "primary"]
    expected = [stats.minimum_detectable_difference(r.control_sd, 79, 0.05, 0.8, 3) for r in primary.itertuples()]
    np.testing.assert_allclose(primary["mde_vs_controls"], expected)
    assert primary["mde_vs_controls"].notna().all()
    with pytest.raises(RephelpersError, match="not in the table"):
        findings.influence_table(scores, n_boot=10, primary=[(7, "arith")])
    with pytest.raises(RephelpersError, match="diagonal"):
        findings.influence_table(scores[scores.ability != "icl"], n_boot=10, primary="diagonal")


def test_draw_cap_gives_the_design_its_cap_in_min_p_and_mde():
    scores = impact.simulate_scores({(k, a): 0.0 for k in range(3) for a in ("arith", "code", "icl")},
                                    {"arith": 0.7, "code": 0.8, "icl": 0.75}, items_per_task=20, magnitudes=(1.0,),
                                    n_controls=9, control_effect=0.1, draw_sd=0.05, seed=6)
    plain = findings.influence_table(scores, n_boot=10)
    capped = findings.influence_table(scores, n_boot=10, draw_cap=300)
    # 9 draws: no p can pass BH over 9 cells, so no mde; a cap of 300 could (1/301 < 0.05/9)
    assert plain["mde_vs_controls"].isna().all()
    np.testing.assert_allclose(plain["min_p_vs_controls"], 1 / 10)
    np.testing.assert_allclose(capped["min_p_vs_controls"], 1 / 301)
    expected = [stats.minimum_detectable_difference(r.control_sd, 300, 0.05, 0.8, 9) for r in capped.itertuples()]
    np.testing.assert_allclose(capped["mde_vs_controls"], expected)
    assert capped["mde_vs_controls"].notna().all()
    # the p-values themselves are the draws' own: the cap changes what the design could detect, not what it read
    np.testing.assert_allclose(capped["p_vs_controls"], plain["p_vs_controls"])
    with pytest.raises(RephelpersError, match="draw_cap must be None or a positive integer"):
        findings.influence_table(scores, n_boot=10, draw_cap=0)
    # Controls with no freedom (cluster 0's draws all the same set) stop at their distinct draws, not the cap.
    def recorded(row):
        dims = [0] if (row.control and row.cluster == 0) else [int(row.draw) + 1] if row.control else [99]
        return json.dumps([{"perturbation": {"kind": "ablate", "dims": dims}, "layer": 15}])
    repeated = scores.assign(interventions=[recorded(r) for r in scores.itertuples(index=False)])
    table = findings.influence_table(repeated, n_boot=10, draw_cap=300)
    own = table[table.cluster == 0]
    assert (own["n_draws"] == 1).all() and (own["n_draws_requested"] == 9).all()
    np.testing.assert_allclose(own["min_p_vs_controls"], 1 / 2)
    np.testing.assert_allclose(table.loc[table.cluster != 0, "min_p_vs_controls"], 1 / 301)


def test_control_cap_needs_rounds_and_a_positive_integer():
    assert control_cap_draws(20, None, None) == 20 and control_cap_draws(20, 300, 5) == 300
    with pytest.raises(RephelpersError, match="control_rounds is None"):
        control_cap_draws(20, 300, None)
    for bad in (0, -3, 2.5, True, "300"):
        with pytest.raises(RephelpersError, match="control_cap must be None or a positive integer"):
            control_cap_draws(20, bad, 5)


def test_sequential_control_p_reads_the_draws_in_draw_order():
    scores = impact.simulate_scores({(0, "math"): 0.0, (1, "math"): 0.0}, {"math": 0.7}, items_per_task=30,
                                    magnitudes=(1.0,), n_controls=40, control_effect=0.1, draw_sd=0.05,
                                    target_like_control=True, seed=8)
    rank = findings.influence_table(scores, n_boot=5).set_index("cluster")
    table = findings.influence_table(scores, n_boot=5, stop_after_exceedances=2).set_index("cluster")
    a = impact.ais(scores)
    draws, phi = impact.control_draws(a), impact.influence_matrix(a).set_index("cluster")
    for k in (0, 1):
        ordered = draws[draws.cluster == k].sort_values("draw")["phi_draw"].to_numpy()
        p, used = stats.sequential_p(phi.loc[k, "phi"], ordered, 2)
        assert table.loc[k, "p_vs_controls"] == pytest.approx(p) and table.loc[k, "n_draws_used"] == used
        assert rank.loc[k, "n_draws_used"] == rank.loc[k, "n_draws"] == 40
    assert table["n_draws_used"].min() < 40  # a null cell stops at its second exceedance
    with pytest.raises(RephelpersError, match="stop_after_exceedances"):
        findings.influence_table(scores, stop_after_exceedances=0)
