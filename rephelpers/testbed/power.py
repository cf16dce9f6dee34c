"""The power of the testbed's design: how wide ρ's interval is, how small a Φ* is detectable.

Part of :mod:`rephelpers.testbed.groundtruth` (which re-exports it).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import require
from ..influence.stats import minimum_detectable_ais
from .agreement import spearman_ci


# -- the power of the design ----------------------------------------------------------------------------
def rho_interval_width(n_skills: int, n_abilities: int, phi_sd: float, star_sd: float, diagonal: float = 0.8,
                       n_sims: int = 200, n_boot: int = 500, seed: int = 0, stratified: bool = True) -> float:
    """Expected width of the bootstrap 95% interval of ρ(Φ, Φ*) for a design, by simulation.

    Each simulated testbed has ``n_skills × n_abilities`` cells whose true Φ* is ``diagonal``
    on the diagonal and 0 elsewhere; the measured Φ* adds normal noise of sd ``star_sd`` (its
    item and seed noise) and the estimator's Φ a proportional copy plus noise of sd
    ``phi_sd``. The width is the mean of :func:`spearman_ci`'s ``high − low``: the figure the
    testbed reports, with the same bootstrap (stratified by own-skill cell; ``stratified=False``:
    the unstratified interval beside it).
    """
    rng = np.random.default_rng(seed)
    truth = np.zeros((n_skills, n_abilities))
    truth[np.arange(n_skills), np.arange(n_skills)] = diagonal
    truth = truth.ravel()
    diagonal_cells = (np.arange(n_skills)[:, None] == np.arange(n_abilities)[None, :]).ravel()
    widths = []
    for i in range(n_sims):
        star = truth + rng.normal(0, star_sd, truth.shape)
        phi = truth + rng.normal(0, phi_sd, truth.shape)
        low, high = spearman_ci(phi, star, n_boot, 0.05, seed + i, strata=diagonal_cells if stratified else None)
        if math.isfinite(low):
            widths.append(high - low)
    return float(np.mean(widths)) if widths else math.nan


def detectable_phi(m_all: float, n_items: int, n_seeds: int = 1, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest diagonal Φ* = (M_all − M_−p)/M_all the design detects with ``power``.

    Φ* is the AIS formula with ``f_all`` as the unperturbed model, so this is
    :func:`rephelpers.influence.stats.minimum_detectable_ais` (a pure loss, each item ``f_all``
    gets right lost with probability Φ*, exact signed-rank test) on the ``n_items · n_seeds``
    paired item scores of all seeds pooled. Pooling treats seeds as more items: it leaves out
    the seed-to-seed spread, which the seed resampling of :func:`phi_star` does carry.
    """
    require(0 < m_all <= 1 and n_items >= 1 and n_seeds >= 1, "detectable_phi: 0 < m_all <= 1, n_items, n_seeds >= 1")
    return minimum_detectable_ais(int(n_items) * int(n_seeds), float(m_all), alpha=alpha, power=power)
