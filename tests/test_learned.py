"""The learned, specificity-seeking projection (kind ``learned``) and multi-layer perturbations in stage 04."""

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from rephelpers.abilities.evaluation import cluster_configs
from rephelpers.artifacts import RunDir
from rephelpers.dimensions.components import ClusterComponents
from rephelpers.errors import RephelpersError
from rephelpers.interventions.edits import LearnedProjection, perturbation_from_dict
from rephelpers.interventions.intervene import Intervention, interventions_to_json, run_logits
from rephelpers.perturbations.controls import second_moment_spectrum
from rephelpers.perturbations.kinds import build, fit_leace, matched_control
from rephelpers.perturbations.learned import (
    fit_learned_projection, fit_table, learned_artifact, load_learned, objective, with_learned,
)
from rephelpers.perturbations.specificity import EDIT_TOLERANCE, sample_heldout, specificity_report, specificity_verdicts
from rephelpers.representations.activations import extract_activations

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
LAYERS = (24, 26)


@pytest.fixture(scope="module")
def documents():
    rows = [{"id": f"c{k}-{i}", "doc_id": f"c{k}-{i}", "text": t, "cluster": k, "split": "heldout" if i >= 4 else "train"}
            for k, texts in TEXTS.items() for i, t in enumerate(texts)]
    return pd.DataFrame(rows)


def _anisotropic(rng, n, d):
    scales = np.exp(rng.normal(0, 1.0, size=d))
    return rng.normal(size=(n, d)) * scales + rng.normal(size=d)


# -- without the model -----------------------------------------------------------------------
def test_learned_projection_is_the_formula_and_round_trips():
    rng = np.random.default_rng(0)
    d, r = 12, 3
    U = np.linalg.qr(rng.normal(size=(d, r)))[0]  # [d, r]
    mu = rng.normal(size=d)
    h = rng.normal(size=(5, 7, d))
    p = LearnedProjection(basis=U.T, mean=mu, strength=0.6)
    expected = h - 0.6 * (h - mu) @ U @ U.T
    np.testing.assert_allclose(p.apply(torch.as_tensor(h)).numpy(), expected, atol=1e-12)
    assert p.rank == r
    back = perturbation_from_dict(json.loads(p.to_json()))
    assert back == p and torch.equal(back.apply(torch.as_tensor(h)), p.apply(torch.as_tensor(h)))
    # full strength puts every state's span(U) coordinates at μ's, and is idempotent
    full = LearnedProjection(basis=U.T, mean=mu)
    once = full.apply(torch.as_tensor(h)).numpy()
    np.testing.assert_allclose(once @ U, np.broadcast_to(mu @ U, once[..., :r].shape), atol=1e-12)
    np.testing.assert_allclose(full.apply(torch.as_tensor(once)).numpy(), once, atol=1e-12)
    # components carry it through their dict form, and build() sets its strength
    comps = ClusterComponents.from_dict(ClusterComponents(layer=1, cluster=0, learned=full).to_dict())
    assert comps.learned == full and build("learned", comps, 0.25).strength == 0.25


def test_learned_projection_rejects_bad_shapes():
    rng = np.random.default_rng(1)
    with pytest.raises(RephelpersError, match="rank 4 must be below the hidden size 4"):
        LearnedProjection(basis=np.eye(4), mean=np.zeros(4)).check(4)
    with pytest.raises(RephelpersError, match="mean has 3 entries"):
        LearnedProjection(basis=rng.normal(size=(2, 4)), mean=np.zeros(3)).check(4)
    with pytest.raises(RephelpersError, match="rank 0"):
        LearnedProjection(basis=(), mean=np.zeros(4)).check(4)
    with pytest.raises(RephelpersError, match="no 'learned'"):
        build("learned", ClusterComponents(layer=1, cluster=0))


