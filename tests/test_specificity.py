"""Specificity report: text sampling, identities, and agreement with independent computations."""

import json

import numpy as np
import pandas as pd
import pytest

from rephelpers.representations.activations import extract_activations
from rephelpers.errors import RephelpersError
from rephelpers.interventions.intervene import perplexity, sequence_nll
from rephelpers.abilities.evaluation import cluster_configs
from rephelpers.views.explorers import specificity_explorer
from rephelpers.perturbations.kinds import kinds, matched_control
from rephelpers.perturbations.specificity import (
    EDIT_TOLERANCE, control_spectrum, probe_balanced_accuracy, readout_layers, repeated_controls,
    sample_heldout, specificity_report,
)
from rephelpers.views.charts import probe_chart, specificity_chart

LAYER = 26
TEXTS = {
    0: [f"{a} plus {b} equals {a + b}." for a, b in [(2, 3), (7, 5), (11, 4), (6, 9), (8, 8), (3, 12), (10, 1)]],
    1: [f"def f{i}(x):\n    return x * {i}" for i in range(7)],
    2: [
        "The river ran quietly past the old mill.",
        "She opened the window and the cold air came in.",
        "Birds gathered on the wire before the storm.",
        "He read the letter twice and then put it away.",
        "The market was busy with farmers and traders.",
        "Snow covered the hills for most of the winter.",
        "They walked home slowly along the dark road.",
    ],
}


@pytest.fixture(scope="module")
def documents():
    rows = []
    for cluster, texts in TEXTS.items():
        for i, text in enumerate(texts):
            rows.append({"id": f"c{cluster}-{i}", "doc_id": f"c{cluster}-{i}", "text": text,
                         "cluster": cluster, "split": "heldout" if i >= 4 else "train"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def activations(model, documents):
    return extract_activations(model, list(documents["text"]), [LAYER], batch_size=32, max_length=16,
                               progress=False, use_cache=False)[LAYER]


@pytest.fixture(scope="module")
def subspaces(documents, activations):
    """Stage-03-like subspaces computed here with numpy from the training rows."""
    train = (documents["split"] == "train").to_numpy()
    X, labels = activations[train].astype(np.float64), documents["cluster"].to_numpy()[train]
    out = []
    for k in TEXTS:
        inside = labels == k
        gap = X[inside].mean(0) - X[~inside].mean(0)
        centred = X[inside] - X[inside].mean(0)
        basis = np.linalg.svd(centred, full_matrices=False)[2][:2]
        out.append({
            "layer": LAYER, "cluster": k, "dims": np.argsort(-gap)[:48].tolist(),
            "direction": (gap / np.linalg.norm(gap)).tolist(), "basis": basis.tolist(),
            "probe": None, "mean_in": X[inside].mean(0).tolist(), "mean_out": X[~inside].mean(0).tolist(),
            "std": X.std(0).tolist(),
        })
    return out


def test_sample_heldout_balances_the_rest(documents):
    target, rest = sample_heldout(documents, 1, n_texts=2, seed=0)
    assert len(target) == 2 and set(target["cluster"]) == {1} and set(target["split"]) == {"heldout"}
    assert len(rest) == 2 and sorted(rest["cluster"]) == [0, 2]
    again = sample_heldout(documents, 1, n_texts=2, seed=0)
    assert list(again[0].index) == list(target.index) and list(again[1].index) == list(rest.index)
    everything = sample_heldout(documents, 1, n_texts=50, seed=0)
    assert len(everything[0]) == 3 and len(everything[1]) == 6


def test_probe_balanced_accuracy_chance_and_signal():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 10))
    y = (rng.random(400) < 0.25).astype(int)
    assert 0.4 <= probe_balanced_accuracy(X[:300], y[:300], X[300:], y[300:]) <= 0.6
    X[:, 0] += 3 * y
    assert probe_balanced_accuracy(X[:300], y[:300], X[300:], y[300:]) > 0.9
    with pytest.raises(RephelpersError, match="both classes"):
        probe_balanced_accuracy(X, np.zeros(400), X, y)


