"""Stage 04's control draws in rounds: when more draws cannot change a specificity verdict.

:func:`rephelpers.perturbations.specificity.specificity_report` runs a cluster's control draws
round by round (``control_rounds``) and stops once :func:`draws_settled` says the verdict of
:func:`rephelpers.perturbations.specificity.specificity_verdicts` is fixed; the counts of what ran
(:func:`control_arms_run`, :func:`draws_used`) and the replay of a report of all draws
(:func:`replay_rounds`) live here beside that rule, which both the report and the verdicts use.
:func:`settled_settings` hands stage 05 the settings whose verdict already fixes stage 06's.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import is_positive_integer, require

MIN_GAP = 0.05
"""Δlog-ppl (nats per token) below which a change, or a target-minus-rest gap, is not read."""
MIN_RATIO = 1.5
"""A specific perturbation raises log-perplexity on its cluster at least this many times more than on the rest."""
SETTING_COLUMNS = ("kind", "magnitude", "layer", "layers", "component", "positions", "cluster")
"""What names one (cluster, setting) of a report, the unit that draws and stops."""


def check_rounds(control_rounds: int | None, min_gap: float, min_ratio: float) -> None:
    """The checks of a round design (stage 04's ``control_rounds`` and thresholds), made before any
    forward pass."""
    require(control_rounds is None or is_positive_integer(control_rounds),
            f"control_rounds (control draws per round) must be None (all n_controls at once) or a positive "
            f"integer such as 5, got {control_rounds!r}")
    for name, value in (("min_gap", min_gap), ("min_ratio", min_ratio)):
        require(isinstance(value, (int, float, np.floating)) and math.isfinite(value),
                f"{name} must be a finite number (the thresholds specificity_verdicts uses), got {value!r}")


def own_specific(target: float, rest: float, min_gap: float, min_ratio: float) -> bool:
    """Whether a perturbation's own Δs allow "specific": a measurable change, ``g = Δ_T − Δ_R ≥ min_gap``
    and ``Δ_T ≥ min_ratio · max(Δ_R, 0)`` (False where any of them is NaN)."""
    if abs(target) < min_gap and abs(rest) < min_gap:
        return False
    return bool(target - rest >= min_gap and target >= min_ratio * max(rest, 0.0))


def draws_settled(
    target: float, rest: float, control_gaps: Sequence[float], min_gap: float = MIN_GAP, min_ratio: float = MIN_RATIO,
) -> str:
    """Why more control draws cannot change a perturbation's verdict (empty while they can), from
    its Δ_T, Δ_R and its draws' gaps so far (:func:`rephelpers.perturbations.specificity.specificity_verdicts`).

    "specific" needs :func:`own_specific` and ``g > max_j g_j`` over every draw; a later
    draw only raises that maximum. So the verdict is settled when the own Δs fail (the
    controls are then never read) or when a draw has ``g_j ≥ g`` (NaN draws do not count:
    the verdict's maximum skips them, so later finite draws could still be below ``g``).
    The label of a settled verdict depends on Δ_T, Δ_R only, so it is final too.
    """
    if not own_specific(target, rest, min_gap, min_ratio):
        return "own Δ not specific"
    gaps = np.asarray(control_gaps, dtype=float)
    if np.any(gaps[~np.isnan(gaps)] >= target - rest):
        return "a control draw's gap ≥ the perturbation's"
    return ""


def all_drawn(row: pd.Series) -> bool:
    """Whether a perturbation row's cluster drew every control it asked for (True for a report
    from before rounds, which has no ``n_draws_used``)."""
    used, cap = row.get("n_draws_used"), row.get("n_controls")
    return bool(used is None or cap is None or pd.isna(used) or pd.isna(cap) or used >= cap)


def control_arms_run(report: pd.DataFrame) -> int:
    """The control arms a report ran forward passes for: its control rows with ``own_pass`` (a
    draw identical to an earlier arm shares that arm's passes). A report from before that
    column counts each distinct control config per cluster and setting once."""
    controls = report[report["arm"] == "control"]
    if "own_pass" in controls.columns:
        return int(controls["own_pass"].astype(bool).sum())
    keys = [c for c in ("cluster", "kind", "magnitude", "layer", "layers", "component", "positions", "config")
            if c in controls.columns]
    return int(len(controls.drop_duplicates(keys)))


def draws_used(report: pd.DataFrame) -> pd.DataFrame:
    """Per cluster and setting: ``n_controls`` (the cap), ``n_draws_used`` (control rows present),
    ``arms_run`` (:func:`control_arms_run` of them) and ``draws_stopped`` (why it stopped before
    the cap; empty when it drew them all)."""
    keys = [c for c in SETTING_COLUMNS if c in report.columns]
    out = []
    for key, group in report.groupby(keys, dropna=False, sort=True):
        controls = group[group["arm"] == "control"]
        out.append({**dict(zip(keys, key)),
                    "n_controls": int(group["n_controls"].iloc[0]) if "n_controls" in group else int(controls["draw"].nunique()),
                    "n_draws_used": int(controls["draw"].nunique()),
                    "arms_run": control_arms_run(group),
                    "draws_stopped": str(group["draws_stopped"].iloc[0]) if "draws_stopped" in group else ""})
    return pd.DataFrame(out)


def replay_rounds(
    report: pd.DataFrame, control_rounds: int, min_gap: float = MIN_GAP, min_ratio: float = MIN_RATIO,
) -> pd.DataFrame:
    """:func:`draws_used` of ``report`` (drawn all at once) as if drawn in rounds of ``control_rounds``.

    Draw j is the same control either way, so the rounds would have run the same rows up to
    the stop: per cluster and setting, walk its draws round by round and stop where
    :func:`draws_settled` does, as stage 04's report does; ``arms_run`` counts the draws whose
    config no earlier arm (the perturbation included) had, as ``own_pass`` does.
    A benchmark reads "control arms before/after" from a finished run without re-running it.
    """
    check_rounds(control_rounds, min_gap, min_ratio)
    require(control_rounds is not None, "replay_rounds needs a round size (control_rounds ≥ 1).")
    keys = [c for c in SETTING_COLUMNS if c in report.columns]
    out = []
    for key, group in report.groupby(keys, dropna=False, sort=True):
        pert = group[group["arm"] == "perturbation"]
        require(len(pert) == 1, f"replay_rounds: {dict(zip(keys, key))} has {len(pert)} perturbation rows, not one.")
        controls = group[group["arm"] == "control"].sort_values("draw")
        require(all_drawn(pert.iloc[0]), f"replay_rounds: {dict(zip(keys, key))} was already drawn in rounds and "
                                          "stopped; replay a report that drew every control (control_rounds=None).")
        row, gaps, drawn, stopped = pert.iloc[0], controls["specificity_gap"].to_numpy(float), 0, ""
        while drawn < len(gaps):
            drawn = min(len(gaps), drawn + int(control_rounds))
            stopped = "" if drawn == len(gaps) else draws_settled(row["dlogppl_target"], row["dlogppl_rest"],
                                                                    gaps[:drawn], min_gap, min_ratio)
            if stopped:
                break
        seen = {row["config"]} if "config" in group.columns else set()
        arms = 0
        for config in (controls["config"].iloc[:drawn] if "config" in controls.columns else range(drawn)):
            arms += config not in seen
            seen.add(config)
        out.append({**dict(zip(keys, key)), "n_controls": len(gaps), "n_draws_used": drawn, "arms_run": arms,
                    "draws_stopped": stopped})
    return pd.DataFrame(out)


def settled_settings(report: pd.DataFrame) -> set[tuple[int, str, float, int]]:
    """The perturbation settings stage 04 judged not specific: ``(cluster, kind, round(magnitude, 9), layer)``
    of every setting whose perturbation rows of ``report`` (:func:`rephelpers.perturbations.specificity.specificity_verdicts`)
    all have ``specific == False``.

    Stage 06 (:func:`rephelpers.influence.findings.cell_verdict`) calls a cell whose setting is not specific
    "non-specific damage" whatever its p against the control draws, so stage 05 may stop drawing controls
    for it: more draws cannot change its verdict. A setting with any row not False (several components or
    positions, one of them specific) is left out, so a cell that could still be a finding keeps drawing.
    The magnitude is rounded as stage 05's and stage 06's setting keys round it.
    """
    missing = [c for c in ("arm", "cluster", "kind", "magnitude", "layer", "specific") if c not in report.columns]
    require(not missing, f"settled_settings needs stage 04's verdict columns {missing}: re-run notebook 04 "
                         "(specificity_report, then specificity_verdicts), or do not gate stage 05 by it.")
    rows = report[report["arm"] == "perturbation"]
    settled = set()
    for (cluster, kind, magnitude, layer), group in rows.groupby(["cluster", "kind", "magnitude", "layer"], sort=True):
        # `specific` is an object column (True/False, None on controls): compare with False exactly.
        if all(isinstance(v, (bool, np.bool_)) and not v for v in group["specific"]):
            settled.add((int(cluster), str(kind), round(float(magnitude), 9), int(layer)))
    return settled


__all__ = ["MIN_GAP", "MIN_RATIO", "SETTING_COLUMNS", "check_rounds", "own_specific", "all_drawn", "draws_settled",
           "control_arms_run", "draws_used", "replay_rounds", "settled_settings"]
