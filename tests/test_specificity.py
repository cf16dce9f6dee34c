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
