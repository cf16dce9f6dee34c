"""Probing classifiers: which dimensions predict a document's cluster.

For every cluster k a one-vs-rest classifier reads the pooled representation
``A(d) ∈ R^d`` of a document and predicts ``𝟙[d ∈ D_k]``. It is fit on the ``train``
rows and scored on the ``heldout`` rows. Its normalised weight magnitudes

    w_{k,j} = |β_{k,j}| / Σ_m |β_{k,m}|

rank the dimensions (Σ_j w_{k,j} = 1), and ``R_k = {j : w_{k,j} > τ}`` (or the top-k)
selects the cluster's critical dimensions.

Three probe kinds:

- ``"l1"`` / ``"l2"``: logistic regression with that penalty (scikit-learn). Features are
  standardised first, ``z_j = (x_j − μ_j) / σ_j`` with the training mean and standard
  deviation, so ``β`` are standardised-space coefficients and ``w`` does not depend on a
  dimension's scale. The same probe in the original activation space is
  ``logit_k(x) = Σ_j (β_{k,j}/σ_j) x_j + (b_k − Σ_j β_{k,j} μ_j/σ_j)``, which is what
  :attr:`ProbeFit.coef` / :attr:`ProbeFit.intercept` hold, ready to be differentiated
  with respect to a hidden state.
- ``"mlp"``: one hidden ReLU layer (``MLPClassifier``, multinomial over all clusters).
  Its importance ``β_{k,j} = E_x |∂ logit_k(z) / ∂ z_j|`` is the mean absolute input
  gradient over the training documents (saliency), normalised the same way. It has no
  single linear read-out, so ``coef``/``intercept`` are ``None``.

Classes are weighted inversely to their frequency (``class_weight="balanced"``) in the
linear probes: one cluster against the rest is unbalanced (1 : K−1), and an unweighted
probe would learn the base rate rather than the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from ..errors import RephelpersError, require
from ..progress import progress_bar

PROBE_KINDS = ("l1", "l2", "mlp")
SPLITS = ("train", "heldout")


@dataclass(frozen=True, eq=False)
class ProbeFit:
    """One-vs-rest probes of one layer: importances, original-space read-out, accuracy.

    Arrays are indexed by cluster id ``k = 0..K−1`` along their first axis.
    """

    kind: str
    weights: np.ndarray
    """``w [K, d]``: normalised importances, each row sums to 1."""
    coef: np.ndarray | None
    """``[K, d]``: linear probes in the original activation space (``None`` for the MLP)."""
    intercept: np.ndarray | None
    """``[K]``: intercepts matching :attr:`coef`."""
    accuracy: np.ndarray
    """``[K]``: held-out accuracy of the binary task "is this document in cluster k"."""
    multiclass_accuracy: float
    """Held-out accuracy of predicting the cluster itself (argmax over the K probes)."""
    n_train: int
    n_heldout: int

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Linear probe logits ``X @ coefᵀ + intercept``, ``[n, K]`` (linear kinds only)."""
        require(self.coef is not None, f"the {self.kind!r} probe has no linear read-out; use l1 or l2.")
        return np.asarray(X, dtype=np.float64) @ self.coef.T + self.intercept


def split_masks(split: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(train, heldout)`` from documents.parquet's ``split`` column."""
    split = np.asarray(split).astype(str)
    unknown = sorted(set(split) - set(SPLITS))
    require(
        not unknown,
        f"split holds values {unknown[:5]}; every row must be one of {SPLITS} (documents.parquet "
        "from notebook 01).",
    )
    train = split == "train"
    require(bool(train.any()), "no rows have split == 'train': there is nothing to fit on.")
    return train, split == "heldout"


def _logistic(kind: str, C: float, seed: int) -> LogisticRegression:
    l1 = kind == "l1"
    # scikit-learn 1.8 replaced `penalty` by `l1_ratio`; keep both generations working.
    if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8):
        penalty = {"l1_ratio": 1.0 if l1 else 0.0}
    else:
        penalty = {"penalty": "l1" if l1 else "l2"}
    return LogisticRegression(
        C=C,
        solver="liblinear" if l1 else "lbfgs",
        class_weight="balanced",
        max_iter=2000,
        random_state=seed,
        **penalty,
    )


def _normalise(beta: np.ndarray, kind: str, cluster: int) -> np.ndarray:
    total = np.abs(beta).sum()
    if not total > 0:
        raise RephelpersError(
            f"the {kind} probe for cluster {cluster} has every coefficient at zero (the penalty "
            "removed them all), so there is no weight to normalise: raise C (weaker penalty) "
            "or use probe kind 'l2'."
        )
    return np.abs(beta) / total


def _mlp_saliency(mlp: MLPClassifier, Z: np.ndarray) -> np.ndarray:
    """``E_z |∂ logit_k / ∂ z_j|`` for a one-hidden-layer ReLU MLP, ``[K, d]``."""
    W1, W2 = mlp.coefs_
    active = (Z @ W1 + mlp.intercepts_[0]) > 0  # ReLU derivative per document and unit
    if W2.shape[1] == 1:
        # Two classes share one logistic output: logit_1 = o, logit_0 = −o.
        W2 = np.concatenate([-W2, W2], axis=1)
    grads = np.einsum("dh,nh,hk->nkd", W1, active.astype(np.float64), W2)
    return np.abs(grads).mean(axis=0)


