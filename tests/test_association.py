"""Stage 03 statistics against independent numpy / scikit-learn computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.decomposition import NMF, PCA

from rephelpers.dimensions.association import (
    class_mean_direction, explained_variance_frame, find_cluster_components, jaccard_matrix,
    load_components, mean_difference_scores, nmf_patterns, overlap_frame, principal_subspace,
    save_components, select_dimensions, components_for,
)
from rephelpers.views.charts import explained_variance_chart, nmf_chart, overlap_chart, score_heatmap_chart
from rephelpers.errors import RephelpersError
from rephelpers.dimensions.components import ClusterComponents
from rephelpers.interventions.edits import Leace, perturbation_from_dict

N_PER_CLUSTER, D, K = 40, 48, 4
PLANTED = {k: [3 * k + 7, 3 * k + 8] for k in range(K)}


@pytest.fixture(scope="module")
def planted():
    """Gaussian activations where cluster k is shifted up by 2 on its two planted dimensions."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(K), N_PER_CLUSTER)
    X = rng.normal(size=(len(labels), D))
    for k, dims in PLANTED.items():
        X[np.ix_(labels == k, dims)] += 2.0
    # Deterministic ~25 % held-out rows within every cluster.
    split = np.where(np.arange(len(labels)) % 4 == 3, "heldout", "train")
    return {"X": X.astype(np.float32), "labels": labels, "split": split}


def loop_scores(X, labels, K):
    S = np.zeros((K, X.shape[1]))
    for k in range(K):
        for i in range(X.shape[1]):
            inside = [X[d, i] for d in range(len(X)) if labels[d] == k]
            outside = [X[d, i] for d in range(len(X)) if labels[d] != k]
            S[k, i] = sum(inside) / len(inside) - sum(outside) / len(outside)
    return S


def test_scores_match_a_plain_loop():
    X = np.array([[1.0, 0.0, 2.0], [3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [2.0, 4.0, -1.0], [7.0, 0.5, 0.0]])
    labels = np.array([0, 0, 1, 1, 2])
    np.testing.assert_allclose(mean_difference_scores(X, labels), loop_scores(X, labels, 3))
    # Hand check of one entry: cluster 0, dim 0 → (1+3)/2 − (0+2+7)/3 = 2 − 3.
    assert mean_difference_scores(X, labels)[0, 0] == pytest.approx(-1.0)


def test_standardized_scores_are_cohens_d(planted):
    X, labels = planted["X"].astype(np.float64), planted["labels"]
    S = mean_difference_scores(X, labels, standardize=True)
    for k in (0, 3):
        a, b = X[labels == k], X[labels != k]
        pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(X) - 2))
        np.testing.assert_allclose(S[k], (a.mean(0) - b.mean(0)) / pooled, rtol=1e-10)


def test_select_by_threshold_and_top_k():
    scores = np.array([0.1, 0.9, -0.3, 0.5, 0.9, 0.2])
    by_tau = select_dimensions(scores, tau=0.15)
    assert set(by_tau) == {i for i, s in enumerate(scores) if s > 0.15}
    assert list(by_tau) == [1, 4, 3, 5]  # descending score, ties by index
    assert list(select_dimensions(scores, top_k=3)) == [1, 4, 3]
    with pytest.raises(RephelpersError, match="exactly one"):
        select_dimensions(scores, tau=0.1, top_k=2)
    with pytest.raises(RephelpersError, match="exactly one"):
        select_dimensions(scores)
    with pytest.raises(RephelpersError, match="top_k"):
        select_dimensions(scores, top_k=7)


def test_threshold_selecting_nothing_reports_the_maximum():
    with pytest.raises(RephelpersError, match=r"largest S\(i,k\) is 0\.9"):
        select_dimensions(np.array([0.1, 0.9, 0.3]), tau=2.0)


def test_empty_cluster_is_named():
    X = np.ones((4, 3))
    with pytest.raises(RephelpersError, match=r"clusters \[1\] have no documents"):
        mean_difference_scores(X, np.array([0, 0, 2, 2]))


def test_nan_activations_are_rejected(planted):
    X = planted["X"].copy()
    X[5, 2] = np.nan
    with pytest.raises(RephelpersError, match="NaN or inf"):
        mean_difference_scores(X, planted["labels"])
    with pytest.raises(RephelpersError, match="layer 9: 1 activation values are NaN"):
        find_cluster_components({9: X}, planted["labels"], planted["split"], progress=False)


def test_missing_layer_and_untrained_cluster(planted):
    args = (planted["labels"], planted["split"])
    with pytest.raises(RephelpersError, match=r"layers \[7\] are not in the activations"):
        find_cluster_components({3: planted["X"]}, *args, layers=[7], progress=False)
    split = planted["split"].copy()
    split[planted["labels"] == 2] = "heldout"
    with pytest.raises(RephelpersError, match=r"clusters \[2\] have no 'train' documents"):
        find_cluster_components({3: planted["X"]}, planted["labels"], split, progress=False)