@pytest.mark.model
def test_readout_layers(model):
    assert readout_layers(model, 26) == [27, 28, 29]
    assert readout_layers(model, 15) == [16, 22, 29]
    assert readout_layers(model, 29) == []


@pytest.fixture(scope="module")
def leace_report(model, documents, subspaces, activations):
    return specificity_report(model, documents, subspaces, "leace", LAYER, clusters=[1], n_texts=3, max_length=16,
                              with_attention=True, probes=activations, progress=False)


@pytest.mark.model
def test_zero_magnitude_is_the_identity(model, documents, subspaces):
    report = specificity_report(model, documents, subspaces, "ablate", LAYER, magnitude=0.0, clusters=[0],
                                n_texts=3, max_length=16, with_attention=True, progress=False)
    assert list(report["arm"]) == ["perturbation", "control"]
    for column in ("dlogppl_target", "dlogppl_rest", "attn_js_target", "attn_js_rest"):
        np.testing.assert_allclose(report[column], 0.0, atol=1e-12)
    np.testing.assert_allclose(report[["cka_target", "cka_rest", "cka_rest_L29"]], 1.0, atol=1e-9)


@pytest.mark.model
def test_report_columns_agree_with_independent_numbers(model, documents, leace_report):
    report = leace_report.set_index("arm")
    assert list(report.index) == ["perturbation", "control"]
    target, _ = sample_heldout(documents, 1, 3, 0)
    nll, count = sequence_nll(model, list(target["text"]), max_length=16, progress=False)
    assert report["ppl_target_before"].iloc[0] == pytest.approx(perplexity(nll, count), rel=1e-4)
    row = report.loc["perturbation"]
    assert row["dlogppl_target"] == pytest.approx(np.log(row["ppl_target_after"]) - np.log(row["ppl_target_before"]))
    assert row["specificity_gap"] == pytest.approx(row["dlogppl_target"] - row["dlogppl_rest"])
    assert row["specificity_ratio"] == pytest.approx(row["dlogppl_target"] / row["dlogppl_rest"])
    assert row["cka_target"] == pytest.approx(np.mean([row[f"cka_target_L{l}"] for l in (27, 28, 29)]))
    assert (report["cka_target"] < 1).all() and (report["attn_js_target"] > 0).all()
    assert model.hf.config._attn_implementation != "eager", "eager attention is switched back off"


@pytest.mark.model
def test_leace_is_fitted_on_train_rows_and_erases_the_probe(leace_report, documents, activations):
    configs = {arm: json.loads(c) for arm, c in zip(leace_report["arm"], leace_report["config"])}
    assert {c["kind"] for c in configs.values()} == {"leace"}
    assert len(configs["perturbation"]["left"]) == len(configs["control"]["left"]) == 1
    train = (documents["split"] == "train").to_numpy()
    np.testing.assert_allclose(configs["perturbation"]["mean"], activations[train].mean(0), rtol=1e-5, atol=1e-4)
    report = leace_report.set_index("arm")
    assert report.loc["perturbation", "probe_bacc_before"] > 0.9
    assert report.loc["perturbation", "probe_bacc_after"] == pytest.approx(0.5, abs=0.2)
    json.dumps(specificity_chart(leace_report).to_dict())
    json.dumps(probe_chart(leace_report).to_dict())


@pytest.mark.model
def test_ablation_hits_harder_than_its_control(model, documents, subspaces):
    report = specificity_report(model, documents, subspaces, "ablate", LAYER, clusters=[1], n_texts=3,
                                max_length=16, progress=False).set_index("arm")
    pert, ctrl = (json.loads(report.loc[arm, "config"]) for arm in ("perturbation", "control"))
    assert len(pert["dims"]) == len(ctrl["dims"]) == 48 and not set(pert["dims"]) & set(ctrl["dims"])
    # zeroing the 48 dimensions with the largest cluster gap moves states more than 48 random ones
    assert report.loc["perturbation", "cka_target"] < report.loc["control", "cka_target"]
    widget = specificity_explorer(model, documents, subspaces, report.reset_index(), kinds=["ablate", "noise"])
    assert widget.children[0].value == "ablate"
    # the chart is returned and shown by the interactive itself (auto_display), not display()ed inside it
    assert widget.auto_display and "cluster 1" in str(widget.result.to_dict())
    # by default the explorer offers every kind the stages build, mean ablation included
    offered = specificity_explorer(model, documents, subspaces, report.reset_index()).children[0].options
    assert list(offered) == kinds() and "mean_ablate" in offered


