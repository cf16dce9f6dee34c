"""What stage 03 hands to stages 04 and 05: one cluster's components at one layer.

Stage 03 finds, for every layer ℓ and cluster k, the dimensions and subspaces tied to the
cluster; stage 04 perturbs them and stage 05 measures what the perturbations do. Everything
that passes between them is one :class:`ClusterComponents`, written to ``subspaces.json``
with :meth:`ClusterComponents.to_dict` and read back with :meth:`ClusterComponents.from_dict`
(the file's format is unchanged: a run directory from before this type still loads).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from ..errors import require
from ..interventions.edits import LearnedProjection, Leace, perturbation_from_dict


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """A linear read-out of "is in cluster k" in the original activation space.

    ``logit_k(h) = coef · h + intercept``; ``kind`` is the penalty it was fitted with
    (``"l1"`` or ``"l2"``) and ``accuracy`` its balanced accuracy on the held-out rows.
    The gradient perturbation steps along ``−sign(coef)``.
    """

    kind: str
    coef: np.ndarray
    intercept: float = 0.0
    accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "coef": self.coef.tolist(), "intercept": self.intercept, "accuracy": self.accuracy}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinearProbe:
        require(isinstance(data, Mapping), f"a probe must be a dict with 'coef' and 'intercept', got {type(data).__name__}")
        require("coef" in data, f"a probe needs 'coef' (and 'intercept'); it has {sorted(data)}")
        accuracy = data.get("accuracy")
        return cls(
            kind=str(data.get("kind", "l2")),
            coef=np.asarray(data["coef"], dtype=np.float64).reshape(-1),
            intercept=float(data.get("intercept", 0.0)),
            accuracy=None if accuracy is None else float(accuracy),
        )


_VECTORS = ("direction", "explained_variance", "mean_in", "mean_out", "std", "token_rms", "token_mean")
_INDEX_SETS = ("dims", "massive_dims")
_DERIVED = ("principal",)  # written by to_dict for readers of the JSON file, recomputed on load


@dataclass(frozen=True, eq=False, repr=False)
class ClusterComponents:
    """Cluster k's components at layer ℓ, as stage 03 found them on the training documents.

    With ``X`` the pooled training activations at ℓ, ``D_k`` cluster k's training documents
    and ``μ_k``, ``μ_rest`` the mean of ``X`` over ``D_k`` and over the others:

    - ``dims`` = R_k, the selected dimensions: ``{i : S(i,k) > τ}`` (strictly, as ``association.select_dimensions`` selects) with
      ``S(i,k) = μ_k,i − μ_rest,i`` (or Cohen's d, token-level S, or probe weights; ``method``
      says which), or the ``top_k`` largest; massive dimensions left out unless ``keep_massive``;
    - ``direction`` = v_k = (μ_k − μ_rest) / ‖μ_k − μ_rest‖, the class-mean direction;
    - ``basis`` = V_k [r, d], the rank-r principal basis of cluster k's centred activations
      (rows oriented along v_k), with ``explained_variance`` σ_j² / Σ σ² per row;
    - ``mean_in`` = μ_k, ``mean_out`` = μ_rest, ``std`` = per-dimension std over all training rows;
    - ``probe``: a linear read-out of "is in cluster k" (:class:`LinearProbe`);
    - ``leace``: the LEACE eraser of "is in cluster k" fitted once, in stage 03 (None where
      the concept is not linearly present);
    - ``learned``: a :class:`LearnedProjection` fitted by gradient in stage 04
      (:mod:`rephelpers.perturbations.learned`), not by stage 03; None until then;
    - ``massive_dims``, ``token_rms`` (and optionally ``token_mean``): token statistics that
      matched controls use; None when stage 02 collected none.

    Every field but ``layer`` and ``cluster`` may be None in a hand-built value: a
    perturbation that needs a missing field says which (:meth:`need`).
    """

    layer: int | None = None
    cluster: int | None = None
    component: str | None = None
    method: str | None = None
    tau: float | None = None
    top_k: int | None = None
    dims: tuple[int, ...] | None = None
    direction: np.ndarray | None = None
    basis: np.ndarray | None = None
    explained_variance: np.ndarray | None = None
    mean_in: np.ndarray | None = None
    mean_out: np.ndarray | None = None
    std: np.ndarray | None = None
    n_train: int | None = None
    n_heldout: int | None = None
    probe: LinearProbe | None = None
    selector_accuracy: float | None = None
    leace: Leace | None = None
    massive_dims: tuple[int, ...] | None = None
    token_rms: np.ndarray | None = None
    token_mean: np.ndarray | None = None
    token_level: bool = False
    keep_massive: bool = False
    learned: LearnedProjection | None = None

    def __repr__(self) -> str:
        size = "?" if self.dims is None else len(self.dims)
        return (f"ClusterComponents(layer={self.layer}, cluster={self.cluster}, method={self.method!r}, "
                f"|R_k|={size}, fields={self.available()})")

    @property
    def principal(self) -> np.ndarray | None:
        """V_k's first row, the cluster's leading principal direction."""
        return None if self.basis is None else self.basis[0]

    def available(self) -> list[str]:
        """The fields that are set, for error messages."""
        return sorted(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def need(self, name: str, kind: str, hint: str = "") -> Any:
        """Field ``name``, or an error saying that perturbation ``kind`` needs it."""
        value = getattr(self, name)
        require(
            value is not None,
            f"{kind}: the cluster components have no {name!r} (they have {self.available()})"
            + (f"; {hint}" if hint else "; re-run notebook 03 or pick another perturbation kind."),
        )
        return value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: vectors as lists, the eraser as ``Leace.to_dict()``, the probe as a dict."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif f.name in _INDEX_SETS and value is not None:
                value = [int(i) for i in value]
            elif f.name in ("probe", "leace", "learned") and value is not None:
                value = value.to_dict()
            out[f.name] = value
        out["principal"] = None if self.basis is None else self.basis[0].tolist()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterComponents:
        """Inverse of :meth:`to_dict`; also takes a hand-built dict with any subset of the fields."""
        require(isinstance(data, Mapping), f"cluster components must be a dict, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - set(_DERIVED))
        require(not unknown, f"cluster components: unknown fields {unknown}; the fields are {sorted(names)}.")
        values: dict[str, Any] = {}
        for name in names & set(data):
            value = data[name]
            if value is None:
                continue
            if name in _VECTORS:
                value = np.asarray(value, dtype=np.float64).reshape(-1)
            elif name == "basis":
                value = np.atleast_2d(np.asarray(value, dtype=np.float64))
            elif name in _INDEX_SETS:
                value = tuple(int(i) for i in np.asarray(value).reshape(-1))
            elif name == "probe":
                value = LinearProbe.from_dict(value)
            elif name == "leace":
                value = _as_leace(value)
            elif name == "learned":
                value = value if isinstance(value, LearnedProjection) else perturbation_from_dict({**value, "kind": "learned"})
            elif name in ("layer", "cluster", "top_k", "n_train", "n_heldout"):
                value = int(value)
            elif name in ("tau", "selector_accuracy"):
                value = float(value)
            elif name in ("token_level", "keep_massive"):
                value = bool(value)
            values[name] = value
        return cls(**values)


def as_components(value: ClusterComponents | Mapping[str, Any]) -> ClusterComponents:
    """``value`` itself, or the :class:`ClusterComponents` a dict describes."""
    if isinstance(value, ClusterComponents):
        return value
    return ClusterComponents.from_dict(value)


def _as_leace(fitted: Any) -> Leace:
    if isinstance(fitted, Leace):
        return fitted
    require(isinstance(fitted, Mapping), f"leace: the eraser must be Leace.to_dict(), got {type(fitted).__name__}")
    eraser = perturbation_from_dict({"kind": "leace", **fitted})
    assert isinstance(eraser, Leace)
    return eraser


__all__ = ["ClusterComponents", "LinearProbe", "as_components"]