def test_principal_subspace_matches_numpy_svd_and_pca(planted):
    X = planted["X"][planted["labels"] == 1].astype(np.float64)
    basis, ratios = principal_subspace(X, rank=3)
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-10)
    _, _, vt = np.linalg.svd(X - X.mean(0))
    for j in range(3):
        assert abs(basis[j] @ vt[j]) == pytest.approx(1.0, abs=1e-8)  # equal up to sign
    np.testing.assert_allclose(ratios, PCA(n_components=3).fit(X).explained_variance_ratio_, rtol=1e-6)

    direction = class_mean_direction(planted["X"], planted["labels"], 1)
    oriented, _ = principal_subspace(X, rank=3, orient=direction)
    assert (oriented @ direction >= 0).all()
    np.testing.assert_allclose(np.abs(oriented), np.abs(basis))
    with pytest.raises(RephelpersError, match="at least 5 documents"):
        principal_subspace(X[:4], rank=4)


def test_class_mean_direction_is_the_normalised_mean_difference(planted):
    X, labels = planted["X"].astype(np.float64), planted["labels"]
    diff = X[labels == 2].mean(0) - X[labels != 2].mean(0)
    np.testing.assert_allclose(class_mean_direction(X, labels, 2), diff / np.linalg.norm(diff))


def test_jaccard_against_set_arithmetic():
    rng = np.random.default_rng(3)
    sets = [set(rng.choice(30, size=rng.integers(1, 12), replace=False).tolist()) for _ in range(5)]
    J = jaccard_matrix(sets)
    for a in range(5):
        for b in range(5):
            assert J[a, b] == pytest.approx(len(sets[a] & sets[b]) / len(sets[a] | sets[b]))
    assert jaccard_matrix([[1, 2], [2, 3]])[0, 1] == pytest.approx(1 / 3)


def test_nmf_patterns_against_sklearn(planted):
    X, labels = planted["X"].astype(np.float64), planted["labels"]
    patterns = nmf_patterns(X, labels, n_components=6, nonnegative="shift", seed=0)
    shifted = X - X.min(0)
    reference = NMF(n_components=6, init="nndsvda", random_state=0, max_iter=500)
    W = reference.fit_transform(shifted)
    assert patterns.reconstruction_error == pytest.approx(reference.reconstruction_err_, rel=1e-6)
    assert patterns.reconstruction_error == pytest.approx(
        np.linalg.norm(shifted - patterns.codes @ patterns.components), rel=1e-10
    )
    assert patterns.relative_error == pytest.approx(patterns.reconstruction_error / np.linalg.norm(shifted))
    np.testing.assert_allclose(patterns.cluster_scores, loop_scores(W, labels, K), rtol=1e-6, atol=1e-9)
    scaled = nmf_patterns(X, labels, n_components=6, standardize=True, seed=0)
    reference = NMF(n_components=6, init="nndsvda", random_state=0, max_iter=500)
    reference.fit((X - X.min(0)) / X.std(0))
    assert scaled.reconstruction_error == pytest.approx(reference.reconstruction_err_, rel=1e-6)
    relu = nmf_patterns(X, labels, n_components=4, nonnegative="relu")
    assert (relu.offset == 0).all() and (relu.codes >= 0).all() and (relu.components >= 0).all()
    assert set(patterns.to_frame().columns) == {"cluster", "component", "score"}


@pytest.mark.parametrize("method", ["mean_diff", "probe_l2"])
def test_find_cluster_components_recovers_planted_dimensions(planted, method):
    acts = {3: planted["X"], 9: planted["X"] * 3}
    dims, components = find_cluster_components(
        acts, planted["labels"], planted["split"], method=method, top_k=2, rank=3, progress=False
    )
    assert list(dims.columns) == ["layer", "cluster", "dim", "score", "probe_weight", "selected"]
    assert len(dims) == 2 * K * D
    assert (dims.groupby(["layer", "cluster"]).selected.sum() == 2).all()
    for c in components:
        assert isinstance(c, ClusterComponents) and c.method == method
        assert sorted(c.dims) == PLANTED[c.cluster]
        assert np.linalg.norm(c.direction) == pytest.approx(1.0)
        assert c.basis.shape == (3, D)
        np.testing.assert_array_equal(c.principal, c.basis[0])
        assert c.probe.accuracy > 0.8
        json.dumps(c.to_dict())  # JSON-ready as promised

    # Scores use training rows only.
    train = planted["split"] == "train"
    S = loop_scores(planted["X"][train].astype(np.float64), planted["labels"][train], K)
    at3 = dims[dims.layer == 3].sort_values(["cluster", "dim"])
    np.testing.assert_allclose(at3.score.to_numpy().reshape(K, D), S, rtol=1e-5, atol=1e-6)
    weights = dims.groupby(["layer", "cluster"]).probe_weight.sum()
    np.testing.assert_allclose(weights, 1.0)


