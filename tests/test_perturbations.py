"""Perturbations against independent numpy / scipy / scikit-learn computations (no model)."""

import json

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from rephelpers.errors import RephelpersError
from rephelpers.interventions.edits import (
    Perturbation, Ablate, Gradient, LearnedProjection, Leace, Noise, Project, Shift, perturbation_from_dict, registered_kinds,
)
from rephelpers.dimensions.components import (
    ClusterComponents,
    ControlStats,
    MeanDirection,
    MeanReference,
    ProbeStep,
    Selection,
    SpreadSelection,
    Subspace,
)
from rephelpers.perturbations.kinds import KINDS, Kind, MAGNITUDE_FIELD, build, fit_leace, kinds, matched_control
from rephelpers.interventions.tokenkeys import standard_normal, token_keys

D = 24


@pytest.fixture(scope="module")
def h():
    return np.random.default_rng(0).normal(size=(3, 5, D))


@pytest.fixture(scope="module")
def concept():
    """Synthetic representations with a planted linear concept (30% positives)."""
    rng = np.random.default_rng(1)
    n = 1200
    y = (rng.random(n) < 0.3).astype(int)
    mixing = rng.normal(size=(D, D)) / np.sqrt(D)
    X = rng.normal(size=(n, D)) @ mixing + 3.0
    X += np.outer(y, rng.normal(size=D))  # the concept direction
    return X, y


def _t(a):
    return torch.as_tensor(a, dtype=torch.float64)


def _subspace(rng, **extra):
    basis = np.linalg.qr(rng.normal(size=(D, 2)))[0].T
    direction = rng.normal(size=D)
    sub = {
        "layer": 3,
        "cluster": 1,
        "dims": [2, 5, 11],
        "direction": direction / np.linalg.norm(direction),
        "principal": basis[0],
        "basis": basis,
        "probe": {"coef": rng.normal(size=D), "intercept": 0.3},
        "mean_in": rng.normal(size=D) + 1.0,
        "mean_out": rng.normal(size=D),
        "std": rng.uniform(0.5, 2.0, size=D),
    }
    sub.update(extra)
    return sub


@pytest.fixture(scope="module")
def subspace(concept):
    X, y = concept
    rng = np.random.default_rng(2)
    learned = LearnedProjection(basis=np.linalg.qr(rng.normal(size=(D, 3)))[0].T, mean=rng.normal(size=D))
    return _subspace(rng, leace=fit_leace(X, y).to_dict(), learned=learned.to_dict())


# -- each kind against numpy ---------------------------------------------------------------
def test_ablate_zero_mean_and_partial(h):
    dims = [1, 4, 9]
    expected = h.copy()
    expected[..., dims] = 0
    np.testing.assert_array_equal(Ablate(dims).apply(_t(h)).numpy(), expected)

    means = [0.5, -1.0, 2.0]
    expected[..., dims] = means
    np.testing.assert_allclose(Ablate(dims, values=means).apply(_t(h)).numpy(), expected)

    expected = h.copy()
    expected[..., dims] = 0.75 * h[..., dims] + 0.25 * np.array(means)
    np.testing.assert_allclose(Ablate(dims, values=means, strength=0.25).apply(_t(h)).numpy(), expected)


def test_noise_only_touches_r_and_has_sigma():
    h = np.zeros((4000, D))
    dims = [0, 3, 7]
    out = Noise(dims, sigma=2.5, seed=7).apply(_t(h)).numpy()
    untouched = np.setdiff1d(np.arange(D), dims)
    assert np.all(out[:, untouched] == 0)
    assert abs(out[:, dims].std() - 2.5) < 0.05
    assert abs(out[:, dims].mean()) < 0.05
    np.testing.assert_array_equal(out, Noise(dims, sigma=2.5, seed=7).apply(_t(h)).numpy())
    assert not np.allclose(out, Noise(dims, sigma=2.5, seed=8).apply(_t(h)).numpy())


# An independent implementation of the documented formulas with Python integers: the
# package's tensor code must give the same bits (it is what "identical on every machine" rests on).
def _fmix32(x):
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _mix(h, v):
    return _fmix32(h ^ _fmix32((v + 0x9E3779B9) & 0xFFFFFFFF))