def test_objective_is_the_bounded_formula():
    """J = Δ − |L_k − L_k⁰ − Δ| − λ·max(0, L_rest − L_rest⁰), checked against a plain evaluation."""
    def plain(lk, lr, bk, br, lam, target):
        rise_k, rise_rest = lk - bk, lr - br
        if target is None:
            return rise_k - lam * rise_rest
        own = min(rise_k, 2 * target - rise_k)
        return own - lam * (rise_rest if rise_rest > 0 else 0.0)

    for lk, lr in [(2.0, 3.0), (2.5, 3.0), (3.0, 3.2), (6.0, 2.5), (1.5, 2.9)]:
        for lam, target in [(10.0, 1.0), (1.0, 0.5), (1.0, None)]:
            got = float(objective(torch.tensor(lk), torch.tensor(lr), 2.0, 3.0, lam, target))
            assert got == pytest.approx(plain(lk, lr, 2.0, 3.0, lam, target)), (lk, lr, lam, target)
    # no edit scores 0, the target exactly scores Δ, and overshooting costs like falling short
    assert float(objective(torch.tensor(2.0), torch.tensor(3.0), 2.0, 3.0, 10.0, 1.0)) == 0.0
    assert float(objective(torch.tensor(3.0), torch.tensor(3.0), 2.0, 3.0, 10.0, 1.0)) == pytest.approx(1.0)
    assert float(objective(torch.tensor(3.5), torch.tensor(3.0), 2.0, 3.0, 10.0, 1.0)) == pytest.approx(
        float(objective(torch.tensor(2.5), torch.tensor(3.0), 2.0, 3.0, 10.0, 1.0)))


def test_learned_control_matches_the_edit_size():
    """The control is a random orthonormal rank-r projection about the same μ, rescaled so that its
    edit ‖ĥ − h‖ matches the learned one's: exactly in RMS on the spectrum's own states, within
    EDIT_TOLERANCE in mean norm on fresh states from the same distribution."""
    rng = np.random.default_rng(3)
    d, r = 40, 4
    states = _anisotropic(rng, 4000, d)
    spectrum = second_moment_spectrum(states)
    cov = np.cov(states.T)
    U = np.linalg.eigh(cov)[1][:, -r:]  # the top-variance subspace: far more than a random one captures
    mu = states.mean(0)
    target = LearnedProjection(basis=U.T, mean=mu)
    comps = ClusterComponents(layer=2, cluster=1, learned=target)
    control = matched_control("learned", comps, d, 1.0, seed=0, spectrum=spectrum)
    assert isinstance(control, LearnedProjection) and control.rank == r and control.mean == target.mean
    B = np.asarray(control.basis)
    np.testing.assert_allclose(B @ B.T, np.eye(r), atol=1e-8)
    assert np.linalg.norm(B @ U) ** 2 < r / 2  # mostly outside the learned subspace

    def edits(p, x):
        t = torch.as_tensor(x)
        return (p.apply(t) - t).norm(dim=-1).numpy()

    rms = lambda e: float(np.sqrt((e ** 2).mean()))  # noqa: E731
    assert rms(edits(control, states)) == pytest.approx(rms(edits(target, states)), rel=1e-6)
    fresh = _anisotropic(np.random.default_rng(3), 2000, d)  # same scales and mean, new draws
    ratio = edits(control, fresh).mean() / edits(target, fresh).mean()
    assert 1 / EDIT_TOLERANCE <= ratio <= EDIT_TOLERANCE
    # a uniformly random subspace, neither drawn from the variance strata nor rescaled, edits far less
    uniform = LearnedProjection(basis=np.linalg.qr(rng.normal(size=(d, r)))[0].T, mean=mu)
    assert edits(uniform, fresh).mean() / edits(target, fresh).mean() < 1 / EDIT_TOLERANCE
    # and without a spectrum the uniform draw is rescaled by the components' std instead
    with_std = ClusterComponents(layer=2, cluster=1, learned=target, std=states.std(0))
    rough = matched_control("learned", with_std, d, 1.0, seed=0)
    assert rough.matching == "uniform, rescaled by std"
    assert 1 / 1.5 <= edits(rough, fresh).mean() / edits(target, fresh).mean() <= 1.5
    assert control == matched_control("learned", comps, d, 1.0, seed=0, spectrum=spectrum)
    assert control != matched_control("learned", comps, d, 1.0, seed=1, spectrum=spectrum)