def test_threshold_in_find_cluster_components(planted):
    dims, components = find_cluster_components(
        {3: planted["X"]}, planted["labels"], planted["split"], tau=1.0, rank=2, with_probe=False, progress=False
    )
    assert dims.probe_weight.isna().all()
    assert all(c.probe is None and c.top_k is None and c.tau == 1.0 for c in components)
    chosen = dims[dims.selected]
    assert (chosen.score > 1.0).all() and (dims[~dims.selected].score <= 1.0).all()
    with pytest.raises(RephelpersError, match="layer 3, cluster 0: τ = 50"):
        find_cluster_components({3: planted["X"]}, planted["labels"], planted["split"], tau=50, progress=False)


def test_components_round_trip_and_lookup(planted, tmp_path):
    _, components = find_cluster_components(
        {3: planted["X"]}, planted["labels"], planted["split"], top_k=4, rank=2, progress=False
    )
    save_components(tmp_path, components, key="abc")
    loaded = load_components(tmp_path)
    # Every field survives the file exactly: vectors, R_k, the probe and the fitted eraser.
    assert [c.to_dict() for c in loaded] == [c.to_dict() for c in components]
    assert all(isinstance(c.leace, Leace) and c.leace == o.leace for c, o in zip(loaded, components))
    assert components_for(loaded, 3, 2).dims == components[2].dims
    with pytest.raises(RephelpersError, match=r"covered layers \[3\]"):
        components_for(loaded, 5, 0)
    with pytest.raises(RephelpersError, match="notebook 03"):
        load_components(tmp_path / "elsewhere")
    with pytest.raises(RephelpersError, match="find_cluster_components"):
        save_components(tmp_path / "dicts", [c.to_dict() for c in components], key="abc")
    # A hand-built dict becomes components too; a misspelt field is named.
    assert ClusterComponents.from_dict({"layer": 3, "cluster": 0, "dims": np.array([4, 1])}).dims == (4, 1)
    with pytest.raises(RephelpersError, match=r"unknown fields \['dimz'\]"):
        ClusterComponents.from_dict({"layer": 3, "cluster": 0, "dimz": [1]})


def test_a_damaged_components_file_says_how_to_recover(planted, tmp_path):
    _, components = find_cluster_components(
        {3: planted["X"]}, planted["labels"], planted["split"], top_k=4, rank=2, progress=False
    )
    path = save_components(tmp_path, components, key="abc")
    data = json.loads(path.read_text())
    del data["subspaces"][0]["dims"]
    path.write_text(json.dumps(data))
    with pytest.raises(RephelpersError, match=r"lacks \['dims'\].*re-run notebook 03"):
        load_components(tmp_path)


def test_tables_and_charts_build(planted):
    dims, components = find_cluster_components(
        {3: planted["X"], 9: planted["X"]}, planted["labels"], planted["split"], top_k=3, rank=2, progress=False
    )
    overlap = overlap_frame(dims)
    at3 = dims[(dims.layer == 3) & dims.selected]
    sets = [set(at3[at3.cluster == k].dim) for k in range(K)]
    expected = jaccard_matrix(sets)
    got = overlap[overlap.layer == 3].pivot(index="cluster_a", columns="cluster_b", values="jaccard").to_numpy()
    np.testing.assert_allclose(got, expected)
    spectra = explained_variance_frame(components)
    assert len(spectra) == 2 * K * 2
    for chart in (
        score_heatmap_chart(dims, 3, per_cluster=4),
        overlap_chart(overlap),
        explained_variance_chart(spectra),
        nmf_chart(nmf_patterns(planted["X"], planted["labels"], 3), 3),
    ):
        assert isinstance(chart.to_dict(), dict)
    assert (spectra.cumulative <= 1 + 1e-9).all()
    assert (spectra.groupby(["layer", "cluster"]).cumulative.diff().dropna() > 0).all()


def test_stored_leace_eraser_equalises_the_cluster_means(planted):
    train = planted["split"] == "train"
    _, components = find_cluster_components(
        {3: planted["X"]}, planted["labels"], planted["split"], top_k=2, rank=2, progress=False
    )
    X, y = planted["X"][train].astype(np.float64), planted["labels"][train]
    for c in components:
        eraser = perturbation_from_dict(c.leace.to_dict())  # as the file stores it
        erased = eraser.apply(torch.tensor(X)).numpy()
        inside = y == c.cluster
        # LEACE leaves no linear trace of the concept: equal class-conditional means.
        gap_before = np.abs(X[inside].mean(0) - X[~inside].mean(0)).max()
        gap_after = np.abs(erased[inside].mean(0) - erased[~inside].mean(0)).max()
        assert gap_before > 1.0 and gap_after < 1e-6 * gap_before
    _, without = find_cluster_components(
        {3: planted["X"]}, planted["labels"], planted["split"], top_k=2, rank=2, with_leace=False, progress=False
    )
    assert all(c.leace is None for c in without)
