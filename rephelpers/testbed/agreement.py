"""Agreement of the chain's Φ (and every other estimator's) with Φ*.

Discovered clusters are mapped to planted ones (:func:`map_clusters`); per setting and
estimator, Spearman's ρ (scipy, average ranks for ties) with a percentile bootstrap interval
over cells, diagonal recovery and off-diagonal false positives; the summary and headline of
notebook 07. :mod:`rephelpers.testbed.groundtruth` describes the criteria and re-exports this module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.stats

from ..artifacts import RunDir
from ..errors import require
from ..estimators.run import PHI_ARTIFACT
from ..runner import point_name
from .chain import SETTING_KEYS, with_setting
from .planted import planted_ability


# -- discovered clusters → planted clusters ------------------------------------------------------------
SPLIT_RECALL = 0.8
"""A planted set is *found* when one cluster it dominates holds at least this share of its texts."""


def map_clusters(documents: pd.DataFrame, skills: Sequence[str], split_recall: float = SPLIT_RECALL) -> pd.DataFrame:
    """For each planted skill, the clusters it dominates and the one that stands for it.

    Columns: ``skill``, ``cluster`` (the cluster holding most of its texts), ``recall`` (share
    of the skill's texts in that cluster), ``purity`` (share of that cluster's texts that are
    the skill's), ``mapped`` (purity ≥ 1/2, so the cluster stands for the skill),
    ``dominated`` (every cluster whose texts are at least half the skill's, comma-separated),
    ``recall_dominated`` (share of the skill's texts in them) and ``status``: ``found`` (mapped
    and ``recall ≥ split_recall``), ``split`` (its texts spread over several clusters, as
    k-means split glyph's "Tablet n" headers from its bare equations) or ``merged`` (no
    cluster it dominates). A ``split`` or ``merged`` set is a clustering miss, not a null of
    the attribution. Texts are recognised by ``domain`` = ``planted_<skill>`` (corpus
    metadata the chain carries, never used to cluster, unless ``cluster_method: domain``).
    """
    require({"cluster", "domain"} <= set(documents.columns), "documents need `cluster` and `domain` columns (stage 01)")
    sizes = documents["cluster"].value_counts()
    rows = []
    for skill in skills:
        mine = documents["domain"] == planted_ability(skill)
        require(mine.any(), f"no document of the planted cluster {skill!r} in the chain's corpus")
        counts = documents.loc[mine, "cluster"].value_counts()
        k = int(counts.index[0])
        purity = float(counts.iloc[0] / sizes[k])
        recall = float(counts.iloc[0] / mine.sum())
        dominated = [int(c) for c, n in counts.items() if n / sizes[c] >= 0.5]
        status = "merged" if purity < 0.5 else ("found" if recall >= split_recall else "split")
        rows.append({"skill": skill, "cluster": k, "recall": recall, "purity": purity, "mapped": purity >= 0.5,
                     "dominated": ",".join(map(str, dominated)),
                     "recall_dominated": float(counts[dominated].sum() / mine.sum()) if dominated else 0.0,
                     "status": status})
    return pd.DataFrame(rows)


def clustering_misses(mapping: pd.DataFrame) -> str:
    """The planted sets the clustering did not find, in words (``""`` when it found all)."""
    if "status" not in mapping.columns:
        miss = mapping[~mapping["mapped"].astype(bool)]
        return "; ".join(f"{r.skill}: merged (purity {r.purity:.2f})" for r in miss.itertuples())
    parts = []
    for r in mapping[mapping["status"] != "found"].itertuples():
        where = f"over clusters {r.dominated}" if r.status == "split" else f"into cluster {r.cluster}"
        parts.append(f"{r.skill}: {r.status} {where} (best recall {r.recall:.2f}, purity {r.purity:.2f})")
    return "; ".join(parts)


# -- agreement ----------------------------------------------------------------------------------------------
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ = corr(rank x, rank y) with average ranks for ties (``scipy.stats.spearmanr``).

    NaN where it is undefined: fewer than two pairs, either side constant, or a NaN in either
    (scipy's ``nan_policy="propagate"``; the callers pass finite cells only).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    require(x.shape == y.shape and x.ndim == 1, "spearman: x and y must be 1-d of equal length")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):  # scipy would warn and give NaN
        return math.nan
    return float(scipy.stats.spearmanr(x, y).statistic)


def spearman_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                strata: Sequence[Any] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's ρ, resampling the cells (pairs) with replacement.

    ``strata`` (one label per cell) resamples within each stratum, so every replicate keeps the
    design's composition: the testbed passes ``diagonal`` (own-skill cell or not), because its
    design fixes P own-skill cells among P × A, and an unstratified resample that draws 1 or 7
    of them instead of 4 measures a design that was not run. Simulated at 4 × 4 cells (diagonal
    Φ* 0.8, noise sd 0.05 on Φ*, 0.1–0.3 on Φ), the stratified interval covers the expected ρ
    in 93–96% of testbeds at 0.48–0.52 wide, the unstratified one in 97–99% at 0.83 wide
    (``tests/test_groundtruth.py`` checks the coverage). Replicate ``b`` draws, for each stratum
    in sorted order, ``rng.integers(0, n_s, size=(n_boot, n_s))`` within it (one generator
    seeded ``seed``). Each replicate's ρ is the Pearson correlation of its average ranks
    (``scipy.stats.rankdata`` and ``scipy.stats.pearsonr`` along the replicates' axis, which is
    ``spearmanr`` replicate by replicate, in one call); replicates where either side is
    constant (ρ undefined) are dropped.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    if strata is None:
        idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    else:
        labels = np.asarray(strata)
        require(labels.shape == x.shape, f"spearman_ci: {labels.shape[0] if labels.ndim else 0} strata for {len(x)} cells")
        groups = [np.flatnonzero(labels == s) for s in np.unique(labels)]
        idx = np.concatenate([g[rng.integers(0, len(g), size=(n_boot, len(g)))] for g in groups], axis=1)
    rx, ry = scipy.stats.rankdata(x[idx], axis=1), scipy.stats.rankdata(y[idx], axis=1)
    constant = (np.ptp(rx, axis=1) == 0) | (np.ptp(ry, axis=1) == 0)
    rho = np.full(n_boot, math.nan)
    if not constant.all():
        rho[~constant] = scipy.stats.pearsonr(rx[~constant], ry[~constant], axis=1).statistic
    rho = rho[np.isfinite(rho)]
    if len(rho) == 0:
        return (math.nan, math.nan)
    low, high = np.quantile(rho, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def _column(table: pd.DataFrame, preferred: str, fallback: str) -> str:
    if preferred in table.columns:
        return preferred
    require(fallback in table.columns, f"influence table has neither {preferred!r} nor {fallback!r}")
    return fallback


SCORES = {"phi": "Φ", "phi_minus_control": "Φ − Φ_control"}


def agreement_cells(influence: pd.DataFrame, stars: pd.DataFrame, mapping: pd.DataFrame) -> pd.DataFrame:
    """One row per setting × planted cluster × ability with Φ (chain) beside Φ* (fine-tunes).

    ``exceeds`` is stage 06's ``exceeds_controls`` (else ``exceeds_control``), ``beyond``
    ``phi_minus_control_low > 0`` (else ``exceeds``), ``flagged`` its ``finding`` (else
    ``significant``); ``diagonal`` marks the skill's own ability. Planted clusters the
    clustering did not find (``mapped`` false) have no Φ and are left out here (they count
    as not recovered).
    """
    exceeds = _column(influence, "exceeds_controls", "exceeds_control")
    flagged = _column(influence, "finding", "significant")
    found = mapping[mapping["mapped"]]
    rows = stars.merge(found[["skill", "cluster"]].rename(columns={"skill": "planted", "cluster": "chain_cluster"}),
                       left_on="cluster", right_on="planted")
    influence = influence.copy()
    if "phi_minus_control" not in influence.columns:
        influence["phi_minus_control"] = influence["phi"] - influence["phi_control"]
    if "phi_minus_control_low" in influence.columns:
        influence["beyond"] = influence["phi_minus_control_low"] > 0
    else:
        influence["beyond"] = influence[exceeds]
    if "min_p_vs_controls" not in influence.columns:
        influence["min_p_vs_controls"] = math.nan
    keep = ["setting", "cluster", "ability", "phi", "phi_control", "phi_minus_control", "beyond", exceeds, flagged,
            "min_p_vs_controls"]
    extra = [c for c in (*SETTING_KEYS, "scoring") if c in influence.columns]
    chain = influence[keep + extra].rename(columns={"cluster": "chain_cluster", exceeds: "exceeds", flagged: "flagged"})
    cells = rows.drop(columns="cluster").merge(chain, on=["chain_cluster", "ability"], how="inner")
    cells["diagonal"] = cells["ability"] == cells["planted"].map(planted_ability)
    for column in ("beyond", "exceeds", "flagged"):
        cells[column] = cells[column].astype(object).fillna(False).astype(bool)
    order = ["setting", *extra, "planted", "chain_cluster", "ability", "diagonal", "phi", "phi_control",
             "phi_minus_control", "beyond", "exceeds", "flagged", "min_p_vs_controls", "phi_star", "phi_star_low",
             "phi_star_high", "null", "m_all", "m_minus"]
    return cells[order].sort_values(["setting", "planted", "ability"]).reset_index(drop=True)


def diagonal_recovery(cells: pd.DataFrame, skills: Sequence[str], beyond: str = "beyond",
                      score: str = "phi") -> tuple[float, dict[str, bool]]:
    """Share of planted skills whose own cell lies beyond its controls and has the largest ``score`` among the row's cells that do.

    ``cells`` of one setting; ``beyond`` names the boolean column that says a cell lies beyond
    its controls (``beyond``, or stage 06's ``exceeds``); a skill without a row (cluster not
    found) is not recovered.
    """
    if beyond not in cells.columns:
        beyond = "exceeds"  # cells made before `beyond` existed
    recovered = {}
    for skill in skills:
        row = cells[(cells["planted"] == skill) & cells[beyond].astype(bool)]
        own = row[row["diagonal"]]
        recovered[skill] = bool(len(own) == 1 and float(own[score].iloc[0]) >= float(row[score].max()))
    return (float(np.mean(list(recovered.values()))) if recovered else math.nan), recovered


def diagonal_argmax(cells: pd.DataFrame, skills: Sequence[str], score: str = "phi") -> float:
    """Share of planted skills whose own cell has a positive ``score`` above every other cell of its row.

    Recovery by ranking alone, no test against the controls: it separates a method that
    points at the wrong skill from one that points at the right one too weakly to be sure.
    """
    hits = []
    for skill in skills:
        row = cells[cells["planted"] == skill]
        own, other = row.loc[row["diagonal"], score], row.loc[~row["diagonal"], score]
        hits.append(bool(len(own) == 1 and own.iloc[0] > 0 and (len(other) == 0 or own.iloc[0] > other.max())))
    return float(np.mean(hits)) if hits else math.nan


def setting_agreement(cells: pd.DataFrame, skills: Sequence[str], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                      scores: Sequence[str] = tuple(SCORES)) -> pd.DataFrame:
    """Per setting and score (``phi``, ``phi_minus_control``): ρ(score, Φ*) with its bootstrap CI,
    diagonal recovery (feasible and strict criterion) and off-diagonal false positives.

    The rows' ``setting`` is the chain point's label plus ``score=<score>``; best first (ρ,
    then diagonal recovery, then fewer false positives).
    """
    rows = []
    for point, sub in cells.groupby("setting", sort=True):
        if "beyond" not in sub.columns:
            sub = sub.assign(beyond=sub["exceeds"])
        if "phi_minus_control" not in sub.columns:
            sub = sub.assign(phi_minus_control=sub["phi"] - sub["phi_control"])
        null_off = sub[~sub["diagonal"] & sub["null"]]
        false_pos = int(null_off["flagged"].sum())
        min_p = float(sub["min_p_vs_controls"].max()) if "min_p_vs_controls" in sub.columns else math.nan
        for score in scores:
            ok = sub[np.isfinite(sub[score]) & np.isfinite(sub["phi_star"])]
            rho = spearman(ok[score], ok["phi_star"])
            low, high = spearman_ci(ok[score], ok["phi_star"], n_boot, alpha, seed, strata=ok["diagonal"])
            low_cells, high_cells = spearman_ci(ok[score], ok["phi_star"], n_boot, alpha, seed)
            share, per_skill = diagonal_recovery(sub, skills, "beyond", score)
            strict, per_skill_strict = diagonal_recovery(sub, skills, "exceeds", score)
            argmax = diagonal_argmax(sub, skills, score)
            rows.append({
                "setting": f"{point}, score={score}", "point": point, "score": score,
                **{c: sub[c].iloc[0] for c in ("perturbation", "intervention_layer", "leace_layers", "scoring") if c in sub.columns},
                "n_cells": len(ok),
                "spearman_rho": rho, "spearman_low": low, "spearman_high": high,
                "spearman_low_unstratified": low_cells, "spearman_high_unstratified": high_cells,
                "diagonal_recovery": share, "recovered": ",".join(s for s, v in per_skill.items() if v),
                "diagonal_recovery_strict": strict,
                "recovered_strict": ",".join(s for s, v in per_skill_strict.items() if v),
                "diagonal_argmax": argmax,
                "min_p_vs_controls": min_p,
                "off_diagonal_false_positives": false_pos, "null_off_diagonal_cells": len(null_off),
                "false_positive_rate": false_pos / len(null_off) if len(null_off) else math.nan,
                "flagged_diagonal": int(sub.loc[sub["diagonal"], "flagged"].sum()),
                "beyond_diagonal": int(sub.loc[sub["diagonal"], "beyond"].sum()),
                "beyond_off_diagonal": int(sub.loc[~sub["diagonal"], "beyond"].sum()),
            })
    table = pd.DataFrame(rows)
    key = table["spearman_rho"].fillna(-2.0) + 1e-3 * table["diagonal_recovery"].fillna(0) - 1e-6 * table["off_diagonal_false_positives"]
    return table.assign(_key=key).sort_values("_key", ascending=False, kind="mergesort").drop(columns="_key").reset_index(drop=True)


# -- one agreement table for every estimator of Φ ----------------------------------------------------------
AGREEMENT_COLUMNS = ("setting", "estimator", "cluster_source", "spearman_rho", "spearman_low", "spearman_high",
                     "diagonal_recovery", "off_diagonal_false_positives", "dose_rho", "seconds", "peak_rss_mb")
CLUSTER_SOURCES = ("oracle", "discovered")


def chain_phi_long(influence: pd.DataFrame, scores: Sequence[str] = tuple(SCORES),
                   estimator: str = "perturbation") -> pd.DataFrame:
    """The chain's Φ (``influence.parquet`` rows of :func:`chain_influence`) in the long form every estimator shares.

    One row per chain point × score (``phi``, ``phi_minus_control``) × cluster × ability:
    ``cluster``, ``ability``, ``phi`` (the score's value), ``estimator``, ``setting`` (the
    point's label plus ``score=<score>``), ``phi_low``/``phi_high`` (stage 06's bootstrap interval
    over items and control draws), and the test columns :func:`estimator_agreement`
    reads when present: ``beyond`` (``phi_minus_control_low > 0``, else stage 06's
    ``exceeds_control(s)``) and ``flagged`` (``finding``, else ``significant``).
    """
    exceeds = _column(influence, "exceeds_controls", "exceeds_control")
    flagged = _column(influence, "finding", "significant")
    table = influence.copy()
    if "phi_minus_control" not in table.columns:
        table["phi_minus_control"] = table["phi"] - table["phi_control"]
    beyond = table["phi_minus_control_low"] > 0 if "phi_minus_control_low" in table.columns else table[exceeds]
    frames = []
    for score in scores:
        frames.append(pd.DataFrame({
            "cluster": table["cluster"].to_numpy(), "ability": table["ability"].to_numpy(),
            "phi": table[score].to_numpy(dtype=float), "estimator": estimator,
            "setting": table["setting"].astype(str) + f", score={score}",
            "beyond": beyond.astype(object).fillna(False).astype(bool).to_numpy(),
            "flagged": table[flagged].astype(object).fillna(False).astype(bool).to_numpy(),
            # stage 06's interval over items and control draws, where it has one
            "phi_low": table[f"{score}_low"].to_numpy(dtype=float) if f"{score}_low" in table.columns else np.nan,
            "phi_high": table[f"{score}_high"].to_numpy(dtype=float) if f"{score}_high" in table.columns else np.nan,
        }))
    return pd.concat(frames, ignore_index=True)


def chain_cost(chain_dir: str | Path, spec: Any, scores: Sequence[str] = tuple(SCORES)) -> pd.DataFrame:
    """Wall time and peak kernel memory of every chain point, from the runner's ``status.json`` files.

    ``seconds`` = the point's own notebooks plus the shared stages 01–02 (``_shared/``, which
    every point of the sweep needs); ``peak_rss_mb`` the largest kernel peak among them.
    Columns: ``setting`` (as :func:`chain_phi_long` labels it, one row per score), ``seconds``, ``peak_rss_mb``.
    """
    chain_dir = Path(chain_dir)
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]

    def stages(folder: Path) -> list[dict[str, Any]]:
        path = folder / "status.json"
        return list(json.loads(path.read_text()).get("stages", {}).values()) if path.exists() else []

    shared = stages(chain_dir / "_shared")
    rows = []
    if any(s.grid for s in specs):
        for s, point in ((s, p) for s in specs for p in s.points()):
            records = stages(chain_dir / point_name(point)) + shared
            label = with_setting(pd.DataFrame({"x": [0]}), {**s.parameters, **point}, point_name(point))["setting"].iloc[0]
            rows.append({"setting": label, "records": records})
    else:
        label = with_setting(pd.DataFrame({"x": [0]}), specs[0].parameters, "run")["setting"].iloc[0]
        rows.append({"setting": label, "records": stages(chain_dir)})
    out = []
    for row in rows:
        rss = [r.get("peak_rss_mb") for r in row["records"] if r.get("peak_rss_mb")]
        for score in scores:  # one row per label chain_phi_long gives the point
            out.append({"setting": f"{row['setting']}, score={score}",
                        "seconds": float(sum(r.get("seconds") or 0.0 for r in row["records"])) if row["records"] else math.nan,
                        "peak_rss_mb": float(max(rss)) if rss else math.nan})
    return pd.DataFrame(out).drop_duplicates("setting")


def chain_estimator_phi(chain_dir: str | Path, spec: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The other estimators' Φ of a chain (RepSim, BM25, influence functions: stage 06's
    ``estimators/phi.parquet``) in long form, and what each cost.

    Their Φ reads stages 01-02 and the ability items only, which every point of a sweep shares,
    so the first finished point's table stands for the chain; perturbation's own rows are left
    out (:func:`chain_phi_long` gives them per setting). Returns ``(phi, cost)``: ``phi`` with
    ``cluster, ability, phi, estimator, setting`` (setting = the estimator's name) and the
    permutation test's ``p_adjusted`` as ``flagged`` (p < 0.05: the estimator claims the cell);
    ``cost`` with ``setting, seconds, peak_rss_mb`` (the estimator's own run, model load included).
    Both empty when notebook 06 ran no other estimator.
    """
    chain_dir = Path(chain_dir)
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    folders = ([chain_dir / point_name(p) for s in specs for p in s.points()] if any(s.grid for s in specs)
               else [chain_dir])
    tables = [f / PHI_ARTIFACT for f in folders if (f / PHI_ARTIFACT).exists()]
    empty = (pd.DataFrame(columns=["cluster", "ability", "phi", "estimator", "setting", "flagged"]),
             pd.DataFrame(columns=["setting", "seconds", "peak_rss_mb"]))
    if not tables:
        return empty
    phi = pd.read_parquet(tables[0])
    phi = phi[phi["estimator"] != "perturbation"].copy()
    if phi.empty:
        return empty
    phi["setting"] = phi["estimator"]
    phi["flagged"] = phi["p_adjusted"].astype(float) < 0.05
    cost = phi.groupby("setting", as_index=False)[["seconds", "peak_rss_mb"]].first()
    return phi[["cluster", "ability", "phi", "estimator", "setting", "flagged"]].reset_index(drop=True), cost


def _setting_of(frame: pd.DataFrame) -> pd.Series:
    return frame["setting"].astype(str) if "setting" in frame.columns else frame["estimator"].astype(str)


def estimator_agreement(
    phi: pd.DataFrame,
    stars: pd.DataFrame,
    mapping: pd.DataFrame,
    cluster_source: str,
    dose: pd.DataFrame | None = None,
    cost: pd.DataFrame | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Rows of the agreement table (``agreement.json`` → ``settings``) for any estimator of Φ.

    ``phi``: the estimator's Φ in long form, ``cluster``, ``ability``, ``phi``, ``estimator``,
    optional ``setting`` (default: the estimator's name), optional ``beyond`` (the cell lies
    beyond its random controls) and ``flagged`` (the estimator claims the cell). ``stars``:
    :func:`phi_star` (its rows with ``dropped`` = 1 are used). ``mapping``: :func:`map_clusters`
    on the clusters ``phi`` is about (``cluster_source`` says which: ``oracle`` = the planted
    sets themselves, ``discovered`` = a clustering). Per setting, over the cells (planted set
    ``p`` × ability ``a``) whose set has a cluster (``mapped``):

    - ``spearman_rho`` = corr(rank Φ, rank Φ*) with a percentile bootstrap interval over cells,
      stratified by own-skill cell or not (``spearman_low``, ``spearman_high``; see
      :func:`spearman_ci`), and the unstratified one beside it (``spearman_low_unstratified``,
      ``spearman_high_unstratified``);
    - ``diagonal_recovery``: among the sets the clustering *found* and the fine-tunes *learned*
      (own-skill Φ* not null), the share whose own cell is the largest Φ of its row, positive,
      and (where ``beyond`` is given) beyond its controls among the row's cells that are; a set
      the clustering split or merged is no recovery failure but a ``clustering_misses`` entry,
      with its purity and recall, and a set whose own Φ* is null has nothing to recover (it is
      listed in ``unlearned_sets``: ranking its own cell first is no hit);
    - ``off_diagonal_false_positives``: off-diagonal cells ``flagged`` where Φ* is null (None
      for an estimator that makes no claims, i.e. has no ``flagged``);
    - ``dose_rho``: Spearman of Φ against the dose (share of ``D_p`` kept) over ``dose``'s rows
      for this setting (``dose``: ``setting`` or ``estimator``, ``dose``, ``phi``; the dose
      skill's own cell), None without them;
    - ``seconds`` and ``peak_rss_mb`` from ``cost`` (``setting`` or ``estimator``, ``seconds``,
      ``peak_rss_mb``), None where it has none.

    Best first (ρ, then diagonal recovery, then fewer false positives).
    """
    require(cluster_source in CLUSTER_SOURCES, f"cluster_source must be one of {CLUSTER_SOURCES}, got {cluster_source!r}")
    missing = {"cluster", "ability", "phi", "estimator"} - set(phi.columns)
    require(not missing, f"phi (long form) lacks the columns {sorted(missing)}; it needs cluster, ability, phi, "
                         "estimator and optionally setting (e.g. rephelpers.estimators' cluster_phi output)")
    require({"skill", "cluster", "mapped"} <= set(mapping.columns), "mapping must be map_clusters' table")
    stars = stars[stars["dropped"] >= 1.0] if "dropped" in stars.columns else stars
    phi = phi.assign(setting=_setting_of(phi), cluster=phi["cluster"].astype(str))
    found_skills = (mapping.loc[mapping["status"] == "found", "skill"] if "status" in mapping.columns
                    else mapping.loc[mapping["mapped"].astype(bool), "skill"]).tolist()
    mapped = mapping[mapping["mapped"].astype(bool)][["skill", "cluster"]].assign(cluster=lambda m: m["cluster"].astype(str))
    truth = stars.merge(mapped.rename(columns={"skill": "planted", "cluster": "phi_cluster"}),
                        left_on="cluster", right_on="planted").drop(columns="cluster")
    truth["diagonal"] = truth["ability"] == truth["planted"].map(planted_ability)
    misses = clustering_misses(mapping)
    own_truth = truth[truth["diagonal"]]
    unlearned = sorted(set(own_truth.loc[own_truth["null"].astype(bool), "planted"]) & set(found_skills))
    recoverable = [s for s in found_skills if s not in unlearned]
    dose_rho = {}
    if dose is not None and len(dose):
        dose = dose.assign(setting=_setting_of(dose))
        for label, sub in dose.groupby("setting"):
            ok = sub[np.isfinite(sub["phi"].astype(float))]
            dose_rho[label] = spearman(ok["phi"], ok["dose"]) if ok["dose"].nunique() >= 2 else math.nan
    costs = {}
    if cost is not None and len(cost):
        cost = cost.assign(setting=_setting_of(cost))
        costs = {r["setting"]: r for r in cost.to_dict("records")}
    rows = []
    for (estimator, label), sub in phi.groupby(["estimator", "setting"], sort=True):
        # an estimator without tests (no values in beyond/flagged) is judged by Φ alone and makes no claims
        sub = sub[[c for c in sub.columns if c not in ("beyond", "flagged") or sub[c].notna().any()]]
        for column in ("beyond", "flagged"):
            if column in sub.columns:
                sub = sub.assign(**{column: sub[column].astype(object).fillna(False).astype(bool)})
        cells = truth.merge(sub.drop(columns=["estimator", "setting"]).rename(columns={"cluster": "phi_cluster"}),
                            on=["phi_cluster", "ability"], how="inner")
        ok = cells[np.isfinite(cells["phi"].astype(float)) & np.isfinite(cells["phi_star"].astype(float))]
        rho = spearman(ok["phi"], ok["phi_star"])
        low, high = spearman_ci(ok["phi"], ok["phi_star"], n_boot, alpha, seed, strata=ok["diagonal"])
        low_cells, high_cells = spearman_ci(ok["phi"], ok["phi_star"], n_boot, alpha, seed)
        recovered = []
        for skill in recoverable:
            row = cells[cells["planted"] == skill]
            if "beyond" in row.columns:
                row = row[row["beyond"].astype(bool)]
            own = row[row["diagonal"]]
            if len(own) == 1 and own["phi"].iloc[0] > 0 and own["phi"].iloc[0] >= row["phi"].max():
                recovered.append(skill)
        null_off = cells[~cells["diagonal"] & cells["null"]]
        false_pos = int(null_off["flagged"].astype(bool).sum()) if "flagged" in cells.columns else None
        spent = costs.get(label, costs.get(estimator, {}))
        rows.append({
            "setting": label, "estimator": estimator, "cluster_source": cluster_source,
            "spearman_rho": rho, "spearman_low": low, "spearman_high": high,
            "diagonal_recovery": len(recovered) / len(recoverable) if recoverable else math.nan,
            "off_diagonal_false_positives": false_pos,
            "dose_rho": dose_rho.get(label, math.nan),
            "seconds": spent.get("seconds", math.nan), "peak_rss_mb": spent.get("peak_rss_mb", math.nan),
            "n_cells": len(ok), "recovered": ",".join(recovered), "found_sets": len(found_skills),
            "unlearned_sets": ",".join(unlearned), "clustering_misses": misses, "null_off_diagonal_cells": len(null_off),
            "spearman_low_unstratified": low_cells, "spearman_high_unstratified": high_cells,
        })
    table = pd.DataFrame(rows, columns=[*AGREEMENT_COLUMNS, "n_cells", "recovered", "found_sets", "unlearned_sets",
                                        "clustering_misses",
                                        "null_off_diagonal_cells", "spearman_low_unstratified",
                                        "spearman_high_unstratified"])
    key = (table["spearman_rho"].astype(float).fillna(-2.0) + 1e-3 * table["diagonal_recovery"].astype(float).fillna(0)
           - 1e-6 * table["off_diagonal_false_positives"].astype(float).fillna(0))
    return table.assign(_key=key).sort_values("_key", ascending=False, kind="mergesort").drop(columns="_key").reset_index(drop=True)


def dose_phi(chains: Mapping[float, tuple[pd.DataFrame, pd.DataFrame]], skill: str) -> pd.DataFrame:
    """Every setting's Φ of the dose skill's cluster on its own ability, per dose.

    ``chains``: dose (share of ``D_p`` kept) → ``(phi, mapping)``, the long-form Φ
    (:func:`chain_phi_long`) and :func:`map_clusters` of the chain run on that dose's fine-tune.
    Returns ``estimator``, ``setting``, ``dose``, ``phi`` (NaN where the clustering did not
    find the set), the input of :func:`estimator_agreement`'s ``dose``.
    """
    ability = planted_ability(skill)
    frames = []
    for dose, (phi, mapping) in sorted(chains.items()):
        row = mapping[mapping["skill"] == skill]
        require(len(row) == 1, f"the mapping of the dose-{dose} chain has no row for {skill!r}")
        own = phi[phi["ability"] == ability].assign(setting=lambda d: _setting_of(d))
        mine = own[own["cluster"].astype(str) == str(row["cluster"].iloc[0])]
        found = bool(row["mapped"].iloc[0])
        frames.append(mine[["estimator", "setting"]].assign(dose=float(dose),
                                                            phi=mine["phi"].astype(float) if found else math.nan))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["estimator", "setting", "dose", "phi"])


def combine_agreement(*tables: pd.DataFrame) -> pd.DataFrame:
    """The rows of several :func:`estimator_agreement` tables (estimators, cluster sources) as one, best first."""
    table = pd.concat([t for t in tables if len(t)], ignore_index=True)
    require(len(table), "no agreement rows to combine")
    key = (table["spearman_rho"].astype(float).fillna(-2.0) + 1e-3 * table["diagonal_recovery"].astype(float).fillna(0)
           - 1e-6 * table["off_diagonal_false_positives"].astype(float).fillna(0))
    return table.assign(_key=key).sort_values("_key", ascending=False, kind="mergesort").drop(columns="_key").reset_index(drop=True)




def best_by(per_setting: pd.DataFrame, column: str = "scoring") -> pd.DataFrame:
    """The best row of :func:`setting_agreement` for each value of ``column`` (its order: best first).

    ``column="scoring"`` answers which way of choosing what to perturb (raw S, Cohen's d,
    token-level, probe, SVD, LEACE) agrees best with the fine-tunes, each at its best kind,
    layer and score.
    """
    require(column in per_setting.columns, f"the agreement table has no {column!r} column (chain points before it existed)")
    keep = [column, "setting", "spearman_rho", "spearman_low", "spearman_high", "diagonal_recovery",
            "diagonal_argmax", "off_diagonal_false_positives", "null_off_diagonal_cells"]
    return per_setting.drop_duplicates(column, keep="first")[[c for c in keep if c in per_setting.columns]].reset_index(drop=True)


AGREEMENT_ARTIFACTS = ("agreement.json", "agreement_cells.parquet")
"""What notebook 07 writes into its run directory, under one key."""


def save_agreement(run: RunDir, summary_text: str, cells: pd.DataFrame,
                   params: Mapping[str, Any]) -> tuple[str, pd.DataFrame]:
    """Write ``agreement.json`` (``summary_text``, :func:`agreement_summary` as JSON) and
    ``agreement_cells.parquet`` (``cells``) through ``run.cached``, keyed by ``params`` (what the
    figures are computed from: cells, Φ*, scores, mapping, design). Same key: the files on disk
    are kept (and returned); another key: the old ones move to ``.history/``."""
    summary_name, cells_name = AGREEMENT_ARTIFACTS

    def save(value: tuple[str, pd.DataFrame], key: str) -> None:
        run.save_text(summary_name, value[0], key)
        run.save_parquet(cells_name, value[1], key)

    def load() -> tuple[str, pd.DataFrame]:
        return run.require(summary_name, "notebook 07_ground_truth").read_text(), run.load_parquet(cells_name)

    return run.cached(list(AGREEMENT_ARTIFACTS), lambda: (summary_text, cells), params=dict(params), save=save, load=load)


def agreement_summary(per_setting: pd.DataFrame, mapping: pd.DataFrame, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``agreement.json``: the best setting's figures at top level, every setting below."""
    require(len(per_setting) > 0, "no setting to summarise")
    best = per_setting.iloc[0]

    def clean(v: Any) -> Any:
        if isinstance(v, (float, np.floating)):
            return None if not math.isfinite(float(v)) else float(v)
        if isinstance(v, (np.integer,)):
            return int(v)
        if isinstance(v, np.bool_):
            return bool(v)
        return v

    return {
        "spearman_rho": clean(best["spearman_rho"]),
        "spearman_ci": [clean(best["spearman_low"]), clean(best["spearman_high"])],
        "diagonal_recovery": clean(best["diagonal_recovery"]),
        "diagonal_recovery_strict": clean(best.get("diagonal_recovery_strict", math.nan)),
        "diagonal_argmax": clean(best.get("diagonal_argmax", math.nan)),
        "off_diagonal_false_positives": clean(best["off_diagonal_false_positives"]),
        "null_off_diagonal_cells": clean(best.get("null_off_diagonal_cells", math.nan)),
        "best_setting": str(best["setting"]),
        **({"best_by_scoring": [{k: clean(v) for k, v in row.items()} for row in best_by(per_setting).to_dict("records")]}
           if "scoring" in per_setting.columns else {}),
        "settings": [{k: clean(v) for k, v in row.items()} for row in per_setting.to_dict("records")],
        "cluster_mapping": [{k: clean(v) for k, v in row.items()} for row in mapping.to_dict("records")],
        **({k: v for k, v in extra.items()} if extra else {}),
    }


def headline(per_setting: pd.DataFrame, target_rho: float = 0.7) -> str:
    """One paragraph: the best setting's agreement, against the method's target (ρ ≥ 0.7, full recovery)."""
    best = per_setting.iloc[0]
    rho = best["spearman_rho"]
    meets = (math.isfinite(rho) and rho >= target_rho and best["diagonal_recovery"] == 1.0)
    return (
        f"Best setting: {best['setting']}. Spearman ρ(Φ, Φ*) = {rho:+.2f} "
        f"[{best['spearman_low']:+.2f}, {best['spearman_high']:+.2f}] over {best['n_cells']} cells; "
        f"diagonal recovery {best['diagonal_recovery']:.0%} ({best['recovered'] or 'none'}; own cell beyond its "
        f"controls and largest there; own cell largest in {best.get('diagonal_argmax', math.nan):.0%} of rows by Φ alone); "
        f"{best['off_diagonal_false_positives']} of {best['null_off_diagonal_cells']} null off-diagonal cells flagged. "
        f"{'Meets' if meets else 'Falls short of'} the target (ρ ≥ {target_rho}, full diagonal recovery) "
        f"across {len(per_setting)} setting(s)."
    )


def agreement_headline(table: pd.DataFrame, target_width: float = 0.5) -> str:
    """One paragraph on :func:`combine_agreement`'s best row: ρ with its interval (against the issue's
    target width of 0.5), diagonal recovery, false positives and clustering misses."""
    best = table.iloc[0]
    width = best["spearman_high"] - best["spearman_low"]
    fp = best["off_diagonal_false_positives"]
    return (
        f"Best: {best['setting']} ({best['estimator']}, {best['cluster_source']} clusters). Spearman ρ(Φ, Φ*) = "
        f"{best['spearman_rho']:+.2f} [{best['spearman_low']:+.2f}, {best['spearman_high']:+.2f}] over "
        f"{best['n_cells']} cells (interval {width:.2f} wide; the design's target is at most {target_width}); diagonal "
        f"recovery {best['diagonal_recovery']:.0%} of the {best['found_sets']} set(s) the clustering found "
        f"({best['recovered'] or 'none'}"
        + (f"; not counted, as their own Φ* is null: {best['unlearned_sets']}" if best.get("unlearned_sets") else "")
        + "); "
        + (f"{int(fp)} of {best['null_off_diagonal_cells']} null off-diagonal cells flagged; " if pd.notna(fp) else "")
        + (f"clustering misses: {best['clustering_misses']}. " if best["clustering_misses"] else "no clustering miss. ")
        + f"{len(table)} row(s) in all."
    )