@pytest.mark.model
def test_several_control_draws_are_independent_rows(model, documents, subspaces):
    options = dict(clusters=[1], n_texts=3, max_length=16, progress=False)
    single = specificity_report(model, documents, subspaces, "ablate", LAYER, **options)
    report = specificity_report(model, documents, subspaces, "ablate", LAYER, n_controls=2, **options)
    assert list(zip(report["arm"], report["draw"])) == [("perturbation", 0), ("control", 0), ("control", 1)]
    numbers = ["dlogppl_target", "dlogppl_rest", "cka_target", "cka_rest"]
    # draw 0 is the single-draw control, the same numbers to the last bit
    pd.testing.assert_frame_equal(report.iloc[:2][["config", *numbers]], single[["config", *numbers]])
    subspace = next(s for s in subspaces if s["cluster"] == 1)
    # the report matches its controls with the layer's token spectrum from the training texts
    second = matched_control("ablate", subspace, model.d_model, 1.0, seed=1,
                             spectrum=control_spectrum(model, documents, LAYER))
    assert report["config"].iloc[2] == second.to_json() and report["config"].iloc[2] != report["config"].iloc[1]
    assert report["dlogppl_target"].iloc[2] != report["dlogppl_target"].iloc[1]
    # one name per setting: stage 05 evaluates these rows under the same ids, with the same perturbations
    configs, _ = cluster_configs([s for s in subspaces if s["cluster"] == 1], LAYER, model.d_model, "ablate", 1.0,
                                 n_controls=2, spectrum=control_spectrum(model, documents, LAYER))
    assert report["setting"].tolist() == ["k1:ablate:m1", "k1:ablate:m1:control", "k1:ablate:m1:control1"]
    assert [configs[sid][0].perturbation.to_json() for sid in report["setting"]] == report["config"].tolist()
    # the chart shows the mean over draws: one bar per (cluster, arm, set, metric)
    spec = specificity_chart(report).to_dict()
    assert spec["spec"]["encoding"]["y"]["aggregate"] == "mean"
    with pytest.raises(RephelpersError, match="n_controls must be a positive int"):
        specificity_report(model, documents, subspaces, "ablate", LAYER, n_controls=0)


@pytest.mark.model
def test_errors_come_before_compute(model, documents, subspaces, activations):
    with pytest.raises(RephelpersError, match="no cluster components at layer 5"):
        specificity_report(model, documents, subspaces, "ablate", 5)
    with pytest.raises(RephelpersError, match=r"clusters \[7\]"):
        specificity_report(model, documents, subspaces, "ablate", LAYER, clusters=[7])
    with pytest.raises(RephelpersError, match="fitted eraser; pass probes="):
        specificity_report(model, documents, subspaces, "leace", LAYER)
    with pytest.raises(RephelpersError, match="no 'probe'"):
        specificity_report(model, documents, subspaces, "gradient", LAYER)
    with pytest.raises(RephelpersError, match="probes must be pooled"):
        specificity_report(model, documents, subspaces, "ablate", LAYER, probes=activations[:3])
    with pytest.raises(RephelpersError, match="lacks columns"):
        specificity_report(model, documents.drop(columns="split"), subspaces, "ablate", LAYER)