# -- with the model ----------------------------------------------------------------------------
@pytest.mark.model
def test_fit_errors_come_before_compute(model, documents):
    for rank in (0, model.d_model, model.d_model + 3):
        with pytest.raises(RephelpersError, match="rank must be an integer in 1..575"):
            fit_learned_projection(model, documents, 1, 26, rank=rank, progress=False)
    with pytest.raises(RephelpersError, match="cluster 9 has no training documents"):
        fit_learned_projection(model, documents, 9, 26, progress=False)
    with pytest.raises(RephelpersError, match="layer 30 is out of range"):
        fit_learned_projection(model, documents, 1, 30, progress=False)
    with pytest.raises(RephelpersError, match="steps must be ≥ 1"):
        fit_learned_projection(model, documents, 1, 26, steps=0, progress=False)
    for target in (0, -1.0, float("nan"), "1"):
        with pytest.raises(RephelpersError, match="target Δ must be a finite number of nats > 0"):
            fit_learned_projection(model, documents, 1, 26, target=target, progress=False)


@pytest.mark.model
def test_learned_edit_equals_a_plain_hook_on_hidden_states(model, documents):
    rng = np.random.default_rng(5)
    layer, r = 20, 3
    U = np.linalg.qr(rng.normal(size=(model.d_model, r)))[0]
    mu = rng.normal(size=model.d_model)
    p = LearnedProjection(basis=U.T, mean=mu, strength=0.8)
    batch = model.encode(TEXTS[2][:3], max_length=16)
    got = run_logits(model, batch, [Intervention(p, layer)])
    seen = {}

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        seen["h"] = h.detach().clone()
        hd = h.double()
        new = (hd - 0.8 * (hd - torch.as_tensor(mu)) @ torch.as_tensor(U) @ torch.as_tensor(U).T).to(h.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    handle = model.module(layer).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            want = model.hf(**batch).logits
    finally:
        handle.remove()
    with torch.inference_mode():
        plain = model.hf(**batch, output_hidden_states=True)
    torch.testing.assert_close(seen["h"], plain.hidden_states[layer + 1])  # the hook saw the layer's output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain.logits).abs().max() > 1e-2  # and the edit did change the logits


@pytest.fixture(scope="module")
def fitted(model, documents, tmp_path_factory):
    run = tmp_path_factory.mktemp("learned_run")
    comps = [ClusterComponents(layer=26, cluster=k) for k in TEXTS]
    options = dict(rank=2, steps=10, lr=0.1, batch_texts=2, n_texts=4, max_length=16)
    out, fits = with_learned(run, model, documents, comps, 26, clusters=[1], progress=False, **options)
    return run, comps, out, fits, options


@pytest.mark.model
def test_fit_is_orthonormal_and_beats_a_random_subspace(model, documents, fitted):
    run, comps, out, fits, options = fitted
    fit = fits[1]
    U = np.asarray(fit.projection.basis)
    np.testing.assert_allclose(U @ U.T, np.eye(2), atol=1e-5)
    assert out[1].learned == fit.projection and out[0].learned is None and comps[1].learned is None
    assert len(fit.objective) == 10 and fit.settings["n_k"] == 4
    # J on the fitting texts: the fitted U raises it more than a random U of the same rank
    assert fit.gain("learned") > fit.gain("random") + 0.01, fit.losses
    table = fit_table(fits)
    assert table.loc[0, "gain_learned"] == pytest.approx(fit.gain("learned"))
    # cached in the run directory under its key: a second call loads it, other settings refit
    assert (run / learned_artifact(1, 26)).exists()
    again, fits_again = with_learned(run, model, documents, comps, 26, clusters=[1], progress=False, **options)
    assert fits_again[1].projection == fit.projection and fits_again[1].seconds == fit.seconds
    with pytest.raises(RephelpersError, match="unknown options"):
        with_learned(run, model, documents, comps, 26, clusters=[1], progress=False, ranks=3)
    with pytest.raises(RephelpersError, match=r"clusters \[7\] have no components"):
        with_learned(run, model, documents, comps, 26, clusters=[7], progress=False)


@pytest.mark.model
def test_report_scores_the_learned_kind_on_heldout_texts(model, documents, fitted):
    _, _, out, fits, _ = fitted
    report = specificity_report(model, documents, out, "learned", 26, clusters=[1], n_texts=3, max_length=16,
                                progress=False, n_controls=2, spectrum=None)
    assert list(report["arm"]) == ["perturbation", "control", "control"]
    assert set(report["kind"]) == {"learned"} and set(report["layers"]) == {"26"}
    config = json.loads(report.loc[0, "config"])
    assert config["kind"] == "learned" and config["strength"] == 1.0
    # the held-out texts the report scores are never among the fitting texts
    target, rest = sample_heldout(documents, 1, 3, 0)
    assert set(target["split"]) == set(rest["split"]) == {"heldout"}
    assert report["edit_norm"].gt(0).all() and report["edit_ratio"].notna().all()


@pytest.fixture(scope="module")
def two_layer_components(model, documents):
    acts = extract_activations(model, list(documents["text"]), list(LAYERS), batch_size=32, max_length=16,
                               progress=False, use_cache=False)
    train = (documents["split"] == "train").to_numpy()
    labels = documents["cluster"].to_numpy()
    return [ClusterComponents(layer=l, cluster=k, std=acts[l][train].std(0),
                              leace=fit_leace(acts[l][train].astype(np.float64), labels[train] == k))
            for l in LAYERS for k in TEXTS]


@pytest.mark.model
def test_multi_layer_leace_equals_single_layer_erasers_by_plain_hooks(model, documents, two_layer_components):
    report = specificity_report(model, documents, two_layer_components, "leace", 26, clusters=[1], n_texts=3,
                                max_length=16, layers=list(LAYERS), progress=False, spectrum=None)
    row = report[report["arm"] == "perturbation"].iloc[0]
    assert row["kind"] == "multi_leace" and row["layers"] == "24,26" and row["setting"] == "k1:multi_leace:m1"
    configs = json.loads(row["config"])
    assert [c["layer"] for c in configs] == [24, 26]
    erasers = {c.layer: c.leace for c in two_layer_components if c.cluster == 1}

    def hook_for(eraser):
        mean, left, right = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (eraser.mean, eraser.left, eraser.right))

        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            new = (h.double() - ((h.double() - mean) @ right.T) @ left).to(h.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    target, _ = sample_heldout(documents, 1, 3, 0)
    batch = model.encode(list(target["text"]), max_length=16)
    handles = [model.module(l).register_forward_hook(hook_for(erasers[l])) for l in LAYERS]
    try:
        with torch.inference_mode():
            logits = model.hf(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    mask = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
    nll = -logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)[mask]
    assert row["ppl_target_after"] == pytest.approx(float(torch.exp(nll.mean())), rel=2e-3)
    # one layer alone is a different perturbation (so the check above can fail)
    single = specificity_report(model, documents, two_layer_components, "leace", 26, clusters=[1], n_texts=3,
                                max_length=16, progress=False, spectrum=None)
    assert abs(single.loc[0, "ppl_target_after"] - row["ppl_target_after"]) > 1e-3 * row["ppl_target_after"]
    # the control acts at both layers too, and the multi-layer edit adds the layers' edits
    control = json.loads(report[report["arm"] == "control"].iloc[0]["config"])
    assert [c["layer"] for c in control] == [24, 26] and all(c["perturbation"]["kind"] == "leace" for c in control)
    assert row["edit_norm"] > single.loc[0, "edit_norm"]


@pytest.mark.model
def test_multi_layer_errors_come_before_compute(model, documents, two_layer_components):
    with pytest.raises(RephelpersError, match="layer 26 must be one of layers"):
        specificity_report(model, documents, two_layer_components, "leace", 26, layers=[24], progress=False)
    with pytest.raises(RephelpersError, match=r"no stage-03 components for \(layer, cluster\) \[\(20, 0\)"):
        specificity_report(model, documents, two_layer_components, "leace", 26, layers=[20, 26], progress=False)
    with pytest.raises(RephelpersError, match="layer 40 is out of range"):
        specificity_report(model, documents, two_layer_components, "leace", 26, layers=[26, 40], progress=False)


@pytest.mark.model
def test_stage_05_multi_layer_leace_evaluates_stage_04s_interventions(model, documents, two_layer_components):
    """Stage 05's multi_leace configs are, arm by arm, the interventions stage 04 ran (whose
    perplexity the test above checks against plain hooks): the eraser at every layer, and each
    control draw at every layer with the same seed. Other kinds stay at the one layer."""
    with_dims = [dataclasses.replace(c, dims=(1, 5, 9)) for c in two_layer_components]  # for a kind on R_k beside it
    configs, meta = cluster_configs(with_dims, 26, model.d_model, kinds=["leace", "ablate"], n_controls=2,
                                    leace_layers=[26, 24], spectrum=None, spectra={24: None})
    setting = meta["k1:multi_leace:m1"]
    assert (setting.kind, setting.layer, setting.arm) == ("multi_leace", 26, "perturbation")
    assert {m.kind for m in meta.values()} == {"none", "multi_leace", "ablate"}
    assert all(len(configs[cid]) == 1 for cid, m in meta.items() if m.kind == "ablate")
    report = specificity_report(model, documents, two_layer_components, "leace", 26, clusters=[1], n_texts=3,
                                max_length=16, layers=list(LAYERS), progress=False, spectrum=None, n_controls=2)
    for _, row in report.iterrows():
        assert json.loads(interventions_to_json(configs[row["setting"]])) == json.loads(row["config"]), row["setting"]
    assert [iv.layer for iv in configs["k1:multi_leace:m1:control1"]] == [24, 26]
    # one layer: the single-layer setting, as before
    single, _ = cluster_configs(two_layer_components, 26, model.d_model, kinds="leace", n_controls=1)
    assert "k1:leace:m1" in single and [iv.layer for iv in single["k1:leace:m1"]] == [26]


@pytest.mark.model
def test_stage_05_leace_layers_errors_name_the_fix(two_layer_components):
    with pytest.raises(RephelpersError, match="add 'leace' to perturbation"):
        cluster_configs(two_layer_components, 26, 576, kinds="ablate", leace_layers=[24, 26])
    with pytest.raises(RephelpersError, match="intervention_layer 26 must be one of leace_layers"):
        cluster_configs(two_layer_components, 26, 576, kinds="leace", leace_layers=[24])
    with pytest.raises(RephelpersError, match=r"no stage-03 components for \(layer, cluster\) \[\(20, 0\)"):
        cluster_configs(two_layer_components, 26, 576, kinds="leace", leace_layers=[20, 26])
    with pytest.raises(RephelpersError, match="leace_layers must be None or a list"):
        cluster_configs(two_layer_components, 26, 576, kinds="leace", leace_layers=26)


@pytest.mark.model
def test_bounded_objective_keeps_the_rest_flat_where_the_unbounded_one_does_not(model, documents):
    """Same texts, site, rank, steps and seed: the unbounded J = L_k − L_rest (the first version)
    wrecks the prose cluster (+5.9 nats after 12 steps, measured) and the rest with it (+1.6); the
    bounded objective (Δ = 1, λ = 10) leaves the rest's loss on the fitting texts within 0.25 nats
    of its unedited value (measured −0.26) and raises the cluster's towards Δ (0.41), not past 2Δ."""
    options = dict(rank=2, steps=12, lr=0.1, batch_texts=2, n_texts=4, max_length=16, progress=False)
    bounded = fit_learned_projection(model, documents, 2, 26, target=1.0, lam=10.0, **options)
    unbounded = fit_learned_projection(model, documents, 2, 26, target=None, lam=1.0, **options)

    def rises(fit):
        return tuple(fit.losses["learned"][g] - fit.losses["none"][g] for g in ("k", "rest"))

    rise_k, rise_rest = rises(bounded)
    old_k, old_rest = rises(unbounded)
    assert old_rest > 0.25 and old_k > 2.0, unbounded.losses  # the bounds below can fail
    assert rise_rest < 0.25, bounded.losses
    assert 0.2 < rise_k < 2.0 and rise_k > rise_rest + 0.2, bounded.losses
    assert bounded.gain("learned") > bounded.gain("random"), bounded.losses
    assert bounded.settings["target"] == 1.0 and unbounded.settings["target"] is None


@pytest.mark.model
def test_stage_05_applies_exactly_the_fitted_subspace(model, documents, fitted, tmp_path):
    """Stage 05 reads the U stage 04 cached (no refit) into the components, builds the learned
    setting and its control from it, and the setting's edit at the layer is h − UUᵀ(h − μ) as a
    plain forward hook computes it; without a fit it says to run notebook 04."""
    source, comps, _, fits, _ = fitted
    shutil.copytree(source, tmp_path / "run")  # a copy: the checks below damage it
    run = RunDir(tmp_path / "run")
    with pytest.raises(RephelpersError, match=r"no fitted subspace for clusters \[0, 2\] at layer 26 \(resid\).*"
                                              r"run notebook 04 with 'learned' in perturbation"):
        load_learned(run, comps, 26, model=model)
    only = [c for c in comps if c.cluster == 1]
    loaded, names = load_learned(run, only, 26, model=model)
    assert names == [learned_artifact(1, 26)] and loaded[0].learned == fits[1].projection
    configs, meta = cluster_configs(loaded, 26, model.d_model, kinds="learned", n_controls=1)
    assert set(configs) == {"baseline", "k1:learned:m1", "k1:learned:m1:control"}
    (intervention,) = configs["k1:learned:m1"]
    assert intervention.perturbation == fits[1].projection and meta["k1:learned:m1"].kind == "learned"
    U = torch.as_tensor(np.asarray(fits[1].projection.basis)).T  # [d, r]
    mu = torch.as_tensor(np.asarray(fits[1].projection.mean))
    batch = model.encode(TEXTS[1][4:7], max_length=16)
    got = run_logits(model, batch, [intervention])

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        new = (h.double() - (h.double() - mu) @ U @ U.T).to(h.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    handle = model.module(26).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            want = model.hf(**batch).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    control = run_logits(model, batch, configs["k1:learned:m1:control"])
    assert (control - want).abs().max() > 1e-2  # a different U changes the logits otherwise: the check can fail
    # a fit of the first, unbounded version, or on another corpus, is refused rather than used
    state = run.path(learned_artifact(1, 26)).read_text()
    try:
        data = json.loads(state)
        del data["settings"]["target"]
        run.path(learned_artifact(1, 26)).write_text(json.dumps(data))
        with pytest.raises(RephelpersError, match="first, unbounded objective.*re-run notebook 04"):
            load_learned(run, only, 26)
    finally:
        run.path(learned_artifact(1, 26)).write_text(state)
    load_learned(run, only, 26)  # restored: read again
    run.save_json("documents.parquet", {"not": "the same corpus"}, key="another")
    with pytest.raises(RephelpersError, match="another version of documents.parquet"):
        load_learned(run, only, 26)


@pytest.mark.model
def test_multi_layer_controls_drawn_in_rounds_equal_those_drawn_at_once(model, documents, two_layer_components):
    options = dict(clusters=[1], n_texts=3, max_length=16, layers=list(LAYERS), progress=False, spectrum=None,
                   n_controls=3)
    full = specificity_verdicts(specificity_report(model, documents, two_layer_components, "leace", 26, **options))
    rounds = specificity_verdicts(specificity_report(model, documents, two_layer_components, "leace", 26,
                                                     control_rounds=1, **options))
    pert = lambda r: r[r.arm == "perturbation"].set_index("cluster")["specificity_verdict"].to_dict()  # noqa: E731
    assert pert(rounds) == pert(full) and set(rounds["kind"]) == {"multi_leace"}
    key = ["cluster", "arm", "draw"]
    columns = [c for c in full.columns if c not in ("n_draws_used", "draws_stopped")]
    shared = rounds[key].merge(full, on=key, how="left")
    pd.testing.assert_frame_equal(shared[columns].reset_index(drop=True), rounds[columns].reset_index(drop=True))
    # a cluster stops early only with a reason, and runs every draw otherwise
    for _, group in rounds.groupby("cluster"):
        drawn = int((group.arm == "control").sum())
        assert drawn == group["n_draws_used"].iloc[0] and (drawn == 3) == (group["draws_stopped"].iloc[0] == "")
