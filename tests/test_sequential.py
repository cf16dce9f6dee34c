"""Sequential control draws (issue 27): the stop rule below the stages, stage 05's rounds, and
stage 06 reading the stopped draws with the same p as a run of every draw."""

import json

import numpy as np
import pandas as pd
import pytest

from rephelpers.abilities.evaluation import (
    check_rounds, cluster_configs, draw_cells, evaluate_abilities, evaluate_in_rounds, evaluation_cost, non_specific_gate,
    round_cache, select_abilities,
)
from rephelpers.abilities.suite import build_tasks
from rephelpers.artifacts import RunDir
from rephelpers.errors import RephelpersError
from rephelpers.influence import findings, impact
from rephelpers.perturbations.rounds import settled_settings
from rephelpers.setting import Setting
from rephelpers.sequential import cluster_in_tail, distinct_draws, in_tail, reading_exceedances

ABILITIES = {"arith": 0.7, "code": 0.6, "icl": 0.8}


def _full(n_clusters=3, n_controls=40, planted=None, seed=0, magnitudes=(1.0,)):
    """A null design (each cluster's R_k one more random set), with ``planted`` effects on top."""
    return impact.simulate_scores({(k, a): 0.0 for k in range(n_clusters) for a in ABILITIES}, ABILITIES,
                                  items_per_task=30, magnitudes=magnitudes, n_controls=n_controls,
                                  control_effect=0.1, draw_sd=0.05, target_like_control=True,
                                  planted=planted, seed=seed)


def _configs_of(scores):
    """cluster_configs-like (configs, config_meta) for a simulated score table (its configs' descriptors)."""
    rows = scores.drop_duplicates("config_id")
    meta = {r.config_id: Setting(int(r.cluster), r.kind, float(r.magnitude), int(r.layer), control=bool(r.control),
                                 draw=int(r.draw))
            for r in rows.itertuples(index=False)}
    return {cid: [] for cid in meta}, meta


def _replay(full, calls):
    """An evaluator that serves a full run's rows for the configs and abilities asked (None: all), and
    records each call as ``(round, configs, abilities)``."""
    def evaluate(r, configs, meta, abilities):
        calls.append((r, sorted(configs), abilities))
        rows = full[full.config_id.isin(list(configs))]
        if abilities is not None:
            rows = rows[rows.ability.isin(list(abilities))]
        return rows.reset_index(drop=True)
    return evaluate


def test_the_stop_rule_counts_exceedances_like_a_plain_loop():
    rng = np.random.default_rng(3)
    for _ in range(200):
        target, draws, h = rng.normal(), rng.normal(size=rng.integers(0, 12)), int(rng.integers(1, 4))
        draws[rng.random(len(draws)) < 0.1] = np.nan
        hits = sum(1 for d in draws if not np.isnan(d) and d >= target)
        assert in_tail(target, draws, h) == (hits < h)
    assert not in_tail(np.nan, [1.0], 2)  # no Φ, no p to read: nothing to draw for
    assert cluster_in_tail([(0.0, [1.0, 1.0]), (5.0, [1.0, 1.0])], 2)
    assert not cluster_in_tail([(0.0, [1.0, 1.0]), (0.5, [1.0, 0.7, 0.0])], 2)
    with pytest.raises(RephelpersError, match="stop_after_exceedances"):
        in_tail(0.0, [1.0], 0)


def test_draw_cells_are_stage_06s_phi_and_control_draws():
    scores = _full(n_clusters=2, n_controls=4, magnitudes=(0.5, 1.0))
    cells = draw_cells(scores)
    a = impact.ais(scores, floor_margin=0.0)
    phi = impact.influence_matrix(a).set_index(["cluster", "ability"])["phi"]
    draws = impact.control_draws(a)
    for k in (0, 1):
        # first the cluster's whole Θ_k, ability by ability (sorted), then each of its two settings
        assert len(cells[k]) == 3 * len(ABILITIES)
        for (target, per_draw), ability in zip(cells[k][:3], sorted(ABILITIES)):
            assert target == phi[(k, ability)]
            ordered = draws[(draws.cluster == k) & (draws.ability == ability)].sort_values("draw")["phi_draw"]
            np.testing.assert_array_equal(per_draw, ordered.to_numpy())
        # a setting's cell, by a plain loop over item means
        base = scores[scores.cluster == -1].groupby("ability")["score"].mean()
        for (target, per_draw), ability in zip(cells[k][3:6], sorted(ABILITIES)):
            rows = scores[(scores.cluster == k) & (scores.magnitude == 0.5) & (scores.ability == ability)]
            m = rows.groupby(["control", "draw"])["score"].mean()
            assert target == pytest.approx((base[ability] - m[(False, 0)]) / base[ability])
            np.testing.assert_allclose(per_draw, [(base[ability] - m[(True, j)]) / base[ability] for j in range(4)])


