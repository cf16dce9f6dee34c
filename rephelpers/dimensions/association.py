"""Stage 03: which hidden dimensions and subspaces belong to which data cluster.

Input: per-layer pooled activations ``A_l(d) ∈ R^d`` of every document (stage 02, rows in
documents.parquet order), cluster labels ``C(d) ∈ {0..K−1}`` and the train / held-out
split (stage 01). Everything is estimated on the ``train`` rows; probes are scored on
the ``heldout`` rows.

- :func:`mean_difference_scores`: ``S(i,k) = mean_{d∈D_k} A_i(d) − mean_{d∉D_k} A_i(d)``
  (the same over tokens instead of documents with stage 02's token statistics:
  :func:`rephelpers.representations.tokenstats.token_mean_difference_scores`).
- :func:`select_dimensions`: ``R_k = {i : S(i,k) > τ}`` or the top-k by S (or by a probe
  weight ``w_{k,i}``, see :mod:`rephelpers.dimensions.probes`).
- :func:`class_mean_direction`, :func:`principal_subspace`: the cluster direction
  ``v_k ∝ μ_k − μ_rest`` and the rank-r principal basis ``V_k`` of the cluster's
  centred activations, what the Shift and Project perturbations act along.
- :func:`nmf_patterns`: non-negative parts of the activations and which cluster uses them.
- :func:`jaccard_matrix`: how much the clusters' R_k overlap.
- :func:`find_cluster_components`: all of it per layer, the one call notebook 03 makes;
  :func:`save_components` / :func:`load_components` / :func:`components_for` hand the result
  to stages 04 and 05.

Causal mediation (does a dimension *carry* the cluster's next-token computation?) is in
:mod:`rephelpers.dimensions.mediation`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.decomposition import NMF

from ..artifacts import RunDir
from ..errors import RephelpersError, require
from ..interventions.edits import Leace
from ..progress import progress_bar
from ..representations.models import COMPONENTS
from ..representations.tokenstats import (
    MASSIVE_THRESHOLD, TokenStats, massive_dimensions, token_mean_difference_scores,
)
from .components import ClusterComponents
from .probes import ProbeFit, fit_probe, split_masks

METHODS = ("mean_diff", "probe_l1", "probe_l2", "mlp")
NONNEGATIVE = ("shift", "relu")
SUBSPACES = "subspaces.json"
DIMENSIONS = "dimensions.parquet"
SUBSPACE_KEYS = (
    "layer", "cluster", "component", "method", "dims", "direction", "principal", "basis",
    "explained_variance", "probe", "mean_in", "mean_out", "std", "n_train",
)
_PROBE_OF_METHOD = {"probe_l1": "l1", "probe_l2": "l2", "mlp": "mlp"}


# -- validation ---------------------------------------------------------------------------
def check_activations(X: np.ndarray, n_rows: int | None = None, layer: int | None = None) -> np.ndarray:
    """``X`` as a finite float64 ``[n, d]`` matrix, or a clear error saying what is wrong."""
    where = "" if layer is None else f"layer {layer}: "
    X = np.asarray(X)
    require(X.ndim == 2, f"{where}activations must be a 2-D [documents, d_model] array, got shape {X.shape}.")
    if n_rows is not None:
        require(
            X.shape[0] == n_rows,
            f"{where}{X.shape[0]} activation rows for {n_rows} documents: the activations and "
            "documents.parquet are out of step; re-run notebook 02 after notebook 01.",
        )
    finite = np.isfinite(X)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(axis=1))
        raise RephelpersError(
            f"{where}{int((~finite).sum())} activation values are NaN or inf (document rows "
            f"{rows[:5].tolist()}{'…' if len(rows) > 5 else ''}). Re-extract them in float32 "
            "(float16 overflows on CPU) with notebook 02."
        )
    return X.astype(np.float64, copy=False)


def check_labels(labels: Sequence[int] | np.ndarray, n_clusters: int | None = None) -> tuple[np.ndarray, int]:
    """Integer labels ``0..K−1`` and ``K``; every cluster id below K must have documents."""
    labels = np.asarray(labels)
    require(labels.ndim == 1 and len(labels) > 0, f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
    require(
        np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0,
        "cluster labels must be integers ≥ 0 (documents.parquet `cluster` column).",
    )
    K = int(labels.max()) + 1 if n_clusters is None else int(n_clusters)
    require(labels.max() < K, f"a label {int(labels.max())} is ≥ n_clusters = {K}.")
    counts = np.bincount(labels, minlength=K)
    empty = np.flatnonzero(counts == 0).tolist()
    require(
        not empty,
        f"clusters {empty} have no documents, so no score can be computed for them. Cluster ids "
        "must run 0..K−1: re-run notebook 01, or pass the labels of the rows you kept.",
    )
    require(K >= 2, "S(i,k) compares a cluster with the rest: at least two clusters are needed.")
    return labels.astype(np.int64), K


# -- scores and selection -----------------------------------------------------------------
def mean_difference_scores(
    X: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    n_clusters: int | None = None,
    standardize: bool = False,
) -> np.ndarray:
    """``S [K, d]`` with ``S(i,k) = (1/|D_k|) Σ_{d∈D_k} A_i(d) − (1/|D∖D_k|) Σ_{d∉D_k} A_i(d)``.

    ``standardize=True`` divides by the pooled within-group standard deviation,
    ``s_{ik} = √(((|D_k|−1) s²_in + (|D∖D_k|−1) s²_out) / (|D|−2))`` (Cohen's d), so that a
    few dimensions with a huge overall scale (massive activations) do not take every
    top-k slot; dimensions with no within-group spread score 0. The default is the
    proposal's raw difference of means.
    """
    X = check_activations(X)
    labels, K = check_labels(labels, n_clusters)
    require(len(labels) == len(X), f"{len(X)} activation rows for {len(labels)} labels.")
    onehot = np.eye(K)[labels]  # [n, K]
    n_in = onehot.sum(0)
    n_out = len(labels) - n_in
    sum_in = onehot.T @ X
    mean_in = sum_in / n_in[:, None]
    mean_out = (X.sum(0) - sum_in) / n_out[:, None]
    scores = mean_in - mean_out
    if not standardize:
        return scores
    require(len(labels) > 2, "standardize=True needs more than two documents.")
    sq_in = onehot.T @ X**2
    ss_in = sq_in - n_in[:, None] * mean_in**2  # Σ (A − μ_in)² within D_k
    ss_out = ((X**2).sum(0) - sq_in) - n_out[:, None] * mean_out**2
    pooled = np.sqrt(np.clip(ss_in + ss_out, 0, None) / (len(labels) - 2))
    return np.divide(scores, pooled, out=np.zeros_like(scores), where=pooled > 0)


def select_dimensions(
    scores: np.ndarray,
    tau: float | None = None,
    top_k: int | None = None,
    name: str = "S(i,k)",
) -> np.ndarray:
    """``R_k = {i : score_i > τ}`` or the ``top_k`` highest-scoring indices (exactly one of them).

    Indices come back in descending score order (ties: lower index first). ``name``
    labels the score in error messages.
    """
    scores = np.asarray(scores, dtype=np.float64)
    require(scores.ndim == 1 and len(scores) > 0, f"{name}: expected a 1-D score vector, got shape {scores.shape}.")
    require(bool(np.isfinite(scores).all()), f"{name}: the scores hold NaN or inf values.")
    require(
        (tau is None) != (top_k is None),
        f"give exactly one of tau (threshold on {name}) or top_k (number of dimensions); got "
        f"tau={tau}, top_k={top_k}.",
    )
    order = np.argsort(-scores, kind="stable")
    if top_k is not None:
        require(
            isinstance(top_k, (int, np.integer)) and 1 <= top_k <= len(scores),
            f"top_k must be an integer in 1..{len(scores)} (the hidden size), got {top_k!r}.",
        )
        return order[: int(top_k)]
    chosen = order[scores[order] > tau]
    if len(chosen) == 0:
        best = float(scores[order[0]])
        raise RephelpersError(
            f"τ = {tau} selects no dimension: the largest {name} is {best:.4g}. Use a τ below it "
            f"(e.g. tau={best / 2:.3g}) or top_k instead."
        )
    return chosen


def jaccard_matrix(sets: Sequence[Iterable[int]]) -> np.ndarray:
    """``J[a, b] = |R_a ∩ R_b| / |R_a ∪ R_b|`` for every pair of dimension sets (1 when both are empty)."""
    sets = [set(map(int, s)) for s in sets]
    out = np.ones((len(sets), len(sets)))
    for a, sa in enumerate(sets):
        for b, sb in enumerate(sets):
            union = len(sa | sb)
            if union:
                out[a, b] = len(sa & sb) / union
    return out


# -- directions and subspaces --------------------------------------------------------------
def class_mean_direction(X: np.ndarray, labels: Sequence[int] | np.ndarray, cluster: int) -> np.ndarray:
    """``v_k = (μ_k − μ_rest) / ‖μ_k − μ_rest‖``: unit vector from the rest towards cluster k."""
    X = check_activations(X)
    labels = np.asarray(labels)
    inside = labels == cluster
    require(bool(inside.any()), f"cluster {cluster} has no documents.")
    require(bool((~inside).any()), f"cluster {cluster} holds every document; there is no rest to compare with.")
    diff = X[inside].mean(0) - X[~inside].mean(0)
    norm = float(np.linalg.norm(diff))
    require(norm > 0, f"cluster {cluster} has the same mean as the rest: its class-mean direction is undefined.")
    return diff / norm


def principal_subspace(
    X_cluster: np.ndarray,
    rank: int,
    orient: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-r principal basis of one cluster: ``(V_k [r, d], explained-variance ratios [r])``.

    ``X_c = X_k − mean(X_k) = U Σ Wᵀ`` (SVD); ``V_k`` is the first r rows of ``Wᵀ``
    (orthonormal) and the ratio of component j is ``σ_j² / Σ_m σ_m²``, its share of the
    cluster's total variance. A singular vector's sign is arbitrary; with ``orient``
    given each row is flipped so that ``V_k[j] · orient ≥ 0`` (pass ``v_k`` so that the
    principal direction points towards the cluster, which is what Shift needs).
    """
    X = check_activations(X_cluster)
    require(isinstance(rank, (int, np.integer)) and rank >= 1, f"rank must be an integer ≥ 1, got {rank!r}.")
    require(
        len(X) >= rank + 1 and rank <= X.shape[1],
        f"a rank-{rank} principal subspace needs at least {rank + 1} documents (got {len(X)}) "
        f"and rank ≤ d_model ({X.shape[1]}): lower `rank` or give the cluster more documents.",
    )
    centred = X - X.mean(0)
    _, sigma, rows = np.linalg.svd(centred, full_matrices=False)
    total = float((sigma**2).sum())
    require(total > 0, "the cluster's activations are all identical: there is no variance to decompose.")
    basis = rows[:rank].copy()
    if orient is not None:
        signs = np.where(basis @ np.asarray(orient, dtype=np.float64) < 0, -1.0, 1.0)
        basis *= signs[:, None]
    return basis, sigma[:rank] ** 2 / total


def cluster_subspace(X: np.ndarray, labels: Sequence[int] | np.ndarray, cluster: int, rank: int) -> dict[str, Any]:
    """The geometry of one cluster as JSON-ready lists.

    ``direction`` = v_k (:func:`class_mean_direction`), ``basis`` = V_k and
    ``explained_variance`` (:func:`principal_subspace`, oriented along v_k),
    ``principal`` = V_k's first row, ``mean_in`` = μ_k, ``mean_out`` = μ_rest,
    ``n_train`` = |D_k|.
    """
    X = check_activations(X)
    labels = np.asarray(labels)
    inside = labels == cluster
    direction = class_mean_direction(X, labels, cluster)
    basis, ratios = principal_subspace(X[inside], rank, orient=direction)
    return {
        "direction": direction.tolist(),
        "principal": basis[0].tolist(),
        "basis": basis.tolist(),
        "explained_variance": ratios.tolist(),
        "mean_in": X[inside].mean(0).tolist(),
        "mean_out": X[~inside].mean(0).tolist(),
        "n_train": int(inside.sum()),
    }


@dataclass(frozen=True, eq=False)
class NMFPatterns:
    """Non-negative factorisation ``X₊ ≈ W H`` of one layer's activations.

    ``components`` is ``H [r, d]``, ``codes`` is ``W [n, r]``; the factorised input is
    ``X₊ = max((X − offset) / scale, 0)`` with ``offset [d]`` and ``scale [d]``.
    """

    components: np.ndarray
    codes: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    nonnegative: str
    cluster_scores: np.ndarray
    """``[K, r]``: S applied to the codes (mean code in cluster k minus mean elsewhere)."""
    reconstruction_error: float
    """``‖X₊ − W H‖_F``."""
    relative_error: float
    """``‖X₊ − W H‖_F / ‖X₊‖_F``."""

    def to_frame(self) -> pd.DataFrame:
        """Long table ``cluster, component, score`` of :attr:`cluster_scores`, for charts."""
        K, r = self.cluster_scores.shape
        return pd.DataFrame({
            "cluster": np.repeat(np.arange(K), r),
            "component": np.tile(np.arange(r), K),
            "score": self.cluster_scores.ravel(),
        })


def nmf_patterns(
    X: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    n_components: int,
    nonnegative: str = "shift",
    n_clusters: int | None = None,
    standardize: bool = False,
    seed: int = 0,
    max_iter: int = 500,
) -> NMFPatterns:
    """Activation patterns by NMF (scikit-learn, Frobenius loss), scored per cluster.

    NMF needs ``X ≥ 0``. ``nonnegative="shift"`` uses ``X₊ = X − min_d X`` (each dimension
    shifted so its minimum over documents is 0; keeps all the information of the
    residual stream, whose coordinates have either sign). ``"relu"`` uses
    ``X₊ = max(X, 0)``, the positive part, natural for post-activation MLP neurons
    (``component="mlp"`` stores MLP *outputs*, which do have both signs; prefer "shift"
    there unless you extracted non-negative features). ``standardize=True`` also divides
    each dimension by its standard deviation over documents, so that a few
    massive-activation dimensions do not make up the whole factorisation. A component a
    cluster uses much more than the rest has a high ``cluster_scores[k, j]``.
    """
    require(nonnegative in NONNEGATIVE, f"nonnegative must be one of {NONNEGATIVE}, got {nonnegative!r}.")
    X = check_activations(X)
    labels, K = check_labels(labels, n_clusters)
    require(len(labels) == len(X), f"{len(X)} activation rows for {len(labels)} labels.")
    require(
        isinstance(n_components, (int, np.integer)) and 1 <= n_components <= min(X.shape),
        f"n_components must be an integer in 1..{min(X.shape)} (documents and d_model bound it), "
        f"got {n_components!r}.",
    )
    offset = X.min(0) if nonnegative == "shift" else np.zeros(X.shape[1])
    spread = X.std(0)
    scale = np.where(spread > 0, spread, 1.0) if standardize else np.ones(X.shape[1])
    positive = np.maximum((X - offset) / scale, 0.0)
    require(bool(positive.any()), "the non-negative activations are all zero: nothing to factorise.")
    model = NMF(n_components=int(n_components), init="nndsvda", random_state=seed, max_iter=max_iter)
    codes = model.fit_transform(positive)
    components = model.components_
    error = float(np.linalg.norm(positive - codes @ components))
    return NMFPatterns(
        components=components,
        codes=codes,
        offset=offset,
        scale=scale,
        nonnegative=nonnegative,
        cluster_scores=mean_difference_scores(codes, labels, K),
        reconstruction_error=error,
        relative_error=error / float(np.linalg.norm(positive)),
    )


# -- the entry point ----------------------------------------------------------------------
def find_cluster_components(
    acts: Mapping[int, np.ndarray],
    labels: Sequence[int] | np.ndarray,
    split: Sequence[str] | np.ndarray,
    method: str = "mean_diff",
    tau: float | None = None,
    top_k: int | None = 32,
    rank: int = 4,
    seed: int = 0,
    *,
    layers: Sequence[int] | None = None,
    component: str = "resid",
    standardize: bool = False,
    C: float = 1.0,
    with_probe: bool = True,
    with_leace: bool = True,
    progress: bool = True,
    token_stats: Mapping[int, TokenStats] | None = None,
    token_level: bool = False,
    keep_massive: bool = False,
    massive_threshold: float = MASSIVE_THRESHOLD,
) -> tuple[pd.DataFrame, list[ClusterComponents]]:
    """Every cluster's dimensions R_k and subspace (v_k, V_k, probe) at every layer.

    All statistics use the ``train`` rows; probe accuracies the ``heldout`` rows.
    ``method`` picks what R_k is selected by:

    - ``"mean_diff"``: ``S(i,k)`` (raw, or Cohen's d with ``standardize=True``);
    - ``"probe_l1"`` / ``"probe_l2"`` / ``"mlp"``: the probe weight ``w_{k,i}`` (sums to 1
      over i, so a uniform weight is 1/d_model).

    ``tau`` (a threshold on that criterion) is used when given, else ``top_k``. With
    ``with_probe`` an L2 logistic probe is also fit for the non-linear-probe methods,
    so every subspace carries a linear read-out ``logit_k(h) = coef · h + intercept``
    (original activation space) for gradient-based perturbations. With ``with_leace``
    each cluster's components also carry the LEACE eraser of "is in cluster k" fitted on
    the training rows (``Leace.fit(X, y == k)``, what the ``leace`` perturbation reads;
    fitted here once), or None where the concept is not linearly present.

    Returns ``(dimensions, components)``. ``dimensions`` has one row per (layer, cluster,
    dim): ``score`` = S(i,k), ``probe_weight`` = w_{k,i} of the fitted probe (NaN without
    one) and ``selected`` = i ∈ R_k. ``components`` holds one
    :class:`~rephelpers.dimensions.components.ClusterComponents` per (layer, cluster): R_k,
    v_k, V_k and its spectrum, the probe, the eraser, the means and the token statistics.

    Attention-sink-aware options (they need ``token_stats``, stage 02's
    ``{layer: TokenStats}`` from :func:`rephelpers.representations.activations.load_token_stats`, rows in
    ``labels`` order):

    - ``token_level=True`` computes S(i,k) over the train documents' *tokens* instead of
      their pooled vectors: ``S(i,k) = Σ_{d∈D_k} sum_i(d) / Σ_{d∈D_k} T_d −
      Σ_{d∉D_k} sum_i(d) / Σ_{d∉D_k} T_d`` (``T_d`` counted tokens of document d), and with
      ``standardize`` the pooled within-group token standard deviation from the sums of
      squares (:func:`rephelpers.representations.tokenstats.token_mean_difference_scores`). Each token
      weighs the same, so S no longer tracks document length. Default False: the
      proposal's S on pooled vectors.
    - ``massive_dims`` (stored in every subspace): dimensions whose largest
      ``|h_i| / median_j |h_j|`` over all tokens exceeds ``massive_threshold`` (default 100;
      :func:`rephelpers.representations.tokenstats.massive_dimensions`). Unless ``keep_massive=True`` they
      are left out of R_k (for every method): R_k is selected among the other
      dimensions (if fewer than ``top_k`` remain, all of them, with a warning). Without
      ``token_stats`` nothing is detected and ``massive_dims`` is ``[]``.
    - ``token_rms`` (stored in every subspace): per-dimension root-mean-square of h over
      the train documents' counted tokens, ``√(Σ_d sumsq_i(d) / Σ_d T_d)``; None without
      ``token_stats``.
    """
    p = _prepare(acts, labels, split, method, tau, top_k, rank, layers, component, with_probe,
                 token_stats, token_level, massive_threshold)
    rows: list[pd.DataFrame] = []
    components: list[ClusterComponents] = []
    for layer in progress_bar(p.layers, desc="cluster components", disable=not progress, leave=False):
        layer_rows, layer_components = _layer_components(
            p, layer, method=method, tau=tau, top_k=top_k, rank=rank, seed=seed, component=component,
            standardize=standardize, C=C, with_leace=with_leace, token_level=token_level,
            keep_massive=keep_massive, massive_threshold=massive_threshold)
        rows += layer_rows
        components += layer_components
    dimensions = pd.concat(rows, ignore_index=True)
    dimensions["layer"] = dimensions["layer"].astype(np.int64)
    dimensions["cluster"] = dimensions["cluster"].astype(np.int64)
    return dimensions, components


@dataclass(frozen=True)
class _Prepared:
    """:func:`find_cluster_components`' inputs, checked: labels and split masks, each layer's
    matrix, its token statistics, and which probes to fit (``selector`` picks R_k, ``linear``
    is the read-out every subspace carries)."""

    labels: np.ndarray
    K: int
    train: np.ndarray
    heldout: np.ndarray
    layers: list[int]
    matrices: dict[int, np.ndarray]
    d_model: int
    stats: dict[int, TokenStats]
    selector: str | None
    linear: str | None


def _prepare(acts: Mapping[int, np.ndarray], labels: Sequence[int] | np.ndarray, split: Sequence[str] | np.ndarray,
             method: str, tau: float | None, top_k: int | None, rank: int, layers: Sequence[int] | None,
             component: str, with_probe: bool, token_stats: Mapping[int, TokenStats] | None,
             token_level: bool, massive_threshold: float) -> _Prepared:
    """Every check of :func:`find_cluster_components`, made before the first fit."""
    require(method in METHODS, f"unknown method {method!r}: use one of {METHODS}")
    require(component in COMPONENTS, f"unknown component {component!r}: use one of {COMPONENTS}")
    require(
        tau is not None or top_k is not None,
        "give tau (a threshold) or top_k (a count) to select each cluster's dimensions.",
    )
    split = np.asarray(split)
    labels, K = check_labels(labels)
    require(len(split) == len(labels), f"{len(split)} split values for {len(labels)} labels.")
    train, heldout = split_masks(split)
    require(len(acts) > 0, "no activations given: run notebook 02 first.")
    layers = sorted(acts) if layers is None else [int(l) for l in layers]
    absent = [l for l in layers if l not in acts]
    require(
        not absent,
        f"layers {absent} are not in the activations (available: {sorted(acts)}). Extract them "
        "in notebook 02 or choose among the available ones.",
    )
    matrices = {l: check_activations(acts[l], len(labels), layer=l) for l in layers}
    d_model = next(iter(matrices.values())).shape[1]
    require(isinstance(rank, (int, np.integer)) and 1 <= rank <= d_model, f"rank must be in 1..{d_model}, got {rank!r}.")
    counts = np.bincount(labels[train], minlength=K)
    no_train = np.flatnonzero(counts == 0).tolist()
    require(not no_train, f"clusters {no_train} have no 'train' documents: fix the split in notebook 01.")
    too_small = {k: int(counts[k]) for k in range(K) if counts[k] < rank + 1}
    require(
        not too_small,
        f"a rank-{rank} subspace needs ≥ {rank + 1} training documents per cluster; clusters "
        f"{too_small} (cluster: documents) have fewer. Lower `rank` or use more documents.",
    )
    if tau is None:
        require(
            isinstance(top_k, (int, np.integer)) and 1 <= top_k <= d_model,
            f"top_k must be an integer in 1..{d_model}, got {top_k!r}.",
        )
    require(
        not token_level or token_stats is not None,
        "token_level=True needs stage 02's token statistics (token_stats=load_token_stats(run)); "
        "this run has none: re-run notebook 02 to collect them, or set token_level=False.",
    )
    require(massive_threshold > 0, f"massive_threshold must be > 0, got {massive_threshold!r}.")
    stats: dict[int, TokenStats] = {}
    if token_stats is not None:
        absent = [l for l in layers if l not in token_stats]
        require(not absent, f"token_stats lack layers {absent} (they hold {sorted(token_stats)}); re-run notebook 02.")
        stats = {l: token_stats[l].check(len(labels), d_model, layer=l) for l in layers}
    selector = _PROBE_OF_METHOD.get(method)
    linear = selector if selector in ("l1", "l2") else ("l2" if with_probe else None)
    if selector or linear:
        require(bool(heldout.any()), "probes need held-out documents, but no row has split == 'heldout'.")

    return _Prepared(labels, K, train, heldout, layers, matrices, d_model, stats, selector, linear)


def _layer_components(
    p: _Prepared, layer: int, *, method: str, tau: float | None, top_k: int | None, rank: int, seed: int,
    component: str, standardize: bool, C: float, with_leace: bool, token_level: bool, keep_massive: bool,
    massive_threshold: float,
) -> tuple[list[pd.DataFrame], list[ClusterComponents]]:
    """One layer of :func:`find_cluster_components`: its rows of ``dimensions`` and its clusters' components."""
    labels, K, train, heldout, d_model = p.labels, p.K, p.train, p.heldout, p.d_model
    selector, linear = p.selector, p.linear
    rows: list[pd.DataFrame] = []
    components: list[ClusterComponents] = []
    X = p.matrices[layer]
    X_train, y_train = X[train], labels[train]
    layer_stats = p.stats.get(layer)
    train_stats = None if layer_stats is None else layer_stats.rows(train)
    if token_level:
        scores = token_mean_difference_scores(train_stats, y_train, K, standardize)
    else:
        scores = mean_difference_scores(X_train, y_train, K, standardize)
    massive = [] if layer_stats is None else massive_dimensions(layer_stats, threshold=massive_threshold)
    candidates = np.setdiff1d(np.arange(d_model), [] if keep_massive else massive)
    layer_top_k = None if tau is not None else int(top_k)
    if layer_top_k is not None and layer_top_k > len(candidates):
        warnings.warn(
            f"layer {layer}: only {len(candidates)} dimensions are not massive, fewer than "
            f"top_k = {top_k}; R_k takes all of them.", stacklevel=3,
        )
        layer_top_k = len(candidates)
    token_rms = None if train_stats is None else train_stats.token_rms()
    fits: dict[str, ProbeFit] = {
        kind: fit_probe(X_train, y_train, X[heldout], labels[heldout], kind, K, C=C, seed=seed)
        for kind in dict.fromkeys(k for k in (selector, linear) if k)
    }
    weighting = fits.get(selector) or fits.get(linear)
    criterion = scores if selector is None else fits[selector].weights
    spread = X_train.std(0)
    for k in range(K):
        try:
            dims = candidates[select_dimensions(
                criterion[k][candidates], tau, layer_top_k,
                name=("S(i,k)" if selector is None else f"{selector} probe weight")
                + ("" if len(candidates) == d_model else " (massive dimensions excluded)"),
            )]
        except RephelpersError as err:
            raise RephelpersError(f"layer {layer}, cluster {k}: {err}") from None
        selected = np.zeros(d_model, dtype=bool)
        selected[dims] = True
        rows.append(pd.DataFrame({
            "layer": layer,
            "cluster": k,
            "dim": np.arange(d_model),
            "score": scores[k],
            "probe_weight": weighting.weights[k] if weighting else np.nan,
            "selected": selected,
        }))
        probe = None
        if linear:
            fit = fits[linear]
            probe = {"kind": linear, "coef": fit.coef[k].tolist(), "intercept": float(fit.intercept[k]),
                     "accuracy": float(fit.accuracy[k])}
        components.append(ClusterComponents.from_dict({
            "layer": int(layer),
            "cluster": k,
            "component": component,
            "method": method,
            "tau": tau,
            "top_k": None if tau is not None else int(top_k),
            "dims": [int(i) for i in dims],
            **cluster_subspace(X_train, y_train, k, int(rank)),
            "probe": probe,
            "selector_accuracy": float(fits[selector].accuracy[k]) if selector else None,
            "std": spread,
            "n_heldout": int((labels[heldout] == k).sum()),
            "leace": _leace_eraser(X_train, y_train == k, layer, k) if with_leace else None,
            "massive_dims": list(massive),
            "token_rms": token_rms,
            "token_level": bool(token_level),
            "keep_massive": bool(keep_massive),
        }))
    return rows, components


def _leace_eraser(X: np.ndarray, concept: np.ndarray, layer: int, cluster: int) -> Leace | None:
    """``Leace.fit(X, concept)``, or None (with a warning) when nothing is erasable."""
    try:
        return Leace.fit(X, concept.astype(int))
    except RephelpersError as err:
        # One cluster without a linear trace must not stop the stage; the leace
        # perturbation reports the missing eraser when it is asked for.
        warnings.warn(f"layer {layer}, cluster {cluster}: no LEACE eraser ({err})", stacklevel=3)
        return None


# -- artifacts ----------------------------------------------------------------------------
def _to_list(value: Any) -> Any:
    """numpy arrays and scalars as plain JSON values."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_components(run_dir: RunDir | str | Path, components: Sequence[ClusterComponents], key: str) -> Path:
    """Write ``subspaces.json`` (``{"version": 1, "subspaces": [c.to_dict(), ...]}``) into the run directory."""
    require(len(components) > 0, "save_components: no cluster components to save.")
    for entry in components:
        require(
            isinstance(entry, ClusterComponents),
            f"save_components: got a {type(entry).__name__}; build entries with find_cluster_components.",
        )
    text = json.dumps(
        {"version": 1, "subspaces": [c.to_dict() for c in components]}, separators=(",", ":"), allow_nan=False,
        default=_to_list,
    )
    # Compact: with one line per number, the vectors (d floats each) would triple the file.
    return RunDir(run_dir).save(SUBSPACES, key, lambda path: path.write_text(text))


def load_components(run_dir: RunDir | str | Path) -> list[ClusterComponents]:
    """Read stage 03's ``subspaces.json`` back: one :class:`ClusterComponents` per (layer, cluster)."""
    data = RunDir(run_dir).load_json(SUBSPACES, stage="notebook 03_cluster_dimensions")
    entries = data.get("subspaces") if isinstance(data, dict) else None
    require(
        isinstance(entries, list) and all(isinstance(e, dict) for e in entries),
        f"{SUBSPACES} does not hold a list of cluster components; delete it and re-run notebook 03.",
    )
    loaded = []
    for entry in entries:
        missing = [k for k in SUBSPACE_KEYS if k not in entry]
        require(not missing, f"{SUBSPACES}: an entry lacks {missing}; delete the file and re-run notebook 03.")
        try:
            loaded.append(ClusterComponents.from_dict(entry))
        except (RephelpersError, TypeError, ValueError) as err:
            raise RephelpersError(f"{SUBSPACES} is not readable ({err}); delete it and re-run notebook 03.") from None
    return loaded


def components_for(components: Sequence[ClusterComponents], layer: int, cluster: int) -> ClusterComponents:
    """The components of ``(layer, cluster)``, or an error listing what there is."""
    found = [c for c in components if c.layer == layer and c.cluster == cluster]
    if len(found) == 1:
        return found[0]
    available = sorted({(c.layer, c.cluster) for c in components})
    layers = sorted({l for l, _ in available})
    clusters = sorted({c for _, c in available})
    require(
        len(found) == 0,
        f"{len(found)} entries for layer {layer}, cluster {cluster}: the list mixes several "
        "runs; filter it by `method` first.",
    )
    raise RephelpersError(
        f"no cluster components for layer {layer}, cluster {cluster}: stage 03 covered layers {layers} "
        f"and clusters {clusters}. Pick one of those, or add the layer to notebook 02/03 and re-run them."
    )


# -- tables and charts --------------------------------------------------------------------
def overlap_frame(dimensions: pd.DataFrame) -> pd.DataFrame:
    """Jaccard overlap of the selected sets R_k, long form: ``layer, cluster_a, cluster_b, jaccard``."""
    frames = []
    for layer, group in dimensions[dimensions.selected].groupby("layer"):
        clusters = sorted(dimensions.loc[dimensions.layer == layer, "cluster"].unique())
        sets = [group.loc[group.cluster == k, "dim"] for k in clusters]
        J = jaccard_matrix(sets)
        frames.append(pd.DataFrame({
            "layer": layer,
            "cluster_a": np.repeat(clusters, len(clusters)),
            "cluster_b": np.tile(clusters, len(clusters)),
            "jaccard": J.ravel(),
        }))
    return pd.concat(frames, ignore_index=True)


def top_dimensions(dimensions: pd.DataFrame, layer: int, per_cluster: int = 8) -> pd.DataFrame:
    """Rows of ``layer`` restricted to the union of every cluster's ``per_cluster`` highest-S dims."""
    at = dimensions[dimensions.layer == layer]
    require(len(at) > 0, f"no dimension scores for layer {layer}; layers present: {sorted(dimensions.layer.unique())}.")
    top = at.sort_values("score", ascending=False, kind="stable").groupby("cluster").head(per_cluster)
    return at[at.dim.isin(top.dim)].reset_index(drop=True)


def explained_variance_frame(components: Sequence[ClusterComponents]) -> pd.DataFrame:
    """``layer, cluster, component, ratio, cumulative`` from each cluster's SVD spectrum."""
    rows = []
    for c in components:
        ratios = c.explained_variance
        require(ratios is not None, f"explained_variance_frame: the components of layer {c.layer}, cluster {c.cluster} "
                                    "have no SVD spectrum (explained_variance); re-run notebook 03.")
        for j, (ratio, total) in enumerate(zip(ratios, np.cumsum(ratios)), start=1):
            rows.append({"layer": c.layer, "cluster": c.cluster, "component": j,
                         "ratio": float(ratio), "cumulative": float(total)})
    return pd.DataFrame(rows)


__all__ = [
    "METHODS",
    "SUBSPACES",
    "DIMENSIONS",
    "NMFPatterns",
    "check_activations",
    "check_labels",
    "mean_difference_scores",
    "select_dimensions",
    "jaccard_matrix",
    "class_mean_direction",
    "principal_subspace",
    "cluster_subspace",
    "nmf_patterns",
    "find_cluster_components",
    "save_components",
    "load_components",
    "components_for",
    "overlap_frame",
    "top_dimensions",
    "explained_variance_frame",
]
