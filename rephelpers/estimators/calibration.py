"""The permutation test over documents on simulated nulls and planted effects.

Document-level scores are simulated as ``score(d, x) = u_d + e_{d,x} + δ·𝟙[d ∈ C*]·σ_u``
(a document effect ``u_d``, item noise ``e``, and for the power runs a shift ``δ`` of one
planted cluster ``C*`` for one ability), and read with
:func:`rephelpers.estimators.aggregate.permutation_pvalues` exactly as notebook 06 reads
a run's scores. Nulls (``δ = 0``):

- ``normal``: ``u ~ N(0, 1)``, ``e ~ N(0, 1)``;
- ``skewed``: ``u ~ Exp(1)`` with 60 % of documents at 0 (BM25-like: most documents
  share no word with an ability's items), ``e ~ N(0, 0.1)``;
- ``unequal``: ``normal`` with cluster sizes in the ratio 1 : 2 : … : K.

``fpr`` is the share of cells with ``p < α`` (the per-cell test), and ``fwer`` the share of
simulated tables with any ``p_adjusted < α`` (under the global null BH's FDR is its FWER).
``power`` is the share of planted cells (``C*``, the shifted ability) with
``p_adjusted < α``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import require
from .aggregate import permutation_pvalues

NULLS = ("normal", "skewed", "unequal")


def simulate_doc_scores(
    n_clusters: int = 5,
    docs_per_cluster: int = 60,
    n_items: int = 20,
    abilities: Sequence[str] = ("a", "b", "c"),
    null: str = "normal",
    effect: float = 0.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.Series]:
    """``(document scores, labels)``; cluster 0 is shifted by ``effect`` document-effect SDs for ability ``abilities[0]``."""
    require(null in NULLS, f"unknown null {null!r}: use one of {NULLS}")
    rng = np.random.default_rng(seed)
    sizes = ([docs_per_cluster * (k + 1) // ((n_clusters + 1) // 2) for k in range(n_clusters)]
             if null == "unequal" else [docs_per_cluster] * n_clusters)
    sizes = [max(2, s) for s in sizes]
    cluster = np.repeat(np.arange(n_clusters), sizes)
    n = len(cluster)
    ids = np.array([f"d{i}" for i in range(n)], dtype=object)
    frames = []
    for j, ability in enumerate(abilities):
        if null == "skewed":
            u = rng.exponential(1.0, n) * (rng.random(n) > 0.6)
            e = rng.normal(0, 0.1, (n, n_items))
            sd = float(u.std()) or 1.0
        else:
            u, e, sd = rng.normal(0, 1, n), rng.normal(0, 1, (n, n_items)), 1.0
        if j == 0 and effect:
            u = u + effect * sd * (cluster == 0)
        frames.append(pd.DataFrame({
            "id": np.repeat(ids, n_items), "ability": ability,
            "item_id": np.tile([f"{ability}{i}" for i in range(n_items)], n),
            "score": (u[:, None] + e).ravel()}))
    return pd.concat(frames, ignore_index=True), pd.Series(cluster, index=ids)


def permutation_calibration(
    n_sims: int = 100,
    alpha: float = 0.05,
    n_permutations: int = 999,
    effects: Sequence[float] = (0.25, 0.5),
    n_clusters: int = 5,
    docs_per_cluster: int = 60,
    n_items: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (null, effect): ``test, null, effect, alpha, fpr, fwer, power, n_cells, n_sims``.

    Defaults: the demo's design (5 clusters of about 60 documents, 3 abilities). A test
    holds its α when ``fpr ≤ α`` (and ``fwer ≤ α``) at ``effect = 0``.
    """
    require(n_sims >= 1, "n_sims must be ≥ 1")
    rows = []
    for null in NULLS:
        for effect in (0.0, *effects):
            p_cells, any_adjusted, planted = [], [], []
            for sim in range(n_sims):
                scores, labels = simulate_doc_scores(n_clusters, docs_per_cluster, n_items, null=null, effect=effect,
                                                     seed=[seed, NULLS.index(null), int(round(effect * 1000)), sim])
                tests = permutation_pvalues(scores, labels, n_permutations=n_permutations, seed=sim + seed)
                if effect == 0:
                    p_cells.extend(tests["p_value"] < alpha)
                    any_adjusted.append(bool((tests["p_adjusted"] < alpha).any()))
                else:
                    cell = tests[(tests["cluster"] == 0) & (tests["ability"] == "a")]
                    planted.append(bool((cell["p_adjusted"] < alpha).item()))
            rows.append({
                "test": "permutation_cluster_above_rest", "null": null, "effect": effect, "alpha": alpha,
                "fpr": float(np.mean(p_cells)) if p_cells else np.nan,
                "fwer": float(np.mean(any_adjusted)) if any_adjusted else np.nan,
                "power": float(np.mean(planted)) if planted else np.nan,
                "n_cells": len(p_cells) or len(planted), "n_sims": n_sims,
            })
    return pd.DataFrame(rows)