def test_rounds_stop_null_clusters_early_and_stage_06_reads_the_full_runs_p():
    full = _full(n_clusters=3, n_controls=40, planted={(0, "icl"): 0.6}, seed=5)
    configs, meta = _configs_of(full)
    calls = []
    stopped = evaluate_in_rounds(_replay(full, calls), configs, meta, control_rounds=5, stop_after_exceedances=2,
                                 progress=False)
    evaluated = stopped.config_id.nunique()
    assert evaluated < full.config_id.nunique()  # fewer configs than the cap
    # Each round draws the next five draws; a cluster out of the tail draws no more.
    draws = stopped[stopped.control].groupby("cluster")["draw"].nunique()
    assert draws[0] == 40  # the planted cell stays in the tail: its cluster draws up to the cap
    assert draws[[1, 2]].min() < 40 and (draws % 5 == 0).all()  # (a null cluster whose R_k is a bad draw may not stop)
    assert "baseline" in calls[0][1] and calls[0][2] is None and len({r for r, _, _ in calls}) == 8
    # The evaluated draws are the full run's (draw j is always the same config) ...
    key = ["config_id", "task", "item"]
    same = full.merge(stopped[key], on=key).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(stopped.sort_values(key).reset_index(drop=True), same[stopped.columns])
    # ... and every cell's sequential p is the one the full run gives.
    got = findings.influence_table(stopped, n_boot=5, stop_after_exceedances=2).set_index(["cluster", "ability"])
    want = findings.influence_table(full, n_boot=5, stop_after_exceedances=2).set_index(["cluster", "ability"])
    pd.testing.assert_series_equal(got["p_vs_controls"], want["p_vs_controls"])
    pd.testing.assert_series_equal(got["n_draws_used"], want["n_draws_used"])
    # The stop is at the h-th exceedance of the cluster's last cell, rounded up to the round.
    for k in (1, 2):
        needed = max(int(u) for u in want.loc[k, "n_draws_used"])
        assert draws[k] == min(40, int(np.ceil(needed / 5) * 5))
    # Read with a smaller h the stopped draws still give the full run's p; a larger h is refused.
    got1 = findings.influence_table(stopped, n_boot=5, stop_after_exceedances=1)["p_vs_controls"]
    want1 = findings.influence_table(full, n_boot=5, stop_after_exceedances=1)["p_vs_controls"]
    pd.testing.assert_series_equal(got1, want1)
    assert reading_exceedances(None, 2) == 2 and reading_exceedances(1, 2) == 1 and reading_exceedances(3, None) == 3
    with pytest.raises(RephelpersError, match="stopped drawing controls at the 2-th"):
        reading_exceedances(3, 2)


def test_rounds_without_a_stop_evaluate_every_draw_once():
    full = _full(n_clusters=2, n_controls=7)
    configs, meta = _configs_of(full)
    calls = []
    out = evaluate_in_rounds(_replay(full, calls), configs, meta, control_rounds=3, progress=False)
    assert [r for r, _, _ in calls] == [0, 1, 2] and all(a is None for _, _, a in calls)
    assert sorted(out.config_id.unique()) == sorted(full.config_id.unique())
    assert sum(len(c) for _, c, _ in calls) == full.config_id.nunique()