def test_edit_norm_equals_a_plain_hidden_state_computation(model, documents, subspaces):
    report = specificity_report(model, documents, subspaces, "ablate", LAYER, clusters=[1], n_texts=3,
                                max_length=16, progress=False)
    target, rest = sample_heldout(documents, 1, 3, 0)
    texts = list(target["text"]) + list(rest["text"])
    batch = model.encode(texts, max_length=16)
    import torch

    with torch.inference_mode():
        hidden = model.hf(**batch, output_hidden_states=True).hidden_states[LAYER + 1]
    mask = batch["attention_mask"].bool()
    for row in report.itertuples(index=False):
        dims = json.loads(row.config)["dims"]
        expected = hidden[..., dims].norm(dim=-1)[mask].mean().item()  # zero-ablation removes h_R
        assert row.edit_norm == pytest.approx(expected, rel=1e-3)
    pert = report[report.arm == "perturbation"].iloc[0]
    assert pert.edit_ratio == pytest.approx(1.0)
    ctrl = report[report.arm == "control"].iloc[0]
    assert ctrl.edit_ratio == pytest.approx(ctrl.edit_norm / pert.edit_norm)
    assert ctrl.edit_matched == (1 / EDIT_TOLERANCE <= ctrl.edit_ratio <= EDIT_TOLERANCE)
    assert ctrl.edit_tolerance == EDIT_TOLERANCE and "strata" in ctrl.matching


def test_specificity_verdicts_gate_on_the_rest_and_on_the_controls():
    from rephelpers.perturbations.specificity import specificity_verdicts

    def rows(target, rest, control_gaps):
        out = [{"cluster": 0, "arm": "perturbation", "draw": 0, "kind": "ablate", "magnitude": 1.0, "layer": 3,
                "dlogppl_target": target, "dlogppl_rest": rest, "specificity_gap": target - rest,
                "specificity_ratio": target / rest if rest else float("nan")}]
        out += [{"cluster": 0, "arm": "control", "draw": j, "kind": "ablate", "magnitude": 1.0, "layer": 3,
                 "dlogppl_target": g, "dlogppl_rest": 0.0, "specificity_gap": g, "specificity_ratio": float("nan")}
                for j, g in enumerate(control_gaps)]
        return pd.DataFrame(out)

    def verdict(*args):
        out = specificity_verdicts(rows(*args))
        return out.loc[out.arm == "perturbation", ["specific", "specificity_verdict"]].iloc[0].tolist()

    assert verdict(0.9, 0.1, [0.05, 0.1]) == [True, "specific"]
    assert verdict(17.1, 15.2, [0.05, 0.1]) == [False, "non-specific damage"]  # the demo's code cluster
    assert verdict(0.9, 0.1, [0.05, 0.95]) == [False, "non-specific damage"]  # a control draw does as much
    assert verdict(0.3, 0.0, [0.05, 0.4]) == [False, "not beyond controls"]
    assert verdict(0.01, 0.004, [0.0]) == [False, "no measurable change"]
    small = specificity_verdicts(rows(0.01, 0.004, [0.0]))
    assert small["specificity_ratio"].isna().all()  # no ratio of two near-zero changes


def test_repeated_controls_names_clusters_whose_draws_coincide():
    rows = []
    for cluster, configs in {0: ["a", "a", "a"], 1: ["b", "c", "b"], 2: ["d", "e", "f"]}.items():
        rows.append({"kind": "ablate", "magnitude": 1.0, "cluster": cluster, "arm": "perturbation", "draw": 0, "config": "t"})
        rows += [{"kind": "ablate", "magnitude": 1.0, "cluster": cluster, "arm": "control", "draw": j, "config": c}
                 for j, c in enumerate(configs)]
    out = repeated_controls(pd.DataFrame(rows))
    assert out[["cluster", "requested", "distinct"]].values.tolist() == [[0, 3, 1], [1, 3, 2]]


# -- control draws in rounds (issue 27) ----------------------------------------------------
ROUND_COLUMNS = ("n_draws_used", "draws_stopped")  # the only columns that say how the draws were taken


def _same_rows(full: pd.DataFrame, rounds: pd.DataFrame) -> None:
    """Every row drawn in rounds equals the row of the same (cluster, arm, draw) drawn at once."""
    key = ["cluster", "arm", "draw"]
    shared = rounds[key].merge(full, on=key, how="left")
    columns = [c for c in full.columns if c not in ROUND_COLUMNS]
    pd.testing.assert_frame_equal(shared[columns].reset_index(drop=True), rounds[columns].reset_index(drop=True))


