"""AIS, Φ, ACE, selectivity, dose-response and flipped items against hand computations."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from rephelpers.influence import impact
from rephelpers.errors import RephelpersError

# Baseline and three perturbed configs of cluster 0 (two θ and one control) on two tasks:
# task "add" (ability "math", 4 items) and task "py" (ability "code", 2 items).
BASE = {"add": [1, 1, 1, 0], "py": [1, 1]}
CONFIGS = {
    # config_id: (cluster, control, magnitude, {task: item scores})
    "base": (-1, False, 0.0, BASE),
    "k0-m1": (0, False, 1.0, {"add": [1, 0, 1, 0], "py": [1, 1]}),
    "k0-m2": (0, False, 2.0, {"add": [0, 0, 1, 1], "py": [0, 1]}),
    "k0-ctrl": (0, True, 2.0, {"add": [1, 1, 1, 0], "py": [1, 0]}),
}
MARGINS = {"base": 2.0, "k0-m1": 1.5, "k0-m2": 0.5, "k0-ctrl": 2.0}


def tiny_scores() -> pd.DataFrame:
    rows = []
    for config_id, (cluster, control, magnitude, by_task) in CONFIGS.items():
        for task, values in by_task.items():
            for item, score in enumerate(values):
                rows.append({
                    "config_id": config_id, "cluster": cluster, "control": control,
                    "kind": "none" if cluster == -1 else "ablate", "magnitude": magnitude,
                    "layer": -1 if cluster == -1 else 15, "interventions": json.dumps([]),
                    "task": task, "ability": "math" if task == "add" else "code", "item": item,
                    "metric": "acc", "score": float(score),
                    # item 0 of "add" has no margin under k0-m2: ace_margin must skip it
                    "margin": np.nan if (config_id == "k0-m2" and task == "add" and item == 0)
                    else MARGINS[config_id] + item,
                })
    return pd.DataFrame(rows)


def test_ability_scores_are_item_means():
    ab = impact.ability_scores(tiny_scores()).set_index(["config_id", "ability"])
    assert ab.loc[("base", "math"), "score"] == pytest.approx(3 / 4)
    assert ab.loc[("k0-m1", "math"), "score"] == pytest.approx(2 / 4)
    assert ab.loc[("k0-m2", "code"), "score"] == pytest.approx(1 / 2)
    assert ab.loc[("base", "math"), "n_items"] == 4


def test_ais_matches_hand_computation():
    a = impact.ais(tiny_scores()).set_index(["config_id", "ability"])
    # AIS = (M(f,a) - M(f̂,a)) / M(f,a)
    assert a.loc[("k0-m1", "math"), "ais"] == pytest.approx((3 / 4 - 2 / 4) / (3 / 4))
    assert a.loc[("k0-m2", "math"), "ais"] == pytest.approx((3 / 4 - 2 / 4) / (3 / 4))
    assert a.loc[("k0-m1", "code"), "ais"] == pytest.approx(0.0)
    assert a.loc[("k0-m2", "code"), "ais"] == pytest.approx((1 - 1 / 2) / 1)
    assert a.loc[("k0-ctrl", "code"), "ais"] == pytest.approx(0.5)
    assert a.loc[("k0-ctrl", "math"), "ais"] == pytest.approx(0.0)
    assert bool(a.loc[("k0-ctrl", "math"), "control"])
    assert "base" not in a.index.get_level_values(0)


def test_influence_matrix_averages_over_theta_and_controls():
    phi = impact.influence_matrix(impact.ais(tiny_scores())).set_index(["cluster", "ability"])
    # Φ = mean over θ of AIS; math: (1/3 + 1/3)/2, code: (0 + 1/2)/2
    assert phi.loc[(0, "math"), "phi"] == pytest.approx(1 / 3)
    assert phi.loc[(0, "code"), "phi"] == pytest.approx(0.25)
    assert phi.loc[(0, "code"), "phi_control"] == pytest.approx(0.5)
    assert phi.loc[(0, "code"), "phi_minus_control"] == pytest.approx(-0.25)
    assert phi.loc[(0, "math"), "n_configs"] == 2
    assert phi.loc[(0, "math"), "n_control_configs"] == 1
    wide = impact.phi_wide(phi.reset_index())
    assert wide.loc[0, "code"] == pytest.approx(0.25) and list(wide.columns) == ["code", "math"]


def test_phi_is_one_mean_over_configs_for_the_table_and_the_bootstrap():
    # config_mean is the one definition of Φ's average: NaN configs left out, NaN if none is left.
    rows = np.array([[0.2, np.nan, 0.4], [np.nan, np.nan, np.nan], [1.0, 2.0, 6.0]])
    np.testing.assert_allclose(impact.config_mean(rows), [0.3, np.nan, 3.0])
    np.testing.assert_allclose(impact.config_mean(rows, [2]), [0.4, np.nan, 6.0])
    assert np.isnan(impact.config_mean(rows, [])).all()
    # influence_matrix and control_draws agree with an independent pandas groupby mean
    rng = np.random.default_rng(0)
    a = impact.ais(tiny_scores())
    a["ais"] = np.where(rng.random(len(a)) < 0.2, np.nan, rng.normal(size=len(a)))
    phi = impact.influence_matrix(a).set_index(["cluster", "ability"])
    expected = a[~a.control].groupby(["cluster", "ability"])["ais"].mean()
    np.testing.assert_allclose(phi.loc[expected.index, "phi"], expected, rtol=1e-12)
    draws = impact.control_draws(a).set_index(["cluster", "ability", "draw"])["phi_draw"]
    expected = a[a.control].groupby(["cluster", "ability", "draw"])["ais"].mean()
    np.testing.assert_allclose(draws.loc[expected.index], expected, rtol=1e-12)


def test_zero_baseline_gives_nan_with_note_not_an_error():
    scores = tiny_scores()
    scores.loc[scores.task == "py", "score"] = 0.0  # M(f, code) = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warning either
        a = impact.ais(scores)
        phi = impact.influence_matrix(a)
    code = a[a.ability == "code"]
    assert code["ais"].isna().all()
    assert code["note"].str.contains("below the floor").all()
    assert (a.loc[a.ability == "math", "note"] == "").all()
    code_cell = phi.set_index(["cluster", "ability"]).loc[(0, "code")]
    assert code_cell[["phi", "phi_control"]].isna().all() and code_cell["n_configs"] == 2


def test_ace_on_scores_and_margins():
    ace = impact.ace(tiny_scores()).set_index(["config_id", "task"])
    # ACE = mean over items of (baseline - perturbed)
    assert ace.loc[("k0-m1", "add"), "ace"] == pytest.approx(np.mean([0, 1, 0, 0]))
    assert ace.loc[("k0-m2", "add"), "ace"] == pytest.approx(np.mean([1, 1, 0, -1]))
    assert ace.loc[("k0-m2", "py"), "ace"] == pytest.approx(0.5)
    # margins: base 2+i vs k0-m1 1.5+i -> 0.5 everywhere; k0-m2 skips its NaN item 0
    assert ace.loc[("k0-m1", "add"), "ace_margin"] == pytest.approx(0.5)
    assert ace.loc[("k0-m2", "add"), "ace_margin"] == pytest.approx(1.5)
    assert ace.loc[("k0-m2", "add"), "n_margin_items"] == 3
    assert ace.loc[("k0-m1", "add"), "n_items"] == 4


def test_ace_relates_to_ais():
    # With every item weighted equally, AIS(k,a,θ) = Σ_T n_T ACE_T / (n_a M(f,a)).
    scores = tiny_scores()
    ace = impact.ace(scores)
    a = impact.ais(scores).set_index(["config_id", "ability"])
    for (config_id, ability), g in ace.groupby(["config_id", "ability"]):
        weighted = (g["ace"] * g["n_items"]).sum() / g["n_items"].sum()
        assert a.loc[(config_id, ability), "ais"] == pytest.approx(weighted / a.loc[(config_id, ability), "baseline_score"])


def test_selectivity_max_share_and_entropy():
    phi = pd.DataFrame({
        "cluster": [0, 0, 0, 1, 1, 1],
        "ability": ["a", "b", "c"] * 2,
        "phi": [0.3, 0.1, -0.2, -0.1, 0.0, np.nan],
    })
    sel = impact.selectivity(phi).set_index("cluster")
    p = np.array([0.75, 0.25])
    assert sel.loc[0, "selectivity"] == pytest.approx(0.75)
    assert sel.loc[0, "selectivity_entropy"] == pytest.approx(1 - (-(p * np.log(p)).sum()) / math.log(3))
    assert sel.loc[0, "top_ability"] == "a"
    assert math.isnan(sel.loc[1, "selectivity"]) and math.isnan(sel.loc[1, "selectivity_entropy"])
    one_hot = pd.DataFrame({"cluster": [2, 2], "ability": ["a", "b"], "phi": [0.0, 0.4]})
    assert impact.selectivity(one_hot).loc[0, "selectivity_entropy"] == pytest.approx(1.0)


def test_dose_response_has_both_arms_and_the_baseline():
    dose = impact.dose_response(tiny_scores())
    math_rows = dose[(dose.ability == "math")].set_index(["arm", "magnitude"])
    assert math_rows.loc[("perturbation", 1.0), "score"] == pytest.approx(0.5)
    assert math_rows.loc[("perturbation", 2.0), "score"] == pytest.approx(0.5)
    assert math_rows.loc[("control", 2.0), "score"] == pytest.approx(0.75)
    assert (dose.loc[dose.ability == "code", "baseline_score"] == 1.0).all()
    # another dose column, constant per config: k0-m1 and k0-m2 share sigma, so they average
    sigma = tiny_scores().assign(sigma=lambda s: np.where(s.cluster >= 0, 0.5, 0.0))
    by_sigma = impact.dose_response(sigma, magnitude_col="sigma")
    math_sigma = by_sigma[(by_sigma.ability == "math") & (by_sigma.arm == "perturbation")]
    assert math_sigma[["sigma", "score", "n_configs"]].values.tolist() == [[0.5, 0.5, 2]]
    with pytest.raises(RephelpersError, match="varies within a config"):
        impact.dose_response(sigma.assign(sigma=range(len(sigma))), magnitude_col="sigma")


def test_flipped_items_lists_changed_items():
    flips = impact.flipped_items(tiny_scores(), 0, "math", theta="k0-m2")
    assert flips[["task", "item", "direction"]].values.tolist() == [
        ["add", 0, "lost"], ["add", 1, "lost"], ["add", 3, "gained"]
    ]
    everything = impact.flipped_items(tiny_scores(), 0, "math", theta={"magnitude": 1.0}, only_changed=False)
    assert len(everything) == 4 and (everything.config_id == "k0-m1").all()
    control = impact.flipped_items(tiny_scores(), 0, "code", control=True)
    assert control[["item", "direction"]].values.tolist() == [[1, "lost"]]
    with pytest.raises(RephelpersError, match="no perturbation config of cluster 0"):
        impact.flipped_items(tiny_scores(), 0, "math", theta="nope")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s.drop(columns="ability"), "missing columns"),
        (lambda s: pd.concat([s, s.assign(config_id="base2")[s.config_id == "base"]]), "exactly one unperturbed"),
        (lambda s: pd.concat([s, s.iloc[[5]]]), "repeat a"),
        (lambda s: s.drop(index=s.index[(s.config_id == "k0-m1") & (s.task == "add")][:1]), "covers 3/4"),
        (lambda s: pd.concat([s, s[s.config_id == "k0-m1"].iloc[:1].assign(item=99)]), "rows the baseline lacks"),
        (lambda s: s.assign(score=s.score.where(s.index != 7, np.nan)), "NaN/inf"),
        (lambda s: s.assign(magnitude=s.magnitude.where(s.index != 7, 9.0)), "vary within one config_id"),
    ],
)
def test_bad_scores_are_refused_with_a_fix(corrupt, message):
    with pytest.raises(RephelpersError, match=message):
        impact.ais(corrupt(tiny_scores()))


def test_planted_influence_is_recovered():
    # Planted: cluster 0 loses 60% of "math", cluster 1 loses 40% of "code" at the top magnitude;
    # Φ averages magnitudes 1 and 2, so E[Φ] = effect * (1/2 + 1) / 2.
    effects = {(0, "math"): 0.6, (1, "code"): 0.4}
    scores = impact.simulate_scores(effects, {"math": 0.8, "code": 0.7}, items_per_task=1500, seed=3)
    phi = impact.influence_matrix(impact.ais(scores)).set_index(["cluster", "ability"])
    for (k, a), effect in effects.items():
        assert phi.loc[(k, a), "phi"] == pytest.approx(0.75 * effect, abs=0.04)
    assert abs(phi.loc[(0, "code"), "phi"]) < 1e-12 and abs(phi.loc[(1, "math"), "phi"]) < 1e-12
    assert phi["phi_control"].abs().max() < 1e-12


def test_ace_covariates_and_probe_accuracy():
    ace = impact.ace(tiny_scores())
    subspaces = [
        {"layer": 15, "cluster": 0, "probe": {"kind": "l2", "coef": [0.5, -1.0], "intercept": 0.1, "accuracy": 0.9},
         "selector_accuracy": None},
        {"layer": 3, "cluster": 0, "probe": None, "selector_accuracy": 0.7},
    ]
    assert impact.probe_accuracy(subspaces) == {(15, 0): 0.9, (3, 0): 0.7}
    rows = impact.ace_covariates(ace, cluster_size={0: 42}, probe_accuracy=impact.probe_accuracy(subspaces))
    assert not rows["control"].any()
    assert (rows["cluster_size"] == 42).all() and (rows["probe_accuracy"] == 0.9).all()
    per_cluster = impact.ace_covariates(ace, probe_accuracy={0: 0.5})
    assert (per_cluster["probe_accuracy"] == 0.5).all()