def test_a_cluster_whose_draws_repeat_one_set_stops_after_a_round_without_a_new_draw():
    full = _full(n_clusters=2, n_controls=30, planted={(0, "icl"): 0.9, (1, "icl"): 0.9})
    ivs = json.dumps([{"perturbation": {"kind": "ablate", "dims": [1, 2]}, "layer": 15}])
    full = full.assign(interventions=[
        ivs if c else json.dumps([{"perturbation": {"kind": "ablate", "dims": [k, j]}, "layer": 15}]) if k >= 0 else "[]"
        for c, k, j in zip(full.control & (full.cluster == 1), full.cluster, full.draw)])
    keep = distinct_draws(full[full.control])
    assert {d for c, d in keep if c == 1} == {0} and {d for c, d in keep if c == 0} == set(range(30))
    configs, meta = _configs_of(full)
    out = evaluate_in_rounds(_replay(full, []), configs, meta, control_rounds=5, stop_after_exceedances=2,
                             progress=False)
    draws = out[out.control].groupby("cluster")["draw"].nunique()
    assert draws[1] == 10 and draws[0] == 30  # cluster 1: round 2 added no distinct draw; cluster 0: the cap


def test_bad_round_designs_fail_before_any_evaluation():
    full = _full(n_clusters=1, n_controls=4)
    configs, meta = _configs_of(full)

    def never(*_):
        raise AssertionError("evaluated")

    for rounds, h, match in ((0, None, "control_rounds"), (2.5, None, "control_rounds"), (None, 2, "set control_rounds"),
                             (2, 0, "stop_after_exceedances"), (2, True, "stop_after_exceedances")):
        with pytest.raises(RephelpersError, match=match):
            check_rounds(rounds, h, 4)
        if rounds is not None:
            with pytest.raises(RephelpersError, match=match):
                evaluate_in_rounds(never, configs, meta, rounds, h, progress=False)
    with pytest.raises(RephelpersError, match="config_meta"):
        evaluate_in_rounds(never, configs, {}, 2, 2, progress=False)


def test_round_cache_reuses_the_rounds_a_larger_cap_shares(tmp_path):
    full = _full(n_clusters=2, n_controls=10)
    run = RunDir(tmp_path / "run")
    served = []

    def evaluate(configs, meta, abilities):
        served.extend(configs)
        return full[full.config_id.isin(list(configs))].reset_index(drop=True)

    def meta_up_to(cap):
        configs, meta = _configs_of(full[~full.control | (full.draw < cap)])
        return configs, meta

    cached = round_cache(run, evaluate, params={"model": "sim"})
    first = evaluate_in_rounds(cached, *meta_up_to(5), control_rounds=5, progress=False)
    n_first = len(served)
    again = evaluate_in_rounds(cached, *meta_up_to(5), control_rounds=5, progress=False)
    assert len(served) == n_first  # all from disk
    pd.testing.assert_frame_equal(first, again)
    bigger = evaluate_in_rounds(cached, *meta_up_to(10), control_rounds=5, progress=False)
    assert len(served) == n_first + 2 * 5  # only round 2 (2 clusters × 5 draws) was evaluated
    assert bigger.config_id.nunique() == full.config_id.nunique()


@pytest.mark.model
def test_the_evaluated_draws_score_as_in_a_full_run(model, tmp_path):
    tasks = build_tasks(["icl", "arithmetic"], tmp_path / "tasks", items_per_task=4, seed=0)
    comps = [{"layer": 12, "cluster": k, "component": "resid", "dims": list(range(8 * k, 8 * k + 8))} for k in range(2)]
    configs, meta = cluster_configs(comps, 12, model.d_model, n_controls=4, seed=3)
    asked = []

    def evaluate(round_configs, round_meta, abilities=None):
        out = evaluate_abilities(model, tasks, round_configs, limit=2, batch_size=4, config_meta=round_meta,
                                 progress=False, fast=True, abilities=abilities)
        asked.append((abilities, set(out.ability)))
        return out

    full = evaluate(configs, meta)
    rounds = evaluate_in_rounds(lambda r, c, m, a: evaluate(c, m, a), configs, meta, control_rounds=2,
                                stop_after_exceedances=1, progress=False)
    one = evaluate({"baseline": configs["baseline"]}, {"baseline": meta["baseline"]}, ["icl"])
    for abilities, got in asked:  # a call on some abilities scores their tasks only
        assert got == set(abilities or ("icl", "arithmetic"))
    want = full[(full.config_id == "baseline") & (full.ability == "icl")].reset_index(drop=True)
    soft = ["margin", "p_correct", "confidence"]  # float rounding of a larger batch
    pd.testing.assert_frame_equal(one.drop(columns=soft), want.drop(columns=soft))
    np.testing.assert_allclose(one.margin, want.margin, rtol=0, atol=1e-3)
    key = ["config_id", "task", "item"]
    same = full.merge(rounds[key], on=key)[list(full.columns)].sort_values(key).reset_index(drop=True)
    rounds = rounds.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(rounds.drop(columns=["margin", "p_correct", "confidence"]),
                                  same.drop(columns=["margin", "p_correct", "confidence"]))
    np.testing.assert_allclose(rounds.margin, same.margin, rtol=0, atol=1e-3)


