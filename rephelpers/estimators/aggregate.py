"""From document-level scores to Φ per cluster, its permutation test, and agreement between estimators.

A document-level score table has columns :data:`DOC_SCORE_COLUMNS`: ``id``
(``documents.parquet``'s id), ``ability``, ``item_id``, ``score`` (positive = the document
helps that item). Every function here takes the partition separately (``labels``: id →
cluster), so the same scores serve stage 01's clusters, the testbed's planted sets or
merged clusters.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from ..errors import require

DOC_SCORE_COLUMNS = ("id", "ability", "item_id", "score")
PHI_COLUMNS = ("cluster", "ability", "phi", "estimator")
CORRECTIONS = {"bh": "fdr_bh", "holm": "holm", "none": None}


def validate_doc_scores(doc_scores: pd.DataFrame, name: str = "document scores") -> pd.DataFrame:
    """``doc_scores`` with ``id`` and ``item_id`` as strings, or a clear error naming what is wrong."""
    require(isinstance(doc_scores, pd.DataFrame), f"{name} must be a DataFrame, got {type(doc_scores).__name__}")
    missing = [c for c in DOC_SCORE_COLUMNS if c not in doc_scores.columns]
    require(not missing, f"{name} lack the columns {missing} (expected {list(DOC_SCORE_COLUMNS)}).")
    require(len(doc_scores) > 0, f"{name} are empty.")
    out = doc_scores.assign(id=doc_scores["id"].astype(str), item_id=doc_scores["item_id"].astype(str),
                            score=pd.to_numeric(doc_scores["score"], errors="coerce").astype(float))
    bad = int((~np.isfinite(out["score"].to_numpy())).sum())
    require(bad == 0, f"{name} hold {bad} non-finite scores; the estimator that wrote them failed on some pairs.")
    dup = int(out.duplicated(["id", "ability", "item_id"]).sum())
    require(dup == 0, f"{name} score {dup} (document, ability, item) pairs more than once.")
    return out


def _labels_series(labels: Mapping[str, object] | pd.Series) -> pd.Series:
    series = labels.copy() if isinstance(labels, pd.Series) else pd.Series(dict(labels))
    require(len(series) > 0, "labels are empty: pass a mapping id → cluster (e.g. documents.set_index('id').cluster).")
    series.index = series.index.astype(str)
    require(not series.index.duplicated().any(), "labels give some document ids twice.")
    return series


def document_means(doc_scores: pd.DataFrame, labels: Mapping[str, object] | pd.Series) -> pd.DataFrame:
    """``[document × ability]`` table of each document's score averaged over the ability's items.

    Rows: the labelled documents that are scored, in ``labels`` order. Every document of
    the corpus is scored by repsim and bm25; an estimator that samples documents (influence
    functions' ``docs_per_cluster``) scores some of each cluster, and every cluster must keep
    at least one scored document.
    """
    scores = validate_doc_scores(doc_scores)
    series = _labels_series(labels)
    wide = scores.groupby(["id", "ability"])["score"].mean().unstack("ability")
    kept = series.index.intersection(wide.index, sort=False)
    empty = sorted(set(series.unique()) - set(series.loc[kept].unique()), key=str)
    require(not empty, f"clusters {empty[:5]} have no scored document: these scores do not cover the partition; "
                       "recompute them on its documents.")
    wide = wide.loc[series.index[series.index.isin(kept)]]
    require(not wide.isna().any().any(), "some documents are scored for an ability on none of its items.")
    return wide


def _cluster_codes(series: pd.Series) -> tuple[np.ndarray, list]:
    clusters = sorted(series.unique().tolist(), key=lambda c: (str(type(c)), c))
    require(len(clusters) >= 2, f"labels put every document in one cluster ({clusters}): Φ compares a cluster "
                                "with the rest, which needs at least two.")
    code = {c: i for i, c in enumerate(clusters)}
    return np.array([code[c] for c in series.to_numpy()]), clusters


def _mean_differences(values: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """``mean_C − mean_rest`` for every cluster C; ``values`` is ``[n]`` or ``[p, n]`` (``codes`` likewise)."""
    values, codes = np.atleast_2d(values), np.atleast_2d(codes)
    n = values.shape[1]
    offset = (np.arange(codes.shape[0])[:, None] * k + codes).ravel()
    sums = np.bincount(offset, weights=np.broadcast_to(values, codes.shape).ravel(), minlength=codes.shape[0] * k)
    counts = np.bincount(offset, minlength=codes.shape[0] * k).astype(float)
    sums, counts = sums.reshape(-1, k), counts.reshape(-1, k)
    total = sums.sum(1, keepdims=True)
    return sums / counts - (total - sums) / (n - counts)


def cluster_phi(doc_scores: pd.DataFrame, labels: Mapping[str, object] | pd.Series, estimator: str) -> pd.DataFrame:
    """Φ per cluster and ability, columns :data:`PHI_COLUMNS`.

    With ``s_a(d)`` document ``d``'s score averaged over ability ``a``'s items,

        Φ(C, a) = n_C · (mean_{d∈C} s_a(d) − mean_{d∉C} s_a(d)),

    ``n_C`` the number of C's labelled documents (the means run over its scored ones: all
    of them, unless the estimator sampled documents). First-order (additive) scores make
    this the effect of C's documents over what the same number of other documents would
    give: the rest absorbs a left-out cluster's budget. ``labels`` maps ``id`` → cluster
    (any partition); unlabelled documents do not count.
    """
    wide = document_means(doc_scores, labels)
    series = _labels_series(labels)
    full_codes, clusters = _cluster_codes(series)
    counts = np.bincount(full_codes, minlength=len(clusters))
    codes = full_codes[series.index.isin(wide.index)]
    rows = []
    for ability in wide.columns:
        diff = _mean_differences(wide[ability].to_numpy(float), codes, len(clusters))[0]
        rows += [{"cluster": c, "ability": ability, "phi": float(counts[i] * diff[i]), "estimator": estimator}
                 for i, c in enumerate(clusters)]
    return pd.DataFrame(rows, columns=list(PHI_COLUMNS))


def permutation_pvalues(
    doc_scores: pd.DataFrame,
    labels: Mapping[str, object] | pd.Series,
    n_permutations: int = 999,
    seed: int = 0,
    correction: str = "bh",
) -> pd.DataFrame:
    """One-sided permutation test of "cluster C ranks above the rest for ability a", per cell.

    Statistic ``T(C, a) = mean_C s_a − mean_rest s_a`` (Φ / n_C; n_C is fixed under
    permutation, so the test is the same for Φ). The null shuffles the cluster labels over
    documents (``n_permutations`` seeded draws, the same draws for every cell):
    ``p = (1 + #{j : T_j ≥ T_obs}) / (n_permutations + 1)``, so no p falls below
    ``1/(n_permutations + 1)``. ``p_adjusted`` corrects across all cells (``bh`` or
    ``holm``; ``none`` copies p). Documents are exchangeable under the null only if their
    scores are, e.g. not when documents of one source share a length that drives the score.
    Columns ``cluster, ability, statistic, p_value, p_adjusted, n_permutations``.
    """
    require(isinstance(n_permutations, (int, np.integer)) and n_permutations >= 1,
            f"n_permutations must be a positive int, got {n_permutations!r}")
    require(correction in CORRECTIONS, f"unknown correction {correction!r}: use one of {list(CORRECTIONS)}")
    wide = document_means(doc_scores, labels)
    series = _labels_series(labels)
    codes, clusters = _cluster_codes(series.loc[wide.index])
    k = len(clusters)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(codes) for _ in range(n_permutations)])
    rows = []
    for ability in wide.columns:
        values = wide[ability].to_numpy(float)
        observed = _mean_differences(values, codes, k)[0]
        null = _mean_differences(values, shuffled, k)
        # A tolerance so that float noise between identical sums never breaks a tie in the null's favour.
        exceed = (null >= observed[None, :] - 1e-12 * (1 + np.abs(observed[None, :]))).sum(0)
        p = (1 + exceed) / (n_permutations + 1)
        rows += [{"cluster": c, "ability": ability, "statistic": float(observed[i]), "p_value": float(p[i])}
                 for i, c in enumerate(clusters)]
    out = pd.DataFrame(rows)
    floor = len(out) / (n_permutations + 1) if correction != "none" else 1 / (n_permutations + 1)
    if floor >= 0.05:
        # The design's defect the calibration warns about: no cell could pass the correction at α = 0.05.
        warnings.warn(f"permutation test: with {n_permutations} permutations and {len(out)} cells the smallest "
                      f"corrected p is {floor:.3f}, so no cell can pass α = 0.05; raise n_permutations to at least "
                      f"{int(np.ceil(len(out) / 0.05))}.", stacklevel=2)
    method = CORRECTIONS[correction]
    out["p_adjusted"] = out["p_value"] if method is None else multipletests(out["p_value"], method=method)[1]
    out["n_permutations"] = int(n_permutations)
    return out


def rank_agreement(phi: pd.DataFrame) -> pd.DataFrame:
    """Spearman's ρ between every two estimators' Φ over the clusters, per ability (scipy's ``spearmanr``).

    ``phi`` is long form (:data:`PHI_COLUMNS`). Columns ``ability, estimator_a, estimator_b,
    rho, p_value, n_clusters``; ρ is NaN where fewer than three clusters are shared or one
    estimator's Φ is constant over them (no ranking to compare).
    """
    missing = [c for c in PHI_COLUMNS if c not in phi.columns]
    require(not missing, f"rank_agreement: Φ lacks the columns {missing}.")
    rows = []
    estimators = list(dict.fromkeys(phi["estimator"]))
    for ability, part in phi.groupby("ability", sort=True):
        wide = part.pivot_table(index="cluster", columns="estimator", values="phi", aggfunc="first")
        for a, b in itertools.combinations([e for e in estimators if e in wide.columns], 2):
            pair = wide[[a, b]].dropna()
            rho = p = float("nan")
            if len(pair) >= 3 and pair[a].nunique() > 1 and pair[b].nunique() > 1:
                result = sps.spearmanr(pair[a], pair[b])
                rho, p = float(result.statistic), float(result.pvalue)
            rows.append({"ability": ability, "estimator_a": a, "estimator_b": b, "rho": rho, "p_value": p,
                         "n_clusters": len(pair)})
    return pd.DataFrame(rows, columns=["ability", "estimator_a", "estimator_b", "rho", "p_value", "n_clusters"])


def agreement_summary(phi: pd.DataFrame, agreement: pd.DataFrame,
                      cluster_names: Mapping[object, str] | None = None) -> str:
    """Plain sentences for the report: per ability, each estimator's top cluster, and where ρ says they agree."""
    names = dict(cluster_names or {})
    lines = []
    for ability, part in phi.groupby("ability", sort=True):
        tops: dict[str, object] = {}
        for est, g in part.dropna(subset=["phi"]).groupby("estimator", sort=False):
            best = g[g["phi"] == g["phi"].max()]["cluster"].tolist()
            # A tie has no top cluster: it can agree with nothing.
            tops[est] = best[0] if len(best) == 1 else "tie of " + " and ".join(str(names.get(c, c)) for c in best)
        label = {est: f"{names.get(c, c)}" for est, c in tops.items()}
        agree = len(set(tops.values())) == 1 and not any(str(c).startswith("tie of ") for c in tops.values())
        head = (f"{ability}: every estimator ranks cluster {next(iter(label.values()))} first"
                if agree else f"{ability}: the estimators disagree on the top cluster ("
                + ", ".join(f"{est}: {c}" for est, c in label.items()) + ")")
        pairs = agreement[agreement["ability"] == ability].dropna(subset=["rho"])
        if len(pairs):
            head += "; Spearman ρ " + ", ".join(f"{r.estimator_a}~{r.estimator_b} {r.rho:+.2f}"
                                                 for r in pairs.itertuples())
        lines.append(head + ".")
    return "\n".join(lines)


def phi_wide(phi: pd.DataFrame, estimators: Sequence[str] | None = None) -> pd.DataFrame:
    """Φ as ``[cluster × (ability, estimator)]``, for a side-by-side table."""
    wide = phi.pivot_table(index="cluster", columns=["ability", "estimator"], values="phi", aggfunc="first")
    if estimators is not None:
        wide = wide.reindex(columns=[c for c in wide.columns if c[1] in estimators])
    return wide
