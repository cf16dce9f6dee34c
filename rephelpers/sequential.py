"""Control draws read in order: Besag–Clifford's sequential p and the rule that stops drawing.

Stage 05 draws a cluster's random controls in rounds; a cell stops once it has ``h`` draws
whose Φ beats the target's (:func:`in_tail`): late rounds evaluate a cluster's draws only on
the abilities whose cells are still in the tail, and the cluster stops when none is
(:func:`cluster_in_tail`); stage 06 reads each cell's draws in the same order and gives it the
sequential p of :func:`sequential_p`. Both stages import this module (stage 05 may not import
stage 06), so the p, the stop rule and what counts as a distinct draw (:func:`distinct_draws`)
are written once. Because stage 05 stops evaluating a cell only after it met its ``h``-th
exceedance, stage 06's sequential p over the draws that cell has is exactly the p it would
read from a run that drew all ``n_controls`` on every ability (the p is fixed at the ``h``-th
exceedance, whatever comes after it).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import is_positive_integer, require


def sequential_p(target: float, controls: np.ndarray, h: int = 10) -> tuple[float, int]:
    """Besag–Clifford sequential Monte Carlo p-value of ``t`` against control draws taken in order.

    Walk the draws ``c_1, c_2, …`` (at most ``n = len(controls)``, the cap) and stop at the
    first ``L`` where ``h`` of them satisfy ``c_j ≥ t``: then ``p = h / L``. If the cap is
    reached with ``g < h`` such draws, ``p = (g + 1) / (n + 1)``, the plain rank p-value.
    Exact (``P(p ≤ α) ≤ α``) when ``t`` is exchangeable with the draws (Besag & Clifford 1991,
    Biometrika 78:301); a cell far from the tail stops after about ``h / P(c ≥ t)`` draws,
    so only cells near the tail pay for the cap, while the smallest p stays ``1/(n + 1)``.
    Draws evaluated in rounds change nothing: the p is read at the ``h``-th exceedance
    whatever round it fell in. Returns ``(p, draws used)``; NaN p and 0 draws without draws.
    """
    require(int(h) >= 1, f"h (exceedances that stop a cell) must be ≥ 1, got {h!r}")
    controls = np.asarray(controls, dtype=float)
    controls = controls[~np.isnan(controls)]
    if len(controls) == 0 or not np.isfinite(target):
        return float("nan"), 0
    hits = np.cumsum(controls >= target)
    stop = np.flatnonzero(hits >= int(h))
    if len(stop):
        used = int(stop[0]) + 1
        return float(int(h) / used), used
    return float((hits[-1] + 1) / (len(controls) + 1)), int(len(controls))


def in_tail(target: float, draws: Sequence[float] | np.ndarray, h: int) -> bool:
    """Whether a cell still needs draws: fewer than ``h`` of its draws have ``Φ^{(j)} ≥ Φ``.

    A cell with no defined Φ (NaN: a baseline of 0) has no p to read and needs none. NaN
    draws are not counted, as :func:`sequential_p` skips them.
    """
    require(int(h) >= 1, f"stop_after_exceedances must be ≥ 1, got {h!r}")
    if not np.isfinite(target):
        return False
    values = np.asarray(draws, dtype=float)
    return int(np.sum(values[~np.isnan(values)] >= target)) < int(h)


def cluster_in_tail(cells: Iterable[tuple[float, Sequence[float] | np.ndarray]], h: int) -> bool:
    """A cluster keeps drawing while any of its cells ``(Φ, its draws' Φ in order)`` is :func:`in_tail`.

    One control draw of a cluster (one random dimension set) serves all of its abilities at
    once, so the cluster draws until its last cell has met its ``h``-th exceedance (or the cap).
    """
    return any(in_tail(target, draws, h) for target, draws in cells)


def recorded_perturbations(text: Any) -> bool:
    """Whether an ``interventions`` cell records real perturbation parameters (stage 05 always
    does; hand-made or simulated score tables may hold placeholders that identify nothing)."""
    try:
        ivs = json.loads(text) if isinstance(text, str) else []
    except ValueError:
        return False
    return bool(ivs) and all(isinstance(iv, dict) and isinstance(iv.get("perturbation"), dict) for iv in ivs)


def distinct_draws(controls: pd.DataFrame) -> set[tuple[int, int]] | None:
    """The ``(cluster, draw)`` pairs that repeat no earlier draw of their cluster, among the
    control rows of a score table (columns ``cluster``, ``draw``, ``interventions``).

    A draw is the set of its configs' interventions over Θ; the first draw (lowest ``draw``)
    with a given set counts, later copies do not. None when the rows do not record real
    perturbation parameters (:func:`recorded_perturbations`): then every draw counts.
    """
    if (len(controls) == 0 or "interventions" not in controls.columns
            or not controls["interventions"].map(recorded_perturbations).all()):
        return None
    signature = (controls.groupby(["cluster", "draw"])["interventions"]
                 .agg(lambda v: "\n".join(sorted(set(v)))).reset_index().sort_values(["cluster", "draw"]))
    first = signature.drop_duplicates(["cluster", "interventions"])
    return {(int(c), int(d)) for c, d in zip(first.cluster, first.draw)}


def reading_exceedances(requested: int | None, drawn: int | None) -> int | None:
    """The ``h`` stage 06 reads the draws with, given its own ``requested`` and stage 05's ``drawn``.

    Draws stopped at the ``drawn``-th exceedance hold every cell's first ``h ≤ drawn``
    exceedances, so they can be read with any such ``h`` (the same p as a full run); not with
    a larger one, nor as a rank p over all draws present (that p would ignore the stop).
    ``requested`` None adopts ``drawn``.
    """
    for name, value in (("stop_after_exceedances", requested), ("stage 05's stop_after_exceedances", drawn)):
        require(value is None or is_positive_integer(value),
                f"{name} must be None or a positive integer, got {value!r}")
    if drawn is None:
        return requested
    if requested is None:
        return int(drawn)
    require(int(requested) <= int(drawn),
            f"stop_after_exceedances = {requested}, but stage 05 stopped drawing controls at the {drawn}-th "
            f"exceedance: a cell may have no more than {drawn} exceedances on disk. Use stop_after_exceedances "
            f"≤ {drawn} (or None, which reads {drawn}), or re-run notebook 05 with stop_after_exceedances = {requested}.")
    return int(requested)