def test_the_control_rounds_benchmark_counts_configs(tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    out = tmp_path / "rounds.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_control_rounds.py"
    monkeypatch.setattr(sys, "argv", ["bench_control_rounds.py", "--quick", "--json", str(out)])
    runpy.run_path(str(bench), run_name="__main__")
    result = json.loads(out.read_text())
    cap = result["all_at_once"]["n_controls=10 (the cap)"]
    assert cap == 1 + 2 * (1 + 10)
    for summary in result["sequential"].values():
        # at least round 0 (baseline, 2 perturbations, 5 draws each), at most the cap
        assert 1 + 2 * (1 + 5) <= summary["min"] <= summary["max"] <= cap and len(summary["counts"]) == 2
    assert result["token_shares"] == pytest.approx({"arithmetic": 4895 / 19531, "code": 7140 / 19531, "icl": 7496 / 19531})
    for name, per in result["cost"].items():
        # whole-cluster rounds evaluate every config on every ability: cost = configs; per-ability rounds never more,
        # and never less than round 0 on every ability
        assert per["whole_cluster"]["counts"] == result["sequential"][name]["counts"]
        assert all(1 + 2 * (1 + 5) <= a <= w for a, w in zip(per["per_ability"]["counts"], per["whole_cluster"]["counts"]))
    bench_globals = runpy.run_path(str(bench))
    assert bench_globals["parse_shares"]("a=1, b=3") == {"a": 1.0, "b": 3.0}
    with pytest.raises(RephelpersError, match="not a number"):
        bench_globals["parse_shares"]("a=x")


# -- per-ability late rounds ----------------------------------------------------------------------
SHARES = {"arith": 4895.0, "code": 7140.0, "icl": 7496.0}


def _cells_by_loop(full, settings=None):
    """``{(cluster, ability): (Φ, [Φ^(j) in draw order])}`` from a full table, by plain loops over item means
    (every simulated ability is higher-is-better with chance 0): ``AIS = (M_base − M) / M_base``, Φ its mean
    over the cluster's settings (``settings``: those (kind, magnitude) only), Φ^(j) the same over draw j's."""
    base = full[full.cluster == -1].groupby("ability")["score"].mean()
    m = full[full.cluster >= 0].groupby(["cluster", "ability", "control", "draw", "kind", "magnitude"])["score"].mean()
    out = {}
    for k in sorted(full.loc[full.cluster >= 0, "cluster"].unique()):
        for a in sorted(base.index):
            target, per_draw = [], {}
            for (kk, aa, control, draw, kind, mag), value in m.items():
                if kk != k or aa != a or (settings is not None and (kind, mag) not in settings):
                    continue
                loss = (base[a] - value) / base[a]
                if control:
                    per_draw.setdefault(draw, []).append(loss)
                else:
                    target.append(loss)
            out[(int(k), a)] = (float(np.mean(target)), [float(np.mean(per_draw[j])) for j in sorted(per_draw)])
    return out


def _bc_p_by_loop(target, draws, h):
    """Besag–Clifford's p by walking the draws: h / L at the h-th draw ≥ target, else (g + 1) / (n + 1)."""
    hits = 0
    for used, value in enumerate(draws, start=1):
        hits += value >= target
        if hits == h:
            return h / used, used
    return (hits + 1) / (len(draws) + 1), len(draws)


def _expected_open(full, evaluated_draws, h):
    """Per cluster, the abilities with a cell still in the tail after the first ``evaluated_draws`` draws: the
    whole of Θ_k and, with several settings, each setting (plain loops, not the package's draw_cells)."""
    settings = sorted(set(zip(full.loc[full.cluster >= 0, "kind"], full.loc[full.cluster >= 0, "magnitude"])))
    units = [None] + ([{s} for s in settings] if len(settings) > 1 else [])
    opened = {}
    for unit in units:
        for (k, a), (target, draws) in _cells_by_loop(full, unit).items():
            if sum(d >= target for d in draws[:evaluated_draws]) < h:
                opened.setdefault(k, set()).add(a)
            else:
                opened.setdefault(k, set())
    return opened


@pytest.mark.parametrize("magnitudes", [(1.0,), (0.5, 1.0)])
def test_late_rounds_ask_only_for_the_abilities_still_in_the_tail(magnitudes):
    full = _full(n_clusters=3, n_controls=30, planted={(0, "icl"): 0.6}, seed=5, magnitudes=magnitudes)
    configs, meta = _configs_of(full)
    calls = []
    evaluate_in_rounds(_replay(full, calls), configs, meta, control_rounds=5, stop_after_exceedances=2, progress=False)
    assert calls[0][0] == 0 and calls[0][2] is None  # round 0: baseline, perturbations, first draws on every ability
    assert {"baseline", *[c for c, m in meta.items() if not m.control or m.draw < 5]} == set(calls[0][1])
    drawing = set(range(3))
    last = 0
    for r in range(1, 6):
        opened = _expected_open(full, 5 * r, 2)
        drawing = {k for k in drawing if opened[k]}
        asked = [(abilities, cids) for rr, cids, abilities in calls if rr == r]
        if not drawing:
            assert not asked  # nothing open: no more rounds
            break
        last = r
        want = {cid for cid, m in meta.items() if m.control and m.cluster in drawing and 5 * r <= m.draw < 5 * r + 5}
        if all(opened[k] == set(ABILITIES) for k in drawing):
            assert asked == [(None, sorted(want))]
            continue
        for ability in ABILITIES:
            mine = sorted(cid for cid in want if ability in opened[meta[cid].cluster])
            assert ((ability,), mine) in asked if mine else all(a != (ability,) for a, _ in asked)
        assert len(asked) == sum(any(a in opened[k] for k in drawing) for a in ABILITIES)
    # the planted icl cell keeps cluster 0 drawing icl to the cap, and no late round asked for every ability
    last_round = {a: cids for r, cids, a in calls if r == 5}
    assert last == 5 and {m.cluster for m in map(meta.get, last_round[("icl",)])} == {0}
    assert all(len(a) == 1 for r, _, a in calls if r > 0)


@pytest.mark.parametrize("magnitudes", [(1.0,), (0.5, 1.0)])
def test_per_ability_rounds_change_no_p_that_stage_06_reads(magnitudes):
    full = _full(n_clusters=3, n_controls=40, planted={(0, "icl"): 0.6, (1, "code"): 0.5}, seed=7, magnitudes=magnitudes)
    configs, meta = _configs_of(full)
    stopped = evaluate_in_rounds(_replay(full, []), configs, meta, control_rounds=5, stop_after_exceedances=2,
                                 progress=False)
    per_cell = stopped[stopped.control].groupby(["cluster", "ability"])["draw"].nunique()
    assert per_cell.groupby("cluster").nunique().max() > 1  # one cluster's abilities hold different numbers of draws
    table = findings.influence_table(stopped, n_boot=5, stop_after_exceedances=2).set_index(["cluster", "ability"])
    for (k, a), (target, draws) in _cells_by_loop(full).items():  # every draw of the full run on every ability
        p, used = _bc_p_by_loop(target, draws, 2)
        row = table.loc[(k, a)]
        assert row.p_vs_controls == pytest.approx(p) and row.n_draws_used == used
        have = int(per_cell[(k, a)])  # the draws this cell has: Φ_control is their mean
        assert row.n_draws == row.n_draws_requested == have and used <= have
        assert row.phi == pytest.approx(target) and row.phi_control == pytest.approx(np.mean(draws[:have]))
    # the draws the cells do not share are no "repeated draws"
    assert "distinct" not in findings.influence_summary(table.reset_index())
    # whole-cluster rounds give the same p, at a higher cost
    whole = evaluate_in_rounds(_replay(full, []), configs, meta, control_rounds=5, stop_after_exceedances=2,
                               progress=False, per_ability=False)
    again = findings.influence_table(whole, n_boot=5, stop_after_exceedances=2).set_index(["cluster", "ability"])
    pd.testing.assert_series_equal(again["p_vs_controls"], table["p_vs_controls"])
    assert evaluation_cost(stopped, SHARES) < evaluation_cost(whole, SHARES)


def test_the_cost_counts_each_config_on_the_abilities_it_was_evaluated_on():
    full = _full(n_clusters=3, n_controls=30, planted={(0, "icl"): 0.6}, seed=5)
    configs, meta = _configs_of(full)
    calls = []
    stopped = evaluate_in_rounds(_replay(full, calls), configs, meta, control_rounds=5, stop_after_exceedances=2,
                                 progress=False)
    total = sum(SHARES.values())
    by_loop = 0.0
    for _, cids, abilities in calls:
        for _ in cids:
            by_loop += sum(SHARES[a] for a in (abilities or ABILITIES)) / total
    assert evaluation_cost(stopped, SHARES) == pytest.approx(by_loop)
    assert any(a is not None for _, _, a in calls) and by_loop < stopped.config_id.nunique()
    assert evaluation_cost(full, SHARES) == pytest.approx(full.config_id.nunique())  # every config on every ability
    assert evaluation_cost(stopped) == pytest.approx(
        sum(len(a or ABILITIES) * len(c) for _, c, a in calls) / len(ABILITIES))  # equal shares
    with pytest.raises(RephelpersError, match="no token share for the abilities"):
        evaluation_cost(stopped, {"icl": 1.0})
    with pytest.raises(RephelpersError, match="positive"):
        evaluation_cost(stopped, {**SHARES, "code": -1.0})


def test_round_cache_keys_a_late_round_by_its_abilities(tmp_path):
    full = _full(n_clusters=2, n_controls=20, planted={(0, "icl"): 0.6}, seed=5)
    configs, meta = _configs_of(full)
    run = RunDir(tmp_path / "run")
    served = []

    def evaluate(round_configs, round_meta, abilities):
        served.append((sorted(round_configs), abilities))
        rows = full[full.config_id.isin(list(round_configs))]
        return rows[rows.ability.isin(list(abilities or ABILITIES))].reset_index(drop=True)

    cached = round_cache(run, evaluate, params={"model": "sim"})
    first = evaluate_in_rounds(cached, configs, meta, control_rounds=5, stop_after_exceedances=2, progress=False)
    subsets = [a for _, a in served if a is not None]
    assert subsets and all(len(a) == 1 for a in subsets)
    files = sorted(f.name for f in (tmp_path / "run" / "scores_rounds").glob("*.parquet"))
    assert "round0.parquet" in files and any(f.endswith("-icl.parquet") for f in files)
    n = len(served)
    again = evaluate_in_rounds(cached, configs, meta, control_rounds=5, stop_after_exceedances=2, progress=False)
    assert len(served) == n  # every round, split by ability or not, from disk
    pd.testing.assert_frame_equal(first, again)
    # the same round and configs on other abilities is another result, not the cached one
    r, cids = 1, [c for c, m in meta.items() if m.control and m.cluster == 0 and 5 <= m.draw < 10]
    other = cached(r, {c: configs[c] for c in cids}, {c: meta[c] for c in cids}, ("arith", "code"))
    assert set(other.ability) == {"arith", "code"} and len(served) == n + 1


def test_evaluate_abilities_picks_the_tasks_of_the_abilities_asked(tmp_path):
    tasks = build_tasks(["icl", "arithmetic"], tmp_path / "tasks", items_per_task=4, seed=0)
    assert [t.ability for t in select_abilities(tasks, ["icl"])] == ["icl"]
    assert select_abilities(tasks, None) == list(tasks.values())
    assert select_abilities(["icl", "gsm8k"], ("gsm8k",)) == ["gsm8k"]  # a registered task is its own ability
    with pytest.raises(RephelpersError, match=r"abilities \['code'\] are not measured"):
        select_abilities(tasks, ["code"])
    with pytest.raises(RephelpersError, match="non-empty list"):
        select_abilities(tasks, "icl")


# -- settings stage 04 judged not specific (issue 27f) ---------------------------------------------
def _setting_of(meta, cluster, magnitude):
    m = next(m for m in meta.values() if m.cluster == cluster and not m.control and m.magnitude == magnitude)
    return (cluster, m.kind, round(float(magnitude), 9), int(m.layer))


def _asked(calls, cluster, meta):
    """``{round: abilities asked for cluster's control draws (None: all)}`` from an evaluator's calls."""
    out = {}
    for r, cids, abilities in calls:
        if any(meta[c].control and meta[c].cluster == cluster for c in cids):
            out.setdefault(r, []).append(abilities)
    return out


@pytest.mark.parametrize("h", [2, None])
def test_a_cluster_whose_only_setting_is_settled_draws_round_0_only(h):
    full = _full(n_clusters=3, n_controls=30, planted={(0, "icl"): 0.6, (1, "icl"): 0.6}, seed=5)
    configs, meta = _configs_of(full)
    settled = {_setting_of(meta, 1, 1.0)}
    calls = []
    out = evaluate_in_rounds(_replay(full, calls), configs, meta, control_rounds=5, stop_after_exceedances=h,
                             progress=False, settled=settled)
    assert sorted(_asked(calls, 1, meta)) == [0]  # settled: round 0 keeps a Φ_control estimate, then nothing
    assert set(out.loc[out.control & (out.cluster == 1), "draw"]) == set(range(5))
    # cluster 0 (planted, unsettled) keeps drawing icl to the cap, as without the gate
    assert max(_asked(calls, 0, meta)) == 5
    plain = []
    evaluate_in_rounds(_replay(full, plain), configs, meta, control_rounds=5, stop_after_exceedances=h,
                       progress=False)
    assert max(_asked(plain, 1, meta)) == 5  # without the gate the planted cell of cluster 1 draws to the cap too
    ungated = [(r, [c for c in cids if meta[c].cluster != 1], a) for r, cids, a in plain]
    gated = [(r, [c for c in cids if meta[c].cluster != 1], a) for r, cids, a in calls]
    assert [x for x in gated if x[1]] == [x for x in ungated if x[1]]  # the other clusters' calls are unchanged
    # stage 06 reads the gated cells' p over the draws they have, as a non-specific verdict, and no error
    spec = pd.DataFrame([{"arm": "perturbation", "cluster": k, "kind": kind, "magnitude": m, "layer": layer,
                          "specific": k != 1, "specificity_verdict": "specific" if k != 1 else "non-specific damage"}
                         for k, kind, m, layer in (_setting_of(meta, c, 1.0) for c in range(3))])
    assert settled_settings(spec) == settled
    table = findings.influence_table(out, n_boot=5, specificity=spec, stop_after_exceedances=h)
    one = table[table.cluster == 1]
    assert (one.n_draws == 5).all() and (one.n_draws_requested == 5).all()
    assert set(one.verdict) <= {"non-specific damage", "no effect", "baseline below floor"}
    icl = one[one.ability == "icl"].iloc[0]
    draws = _cells_by_loop(full)[(1, "icl")][1][:5]
    expected = (_bc_p_by_loop(icl.phi, draws, h)[0] if h else (sum(d >= icl.phi for d in draws) + 1) / 6)
    assert icl.p_vs_controls == pytest.approx(expected)
    assert "stage 04 judged not specific" in findings.influence_summary(table)


def test_a_settled_setting_beside_an_unsettled_one_closes_only_its_own_cells():
    """Rule: a cell closes when every setting of its unit is settled; the whole-Θ_k cell of a cluster with one
    unsettled setting stays open while it is in the tail, and the unsettled setting's cells draw as before."""
    full = _full(n_clusters=2, n_controls=30, planted={(0, "icl"): 0.6}, seed=7, magnitudes=(0.5, 1.0))
    configs, meta = _configs_of(full)
    settled = {_setting_of(meta, 0, 0.5)}
    calls, plain = [], []
    evaluate_in_rounds(_replay(full, calls), configs, meta, control_rounds=5, stop_after_exceedances=2,
                       progress=False, settled=settled)
    evaluate_in_rounds(_replay(full, plain), configs, meta, control_rounds=5, stop_after_exceedances=2, progress=False)
    # by plain loops: per round, the abilities of cluster 0 with a cell in the tail, leaving out the settled setting's
    whole = _cells_by_loop(full)
    kept = _cells_by_loop(full, {("ablate", 1.0)})
    for r in range(1, 6):
        want = {a for a in ABILITIES for cells in (whole, kept)
                if sum(d >= cells[(0, a)][0] for d in cells[(0, a)][1][:5 * r]) < 2}
        asked = _asked(calls, 0, meta).get(r, [])
        got = {a for subset in asked for a in (subset or ABILITIES)}
        assert got == want, r
        if not want:
            break
    # the planted icl cell of the unsettled setting keeps cluster 0 drawing to the cap, whole-Θ and per setting
    assert ("icl",) in _asked(calls, 0, meta)[5]
    # on this seed only the settled setting's code cell is still in the tail in rounds 4-5: the gate drops it
    assert ("code",) in _asked(plain, 0, meta)[4] and ("code",) not in _asked(calls, 0, meta)[4]
    assert sum(len(c) for _, c, _ in calls) < sum(len(c) for _, c, _ in plain)


def test_no_settled_set_asks_for_exactly_the_calls_of_before():
    full = _full(n_clusters=3, n_controls=30, planted={(0, "icl"): 0.6}, seed=5, magnitudes=(0.5, 1.0))
    configs, meta = _configs_of(full)
    for h in (2, None):
        before, empty, none = [], [], []
        evaluate_in_rounds(_replay(full, before), configs, meta, control_rounds=5, stop_after_exceedances=h, progress=False)
        evaluate_in_rounds(_replay(full, none), configs, meta, control_rounds=5, stop_after_exceedances=h,
                           progress=False, settled=None)
        evaluate_in_rounds(_replay(full, empty), configs, meta, control_rounds=5, stop_after_exceedances=h,
                           progress=False, settled=set())
        assert before == none == empty and len(before) > 1
    with pytest.raises(RephelpersError, match="settled must be None or a set"):
        evaluate_in_rounds(_replay(full, []), configs, meta, control_rounds=5, settled=[(0, "ablate", 1.0, 0)])
    with pytest.raises(RephelpersError, match="stop_non_specific must be True or False"):
        check_rounds(5, 2, 20, stop_non_specific="yes")


def test_settled_settings_are_the_settings_with_every_perturbation_row_not_specific():
    rows = [  # cluster, kind, magnitude, layer, component, arm, specific
        (0, "ablate", 1.0, 15, "resid", "perturbation", False),
        (0, "ablate", 1.0, 15, "resid", "control", None),
        (0, "ablate", 0.5, 15, "resid", "perturbation", True),
        (1, "ablate", 1.0, 15, "resid", "perturbation", False),  # one component not specific, the other specific
        (1, "ablate", 1.0, 15, "mlp", "perturbation", True),
        (2, "project", 1 / 3, 15, "resid", "perturbation", False),
        (2, "project", 1 / 3, 15, "mlp", "perturbation", False),
        (2, "project", 1 / 3, 9, "resid", "perturbation", True),
    ]
    report = pd.DataFrame(rows, columns=["cluster", "kind", "magnitude", "layer", "component", "arm", "specific"])
    assert settled_settings(report) == {(0, "ablate", 1.0, 15), (2, "project", round(1 / 3, 9), 15)}
    with pytest.raises(RephelpersError, match=r"verdict columns \['specific'\]"):
        settled_settings(report.drop(columns="specific"))


def test_non_specific_gate_reads_stage_04_only_when_asked(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert non_specific_gate(run, True, None) is None and non_specific_gate(run, False, 5) is None
    assert non_specific_gate(run, True, 5) is None
    assert "no specificity.parquet" in capsys.readouterr().out
    report = pd.DataFrame([{"arm": "perturbation", "cluster": 3, "kind": "ablate", "magnitude": 1.0, "layer": 15,
                            "specific": False, "specificity_verdict": "non-specific damage"}])
    run.save_parquet("specificity.parquet", report, "k")
    assert non_specific_gate(run, True, 5) == {(3, "ablate", 1.0, 15)}
    with pytest.raises(RephelpersError, match="stop_non_specific must be True or False"):
        non_specific_gate(run, 1, 5)