def _verdicts(report: pd.DataFrame) -> dict[int, str]:
    rows = report[report["arm"] == "perturbation"]
    return dict(zip(rows["cluster"], rows["specificity_verdict"]))


@pytest.mark.model
def test_rounds_keep_the_verdicts_and_rows_of_all_draws(model, documents, subspaces):
    from rephelpers.perturbations.specificity import control_arms_run, draws_used, replay_rounds, specificity_verdicts

    # project at m=1 (measured here): cluster 1 is specific (gap 0.77 against control gaps ≤ 0.26), so it
    # draws every round; cluster 2's own Δs (0.30 on its texts, 0.22 on the rest) rule "specific" out
    options = dict(clusters=[1, 2], n_texts=3, max_length=16, progress=False, n_controls=5)
    full = specificity_verdicts(specificity_report(model, documents, subspaces, "project", LAYER, **options))
    rounds = specificity_verdicts(specificity_report(model, documents, subspaces, "project", LAYER, control_rounds=2,
                                                     **options))
    assert _verdicts(rounds) == _verdicts(full) == {1: "specific", 2: "non-specific damage"}
    _same_rows(full, rounds)
    used = draws_used(rounds).set_index("cluster")
    assert used.loc[1, ["n_controls", "n_draws_used", "draws_stopped"]].tolist() == [5, 5, ""]  # three rounds: 2 + 2 + 1
    assert used.loc[2, ["n_controls", "n_draws_used", "draws_stopped"]].tolist() == [5, 2, "own Δ not specific"]
    assert rounds.groupby("cluster")["draw"].max().to_dict() == {1: 4, 2: 1}  # rows only for the draws run
    assert (full["n_draws_used"] == 5).all() and (full["draws_stopped"] == "").all()
    # arms run: one per distinct draw run (every draw here is distinct)
    assert full.groupby(["cluster", "arm"])["config"].nunique().loc[(slice(None), "control")].tolist() == [5, 5]
    assert control_arms_run(full) == 10 and control_arms_run(rounds) == 7
    assert used["arms_run"].tolist() == [5, 2]
    # replaying the report of all draws gives what the rounds ran (a finished run's before/after)
    pd.testing.assert_frame_equal(replay_rounds(full, 2), draws_used(rounds))


@pytest.mark.model
def test_a_control_draw_as_large_as_the_gap_stops_drawing(model, documents, subspaces):
    from rephelpers.perturbations.specificity import specificity_verdicts

    # shift ×3 (measured here): cluster 1's gap is 3.31 and its first control draw's 3.54
    options = dict(clusters=[1], n_texts=3, max_length=16, progress=False, n_controls=3)
    full = specificity_verdicts(specificity_report(model, documents, subspaces, "shift", LAYER, 3.0, **options))
    rounds = specificity_verdicts(specificity_report(model, documents, subspaces, "shift", LAYER, 3.0,
                                                     control_rounds=1, **options))
    assert _verdicts(rounds) == _verdicts(full) == {1: "non-specific damage"}
    assert rounds["arm"].tolist() == ["perturbation", "control"]
    assert set(rounds["draws_stopped"]) == {"a control draw's gap ≥ the perturbation's"}
    pert, control = rounds.iloc[0], rounds.iloc[1]
    assert control["specificity_gap"] >= pert["specificity_gap"] and pert["dlogppl_target"] >= 1.5 * pert["dlogppl_rest"]
    _same_rows(full, rounds)


def test_a_bad_round_design_fails_before_anything_runs():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) before the round design was checked")

    for bad in (0, -2, 2.5, True, "5"):
        with pytest.raises(RephelpersError, match="control_rounds .*must be None .* or a positive integer"):
            specificity_report(Untouchable(), pd.DataFrame(), [], "ablate", 3, n_controls=20, control_rounds=bad)
    with pytest.raises(RephelpersError, match="min_gap must be a finite number"):
        specificity_report(Untouchable(), pd.DataFrame(), [], "ablate", 3, control_rounds=5, min_gap=float("nan"))


