"""Matched controls edit as much as their perturbation (issue 9): magnitude strata for dimension
controls, captured second moment for project controls, and the check on the demo model."""

import json

import numpy as np
import pytest
import torch

from rephelpers.dimensions.association import cluster_subspace, mean_difference_scores, select_dimensions
from rephelpers.interventions.edits import perturbation_from_dict
from rephelpers.perturbations.controls import MATCH_CARRY, MATCH_WINDOW, control_profile, second_moment_spectrum
from rephelpers.perturbations.kinds import build, matched_control, matched_controls

D = 64
TOLERANCE = 1.25  # stage 04's default EDIT_TOLERANCE


def _synthetic(seed=0, n=4000):
    """Token states whose per-dimension RMS spans three orders of magnitude, two of them massive."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(0.5), np.log(50.0), size=D))
    scale[[5, 9]] = 2000.0  # massive
    mix = np.linalg.qr(rng.normal(size=(D, D)))[0]
    states = rng.normal(size=(n, D)) * scale
    states[:, 10:] = states[:, 10:] @ (np.eye(D - 10) * 0.8 + 0.2 * mix[10:, 10:])  # some correlation
    return states, scale


def _subspace(states, dims, massive=(5, 9), cluster=0, layer=3):
    return {"layer": layer, "cluster": cluster, "dims": list(dims), "massive_dims": list(massive),
            "token_rms": np.sqrt((states**2).mean(0)).tolist(), "mean_out": states.mean(0).tolist(),
            "std": states.std(0).tolist()}


def test_dimension_partners_come_from_their_magnitude_stratum():
    states, _ = _synthetic()
    rms = np.sqrt((states**2).mean(0))
    order = [i for i in np.argsort(-rms) if i not in (5, 9)]
    dims = order[6:14]  # high but not the highest: every stratum has peers
    sub = _subspace(states, dims)
    for seed in range(5):
        control = matched_control("ablate", sub, D, seed=seed)
        assert len(control.dims) == len(dims) and not set(control.dims) & set(dims)
        assert "token_rms strata" in control.matching
        mine, theirs = np.sort(rms[dims]), np.sort(rms[list(control.dims)])
        # paired by rank, each partner within its stratum, widened at most by the carry
        assert np.all(np.abs(np.log(theirs / mine)) <= np.log(MATCH_CARRY * MATCH_WINDOW))
        ratio = np.sqrt((rms[list(control.dims)] ** 2).sum() / (rms[dims] ** 2).sum())
        assert 1 / 1.1 <= ratio <= 1.1
    # a uniform draw outside R_k and the massive dims would not match: its expected ratio
    others = np.setdiff1d(np.arange(D), [*dims, 5, 9])
    assert np.sqrt(len(dims) * (rms[others] ** 2).mean() / (rms[dims] ** 2).sum()) < 1 / TOLERANCE


def test_massive_dimensions_are_never_drawn():
    states, _ = _synthetic()
    rms = np.sqrt((states**2).mean(0))
    big = [i for i in np.argsort(-rms) if i not in (5, 9)][:6]  # the largest ordinary dims: massive ones are nearest
    spectrum = second_moment_spectrum(states)
    for kind in ("ablate", "mean_ablate", "noise"):
        for seed in range(20):
            sub = _subspace(states, big)
            assert not {5, 9} & set(matched_control(kind, sub, D, seed=seed).dims)
            # without the key, the spectrum's detector finds them
            del sub["massive_dims"]
            assert not {5, 9} & set(matched_control(kind, sub, D, seed=seed, spectrum=spectrum).dims)


def test_controls_are_deterministic_per_seed_layer_and_cluster():
    states, _ = _synthetic()
    spectrum = second_moment_spectrum(states)
    sub = _subspace(states, [20, 21, 22, 23])
    sub["basis"] = np.linalg.qr(np.random.default_rng(1).normal(size=(D, 3)))[0].T.tolist()
    for kind in ("ablate", "mean_ablate", "noise", "project"):
        a = matched_control(kind, sub, D, seed=4, spectrum=spectrum)
        assert a == matched_control(kind, sub, D, seed=4, spectrum=spectrum)
        assert a.matching == matched_control(kind, sub, D, seed=4, spectrum=spectrum).matching
        others = [matched_control(kind, {**sub, **change}, D, seed=s, spectrum=spectrum)
                  for s, change in ((5, {}), (4, {"cluster": 1}), (4, {"layer": 7}))]
        assert all(o != a for o in others), kind
        draws = matched_controls(kind, sub, D, seed=4, n_controls=3, spectrum=spectrum)
        assert draws[0] == a and draws[1] == matched_control(kind, sub, D, seed=5, spectrum=spectrum)
        back = perturbation_from_dict(json.loads(a.to_json()))
        assert back == a and back.matching == a.matching  # the matching travels with the config


def test_mean_ablate_and_noise_match_on_the_spread_that_governs_their_edit():
    rng = np.random.default_rng(2)
    offset = rng.uniform(-30, 30, size=D)
    spread = np.exp(rng.uniform(np.log(0.5), np.log(20.0), size=D))
    states = offset + rng.normal(size=(5000, D)) * spread
    spectrum = second_moment_spectrum(states)
    sub = {"layer": 0, "cluster": 0, "dims": list(np.argsort(-spread)[4:10]), "mean_out": states.mean(0).tolist(),
           "massive_dims": []}
    profile, source = control_profile("mean_ablate", sub, D, spectrum)
    assert "spread about mean_out" in source
    np.testing.assert_allclose(profile, states.std(0), rtol=1e-6)  # μ_out is the mean here: spread = std
    assert control_profile("noise", sub, D, spectrum)[0] == pytest.approx(states.std(0), rel=1e-6)
    np.testing.assert_allclose(control_profile("ablate", sub, D, spectrum)[0], np.sqrt((states**2).mean(0)))
    target = build("mean_ablate", sub)
    x = torch.as_tensor(states[:2000])
    e_t = (target.apply(x) - x).norm(dim=-1).mean()
    for seed in range(4):
        control = matched_control("mean_ablate", sub, D, seed=seed, spectrum=spectrum)
        assert 1 / TOLERANCE <= float((control.apply(x) - x).norm(dim=-1).mean() / e_t) <= TOLERANCE
    # fallbacks: pooled statistics, then uniform
    site = {"layer": 3, "cluster": 0}
    assert control_profile("ablate", {**site, "mean_out": [1.0] * D, "std": [1.0] * D}, D)[1] == "pooled rms"
    assert control_profile("ablate", site, D) == (None, "uniform")
    assert matched_control("ablate", {**site, "dims": [1, 2]}, D).matching == "uniform"


def test_project_control_captures_the_same_second_moment():
    states, _ = _synthetic(seed=3)
    spectrum = second_moment_spectrum(states)
    M = states.T @ states / len(states)
    rng = np.random.default_rng(4)
    # a V_k that leans on high-variance directions (as a cluster's principal subspace does)
    top = spectrum.eigenvectors[2:12]
    V = np.linalg.qr((rng.normal(size=(3, 10)) @ top + 0.1 * rng.normal(size=(3, D))).T)[0].T
    V[:, [5, 9]] *= 0.3  # a little weight on the massive dimensions
    V = np.linalg.qr(V.T)[0].T
    sub = {"layer": 0, "cluster": 1, "dims": [0], "basis": V.tolist(), "massive_dims": [5, 9]}
    wanted = np.trace(V @ M @ V.T)
    uniform = matched_control("project", sub, D)
    assert uniform.matching == "uniform (no spectrum)"
    for seed in range(6):
        control = matched_control("project", sub, D, seed=seed, spectrum=spectrum)
        C = np.asarray(control.basis)
        np.testing.assert_allclose(C @ C.T, np.eye(3), atol=1e-9)
        np.testing.assert_allclose(C[:, [5, 9]], V[:, [5, 9]], atol=1e-12)  # the massive part is V_k's
        assert 1 / 1.1 ** 2 <= np.trace(C @ M @ C.T) / wanted <= 1.1**2
        assert np.linalg.norm(C @ V.T) ** 2 < 1.5  # not V_k again (rank 3 would be 3)


# -- the demo model ---------------------------------------------------------------------------------
LAYER = 15
ARITH = [f"{a} plus {b} equals {a + b}, and {a} times {b} is {a * b}." for a, b in
         [(2, 3), (7, 5), (11, 4), (6, 9), (8, 8), (3, 12), (10, 1), (4, 7)]]
PROSE = [
    "The river ran quietly past the old mill at the edge of the village.",
    "She opened the window and the cold air of the morning came in.",
    "Birds gathered on the wire before the storm rolled over the hills.",
    "He read the letter twice and then put it away in the drawer.",
    "The market was busy with farmers and traders selling their goods.",
    "Snow covered the hills for most of the winter that year.",
    "They walked home slowly along the dark road under the stars.",
    "A small boat drifted across the lake in the evening light.",
]


@pytest.mark.model
def test_controls_match_the_edit_size_on_the_demo_model(model):
    texts = ARITH + PROSE
    labels = np.array([0] * len(ARITH) + [1] * len(PROSE))
    batch = model.encode(texts, max_length=32)
    seen = {}

    class Stop(Exception):
        pass

    def hook(_module, _inputs, out):
        seen["h"] = (out[0] if isinstance(out, tuple) else out).detach().float()
        raise Stop  # nothing after the layer is needed

    handle = model.module(LAYER).register_forward_hook(hook)
    try:
        with torch.inference_mode(), pytest.raises(Stop):
            model.hf(**batch)
    finally:
        handle.remove()
    h, mask = seen["h"], batch["attention_mask"].bool()
    pooled = ((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).double().numpy()
    states = h[mask].double().numpy()
    spectrum = second_moment_spectrum(states)
    ratio = (np.abs(states) / np.median(np.abs(states), axis=1, keepdims=True)).max(0)
    massive = np.flatnonzero(ratio > 100)
    assert len(massive) >= 1  # SmolLM2's attention sink
    rms = np.sqrt((states**2).mean(0))
    candidates = np.setdiff1d(np.arange(model.d_model), massive)  # stage 03 keeps massive dims out of R_k
    scores = mean_difference_scores(pooled, labels)

    def edit(p):  # ‖ĥ − h‖ per real token, averaged: computed here, not by the package
        return float((p.apply(h) - h).norm(dim=-1)[mask].mean())

    checked = []
    for k in (0, 1):
        dims = candidates[select_dimensions(scores[k][candidates], top_k=32)]
        sub = {"layer": LAYER, "cluster": k, "dims": dims.tolist(), "massive_dims": massive.tolist(),
               "std": pooled.std(0).tolist(), **cluster_subspace(pooled, labels, k, 4)}
        # the largest edit any 32 eligible dimensions can make: R_k may hold the few largest ordinary ones
        best = np.sort(rms[np.setdiff1d(candidates, dims)])[::-1][: len(dims)]
        reachable = np.sqrt((best**2).sum() / (rms[dims] ** 2).sum())
        for kind in ("ablate", "mean_ablate", "noise", "project"):
            target = edit(build(kind, sub))
            for control in matched_controls(kind, sub, model.d_model, n_controls=2, spectrum=spectrum):
                r = edit(control) / target
                if kind in ("ablate", "mean_ablate") and reachable < 1 / TOLERANCE:
                    assert r >= 0.8 * reachable, (k, kind, r, reachable)  # as close as any set gets
                    assert not set(control.dims) & set(massive)
                else:
                    assert 1 / TOLERANCE <= r <= TOLERANCE, (k, kind, r, control.matching)
                    checked.append(kind)
    assert set(checked) == {"ablate", "mean_ablate", "noise", "project"}
