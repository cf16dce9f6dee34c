"""Every test stage 06 reports holds its α on simulated nulls (a CI-sized calibration run)."""

import numpy as np
import pytest
from scipy import stats as sps

from rephelpers.errors import RephelpersError
from rephelpers.influence import calibration, stats


@pytest.fixture(scope="module")
def result():
    grid = {"n_clusters": (3, 5), "items": (20, 40), "baseline": (0.5, 0.8)}
    # Power is checked by the quick bench below; here only the nulls, at CI size.
    return calibration.calibrate(n_sims=4, grid=grid, n_controls=19, ace_clusters=(8,), seed=0, effects=())


def test_every_reported_test_holds_its_alpha(result):
    frame = calibration.calibration_frame(result)
    reported = frame[frame["reported"]]
    assert set(reported["name"]) == set(calibration.REPORTED)
    assert (reported["n_tests"] >= 32).all()
    bad = reported[reported["fpr"] > reported["alpha"] + 0.03]
    assert bad.empty, bad.to_string()


def test_the_replaced_item_level_control_test_is_anti_conservative(result):
    # The reason the control comparison moved to the distribution of draws: under the null
    # "R_k is one more random set" the item-level test fires far above α.
    frame = calibration.calibration_frame(result).set_index("name")
    assert frame.loc["legacy_item_wilcoxon_vs_control", "fpr"] > 0.15
    assert frame.loc["legacy_ace_regression_per_row", "fpr"] > 0.15


def test_empirical_p_is_the_rank_formula():
    controls = np.array([0.1, 0.3, 0.2, 0.5])
    assert stats.empirical_p(0.4, controls) == pytest.approx((1 + 1) / 5)
    assert stats.empirical_p(0.6, controls) == pytest.approx(1 / 5)
    assert stats.empirical_p(0.3, controls) == pytest.approx((1 + 2) / 5)  # a tie counts against the target
    assert np.isnan(stats.empirical_p(0.3, np.array([])))


def test_empirical_p_is_uniform_for_exchangeable_continuous_draws():
    rng = np.random.default_rng(0)
    p = np.array([stats.empirical_p(x[0], x[1:]) for x in rng.normal(size=(4000, 20))])
    assert abs(np.mean(p <= 0.05) - 1 / 20) < 0.012
    assert abs(np.mean(p <= 0.5) - 10 / 20) < 0.03


def test_prediction_t_matches_scipy():
    controls = np.array([0.1, 0.3, 0.2, 0.5, 0.25])
    t = (0.6 - controls.mean()) / (controls.std(ddof=1) * np.sqrt(1 + 1 / 5))
    assert stats.prediction_t_p(0.6, controls) == pytest.approx(sps.t.sf(t, 4))


def test_minimum_detectable_ais_matches_a_simulation():
    mde = stats.minimum_detectable_ais(40, 0.8, alpha=0.05, power=0.8)
    rng = np.random.default_rng(1)
    n_correct = 32

    def power(q):
        hits = 0
        for _ in range(400):
            d = np.zeros(40)
            d[: rng.binomial(n_correct, q)] = 1
            hits += stats.signed_rank(d)[1] < 0.05
        return hits / 400

    assert power(mde) >= 0.75
    assert power(max(mde - 0.06, 0.005)) < 0.8
    assert stats.minimum_detectable_ais(40, 0.8, n_tests=15) > mde


def test_sequential_p_matches_a_brute_force_walk():
    rng = np.random.default_rng(3)
    for _ in range(200):
        target, controls, h = rng.normal(), rng.normal(size=int(rng.integers(1, 60))), int(rng.integers(1, 6))
        hits, p, used = 0, None, 0
        for j, c in enumerate(controls, start=1):  # the procedure, one draw at a time
            hits += c >= target
            if hits == h:
                p, used = h / j, j
                break
        if p is None:
            p, used = (hits + 1) / (len(controls) + 1), len(controls)
        assert stats.sequential_p(target, controls, h) == (pytest.approx(p), used)
    assert stats.sequential_p(0.0, np.array([-1.0, -2.0]), h=3) == (pytest.approx(1 / 3), 2)
    with pytest.raises(Exception, match="h"):
        stats.sequential_p(0.0, np.zeros(3), h=0)


