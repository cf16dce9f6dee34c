"""Perturbations of hidden states: one small frozen, serialisable class per method.

Each class maps a hidden-state tensor ``h`` of shape ``[..., d]`` to ``ĥ`` with the same
shape; where it is applied (layer, component, token positions) is the business of
:class:`rephelpers.interventions.intervene.Intervention`. ``to_dict()``/``perturbation_from_dict()``
round-trip every perturbation through plain JSON types, so a configuration travels in
papermill parameters and is written into every result row.

Notation: ``R`` is a set of dimension indices (R_k of cluster k), ``v`` a direction,
``V`` an orthonormal basis (rows) of a subspace.

Every class has one magnitude field: ablate/project/leace a ``strength`` in [0, 1]
interpolating between ``h`` and the fully perturbed state, noise its ``sigma``, shift its
``alpha``, gradient its ``epsilon``. How the stages build each kind from a cluster's
components, and its matched control, is stage 04's business
(:mod:`rephelpers.perturbations.kinds`, :mod:`rephelpers.perturbations.controls`); these
classes sit below the stages because stage 03 fits an eraser and ablates dimensions too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..errors import RephelpersError, require
from .tokenkeys import row_keys, standard_normal

_REGISTRY: dict[str, type["Perturbation"]] = {}


class _derived:
    """A value computed from a perturbation's fields on first use and kept on the instance.

    ``functools.cached_property`` does the same but holds a lock (Python 3.11), so a class
    using it cannot be pickled by value, as nnsight's remote execution ships these classes
    to a server that does not have this package.
    """

    def __init__(self, compute: Callable[[Any], Any]) -> None:
        self.compute = compute
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = self.compute(instance)
        instance.__dict__[self.name] = value  # frozen dataclasses still have a __dict__
        return value


@dataclass(frozen=True)
class Perturbation:
    """Base class. Subclasses set ``kind`` and implement :meth:`apply`."""

    kind: ClassVar[str] = "base"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Named super: a class rebuilt from its pickled source (nnsight's remote execution ships
        # these classes by value) runs this before the zero-argument form's __class__ cell exists.
        super(Perturbation, cls).__init_subclass__(**kwargs)
        if cls.kind != "base":
            _REGISTRY[cls.kind] = cls

    def apply(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, d_model: int) -> None:
        """Raise a clear error if this perturbation cannot act on ``d_model``-wide states."""

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "matching" and value is None:
                continue  # only matched controls carry it
            out[f.name] = list(map(_plain, value)) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """A short human label (no vectors), for tables and chart legends."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "matching" and value is None:
                continue
            if isinstance(value, tuple):
                parts.append(f"{f.name}=[{len(value)}]")
            else:
                parts.append(f"{f.name}={value}")
        return f"{self.kind}(" + ", ".join(parts) + ")"


def _plain(x: Any) -> Any:
    return list(map(_plain, x)) if isinstance(x, (tuple, list)) else x


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def perturbation_from_dict(data: dict[str, Any]) -> Perturbation:
    """Inverse of :meth:`Perturbation.to_dict`."""
    data = dict(data)
    kind = data.pop("kind", None)
    require(kind in _REGISTRY, f"unknown perturbation kind {kind!r}; known: {sorted(_REGISTRY)}")
    cls = _REGISTRY[kind]
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    require(not unknown, f"{kind}: unknown fields {sorted(unknown)}")
    return cls(**{k: _tuplify(v) for k, v in data.items()})


def _check_dims(kind: str, dims: tuple[int, ...], d_model: int) -> None:
    require(len(dims) > 0, f"{kind}: the dimension set is empty; lower τ or use top_k.")
    bad = [i for i in dims if not (0 <= int(i) < d_model)]
    require(
        not bad,
        f"{kind}: dimensions {bad[:5]} are out of range for hidden size {d_model} "
        f"(valid: 0..{d_model - 1}).",
    )