def fit_probe(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_heldout: np.ndarray,
    y_heldout: np.ndarray,
    kind: str = "l2",
    n_clusters: int | None = None,
    C: float = 1.0,
    hidden: int = 64,
    seed: int = 0,
) -> ProbeFit:
    """Fit the K one-vs-rest probes of ``kind`` on train rows; score them on held-out rows.

    ``C`` is the inverse regularisation strength of the logistic probes; ``hidden`` the
    width of the MLP's hidden layer. Every cluster ``0..K−1`` needs training documents.
    """
    require(kind in PROBE_KINDS, f"unknown probe kind {kind!r}: use one of {PROBE_KINDS}")
    require(C > 0, f"C must be > 0 (inverse regularisation strength), got {C}")
    X_train = np.asarray(X_train, dtype=np.float64)
    X_heldout = np.asarray(X_heldout, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.int64)
    y_heldout = np.asarray(y_heldout, dtype=np.int64)
    require(len(y_heldout) > 0, "no held-out rows: a probe's accuracy needs split == 'heldout' documents.")
    require(
        X_train.shape[1] == X_heldout.shape[1],
        f"train and held-out activations differ in width ({X_train.shape[1]} vs {X_heldout.shape[1]}).",
    )
    K = int(n_clusters if n_clusters is not None else max(y_train.max(), y_heldout.max()) + 1)
    missing = [k for k in range(K) if not (y_train == k).any()]
    require(
        not missing,
        f"clusters {missing} have no training documents, so no probe can learn them: check "
        "the split column (every cluster needs 'train' rows) or drop those clusters.",
    )
    require(K >= 2, "probing needs at least two clusters.")

    scaler = StandardScaler().fit(X_train)
    Z_train, Z_heldout = scaler.transform(X_train), scaler.transform(X_heldout)
    sigma, mu = scaler.scale_, scaler.mean_

    if kind == "mlp":
        mlp = MLPClassifier(
            hidden_layer_sizes=(hidden,), solver="lbfgs", alpha=1e-3, max_iter=500, random_state=seed
        ).fit(Z_train, y_train)
        predicted = mlp.predict(Z_heldout)
        saliency = _mlp_saliency(mlp, Z_train)
        weights = np.stack([_normalise(saliency[k], kind, k) for k in range(K)])
        accuracy = np.array([accuracy_score(y_heldout == k, predicted == k) for k in range(K)])
        return ProbeFit(
            kind, weights, None, None, accuracy, float(accuracy_score(y_heldout, predicted)),
            len(y_train), len(y_heldout),
        )

    beta = np.zeros((K, X_train.shape[1]))
    bias = np.zeros(K)
    for k in range(K):
        probe = _logistic(kind, C, seed).fit(Z_train, (y_train == k).astype(int))
        beta[k], bias[k] = probe.coef_[0], probe.intercept_[0]
    weights = np.stack([_normalise(beta[k], kind, k) for k in range(K)])
    coef = beta / sigma
    intercept = bias - coef @ mu
    logits = X_heldout @ coef.T + intercept
    accuracy = np.array([accuracy_score(y_heldout == k, logits[:, k] > 0) for k in range(K)])
    return ProbeFit(
        kind, weights, coef, intercept, accuracy,
        float(accuracy_score(y_heldout, logits.argmax(axis=1))), len(y_train), len(y_heldout),
    )


def probe_accuracy_curve(
    acts: Mapping[int, np.ndarray],
    labels: Sequence[int] | np.ndarray,
    split: Sequence[str] | np.ndarray,
    kinds: Sequence[str] = PROBE_KINDS,
    C: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Held-out probe accuracy per layer and kind: where is the cluster linearly readable?

    Columns: ``layer``, ``kind``, ``accuracy`` (multiclass, argmax over the K probes),
    ``mean_binary_accuracy`` (mean over k of the one-vs-rest accuracy) and ``chance``
    (the held-out share of the most frequent cluster: what always guessing it scores).
    """
    bad = [k for k in kinds if k not in PROBE_KINDS]
    require(not bad, f"unknown probe kinds {bad}: use any of {PROBE_KINDS}")
    labels = np.asarray(labels, dtype=np.int64)
    train, heldout = split_masks(split)
    require(bool(heldout.any()), "no rows have split == 'heldout': probe accuracy needs held-out documents.")
    chance = float(np.bincount(labels[heldout]).max() / heldout.sum())
    rows = []
    jobs = [(layer, kind) for layer in sorted(acts) for kind in kinds]
    for layer, kind in progress_bar(jobs, desc="probes", disable=not progress, leave=False):
        X = acts[layer]
        require(len(X) == len(labels), f"layer {layer}: {len(X)} activation rows for {len(labels)} labels.")
        fit = fit_probe(X[train], labels[train], X[heldout], labels[heldout], kind,
                        n_clusters=int(labels.max()) + 1, C=C, seed=seed)
        rows.append({
            "layer": int(layer), "kind": kind, "accuracy": fit.multiclass_accuracy,
            "mean_binary_accuracy": float(fit.accuracy.mean()), "chance": chance,
        })
    return pd.DataFrame(rows)


__all__ = [
    "PROBE_KINDS",
    "ProbeFit",
    "fit_probe",
    "split_masks",
    "probe_accuracy_curve",
]
