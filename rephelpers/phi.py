"""Φ's two formulas on arrays, below every stage that reads them.

Stage 06 (:mod:`rephelpers.influence.impact`) builds AIS and Φ from them; stage 05
(:mod:`rephelpers.abilities.evaluation`) needs the very same numbers to decide when a
cluster may stop drawing controls (:mod:`rephelpers.sequential`). Stage 05 may not import
stage 06, so the formulas live here, once.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def relative_loss(m_base: Any, m_pert: Any, sign: Any = 1.0) -> np.ndarray:
    """The AIS formula on arrays: ``s · (M_base − M_pert) / M_base``, NaN where ``M_base = 0``.

    :func:`rephelpers.influence.impact.ais` applies it to a score table, the bootstrap
    (:mod:`rephelpers.influence.stats`) to every resample's matrix of ``M*`` values, stage 05's
    stop rule to the draws evaluated so far.
    """
    m_base, m_pert = np.asarray(m_base, dtype=float), np.asarray(m_pert, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m_base == 0, np.nan, sign * (m_base - m_pert) / np.where(m_base == 0, 1.0, m_base))


def config_mean(ais: np.ndarray, configs: np.ndarray | None = None) -> np.ndarray:
    """Φ's average over configs: ``(1/|Θ'|) Σ_{θ∈Θ'} AIS(θ)``, one value per row of ``ais``.

    ``ais [n, c]`` holds AIS per config in its columns (one row for the point estimate, one
    per bootstrap replicate in :func:`rephelpers.influence.stats.bootstrap_ci`); ``configs``
    picks the columns of Θ_k (default: all). Θ' is the configs whose AIS is defined (a
    baseline of 0 leaves it undefined, NaN); a row with none left is NaN. This is the one
    definition of Φ: :func:`rephelpers.influence.impact.influence_matrix`,
    :func:`~rephelpers.influence.impact.control_draws`, the bootstrap and stage 05's stop rule use it.
    """
    ais = np.atleast_2d(np.asarray(ais, dtype=np.float64))
    chosen = ais if configs is None else ais[:, np.asarray(configs, dtype=np.int64)]
    if chosen.shape[1] == 0:
        return np.full(ais.shape[0], np.nan)
    count = np.sum(~np.isnan(chosen), axis=1)
    total = np.nansum(chosen, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
