"""A setting θ: which perturbation (or control, or none) a stage applies, under one name.

Stages 04, 05 and 06 all speak of the same objects: cluster k's perturbation of a kind at
a magnitude and layer, its random control draws, and the unperturbed model. A
:class:`Setting` is that object, and :attr:`Setting.id` the one name every stage's rows
carry (stage 04's ``setting``, stage 05's ``config_id``, the simulator's ids):

- ``baseline`` (cluster :data:`BASELINE_CLUSTER`, kind ``none``, magnitude 0);
- ``k{k}:{kind}:m{m}`` for cluster k's perturbation, ``m`` printed with ``:g``;
- ``k{k}:{kind}:m{m}:control`` for its control draw 0 and ``…:control{j}`` for draw j ≥ 1.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from .errors import require

BASELINE_CLUSTER = -1
"""The ``cluster`` of the unperturbed model."""
BASELINE_ID = "baseline"
"""The ``id`` of the unperturbed model."""
_IDS = (
    re.compile(r"^k(?P<cluster>\d+):(?P<kind>[a-z_]+):m(?P<magnitude>[^:]+)(?::control(?P<draw>\d*))?$"),
    re.compile(r"^k(?P<cluster>\d+)-(?P<kind>[a-z_]+)-m(?P<magnitude>-?[^-]+)(?:-control(?P<draw>\d*))?$"),  # older ids
)


@dataclass(frozen=True)
class Setting:
    """One θ: cluster ``k`` (or the baseline), ``kind`` at ``magnitude``, applied at ``layer``/``component``
    on ``positions``; ``control`` with ``draw`` j for the j-th random control draw (draw 0 for the
    perturbation itself)."""

    cluster: int
    kind: str = "none"
    magnitude: float = 0.0
    layer: int = -1
    component: str = "resid"
    positions: str = "all"
    control: bool = False
    draw: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cluster", int(self.cluster))
        object.__setattr__(self, "magnitude", float(self.magnitude))
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "draw", int(self.draw))
        require(self.cluster >= BASELINE_CLUSTER, f"a setting's cluster is ≥ 0 (or {BASELINE_CLUSTER} for the baseline), got {self.cluster}")
        require(self.draw >= 0, f"a control draw is numbered from 0, got {self.draw}")
        require(not (self.is_baseline and self.control), "the baseline has no control draw")
        require(self.control or self.draw == 0, "only a control has a draw number other than 0")

    @classmethod
    def baseline(cls, layer: int = -1, component: str = "resid", positions: str = "all") -> "Setting":
        return cls(BASELINE_CLUSTER, "none", 0.0, layer, component, positions)

    @property
    def is_baseline(self) -> bool:
        return self.cluster == BASELINE_CLUSTER

    @property
    def arm(self) -> str:
        """``baseline``, ``perturbation`` or ``control`` (stage 04's word)."""
        return "baseline" if self.is_baseline else ("control" if self.control else "perturbation")

    @property
    def id(self) -> str:
        if self.is_baseline:
            return BASELINE_ID
        base = f"k{self.cluster}:{self.kind}:m{self.magnitude:g}"
        return f"{base}:control{self.draw or ''}" if self.control else base

    def control_draw(self, draw: int) -> "Setting":
        """This perturbation's control draw ``draw``."""
        require(not self.is_baseline, "the baseline has no control draw")
        return replace(self, control=True, draw=int(draw))

    def meta(self) -> dict[str, Any]:
        """The descriptor columns a score row carries (stage 05's ``config_meta``)."""
        return {"cluster": self.cluster, "control": self.control, "kind": self.kind, "magnitude": self.magnitude,
                "layer": self.layer, "draw": self.draw}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_id(setting_id: str) -> dict[str, Any]:
    """``{cluster, kind, magnitude, control, draw}`` of a setting id (also the older ``k0-ablate-m1-control`` form)."""
    if setting_id == BASELINE_ID:
        return {"cluster": BASELINE_CLUSTER, "kind": "none", "magnitude": 0.0, "control": False, "draw": 0}
    match = next((m for m in (p.match(str(setting_id)) for p in _IDS) if m), None)
    require(match is not None, f"{setting_id!r} is not a setting id (baseline, k<k>:<kind>:m<m>[:control<j>])")
    draw = match["draw"]
    return {"cluster": int(match["cluster"]), "kind": match["kind"], "magnitude": float(match["magnitude"]),
            "control": draw is not None, "draw": int(draw) if draw else 0}
