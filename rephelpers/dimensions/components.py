"""What stage 03 hands to stages 04 and 05: one cluster's components at one layer.

Stage 03 finds, for every layer ℓ and cluster k, the dimensions and subspaces tied to the
cluster; stage 04 perturbs them and stage 05 measures what the perturbations do. Everything
that passes between them is one :class:`ClusterComponents`, written to ``subspaces.json``
with :meth:`ClusterComponents.to_dict` and read back with :meth:`ClusterComponents.from_dict`
(the file's format is unchanged: a run directory from before this type still loads). Each
perturbation kind reads only a small typed value taken from it (the classes below
:class:`ClusterComponents`).
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

    The one container stage 03 writes (``subspaces.json``) and stages 04/05 read. No
    perturbation reads it directly: each kind takes the typed value it needs, which
    :data:`rephelpers.perturbations.kinds.KINDS` extracts with the value type's ``of``
    (:class:`Selection`, :class:`MeanReference`, :class:`SpreadSelection`,
    :class:`MeanDirection`, :class:`Subspace`, :func:`eraser`, :class:`ProbeStep`; the
    controls take :class:`ControlStats`), and that says what is missing once, there.

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

    ``layer`` and ``cluster`` are required; every other field may be None in a hand-built
    value (a test's, or components fitted with ``with_probe=False``/``with_leace=False``).
    """

    layer: int
    cluster: int
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
        """Inverse of :meth:`to_dict`; also takes a hand-built dict with ``layer``, ``cluster`` and any other fields."""
        require(isinstance(data, Mapping), f"cluster components must be a dict, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - set(_DERIVED))
        require(not unknown, f"cluster components: unknown fields {unknown}; the fields are {sorted(names)}.")
        absent = [k for k in ("layer", "cluster") if data.get(k) is None]
        require(not absent, f"cluster components need {absent} (which layer and cluster they belong to); "
                            f"they have {sorted(k for k, v in data.items() if v is not None)}.")
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


def _need(c: ClusterComponents, name: str, who: str, hint: str = "") -> Any:
    """Field ``name`` of ``c``, or an error saying that ``who`` needs it and what ``c`` has."""
    value = getattr(c, name)
    require(
        value is not None,
        f"{who}: the cluster components (layer {c.layer}, cluster {c.cluster}) have no {name!r} "
        f"(they have {c.available()})"
        + (f"; {hint}" if hint else "; re-run notebook 03 or pick another perturbation kind."),
    )
    return value


def _mean_gap(c: ClusterComponents, width: int) -> np.ndarray | None:
    """μ_k − μ_rest, or None when either mean is absent (the kinds then use raw magnitudes)."""
    if c.mean_in is None or c.mean_out is None:
        return None
    gap = c.mean_in - c.mean_out
    require(gap.shape == (width,), f"mean_in/mean_out have shape {gap.shape}, expected ({width},)")
    return gap


# -- what each perturbation kind needs ------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Selection:
    """R_k alone (``ablate``): a non-empty tuple of dimension indices."""

    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        require(len(self.dims) > 0, "R_k is empty for this cluster; lower τ or use top_k in notebook 03.")

    @classmethod
    def of(cls, c: ClusterComponents, who: str = "ablate") -> Selection:
        dims = _need(c, "dims", who)
        require(len(dims) > 0, f"{who}: R_k is empty for this cluster; lower τ or use top_k in notebook 03.")
        return cls(dims)


@dataclass(frozen=True, eq=False)
class MeanReference:
    """R_k and the rest's mean μ_rest [d] (``mean_ablate``, mediation): R_k is set towards μ_rest,R."""

    dims: tuple[int, ...]
    mean_out: np.ndarray

    @classmethod
    def of(cls, c: ClusterComponents, who: str = "mean_ablate") -> MeanReference:
        return cls(Selection.of(c, who).dims, _need(c, "mean_out", who))


@dataclass(frozen=True, eq=False)
class SpreadSelection:
    """R_k and its natural spread (``noise``): ``typical_std = median_{i∈R_k} std_i``.

    ``typical_std`` is 1 (σ in raw units) for components without ``std``, and ``std[0]`` for a
    one-entry ``std`` (one spread for every dimension).
    """

    dims: tuple[int, ...]
    typical_std: float

    @classmethod
    def of(cls, c: ClusterComponents, who: str = "noise") -> SpreadSelection:
        dims = Selection.of(c, who).dims
        std = c.std
        if std is None:
            return cls(dims, 1.0)
        if std.size == 1:
            return cls(dims, float(std[0]))
        require(
            max(dims) < std.size,
            f"{who}: the components' std has {std.size} entries but R_k reaches dimension {max(dims)}; "
            "it must hold one standard deviation per hidden dimension.",
        )
        # the median, so that one massive dimension in R_k does not set the level of all the others
        return cls(dims, float(np.median(std[list(dims)])))


@dataclass(frozen=True, eq=False)
class MeanDirection:
    """The unit class-mean direction v_k [d] and the gap ``μ_k − μ_rest`` [d] (``shift``; None: raw α)."""

    direction: np.ndarray
    gap: np.ndarray | None

    @classmethod
    def of(cls, c: ClusterComponents, who: str = "shift") -> MeanDirection:
        v = _need(c, "direction", who)
        return cls(v, _mean_gap(c, len(v)))


@dataclass(frozen=True, eq=False)
class Subspace:
    """The principal basis V_k [r, d] (``project``)."""

    basis: np.ndarray

    @classmethod
    def of(cls, c: ClusterComponents, who: str = "project") -> Subspace:
        return cls(_need(c, "basis", who))


def eraser(c: ClusterComponents, who: str = "leace") -> Leace:
    """The fitted LEACE eraser of "is in cluster k" (``leace``)."""
    return _need(c, "leace", who, hint="fit it with fit_leace(X, cluster == k) in notebook 03")


def learned_subspace(c: ClusterComponents, who: str = "learned") -> LearnedProjection:
    """The learned, specificity-seeking subspace U of cluster k (``learned``), fitted in stage 04."""
    return _need(c, "learned", who, hint="fit it with rephelpers.perturbations.learned.with_learned(run, model, "
                 "documents, components, layer) (notebook 04 does when 'learned' is listed)")


@dataclass(frozen=True, eq=False)
class ProbeStep:
    """The probe's weights w [d] and intercept, and the gap ``μ_k − μ_rest`` (``gradient``; None: raw ε)."""

    coef: np.ndarray
    intercept: float
    gap: np.ndarray | None

    @classmethod
    def of(cls, c: ClusterComponents, who: str = "gradient") -> ProbeStep:
        probe = _need(c, "probe", who, hint="notebook 03 stores a probe per cluster")
        require(bool(np.abs(probe.coef).sum() > 0), f"{who}: the probe coefficients are all zero")
        return cls(probe.coef, probe.intercept, _mean_gap(c, len(probe.coef)))


@dataclass(frozen=True, eq=False)
class ControlStats:
    """What a matched control reads besides its target: where it is, and the statistics that match it.

    ``layer``, ``cluster`` seed the draw (each cluster's control independent of the others');
    ``massive_dims``, ``token_rms``, ``token_mean`` (stage 02's token statistics), ``std`` and
    ``mean_out`` (pooled, stage 03) set the magnitude strata; each None where it was not collected,
    and the control then falls back as :func:`rephelpers.perturbations.kinds.matched_control` says.
    """

    layer: int
    cluster: int
    massive_dims: tuple[int, ...] | None = None
    token_rms: np.ndarray | None = None
    token_mean: np.ndarray | None = None
    std: np.ndarray | None = None
    mean_out: np.ndarray | None = None

    @classmethod
    def of(cls, c: ClusterComponents) -> ControlStats:
        return cls(c.layer, c.cluster, c.massive_dims, c.token_rms, c.token_mean, c.std, c.mean_out)


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


__all__ = ["ClusterComponents", "ControlStats", "LinearProbe", "MeanDirection", "MeanReference", "ProbeStep",
           "Selection", "SpreadSelection", "Subspace", "as_components", "eraser"]
