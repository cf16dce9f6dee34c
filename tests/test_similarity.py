"""Linear CKA and attention JS divergence against direct formulas and scipy."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import ortho_group

from rephelpers.errors import RephelpersError
from rephelpers.perturbations.similarity import attention_js, js_divergence, linear_cka


def _direct_cka(X, Y):
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with centred linear Gram matrices."""
    n = len(X)
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)  # noqa: E731
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


@pytest.mark.parametrize("n, p, q", [(40, 8, 6), (10, 30, 25)])  # feature path and Gram path
def test_cka_matches_direct_formula(n, p, q):
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, p))
    Y = X[:, :q] @ rng.normal(size=(q, q)) + 0.5 * rng.normal(size=(n, q))
    assert linear_cka(X, Y) == pytest.approx(_direct_cka(X, Y), rel=1e-10)
    assert 0 <= linear_cka(X, Y) <= 1


def test_cka_identity_and_invariances():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 12))
    Q = ortho_group.rvs(12, random_state=1)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-12)
    Y = rng.normal(size=(50, 7))
    assert linear_cka(X, 3.7 * Y) == pytest.approx(linear_cka(X, Y), rel=1e-12)
    assert linear_cka(X @ Q + 5.0, Y) == pytest.approx(linear_cka(X, Y), rel=1e-12)
    # not invariant to anisotropic scaling (it is not a CCA)
    assert linear_cka(X, X * np.linspace(0.1, 10, 12)) < 0.99
    # torch input works the same
    assert linear_cka(torch.as_tensor(X), torch.as_tensor(Y)) == pytest.approx(linear_cka(X, Y))


def test_cka_edge_cases():
    X = np.random.default_rng(2).normal(size=(6, 4))
    assert math.isnan(linear_cka(X, np.ones((6, 3))))
    with pytest.raises(RephelpersError, match="rows"):
        linear_cka(X, X[:5])
    with pytest.raises(RephelpersError, match="matrix"):
        linear_cka(X[0], X[0])
    with pytest.raises(RephelpersError, match="NaN"):
        linear_cka(X, np.full((6, 4), np.nan))


def test_js_divergence_matches_scipy():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(7), size=5)
    q = rng.dirichlet(np.ones(7), size=5)
    q[0, :3] = 0  # zeros are fine (0 log 0 = 0)
    q[0] /= q[0].sum()
    expected = jensenshannon(p, q, base=2, axis=1) ** 2
    np.testing.assert_allclose(js_divergence(torch.as_tensor(p), torch.as_tensor(q)).numpy(), expected, atol=1e-12)
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(1.0)


def test_attention_js_skips_padding_queries():
    rng = np.random.default_rng(4)
    b, heads, s = 2, 3, 4
    p = rng.dirichlet(np.ones(s), size=(b, heads, s))
    q = rng.dirichlet(np.ones(s), size=(b, heads, s))
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    got = attention_js(torch.as_tensor(p), torch.as_tensor(q), torch.as_tensor(mask)).numpy()
    per = jensenshannon(p, q, base=2, axis=-1) ** 2  # [b, heads, s]
    expected = [per[0, :, 1:].mean(), per[1].mean()]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    with pytest.raises(RephelpersError, match="shape"):
        attention_js(torch.as_tensor(p), torch.as_tensor(q[:, :2]), torch.as_tensor(mask))