def test_sequential_p_is_valid_and_cheap_on_exchangeable_draws():
    rng = np.random.default_rng(0)
    out = np.array([stats.sequential_p(x[0], x[1:], h=5) for x in rng.normal(size=(4000, 301))])
    p, used = out[:, 0], out[:, 1]
    for level in (0.01, 0.05, 0.2):
        assert np.mean(p <= level) <= level + 0.01
    assert used.mean() < 40  # under the null most cells stop after about h / P(c ≥ t) draws, not the 300 cap
    assert p.min() == pytest.approx(1 / 301)


def test_rank_test_power_and_its_mde_match_a_simulation():
    rng = np.random.default_rng(5)
    sd, n, m = 0.05, 99, 3
    mde = stats.minimum_detectable_difference(sd, n, alpha=0.05, power=0.8, n_tests=m)
    assert np.isfinite(mde)

    def simulated(delta):
        z = rng.normal(size=(3000, n + 1)) * sd
        p = np.array([stats.empirical_p(row[0] + delta, row[1:]) for row in z])
        return np.mean(p < 0.05 / m)

    for delta in (mde, 0.5 * mde):
        assert simulated(delta) == pytest.approx(stats.rank_test_power(delta, sd, n, 0.05, m), abs=0.03)
    assert simulated(mde) >= 0.77
    # the demo's design: 20 draws, 15 cells, no rank p can pass the correction on its own
    assert np.isnan(stats.minimum_detectable_difference(sd, 20, 0.05, 0.8, 15))
    assert stats.rank_test_power(1.0, sd, 20, 0.05, 15) == 0.0
    assert np.isfinite(stats.minimum_detectable_difference(sd, 300, 0.05, 0.8, 15))


def test_quick_bench_reports_fpr_and_power_through_one_rule(monkeypatch, tmp_path):
    import json
    import runpy
    import sys
    from pathlib import Path

    seen = []
    real = calibration._table_rejections

    def spy(table, alpha):
        out = real(table, alpha)
        seen.append(table)
        return out

    monkeypatch.setattr(calibration, "_table_rejections", spy)
    out = tmp_path / "calibration.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_calibration.py"
    monkeypatch.setattr(sys, "argv", ["bench_calibration.py", "--quick", "--json", str(out)])
    runpy.run_path(str(bench), run_name="__main__")
    result = json.loads(out.read_text())
    assert result["quick"] and result["effects"] == [0.1, 0.2, 0.3]
    tests = {t["name"]: t for t in result["tests"]}
    for test in result["tests"]:
        assert {"name", "alpha", "fpr", "power", "n_sims"} <= set(test) and 0 <= test["fpr"] <= 1
        assert test["power"] is None or (set(test["power"]) == {"0.1", "0.2", "0.3"}
                                         and all(0 <= v <= 1 for v in test["power"].values()))
    for name in ("wilcoxon_phi_nonzero", "control_distribution_rank", "control_distribution_rank_bh_familywise"):
        assert tests[name]["power"] is not None
    # One grid point, one simulation: a no-effect table, a random-sets null and one planted table
    # per effect, all read by the same rule; the power is that rule on the planted cells.
    assert len(seen) == 5
    for table, effect in zip(seen[2:], ("0.1", "0.2", "0.3")):
        planted = [(k, a) in calibration.PLANTED_CELLS for k, a in zip(table["cluster"], table["ability"])]
        assert tests["control_distribution_rank"]["power"][effect] == pytest.approx(
            np.mean(table.loc[planted, "p_vs_controls"] < 0.05))
        assert tests["wilcoxon_phi_nonzero"]["power"][effect] == pytest.approx(np.mean(table.loc[planted, "p_value"] < 0.05))
    design = tests["design:sequential_h3_cap300_bh"]
    assert design["mean_draws_per_cluster"]["0"] < 300 and "fpr_familywise" in design