def _vector(values: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def _check_finite_nonnegative(kind: str, name: str, value: float) -> None:
    require(
        math.isfinite(value) and value >= 0,
        f"{kind}: {name} must be a finite number ≥ 0, got {value}",
    )


def _check_width(kind: str, name: str, width: int, d_model: int) -> None:
    require(width == d_model, f"{kind}: {name} has {width} entries, hidden size is {d_model}")


def _check_rows(kind: str, name: str, rows: tuple[tuple[float, ...], ...], d_model: int) -> None:
    require(len(rows) > 0, f"{kind}: {name} has rank 0; give at least one vector.")
    widths = sorted({len(r) for r in rows})
    require(widths == [d_model], f"{kind}: {name} rows have widths {widths}, hidden size is {d_model}")


@dataclass(frozen=True)
class Ablate(Perturbation):
    """Zero (or mean-) ablation of the dimensions in R, at a given strength m.

    ``ĥ_i = (1 − m) · h_i + m · c_i`` for ``i ∈ R`` and ``ĥ_i = h_i`` otherwise, with the
    reference ``c_i = 0`` (zero ablation) or ``c_i = μ_i`` when ``values`` holds the means μ
    (mean ablation). ``strength`` m = 1 is full ablation (``ĥ_i = c_i``); m = 0 is the
    identity.
    """

    kind: ClassVar[str] = "ablate"
    dims: tuple[int, ...]
    values: tuple[float, ...] | None = None
    strength: float = 1.0
    matching: str | None = field(default=None, compare=False)
    """How a matched control was drawn (:func:`matched_control`); None for a perturbation."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(i) for i in self.dims))
        object.__setattr__(self, "strength", float(self.strength))
        _check_finite_nonnegative(self.kind, "strength", self.strength)
        if self.values is not None:
            object.__setattr__(self, "values", tuple(float(v) for v in self.values))
            require(
                len(self.values) == len(self.dims),
                f"ablate: {len(self.values)} mean values for {len(self.dims)} dimensions",
            )

    def check(self, d_model: int) -> None:
        _check_dims(self.kind, self.dims, d_model)

    @_derived
    def _index(self) -> torch.Tensor:
        return torch.tensor(self.dims, dtype=torch.long)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        idx = self._index.to(h.device)
        reference = 0.0 if self.values is None else _vector(self.values, h)
        out = h.clone()
        out[..., idx] = (1.0 - self.strength) * h[..., idx] + self.strength * reference
        return out


@dataclass(frozen=True)
class Noise(Perturbation):
    """Gaussian noise on the dimensions in R: ``ĥ_{t,i} = h_{t,i} + 𝟙[i ∈ R] · σ · z(seed, key_t, i)``.

    ``z`` is a standard normal draw computed, not sampled: Box–Muller on two 32-bit hashes
    of ``(seed, key_t, 2i)`` and ``(seed, key_t, 2i + 1)``, and ``key_t`` is a hash of token
    t's row up to and including t, the (real position, token id) pairs with padding left
    out (formulas in :mod:`rephelpers.interventions.tokenkeys`). So each token and each decoding step
    gets fresh noise, and a token gets the same noise for a seed and an input whatever
    batch, row, padding or code path (per-config, shared-prefix sweep, KV-cache decoding)
    processes it; the integers are identical on every machine. The interventions pass the
    keys (:func:`rephelpers.interventions.intervene.perturb`); called without them, on tensors that hold
    no tokens (e.g. pooled vectors), the i-th row along the leading dimensions gets key i.
    """

    kind: ClassVar[str] = "noise"
    keyed: ClassVar[bool] = True  # apply() takes per-token keys
    dims: tuple[int, ...]
    sigma: float = 1.0
    seed: int = 0
    matching: str | None = field(default=None, compare=False)
    """How a matched control was drawn (:func:`matched_control`); None for a perturbation."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(i) for i in self.dims))
        object.__setattr__(self, "sigma", float(self.sigma))
        _check_finite_nonnegative(self.kind, "sigma", self.sigma)

    def check(self, d_model: int) -> None:
        _check_dims(self.kind, self.dims, d_model)

    def apply(self, h: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """``ĥ`` for ``h [..., d]``; ``keys [...]`` (one per row of ``h``) from
        :func:`rephelpers.interventions.tokenkeys.token_keys`."""
        if keys is None:
            keys = row_keys(h.shape[:-1], h.device)
        require(
            tuple(keys.shape) == tuple(h.shape[:-1]),
            f"noise: keys of shape {tuple(keys.shape)} do not match the states' {tuple(h.shape[:-1])}; "
            "pass one key per token (token_keys(...).keys).",
        )
        # float64 where the device has it: the draws then agree across devices to float32 rounding.
        dtype = torch.float32 if h.device.type == "mps" else torch.float64
        eps = standard_normal(self.seed, keys.to(h.device), self.dims, dtype)
        idx = torch.tensor(self.dims, dtype=torch.long, device=h.device)
        out = h.clone()
        out[..., idx] = out[..., idx] + (self.sigma * eps).to(h.dtype)
        return out


@dataclass(frozen=True)
class Shift(Perturbation):
    """Directional shift along a cluster direction: ``ĥ = h + α · v`` (v as given)."""

    kind: ClassVar[str] = "shift"
    direction: tuple[float, ...]
    alpha: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        object.__setattr__(self, "alpha", float(self.alpha))

    def check(self, d_model: int) -> None:
        _check_width(self.kind, "direction", len(self.direction), d_model)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.alpha * _vector(self.direction, h)


def _orthonormal_rows(kind: str, basis: Any) -> torch.Tensor:
    """An orthonormal basis [rank, d] of the span of ``basis``'s rows (QR; dependent rows dropped)."""
    v = torch.tensor(basis, dtype=torch.float64)
    q, r = torch.linalg.qr(v.T)
    keep = r.diagonal().abs() > 1e-10
    if not bool(keep.any()):
        raise RephelpersError(f"{kind}: the basis vectors are all zero.")
    return q[:, keep].T.contiguous()


@dataclass(frozen=True)
class Project(Perturbation):
    """Orthogonal projection out of a subspace: ``ĥ = h − s · Σ_{v∈V} (h·v) v``.

    ``basis`` holds the rows of V; they are re-orthonormalised (QR) before use so a
    slightly non-orthogonal basis still yields an exact projection. ``strength`` s in
    [0, 1] interpolates between ``h`` (0) and the projected state (1).
    """

    kind: ClassVar[str] = "project"
    basis: tuple[tuple[float, ...], ...]
    strength: float = 1.0
    matching: str | None = field(default=None, compare=False)
    """How a matched control was drawn (:func:`matched_control`); None for a perturbation."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "basis", tuple(tuple(float(x) for x in row) for row in self.basis)
        )
        object.__setattr__(self, "strength", float(self.strength))
        _check_finite_nonnegative(self.kind, "strength", self.strength)

    def check(self, d_model: int) -> None:
        _check_rows(self.kind, "basis", self.basis, d_model)
        require(self.rank > 0, "project: the basis vectors are all zero.")

    @property
    def rank(self) -> int:
        return int(self._orthonormal.shape[0])

    @_derived
    def _orthonormal(self) -> torch.Tensor:
        return _orthonormal_rows(self.kind, self.basis)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        v = self._orthonormal.to(h.device, h.dtype)
        return h - self.strength * (h @ v.T) @ v


@dataclass(frozen=True)
class Leace(Perturbation):
    """LEACE concept eraser (Belrose et al. 2023, "LEACE: Perfect linear concept erasure
    in closed form"), at strength s.

    ``r(x) = x − W⁺ P W (x − μ)`` where μ is the mean of the fitting data, ``W = Σ_xx^{-1/2}``
    the whitening matrix, ``W⁺`` its pseudo-inverse and ``P = U Uᵀ`` the orthogonal
    projection onto the column space of ``W Σ_xz`` (the whitened cross-covariance between
    the representation x and the one-hot concept z). After erasure no linear classifier
    predicts z better than a constant (on the fitting distribution), while x moves as
    little as possible in the least-squares sense. The rank-r matrix ``W⁺ P W`` is stored
    factorised as ``leftᵀ · right`` with ``left = (W⁺U)ᵀ`` and ``right = UᵀW`` (both r × d),
    so ``ĥ = h − s · ((h − μ) rightᵀ) left``; s = 1 is full erasure, s = 0 the identity.

    Fit with :meth:`Leace.fit` (or :func:`fit_leace`) on pooled representations and
    cluster labels.
    """

    kind: ClassVar[str] = "leace"
    mean: tuple[float, ...]
    left: tuple[tuple[float, ...], ...]
    right: tuple[tuple[float, ...], ...]
    strength: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        for name in ("left", "right"):
            rows = tuple(tuple(float(x) for x in row) for row in getattr(self, name))
            object.__setattr__(self, name, rows)
        require(
            len(self.left) == len(self.right),
            f"leace: left has {len(self.left)} rows but right has {len(self.right)}",
        )
        object.__setattr__(self, "strength", float(self.strength))
        _check_finite_nonnegative(self.kind, "strength", self.strength)

    @classmethod
    def fit(
        cls,
        X: Any,
        y: Any,
        *,
        shrinkage: bool = True,
        svd_tol: float = 0.01,
        constrain_cov_trace: bool = False,
    ) -> "Leace":
        """Fit the eraser of the concept ``y`` (integer labels) on representations ``X [n, d]``.

        Two distinct labels give a one-column concept (erases "is class 1", rank ≤ 1);
        more give one-hot z (erases every label jointly, rank ≤ #labels − 1). Fitting uses
        ``concept_erasure.LeaceFitter`` in float64. ``constrain_cov_trace`` is off by default
        because its regularisation toward an orthogonal projection no longer guarantees
        linear guardedness; turn it on if repeated erasure makes hidden-state norms grow.
        """
        from concept_erasure import LeaceFitter

        X = torch.as_tensor(np.asarray(X, dtype=np.float64))
        labels = np.asarray(y).reshape(-1)
        require(X.ndim == 2, f"leace: X must be a matrix [n, d], got shape {tuple(X.shape)}")
        require(
            X.shape[0] == len(labels),
            f"leace: X has {X.shape[0]} rows but y has {len(labels)} labels",
        )
        classes, codes = np.unique(labels, return_inverse=True)
        require(
            len(classes) >= 2,
            f"leace: the labels hold a single class ({classes.tolist()}); erasing a concept "
            "needs examples of at least two classes.",
        )
        require(bool(torch.isfinite(X).all()), "leace: X holds NaN or inf values")
        if len(classes) == 2:
            z = torch.as_tensor(codes, dtype=torch.float64).unsqueeze(1)
        else:
            z = torch.nn.functional.one_hot(torch.as_tensor(codes), len(classes)).to(torch.float64)
        fitter = LeaceFitter.fit(
            X, z, shrinkage=shrinkage, svd_tol=svd_tol, constrain_cov_trace=constrain_cov_trace
        )
        eraser = fitter.eraser
        # The fitter zeroes the columns of truncated singular directions; drop them.
        left = eraser.proj_left.T  # [k, d]
        right = eraser.proj_right  # [k, d]
        keep = (left.norm(dim=1) > 1e-12) & (right.norm(dim=1) > 1e-12)
        require(
            bool(keep.any()),
            f"leace: the concept is not linearly present in X (every singular value of the "
            f"whitened cross-covariance is below svd_tol={svd_tol}); nothing to erase.",
        )
        mean = eraser.bias if eraser.bias is not None else torch.zeros(X.shape[1], dtype=X.dtype)
        return cls(mean=mean.tolist(), left=left[keep].tolist(), right=right[keep].tolist())

    def check(self, d_model: int) -> None:
        _check_width(self.kind, "mean", len(self.mean), d_model)
        _check_rows(self.kind, "left", self.left, d_model)
        _check_rows(self.kind, "right", self.right, d_model)

    @property
    def rank(self) -> int:
        return len(self.left)

    @_derived
    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor(x, dtype=torch.float64) for x in (self.mean, self.left, self.right))

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        mean, left, right = (t.to(h.device, h.dtype) for t in self._factors)
        return h - self.strength * ((h - mean) @ right.T) @ left


@dataclass(frozen=True)
class Gradient(Perturbation):
    """Gradient-sign step against a cluster probe (FGSM-style): ``ĥ = h + ε · sign(∇_h L)``.

    ``L(h) = BCE(σ(z), 1) = log(1 + e^{−z})`` with the logit ``z = w·h + b`` of the
    one-vs-rest logistic probe (``coef`` w, ``intercept`` b) for "is cluster k", so the step
    raises the probe's loss, i.e. removes evidence for cluster k. ε is an L∞ budget per
    coordinate. Because L is strictly decreasing in z, ``sign(∇_h L) = −sign(∇_h z)``
    exactly; the step differentiates z, which (unlike ``∇L = −σ(−z)∇z``) never underflows
    to zero for states the probe classifies confidently. The gradient is taken locally on
    a detached float64 copy of ``h`` (the probe is a function of ``h`` alone, so nothing is
    back-propagated through the model); this works inside ``torch.inference_mode()`` and
    ``torch.no_grad()`` too. For this linear probe the step is ``−ε · sign(w)``.
    """

    kind: ClassVar[str] = "gradient"
    coef: tuple[float, ...]
    intercept: float = 0.0
    epsilon: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "coef", tuple(float(x) for x in self.coef))
        object.__setattr__(self, "intercept", float(self.intercept))
        object.__setattr__(self, "epsilon", float(self.epsilon))
        _check_finite_nonnegative(self.kind, "epsilon", self.epsilon)

    def check(self, d_model: int) -> None:
        _check_width(self.kind, "coef", len(self.coef), d_model)
        require(any(c != 0 for c in self.coef), "gradient: the probe coefficients are all zero")

    def probe_logit(self, h: torch.Tensor) -> torch.Tensor:
        """The probe's logit ``z = w·h + b`` for "is cluster k", per state."""
        return h @ _vector(self.coef, h) + self.intercept

    def probe_loss(self, h: torch.Tensor) -> torch.Tensor:
        """Per-state loss ``L(h) = log(1 + e^{−z})`` of the probe for label 1."""
        return torch.nn.functional.softplus(-self.probe_logit(h))

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        # Inference tensors cannot join an autograd graph: leave inference mode and copy.
        with torch.inference_mode(False), torch.enable_grad():
            x = h.detach().to(torch.float64).clone().requires_grad_(True)
            (grad_logit,) = torch.autograd.grad(self.probe_logit(x).sum(), x)
        return h - self.epsilon * grad_logit.sign().to(h.dtype)


@dataclass(frozen=True)
class LearnedProjection(Perturbation):
    """Removal of a learned subspace's variation about the layer's mean, at strength α.

    ``ĥ = h − α · U Uᵀ (h − μ)``, written with ``basis`` = Uᵀ (r rows, orthonormal) as
    ``ĥ = h − α · ((h − μ) Uᵀᵀ) Uᵀ``; μ (``mean``) is the layer's mean token state, so at
    α = 1 the state's component in span(U) is set to μ's (mean ablation of a subspace, not
    zeroing, which would also remove the mean that every text shares). α = 0 is the
    identity. The rows are re-orthonormalised (QR) before use, so a basis read back from
    JSON with rounding still gives a projection.

    U is fitted by gradient to raise cluster k's loss and keep the others'
    (:func:`rephelpers.perturbations.learned.fit_learned_projection`); a matched control is
    a random U' through the same formula. ``matching`` says how a control was drawn.
    """

    kind: ClassVar[str] = "learned"
    basis: tuple[tuple[float, ...], ...]
    mean: tuple[float, ...]
    strength: float = 1.0
    matching: str | None = field(default=None, compare=False)
    """How a matched control was drawn (:func:`matched_control`); None for a perturbation."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "basis", tuple(tuple(float(x) for x in row) for row in self.basis))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "strength", float(self.strength))
        _check_finite_nonnegative(self.kind, "strength", self.strength)

    def check(self, d_model: int) -> None:
        _check_rows(self.kind, "basis", self.basis, d_model)
        _check_width(self.kind, "mean", len(self.mean), d_model)
        require(self.rank < d_model, f"learned: rank {self.rank} must be below the hidden size {d_model} "
                                     "(a full-rank projection replaces every state by the mean).")

    @property
    def rank(self) -> int:
        return int(self._orthonormal.shape[0])

    @_derived
    def _orthonormal(self) -> torch.Tensor:
        return _orthonormal_rows(self.kind, self.basis)

    @_derived
    def _mean(self) -> torch.Tensor:
        return torch.tensor(self.mean, dtype=torch.float64)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        u = self._orthonormal.to(h.device, h.dtype)
        mu = self._mean.to(h.device, h.dtype)
        return h - self.strength * ((h - mu) @ u.T) @ u

    def describe(self) -> str:
        extra = f", matching={self.matching}" if self.matching else ""
        return f"learned(rank={len(self.basis)}, strength={self.strength}{extra})"


def registered_kinds() -> list[str]:
    """The perturbation classes' ``kind`` tags (what :func:`perturbation_from_dict` reads).

    Not the list of kinds the stages build: ``mean_ablate`` is an :class:`Ablate`; that list
    is :func:`kinds`.
    """
    return sorted(_REGISTRY)


__all__ = ["Perturbation", "Ablate", "Noise", "Shift", "Project", "Leace", "Gradient", "LearnedProjection",
           "perturbation_from_dict", "registered_kinds"]
