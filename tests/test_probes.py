"""Probing classifiers against independent scikit-learn pipelines and torch autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rephelpers.errors import RephelpersError
from rephelpers.dimensions.probes import fit_probe, probe_accuracy_curve, split_masks
from rephelpers.views.charts import probe_accuracy_chart

K, D = 3, 24
PLANTED = {0: [2, 3], 1: [10, 11], 2: [17, 18]}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(K), 50)
    # Unequal scales per dimension, so the standardisation fold-back is exercised.
    X = rng.normal(size=(len(labels), D)) * rng.uniform(0.5, 3.0, size=D) + rng.normal(size=D)
    for k, dims in PLANTED.items():
        X[np.ix_(labels == k, dims)] += 2.5 * X[:, dims].std(0)
    heldout = np.arange(len(labels)) % 5 == 0
    return {"Xtr": X[~heldout], "ytr": labels[~heldout], "Xho": X[heldout], "yho": labels[heldout],
            "X": X, "labels": labels, "split": np.where(heldout, "heldout", "train")}


@pytest.mark.parametrize("kind", ["l1", "l2", "mlp"])
def test_weights_are_normalised_and_find_planted_dimensions(data, kind):
    fit = fit_probe(data["Xtr"], data["ytr"], data["Xho"], data["yho"], kind=kind)
    assert fit.weights.shape == (K, D)
    assert (fit.weights >= 0).all()
    np.testing.assert_allclose(fit.weights.sum(1), 1.0)
    for k, dims in PLANTED.items():
        assert sorted(np.argsort(-fit.weights[k])[:2]) == dims
    assert fit.multiclass_accuracy > 0.9


@pytest.mark.parametrize("kind,penalty", [("l1", "l1"), ("l2", "l2")])
def test_linear_probe_matches_a_sklearn_pipeline(data, kind, penalty):
    fit = fit_probe(data["Xtr"], data["ytr"], data["Xho"], data["yho"], kind=kind, C=0.5)
    decisions = []
    for k in range(K):
        pipe = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=0.5, l1_ratio=1.0 if penalty == "l1" else 0.0,
                               solver="liblinear" if penalty == "l1" else "lbfgs",
                               class_weight="balanced", max_iter=2000, random_state=0),
        ).fit(data["Xtr"], data["ytr"] == k)
        decisions.append(pipe.decision_function(data["Xho"]))
        assert fit.accuracy[k] == pytest.approx(accuracy_score(data["yho"] == k, pipe.predict(data["Xho"])))
        beta = np.abs(pipe[-1].coef_[0])
        np.testing.assert_allclose(fit.weights[k], beta / beta.sum(), rtol=1e-6, atol=1e-9)
    decisions = np.stack(decisions, axis=1)
    # The folded-back original-space probe reproduces scaler + logistic regression exactly.
    np.testing.assert_allclose(fit.decision_function(data["Xho"]), decisions, rtol=1e-6, atol=1e-6)
    assert fit.multiclass_accuracy == pytest.approx(accuracy_score(data["yho"], decisions.argmax(1)))


def test_mlp_saliency_is_the_mean_absolute_input_gradient(data):
    fit = fit_probe(data["Xtr"], data["ytr"], data["Xho"], data["yho"], kind="mlp", hidden=16, seed=0)
    scaler = StandardScaler().fit(data["Xtr"])
    Z = scaler.transform(data["Xtr"])
    mlp = MLPClassifier(hidden_layer_sizes=(16,), solver="lbfgs", alpha=1e-3, max_iter=500,
                        random_state=0).fit(Z, data["ytr"])
    W1, W2 = (torch.tensor(w) for w in mlp.coefs_)
    b1, b2 = (torch.tensor(b) for b in mlp.intercepts_)
    z = torch.tensor(Z, requires_grad=True)
    logits = torch.relu(z @ W1 + b1) @ W2 + b2
    for k in range(K):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), z, retain_graph=True)
        saliency = grad.abs().mean(0).numpy()
        np.testing.assert_allclose(fit.weights[k], saliency / saliency.sum(), rtol=1e-6)
    predicted = mlp.predict(scaler.transform(data["Xho"]))
    assert fit.multiclass_accuracy == pytest.approx(accuracy_score(data["yho"], predicted))
    assert fit.coef is None
    with pytest.raises(RephelpersError, match="no linear read-out"):
        fit.decision_function(data["Xho"])


def test_probe_errors(data):
    with pytest.raises(RephelpersError, match="unknown probe kind"):
        fit_probe(data["Xtr"], data["ytr"], data["Xho"], data["yho"], kind="svm")
    with pytest.raises(RephelpersError, match="no held-out rows"):
        fit_probe(data["Xtr"], data["ytr"], data["Xho"][:0], data["yho"][:0])
    with pytest.raises(RephelpersError, match=r"clusters \[1\] have no training documents"):
        keep = data["ytr"] != 1
        fit_probe(data["Xtr"][keep], data["ytr"][keep], data["Xho"], data["yho"])
    with pytest.raises(RephelpersError, match="every coefficient at zero"):
        fit_probe(data["Xtr"], data["ytr"], data["Xho"], data["yho"], kind="l1", C=1e-6)
    with pytest.raises(RephelpersError, match="one of"):
        split_masks(["train", "test"])


def test_accuracy_curve(data):
    curve = probe_accuracy_curve({4: data["X"], 8: data["X"][:, ::-1].copy()}, data["labels"], data["split"],
                                 kinds=["l2"], progress=False)
    assert list(curve.layer) == [4, 8] and set(curve.kind) == {"l2"}
    heldout = data["split"] == "heldout"
    assert curve.chance.iloc[0] == pytest.approx(np.bincount(data["labels"][heldout]).max() / heldout.sum())
    assert (curve.accuracy > 0.9).all()
    assert isinstance(probe_accuracy_chart(curve).to_dict(), dict)