def _reference_keys(real_ids):
    total, keys = 0, []
    for position, token in enumerate(real_ids):
        total = (total + _mix(position, token)) & 0xFFFFFFFF
        keys.append(_fmix32(total))
    return keys


def _reference_normal(seed, key, dim):
    base = _mix(_mix(0x6E6F6973, seed & 0xFFFFFFFF), seed >> 32)
    keyed = _mix(base, key)
    u1 = (_mix(keyed, 2 * dim) + 1) / 2**32
    u2 = _mix(keyed, 2 * dim + 1) / 2**32
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def test_token_keys_and_draws_equal_a_pure_python_reference():
    ids = [[0, 0, 17, 4093, 49151, 5], [17, 4093, 49151, 5, 0, 0]]  # left- and right-padded
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    keys = token_keys(torch.tensor(ids), mask).keys
    want = _reference_keys([17, 4093, 49151, 5])
    assert keys[0, 2:].tolist() == want and keys[1, :4].tolist() == want
    seed = 2**40 + 12345  # both 32-bit halves of a large seed matter
    dims = [0, 7, 575]
    got = standard_normal(seed, keys[0, 2:], dims)
    expected = [[_reference_normal(seed, k, d) for d in dims] for k in want]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_token_keys_continue_a_row_like_a_full_pass():
    ids = torch.tensor([[0, 3, 9, 27, 81, 243], [1, 2, 4, 8, 16, 32]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    full = token_keys(ids, mask)
    state = token_keys(ids[:, :3], mask[:, :3])
    for t in range(3, 6):  # one token per step, as in KV-cache decoding
        state = token_keys(ids[:, t : t + 1], None, state)
        assert torch.equal(state.keys[:, 0], full.keys[:, t])
    # A token's key depends on what precedes it, not only on its id and position.
    other = token_keys(torch.tensor([[3, 9, 28, 81]])).keys
    assert torch.equal(other[0, :2], full.keys[0, 1:3]) and not torch.equal(other[0, 2:], full.keys[0, 3:5])


def test_keyed_noise_has_sigma_and_is_fresh_per_key():
    sigma, dims = 1.7, tuple(range(0, D, 3))
    keys = token_keys(torch.arange(50_000).reshape(50, 1000) % 49152).keys
    h = torch.zeros(50, 1000, D, dtype=torch.float64)
    out = Noise(dims, sigma=sigma, seed=11).apply(h, keys)
    eps = out[..., list(dims)].flatten().numpy()
    # 400k draws: the standard error of the std is σ/√(2n) ≈ 0.002σ, of the mean σ/√n ≈ 0.0016σ.
    assert abs(eps.std() / sigma - 1) < 0.01 and abs(eps.mean() / sigma) < 0.01
    assert scipy.stats.kstest(eps / sigma, "norm").pvalue > 1e-3
    assert torch.all(out[..., [i for i in range(D) if i not in dims]] == 0)
    # Every token position gets its own vector; the same keys give the same vectors.
    per_token = out[..., list(dims)].reshape(-1, len(dims))
    assert torch.unique(per_token, dim=0).shape[0] == per_token.shape[0]
    torch.testing.assert_close(Noise(dims, sigma=sigma, seed=11).apply(h[7:9], keys[7:9]), out[7:9], rtol=0, atol=0)
    other_seed = Noise(dims, sigma=sigma, seed=12).apply(h, keys)[..., list(dims)].flatten().numpy()
    assert abs(np.corrcoef(eps, other_seed)[0, 1]) < 0.01
    with pytest.raises(RephelpersError, match="keys of shape"):
        Noise(dims).apply(h, keys[:, :5])


def test_shift(h):
    v = np.random.default_rng(3).normal(size=D)
    np.testing.assert_allclose(Shift(v, alpha=-1.5).apply(_t(h)).numpy(), h - 1.5 * v)


def test_project_matches_numpy_and_leaves_nothing_in_v(h):
    rng = np.random.default_rng(4)
    raw = rng.normal(size=(3, D))  # not orthonormal: Project re-orthonormalises
    V = scipy.linalg.orth(raw.T).T
    expected = h - (h @ V.T) @ V
    out = Project(raw).apply(_t(h)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-10)
    assert np.abs(out @ V.T).max() <= 1e-5
    half = Project(raw, strength=0.5).apply(_t(h)).numpy()
    np.testing.assert_allclose(half, h - 0.5 * (h @ V.T) @ V, atol=1e-10)
    # float32 states, as in the model
    out32 = Project(raw).apply(torch.as_tensor(h, dtype=torch.float32)).double().numpy()
    assert np.abs(out32 @ V.T).max() <= 1e-5


def test_leace_matches_closed_form(concept):
    """r(x) = x − W⁺PW(x − μ), computed here with numpy from the covariances."""
    X, y = concept
    eraser = Leace.fit(X, y, shrinkage=False, svd_tol=1e-6)
    mu = X.mean(0)
    Xc = X - mu
    sigma_xx = Xc.T @ Xc / (len(X) - 1)
    sigma_xz = Xc.T @ (y - y.mean())[:, None] / (len(X) - 1)
    evals, evecs = np.linalg.eigh(sigma_xx)
    W = evecs @ np.diag(evals ** -0.5) @ evecs.T
    W_pinv = evecs @ np.diag(evals ** 0.5) @ evecs.T
    u = np.linalg.svd(W @ sigma_xz, full_matrices=False)[0]
    P = u @ u.T
    expected = X - (Xc @ (W_pinv @ P @ W).T)
    np.testing.assert_allclose(eraser.apply(_t(X)).numpy(), expected, atol=1e-8)
    assert eraser.rank == 1
    # the erased data has no covariance with the concept
    erased = eraser.apply(_t(X)).numpy()
    assert np.abs((erased - erased.mean(0)).T @ (y - y.mean())).max() < 1e-8


def test_leace_makes_a_fresh_probe_chance(concept):
    X, y = concept
    train = np.arange(len(X)) < 800
    eraser = fit_leace(X[train], y[train])

    def held_out_bacc(Z):
        probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit(Z[train], y[train])
        return balanced_accuracy_score(y[~train], probe.predict(Z[~train]))

    assert held_out_bacc(X) > 0.9
    erased = eraser.apply(_t(X)).numpy()
    # chance is 0.5; the band allows for sampling noise with 400 held-out rows
    assert 0.4 <= held_out_bacc(erased) <= 0.6
    # accuracy is at the majority rate (0.7 here) within the same band
    probe = LogisticRegression(max_iter=2000).fit(erased[train], y[train])
    majority = 1 - y[~train].mean()
    assert abs(probe.score(erased[~train], y[~train]) - majority) <= 0.05


def test_leace_multiclass_rank_and_strength(concept):
    X, _ = concept
    labels = np.random.default_rng(5).integers(0, 4, size=len(X))
    X = X + np.eye(D)[labels] * 2.0
    eraser = fit_leace(X, labels)
    assert eraser.rank == 3  # k − 1 for k classes
    full = eraser.apply(_t(X)).numpy()
    half = Leace(eraser.mean, eraser.left, eraser.right, strength=0.5).apply(_t(X)).numpy()
    np.testing.assert_allclose(half, 0.5 * (X + full), atol=1e-9)


def test_gradient_is_the_sign_step_and_raises_the_probe_loss(h):
    rng = np.random.default_rng(6)
    w, b = rng.normal(size=D) * 0.3, 0.2
    g = Gradient(w, intercept=b, epsilon=0.1)
    out = g.apply(_t(h)).numpy()
    # closed form for a logistic probe with label 1: ∇L = −σ(−(w·h+b)) w
    np.testing.assert_allclose(out, h - 0.1 * np.sign(w), atol=1e-12)

    def loss(x):
        return np.logaddexp(0, -(x @ w + b))

    assert np.all(loss(out) > loss(h))
    np.testing.assert_allclose(g.probe_loss(_t(h)).numpy(), loss(h))
    # confidently classified states (σ(−z) underflows) still take the full step
    far = h + 1e3 * np.sign(w)
    np.testing.assert_allclose(g.apply(_t(far)).numpy(), far - 0.1 * np.sign(w), atol=1e-9)


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_gradient_works_without_autograd(h, mode):
    g = Gradient(np.random.default_rng(7).normal(size=D), epsilon=0.2)
    expected = g.apply(torch.as_tensor(h, dtype=torch.float32))
    context = torch.inference_mode() if mode == "inference" else torch.no_grad()
    with context:
        x = torch.as_tensor(h, dtype=torch.float32).clone()
        out = g.apply(x)
    torch.testing.assert_close(out, expected)


# -- serialisation ---------------------------------------------------------------------------
def test_every_kind_round_trips(subspace, h):
    # Every class can be built; mean_ablate is an Ablate built with reference values.
    assert set(registered_kinds()) == set(MAGNITUDE_FIELD) - {"mean_ablate"}
    x = _t(h)
    for kind in MAGNITUDE_FIELD:
        for p in (build(kind, subspace, 0.7, seed=3), matched_control(kind, subspace, D, 0.7, seed=3)):
            back = perturbation_from_dict(json.loads(p.to_json()))
            assert back == p
            assert torch.equal(back.apply(x), p.apply(x)), kind


def test_each_kind_describes_itself_in_one_entry(subspace):
    # One list of kinds: build, the magnitude fields and the controls all read KINDS.
    assert kinds() == list(KINDS) == list(MAGNITUDE_FIELD)
    assert {k.cls.kind for k in KINDS.values()} == set(registered_kinds())
    for name, kind in KINDS.items():
        target = build(name, subspace, 0.5, seed=1)
        assert type(target) is kind.cls and getattr(target, kind.magnitude_field) != 0, name
        assert kind.scaling and kind.acts_on, name
        control = matched_control(name, subspace, D, 0.5, seed=1)
        assert isinstance(control, Perturbation) and control != target, name
    # a kind registered beside the built-in ones is built and controlled through the same entry
    extra = Kind("half_ablate", Ablate, "strength", "strength m/2", "R_k",
                 lambda selection, m, seed: Ablate(dims=selection.dims, strength=m / 2), KINDS["ablate"].control,
                 Selection.of)
    KINDS[extra.name] = extra
    try:
        assert build("half_ablate", subspace, 0.8).strength == 0.4
        assert len(matched_control("half_ablate", subspace, D, 0.8, seed=2).dims) == len(subspace["dims"])
    finally:
        del KINDS[extra.name]


# -- clear errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "perturbation, message",
    [
        (Ablate([3, D]), "out of range"),
        (Noise([-1]), "out of range"),
        (Ablate([]), "empty"),
        (Project([]), "rank 0"),
        (Project([[0.0] * D]), "all zero"),
        (Project([[1.0] * (D - 1)]), "widths"),
        (Shift([1.0] * (D + 1)), "direction has"),
        (Gradient([1.0] * 3), "coef has"),
        (Leace([0.0] * D, [], []), "rank 0"),
        (Leace([0.0] * D, [[1.0] * 5], [[1.0] * 5]), "widths"),
    ],
)
def test_check_errors(perturbation, message):
    with pytest.raises(RephelpersError, match=message):
        perturbation.check(D)


def test_constructor_errors(concept):
    X, y = concept
    with pytest.raises(RephelpersError, match="sigma"):
        Noise([1], sigma=-1.0)
    with pytest.raises(RephelpersError, match="single class"):
        fit_leace(X, np.zeros(len(X)))
    with pytest.raises(RephelpersError, match="rows"):
        fit_leace(X, y[:-1])
    with pytest.raises(RephelpersError, match="unknown perturbation kind"):
        perturbation_from_dict({"kind": "scramble"})


# -- factories -------------------------------------------------------------------------------
def test_build_scales_magnitude(subspace):
    m = 0.8
    dims = subspace["dims"]
    gap = np.asarray(subspace["mean_in"]) - np.asarray(subspace["mean_out"])
    v = np.asarray(subspace["direction"])
    w = np.asarray(subspace["probe"]["coef"])
    assert build("ablate", subspace, m) == Ablate(dims, strength=m)
    assert build("noise", subspace, m, seed=4) == Noise(dims, sigma=m * np.median(subspace["std"][dims]), seed=4)
    assert build("shift", subspace, m).alpha == pytest.approx(-m * gap @ v)
    assert build("project", subspace, m) == Project(subspace["basis"], strength=m)
    assert build("leace", subspace, m).strength == m
    eps = build("gradient", subspace, m).epsilon
    assert eps == pytest.approx(m * abs(w @ gap) / np.abs(w).sum())
    # at m = 1 the shift puts cluster k's mean on the rest's mean along v
    moved = build("shift", subspace, 1.0).apply(_t(subspace["mean_in"])).numpy()
    assert moved @ v == pytest.approx(np.asarray(subspace["mean_out"]) @ v)


def test_build_without_statistics_uses_raw_magnitude():
    sub = _subspace(np.random.default_rng(8), mean_in=None, mean_out=None, std=None)
    assert build("noise", sub, 0.3).sigma == 0.3
    assert build("shift", sub, 0.3).alpha == 0.3
    assert build("gradient", sub, 0.3).epsilon == 0.3


def test_each_kind_is_made_from_exactly_its_typed_value(subspace):
    # KINDS[k].needs takes the kind's typed value from the container; make reads nothing else
    components = ClusterComponents.from_dict(subspace)
    expected = {"ablate": Selection, "mean_ablate": MeanReference, "noise": SpreadSelection, "shift": MeanDirection,
                "project": Subspace, "leace": Leace, "gradient": ProbeStep, "learned": LearnedProjection}
    assert set(expected) == set(KINDS)
    for name, kind in KINDS.items():
        value = kind.needs(components)
        assert type(value) is expected[name], name
        assert kind.make(value, 0.6, 2) == build(name, components, 0.6, seed=2), name
    # the typed values hold what the formulas read, computed independently here
    assert kind_value("noise", components).typical_std == np.median(np.asarray(subspace["std"])[subspace["dims"]])
    np.testing.assert_array_equal(kind_value("shift", components).gap,
                                  np.asarray(subspace["mean_in"]) - np.asarray(subspace["mean_out"]))
    assert Selection((4, 1)).dims == (4, 1)
    with pytest.raises(RephelpersError, match="R_k is empty"):
        Selection(())
    # the controls read ControlStats, not the container
    stats = ControlStats.of(components)
    assert (stats.layer, stats.cluster) == (3, 1) and stats.std is components.std


def kind_value(name, components):
    return KINDS[name].needs(components)


def test_components_need_their_layer_and_cluster(subspace):
    with pytest.raises(RephelpersError, match=r"need \['layer'\]"):
        build("ablate", {k: v for k, v in subspace.items() if k != "layer"})
    with pytest.raises(RephelpersError, match="layer 3, cluster 1.*no 'basis'"):
        build("project", {k: v for k, v in subspace.items() if k != "basis"})


def test_build_errors(subspace):
    with pytest.raises(RephelpersError, match="no 'leace'.*fit_leace"):
        build("leace", {k: v for k, v in subspace.items() if k != "leace"})
    with pytest.raises(RephelpersError, match="no 'probe'"):
        build("gradient", {**subspace, "probe": None})
    with pytest.raises(RephelpersError, match="R_k is empty"):
        build("ablate", {**subspace, "dims": []})
    with pytest.raises(RephelpersError, match="unknown perturbation kind"):
        build("erase", subspace)


def test_controls_match_size_rank_and_norm(subspace):
    x = _t(np.random.default_rng(9).normal(size=(50, D)))
    for kind in registered_kinds():
        target = build(kind, subspace, 0.9, seed=1)
        control = matched_control(kind, subspace, D, 0.9, seed=1)
        control.check(D)
        assert control == matched_control(kind, subspace, D, 0.9, seed=1), "deterministic"
        assert control != matched_control(kind, subspace, D, 0.9, seed=2)
        if kind in ("ablate", "noise"):
            assert len(control.dims) == len(target.dims)
            assert not set(control.dims) & set(target.dims)
            assert getattr(control, MAGNITUDE_FIELD[kind]) == getattr(target, MAGNITUDE_FIELD[kind])
        elif kind == "project":
            assert control.rank == target.rank
            Vc = np.asarray(control.basis)
            np.testing.assert_allclose(Vc @ Vc.T, np.eye(target.rank), atol=1e-10)
        elif kind == "shift":
            assert np.linalg.norm(control.alpha * np.asarray(control.direction)) == pytest.approx(
                np.linalg.norm(target.alpha * np.asarray(target.direction)))
        elif kind == "gradient":
            step = (control.apply(x) - x).numpy()
            np.testing.assert_allclose(np.abs(step), target.epsilon)  # same L∞ size, same L2 norm
        elif kind == "leace":
            assert control.rank == target.rank and control.mean == target.mean
            full = Leace(control.mean, control.left, control.right)  # strength 1
            once = full.apply(x)
            torch.testing.assert_close(full.apply(once), once)  # still a projection
            assert not torch.allclose(control.apply(x), target.apply(x))


def test_leace_control_removes_unit_variance_coordinates():
    """Like a fitted eraser, the control removes coordinates of unit variance in standardised space."""
    rng = np.random.default_rng(10)
    spread = rng.uniform(0.1, 20.0, size=D)
    X = rng.normal(size=(20000, D)) * spread  # independent dimensions: diag(std) is the exact whitening
    labels = rng.integers(0, 3, size=len(X))
    X[:, 0] += 5 * labels * spread[0]
    sub = {"dims": [0], "std": X.std(0), "leace": fit_leace(X, labels).to_dict(), "layer": 0, "cluster": 0}
    control = matched_control("leace", sub, D)
    assert control.rank == 2
    read = (X - np.asarray(control.mean)) @ np.asarray(control.right).T
    np.testing.assert_allclose(read.var(0), 1.0, atol=0.05)
    np.testing.assert_allclose(np.asarray(control.right) @ np.asarray(control.left).T, np.eye(2), atol=1e-10)


def test_leace_control_moves_the_state_as_much_as_the_eraser():
    """A control must change the state as much as what it controls for: on states of a known, correlated
    covariance, the rescaled random eraser's mean squared edit equals the fitted eraser's (Monte Carlo,
    independent of the trace formula the control uses), where the unscaled one's does not."""
    from rephelpers.perturbations.controls import second_moment_spectrum

    rng = np.random.default_rng(11)
    mixing = rng.normal(size=(D, D)) * rng.uniform(0.1, 10.0, size=D)  # correlated, very unequal variances
    X = rng.normal(size=(20000, D)) @ mixing.T
    labels = (X @ mixing[:, -1] > 0).astype(int)  # a concept along a high-variance direction
    X[labels == 1] += 3.0 * mixing[:, -1] / np.linalg.norm(mixing[:, -1])
    fitted = fit_leace(X, labels)
    sub = {"dims": [0], "std": X.std(0), "leace": fitted.to_dict(), "layer": 0, "cluster": 0}
    x = torch.as_tensor(X[:4000], dtype=torch.float64)

    def mean_sq_edit(p):
        return float(((p.apply(x) - x) ** 2).sum(-1).mean())

    for spectrum in (second_moment_spectrum(X), None):
        control = matched_control("leace", sub, D, seed=3, spectrum=spectrum)
        unscaled = Leace(control.mean, control.left, control.right, strength=1.0)
        ratio = mean_sq_edit(control) / mean_sq_edit(fitted)
        if spectrum is not None:
            assert ratio == pytest.approx(1.0, rel=0.1)
        else:  # diag(std²) ignores the correlations: matched to the diagonal model, not exactly
            assert 0.2 < ratio < 5.0
        assert abs(np.log(mean_sq_edit(unscaled) / mean_sq_edit(fitted))) > np.log(1.5)


def test_controls_differ_between_clusters(subspace):
    a = matched_control("project", subspace, D, seed=0)
    b = matched_control("project", {**subspace, "cluster": 2}, D, seed=0)
    assert a != b


def test_mean_ablate_sets_dims_to_the_rest_mean_and_control_uses_same_reference():
    from rephelpers.interventions.edits import Ablate
    from rephelpers.perturbations.kinds import build, matched_control

    rng = np.random.default_rng(3)
    d = 12
    subspace = {"layer": 1, "cluster": 0, "dims": [2, 5, 7], "mean_out": rng.normal(size=d).tolist()}
    h = torch.tensor(rng.normal(size=(4, d)), dtype=torch.float32)
    full = build("mean_ablate", subspace, magnitude=1.0)
    expected = h.numpy().copy()
    expected[:, [2, 5, 7]] = np.asarray(subspace["mean_out"])[[2, 5, 7]]
    np.testing.assert_allclose(full.apply(h).numpy(), expected, atol=1e-6)
    half = build("mean_ablate", subspace, magnitude=0.5)
    np.testing.assert_allclose(half.apply(h).numpy(), 0.5 * h.numpy() + 0.5 * expected, atol=1e-6)
    control = matched_control("mean_ablate", subspace, d_model=d, seed=0)
    assert isinstance(control, Ablate) and len(control.dims) == 3 and not set(control.dims) & {2, 5, 7}
    np.testing.assert_allclose(control.values, np.asarray(subspace["mean_out"])[list(control.dims)])