def test_sequential_design_holds_alpha_and_buys_power_that_twenty_draws_cannot():
    designs = [calibration.ControlDesign("rank_20_bh", 20),
               calibration.ControlDesign("sequential_h3_cap300_bh", 300, h=3)]
    study = calibration.design_study(n_sims=60, designs=designs, effects=(0.3,), seed=1)
    rank, sequential = study["tests"]
    assert rank["power"]["0.3"] == 0.0  # 20 draws: the smallest rank p, 1/21, never passes BH over 15 cells
    assert sequential["power"]["0.3"] > 0.5
    for test in study["tests"]:
        assert test["fpr_familywise"] <= test["alpha"] + 0.03
    assert sequential["mean_draws_per_cluster"]["0"] < 60  # nulls stop early: far from the 300 cap


def test_design_study_costs_per_ability_rounds_by_each_abilitys_own_stop():
    # one cluster, two abilities: the first meets its 2nd exceedance at draw 2 (one round of 5), the second never
    # (to the cap of 10); per-ability rounds pay 5 draws of the first and 10 of the second, weighted 1:3
    target = np.array([[0.5, 0.5]])
    draws = np.zeros((1, 2, 10))
    draws[0, 0, :2] = 1.0
    design = calibration.ControlDesign("seq", 10, h=2, round_size=5)
    _, whole, per_ability = calibration._design_rejections(target, draws, design, np.array([[True, False]]), 0.05,
                                                           np.array([0.25, 0.75]))
    assert whole.tolist() == [10.0] and per_ability.tolist() == [0.25 * 5 + 0.75 * 10]
    rank = calibration.ControlDesign("rank", 10)
    _, whole, per_ability = calibration._design_rejections(target, draws, rank, np.array([[True, False]]), 0.05,
                                                           np.array([0.25, 0.75]))
    assert whole.tolist() == per_ability.tolist() == [10.0]  # all draws at once: every ability pays every draw
    study = calibration.design_study(n_sims=5, designs=[design], effects=(0.2,), seed=1)
    test = study["tests"][0]
    assert set(test["mean_cost_per_cluster_per_ability"]) == {"0", "0.2"}
    assert all(5 <= test["mean_cost_per_cluster_per_ability"][e] <= test["mean_draws_per_cluster"][e] for e in ("0", "0.2"))
    assert study["token_shares"] == pytest.approx({a: n / 19531 for a, n in calibration.DEMO_TOKEN_SHARES.items()})
    with pytest.raises(RephelpersError, match="token_shares needs a positive share"):
        calibration.design_study(n_sims=1, designs=[design], token_shares={"icl": 1.0})


def test_the_designs_stage_06_reads_are_the_reported_rows_and_hold_alpha():
    # The demo's own design (rounds, h = 3, cap 300) must be a reported row, not only the 20-draw rank p it replaced.
    assert calibration.DEMO_CONTROL_DESIGN in calibration.REPORTED_DESIGNS
    designs = [d for d in calibration.DESIGNS if d.name in calibration.REPORTED_DESIGNS]
    study = calibration.design_study(n_sims=40, designs=designs, effects=(0.2,), seed=2)
    rows = {t["name"]: t for t in study["tests"]}
    assert {name for name, t in rows.items() if t["reported"]} == {f"design:{n}" for n in calibration.REPORTED_DESIGNS}
    assert rows[f"design:{calibration.DEMO_CONTROL_DESIGN}"]["demo"]
    for test in rows.values():
        assert test["fpr_familywise"] <= test["alpha"] + 0.03, test["name"]