def _gate_rows(target, rest, control_gaps, used=None, cap=None, stopped=""):
    out = [{"cluster": 0, "arm": "perturbation", "draw": 0, "kind": "ablate", "magnitude": 1.0, "layer": 3,
            "dlogppl_target": target, "dlogppl_rest": rest, "specificity_gap": target - rest,
            "specificity_ratio": float("nan")}]
    out += [{"cluster": 0, "arm": "control", "draw": j, "kind": "ablate", "magnitude": 1.0, "layer": 3,
             "dlogppl_target": g, "dlogppl_rest": 0.0, "specificity_gap": g, "specificity_ratio": float("nan")}
            for j, g in enumerate(control_gaps)]
    frame = pd.DataFrame(out)
    if used is not None:
        frame = frame.assign(n_draws_used=used, n_controls=cap, draws_stopped=stopped)
    return frame


def test_a_settled_verdict_is_the_verdict_of_every_draw():
    """Property check against specificity_verdicts itself: wherever draws_settled stops a prefix of
    the draws, the verdict on that prefix is the verdict on all of them."""
    from rephelpers.perturbations.specificity import draws_settled, specificity_verdicts

    def verdict(target, rest, gaps):
        out = specificity_verdicts(_gate_rows(target, rest, gaps))
        return out.loc[out.arm == "perturbation", "specificity_verdict"].iloc[0]

    rng = np.random.default_rng(0)
    settled = open_ = 0
    for _ in range(150):
        target = round(rng.choice([0.0, 0.02, 0.3, 0.6, 1.0]) + rng.normal(0, 0.05), 3)
        rest = round(rng.choice([0.0, 0.02, 0.1, 0.4]) + rng.normal(0, 0.05), 3)
        gaps = rng.normal(0.1, 0.2, 6).round(3)
        gaps[rng.random(6) < 0.15] = np.nan  # a draw with no defined gap
        whole = verdict(target, rest, gaps)
        for p in range(1, 7):
            if draws_settled(target, rest, gaps[:p]):
                settled += 1
                assert verdict(target, rest, gaps[:p]) == whole, (target, rest, gaps, p)
                break
        else:
            open_ += 1
            assert whole == "specific" or np.isnan(gaps).any()  # only a still-specific cell needs every draw
    assert settled > 50 and open_ > 10  # both branches were exercised


def test_verdicts_refuse_thresholds_that_would_reopen_a_stopped_cluster():
    from rephelpers.perturbations.specificity import specificity_verdicts

    stopped = _gate_rows(0.04, 0.0, [0.01], used=1, cap=5, stopped="own Δ not specific")
    assert specificity_verdicts(stopped)["specificity_verdict"].iloc[0] == "no measurable change"
    with pytest.raises(RephelpersError, match="stopped after 1 of 5 .* pass specificity_report and specificity_verdicts"):
        specificity_verdicts(stopped, min_gap=0.01)
    complete = _gate_rows(0.04, 0.0, [0.01] * 5, used=5, cap=5)
    assert specificity_verdicts(complete, min_gap=0.01)["specificity_verdict"].iloc[0] == "specific"


def test_control_arms_run_counts_distinct_configs_in_reports_without_own_pass():
    from rephelpers.perturbations.specificity import control_arms_run

    rows = []
    for cluster, configs in {0: ["a", "a", "a"], 1: ["b", "c", "b"], 2: ["d", "e", "f"]}.items():
        rows.append({"kind": "ablate", "magnitude": 1.0, "cluster": cluster, "arm": "perturbation", "draw": 0, "config": "t"})
        rows += [{"kind": "ablate", "magnitude": 1.0, "cluster": cluster, "arm": "control", "draw": j, "config": c}
                 for j, c in enumerate(configs)]
    report = pd.DataFrame(rows)
    assert control_arms_run(report) == 1 + 2 + 3
    marked = report.assign(own_pass=[True, True, False, False, True, True, True, False, True, True, True, True])
    assert control_arms_run(marked) == 1 + 2 + 3
