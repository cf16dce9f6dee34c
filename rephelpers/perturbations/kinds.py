"""Perturbations of hidden states: one small frozen, serialisable class per method.

Each class maps a hidden-state tensor ``h`` of shape ``[..., d]`` to ``ĥ`` with the same
shape; where it is applied (layer, component, token positions) is the business of
:class:`rephelpers.perturbations.intervene.Intervention`. ``to_dict()``/``perturbation_from_dict()``
round-trip every perturbation through plain JSON types, so a configuration travels in
papermill parameters and is written into every result row.

Notation: ``R`` is a set of dimension indices (R_k of cluster k), ``v`` a direction,
``V`` an orthonormal basis (rows) of a subspace.

Every kind has one magnitude field (:data:`MAGNITUDE_FIELD`): ablate/project/leace a
``strength`` in [0, 1] interpolating between ``h`` and the fully perturbed state, noise
its ``sigma``, shift its ``alpha``, gradient its ``epsilon``. :data:`KINDS` holds, per kind,
how it is built from a stage-03 subspace and a unit-free ``magnitude`` (:func:`build`)
and how its random perturbation of the same size is drawn (:func:`matched_control`, the
specificity control).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..dimensions.components import ClusterComponents, as_components
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
    out (formulas in :mod:`rephelpers.perturbations.tokenkeys`). So each token and each decoding step
    gets fresh noise, and a token gets the same noise for a seed and an input whatever
    batch, row, padding or code path (per-config, shared-prefix sweep, KV-cache decoding)
    processes it; the integers are identical on every machine. The interventions pass the
    keys (:func:`rephelpers.perturbations.intervene.perturb`); called without them, on tensors that hold
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
        :func:`rephelpers.perturbations.tokenkeys.token_keys`."""
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
        v = torch.tensor(self.basis, dtype=torch.float64)
        q, r = torch.linalg.qr(v.T)
        keep = r.diagonal().abs() > 1e-10
        if not bool(keep.any()):
            raise RephelpersError("project: the basis vectors are all zero.")
        return q[:, keep].T.contiguous()  # [rank, d]

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


def registered_kinds() -> list[str]:
    """The perturbation classes' ``kind`` tags (what :func:`perturbation_from_dict` reads).

    Not the list of kinds the stages build: ``mean_ablate`` is an :class:`Ablate`; that list
    is :func:`kinds`.
    """
    return sorted(_REGISTRY)


# -- kinds: how a perturbation is built from a cluster's components, and its matched control --
@dataclass(frozen=True)
class Kind:
    """One perturbation kind as the stages use it (one entry of :data:`KINDS`).

    ``make(components, m, seed)`` builds the ``cls`` perturbation of one stage-03 subspace (a
    cluster at a layer) at the unit-free magnitude m, scaled so that m = 1 is "full
    strength" (``scaling`` says what that is); ``magnitude_field`` is the field m sets.
    ``control(target, components, d_model, rng, spectrum)`` draws the random perturbation of
    the same size that controls for it (:func:`matched_control`). ``acts_on`` names the
    cluster component it changes: ``"R_k"`` (stage 03's selected dimensions, so how they
    were selected decides what it touches) or its own (``"SVD V_k"``, ``"LEACE"``, ...).
    Adding a kind means
    writing its class (if it is a new one) and one ``Kind`` in :data:`KINDS`; nothing else
    in the package lists kinds.
    """

    name: str
    cls: type[Perturbation]
    magnitude_field: str
    scaling: str
    acts_on: str
    make: Callable[[ClusterComponents, float, int], Perturbation] = field(repr=False)
    control: Callable[..., Perturbation] = field(repr=False)


def _make_ablate(components: ClusterComponents, m: float, seed: int) -> Perturbation:
    return Ablate(dims=_dims(components, "ablate"), strength=m)


def _make_mean_ablate(components: ClusterComponents, m: float, seed: int) -> Perturbation:
    dims = _dims(components, "mean_ablate")
    reference = components.need("mean_out", "mean_ablate")
    return Ablate(dims=dims, values=reference[list(dims)], strength=m)


def _make_noise(components: ClusterComponents, m: float, seed: int) -> Perturbation:
    dims = _dims(components, "noise")
    return Noise(dims=dims, sigma=m * _typical_std(components, dims), seed=seed)


def _make_shift(components: ClusterComponents, m: float, seed: int) -> Perturbation:
    v = components.need("direction", "shift")
    gap = _mean_gap(components, len(v))
    return Shift(direction=v, alpha=m if gap is None else -m * float(gap @ v))


def _make_project(components: ClusterComponents, m: float, seed: int) -> Perturbation:
    return Project(basis=components.need("basis", "project"), strength=m)


def _make_leace(components: ClusterComponents, m: float, seed: int) -> Perturbation:
    fitted = components.need("leace", "leace", hint="fit it with fit_leace(X, cluster == k) in notebook 03")
    return replace(fitted, strength=m)


def _make_gradient(components: ClusterComponents, m: float, seed: int) -> Perturbation:
    coef, intercept = _probe(components)
    gap = _mean_gap(components, len(coef))
    scale = 1.0 if gap is None else abs(float(coef @ gap)) / float(np.abs(coef).sum())
    return Gradient(coef=coef, intercept=intercept, epsilon=m * scale)


def _control_dims(kind: str) -> Callable[..., Perturbation]:
    """Partners of R_k from its magnitude strata (ablate, mean_ablate, noise; see :func:`matched_control`)."""
    def control(target: Any, components: ClusterComponents, d_model: int, rng: np.random.Generator,
                spectrum: dict[str, Any] | None) -> Perturbation:
        profile, source = control_profile(kind, components, d_model, spectrum)
        massive = _massive_dims(components, spectrum, d_model)
        dims, note = _matched_dims(rng, target.dims, profile, massive, d_model)
        matching = f"uniform{note}" if profile is None else f"{source} strata{note}"
        if isinstance(target, Noise):
            return Noise(dims=dims, sigma=target.sigma, seed=target.seed, matching=matching)
        values = None
        if target.values is not None:  # mean ablation: the control uses the same reference
            values = components.need("mean_out", kind)[list(dims)]
        return Ablate(dims=dims, values=values, strength=target.strength, matching=matching)
    return control


def _control_project(target: Any, components: ClusterComponents, d_model: int, rng: np.random.Generator,
                     spectrum: dict[str, Any] | None) -> Perturbation:
    spec = _check_spectrum(spectrum, d_model)
    if spec is None:
        q, _ = np.linalg.qr(rng.standard_normal((d_model, target.rank)))
        return Project(basis=q.T, strength=target.strength, matching="uniform (no spectrum)")
    basis, note = _matched_basis(rng, target, spec, _massive_dims(components, spectrum, d_model))
    return Project(basis=basis, strength=target.strength, matching=f"spectrum variance strata{note}")


def _control_shift(target: Any, components: ClusterComponents, d_model: int, rng: np.random.Generator,
                   spectrum: dict[str, Any] | None) -> Perturbation:
    v = rng.standard_normal(d_model)
    v *= np.linalg.norm(target.direction) / np.linalg.norm(v)
    return Shift(direction=v, alpha=target.alpha)


def _control_gradient(target: Any, components: ClusterComponents, d_model: int, rng: np.random.Generator,
                      spectrum: dict[str, Any] | None) -> Perturbation:
    signs = rng.choice([-1.0, 1.0], size=d_model)
    return Shift(direction=signs, alpha=target.epsilon)


def _control_leace(target: Any, components: ClusterComponents, d_model: int, rng: np.random.Generator,
                   spectrum: dict[str, Any] | None) -> Perturbation:
    spread = np.ones(d_model) if components.std is None else components.std
    require(spread.shape == (d_model,), f"leace: the components' std has shape {spread.shape}, expected ({d_model},)")
    gain = np.divide(1.0, spread, out=np.zeros(d_model), where=spread > 1e-12)
    u, _ = np.linalg.qr(rng.standard_normal((d_model, target.rank)))
    return Leace(mean=target.mean, left=(spread[:, None] * u).T, right=(gain[:, None] * u).T,
                 strength=target.strength)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("ablate", Ablate, "strength", "strength m; ĥ_R = (1 − m)·h_R (m = 1 zeroes R_k)", "R_k",
         _make_ablate, _control_dims("ablate")),
    Kind("mean_ablate", Ablate, "strength",
         "strength m towards the rest's mean; ĥ_R = (1 − m)·h_R + m·μ_out,R. Zeroing a dimension whose "
         "typical value is far from 0 (the 'massive activation' dimensions of many LMs) damages every input "
         "alike; setting it to the value it takes on other clusters' text removes only what is specific to "
         "cluster k",
         "R_k", _make_mean_ablate, _control_dims("mean_ablate")),
    Kind("noise", Noise, "sigma",
         "σ = m · median_{i∈R_k} std_i, noise as large as the typical natural spread of those dimensions "
         "(raw σ = m if std is absent); the median, so that one massive dimension in R_k does not set the "
         "noise level of all the others",
         "R_k", _make_noise, _control_dims("noise")),
    Kind("shift", Shift, "alpha",
         "ĥ = h + α v_k with α = m · (μ_out − μ_in)·v_k: at m = 1 the mean of cluster k lands on the mean "
         "of the rest along v_k (raw α = m without the means)",
         "mean direction", _make_shift, _control_shift),
    Kind("project", Project, "strength", "strength m on V_k (m = 1 removes it entirely)", "SVD V_k",
         _make_project, _control_project),
    Kind("leace", Leace, "strength", "strength m on the fitted eraser (m = 1 is full erasure)", "LEACE",
         _make_leace, _control_leace),
    Kind("gradient", Gradient, "epsilon",
         "ε = m · |w·(μ_in − μ_out)| / ‖w‖₁: at m = 1 the step moves the probe's logit by the gap between "
         "cluster k's mean and the rest's mean (a sign step changes the logit by exactly ε‖w‖₁); raw ε = m "
         "without the means",
         "probe gradient", _make_gradient, _control_gradient),
)}
"""Every perturbation kind the stages build, by name: the one list of kinds."""

MAGNITUDE_FIELD: dict[str, str] = {name: k.magnitude_field for name, k in KINDS.items()}
"""The field that :func:`build`'s ``magnitude`` sets, per kind."""


def kinds() -> list[str]:
    """The kinds :func:`build` makes (:data:`KINDS`), in their order."""
    return list(KINDS)


def fit_leace(X: Any, y: Any, **options: Any) -> Leace:
    """Fit a :class:`Leace` eraser of labels ``y`` on ``X [n, d]`` (see :meth:`Leace.fit`).

    For cluster k's eraser pass one-vs-rest labels, ``y = (cluster == k)``; the result's
    result is what ``build("leace", components)`` reads from ``components.leace``.
    """
    return Leace.fit(X, y, **options)


def build(kind: str, components: ClusterComponents, magnitude: float = 1.0, seed: int = 0) -> Perturbation:
    """The ``kind`` perturbation of one cluster's components at a layer: ``KINDS[kind].make``.

    ``components`` is stage 03's :class:`~rephelpers.dimensions.components.ClusterComponents`
    (or a dict of its fields): ``dims`` (R_k), ``direction`` (unit v_k), ``basis`` (rows of
    V_k), ``probe``, ``mean_in``/``mean_out`` (mean representation of cluster k / of the
    rest), ``std`` (per-dimension standard deviation) and ``leace`` (the fitted eraser).
    A kind that needs a field the components lack says which.

    ``magnitude`` m is scaled so that m = 1 is "full strength" for every kind
    (``KINDS[kind].scaling``):

    - ``ablate``: strength m; ``ĥ_R = (1 − m)·h_R`` (m = 1 zeroes R_k).
    - ``mean_ablate``: strength m towards the rest's mean; ``ĥ_R = (1 − m)·h_R + m·μ_out,R``.
    - ``noise``: ``σ = m · median_{i∈R_k} std_i``.
    - ``shift``: ``ĥ = h + α v_k`` with ``α = m · (μ_out − μ_in)·v_k``.
    - ``project``: strength m on V_k (m = 1 removes it entirely).
    - ``leace``: strength m on ``components.leace`` (m = 1 is full erasure).
    - ``gradient``: ``ε = m · |w·(μ_in − μ_out)| / ‖w‖₁``.

    ``seed`` seeds the noise draw.
    """
    require(kind in KINDS, f"unknown perturbation kind {kind!r}; use one of {sorted(KINDS)}")
    m = float(magnitude)
    require(math.isfinite(m), f"magnitude must be finite, got {magnitude}")
    return KINDS[kind].make(as_components(components), m, seed)


MATCH_WINDOW = 1.25
"""Half-width of a magnitude stratum: a dimension's (or basis vector's) stratum holds the
eligible candidates whose magnitude lies within this factor of its own."""
MATCH_MIN_POOL = 4
"""A stratum with fewer eligible candidates widens to the nearest this many in log magnitude."""
MATCH_CARRY = 4.0
"""How far a partner may be drawn away from its own stratum to make up for the partners
before it: at most this factor above or below the dimension's magnitude."""
MATCH_ACCEPT = 1.1
"""A draw whose predicted edit ratio (see :func:`matched_control`) lies within this factor of 1 is
taken; otherwise up to :data:`MATCH_TRIES` draws are made and the one closest to 1 is kept."""
MATCH_TRIES = 32
MASSIVE_RATIO = 100.0
"""Without ``components.massive_dims``, a spectrum's dimensions with ``max_t |h_ti| / median_j |h_tj|``
above this ratio count as massive (the definition of :mod:`rephelpers.representations.tokenstats`)."""
_SPECTRUM_KEYS = ("eigenvalues", "eigenvectors", "mean", "rms", "ratio_max", "n_tokens")


def second_moment_spectrum(states: Any, source: str = "") -> dict[str, Any]:
    """The token statistics of one (layer, component) site that matched controls use.

    ``states [n_tokens, d]`` are hidden states ``h_t`` at the site (every real token of
    some training texts: what the perturbation acts on). Returns a dict of numpy arrays:

    - ``eigenvalues [d]`` (descending, ≥ 0) and ``eigenvectors [d, d]`` (row i is the i-th
      unit eigenvector) of the second moment about zero ``M = (1/n) Σ_t h_t h_tᵀ``. About
      zero, not about the mean: a projection ``ĥ = h − P h`` edits by ``‖P h‖``, mean
      included, so ``E‖P h‖² = tr(P M)``;
    - ``mean [d]`` (``m = (1/n) Σ_t h_t``) and ``rms [d] = √diag(M)``;
    - ``ratio_max [d] = max_t |h_ti| / median_j |h_tj|`` (the massive-activation detector);
    - ``n_tokens`` and ``source`` (a label).

    ``d × d`` numbers per layer: keep it per layer (stage 04 computes it with
    :func:`rephelpers.perturbations.specificity.control_spectrum`), never per subspace.
    """
    X = torch.as_tensor(np.asarray(states), dtype=torch.float64)
    require(X.ndim == 2 and X.shape[0] >= 2, f"states must be a matrix [tokens ≥ 2, d], got shape {tuple(X.shape)}")
    require(bool(torch.isfinite(X).all()), "states hold NaN or inf values")
    n = X.shape[0]
    second = X.T @ X / n
    values, vectors = torch.linalg.eigh(second)  # ascending
    median = X.abs().median(dim=1).values.clamp_min(1e-12)
    return {
        "eigenvalues": values.flip(0).clamp_min(0.0).numpy(),
        "eigenvectors": vectors.flip(1).T.contiguous().numpy(),
        "mean": X.mean(0).numpy(),
        "rms": second.diagonal().clamp_min(0.0).sqrt().numpy(),
        "ratio_max": (X.abs() / median[:, None]).max(0).values.numpy(),
        "n_tokens": int(n),
        "source": str(source),
    }


def control_profile(
    kind: str, components: ClusterComponents, d_model: int, spectrum: dict[str, Any] | None = None
) -> tuple[np.ndarray | None, str]:
    """Per-dimension magnitude that governs the edit of ``kind`` on that dimension, and its source.

    Dimension controls pair each i ∈ R_k with a dimension of similar profile:

    - ``ablate`` edits dimension i by ``|h_i|``: its root-mean-square over tokens,
      ``components.token_rms`` (stage 03, over training tokens) or else the spectrum's
      ``rms``; else, from the pooled statistics, ``√(μ_out,i² + std_i²)`` (RMS over
      documents of the pooled vector, with the rest's mean for the overall mean).
    - ``mean_ablate`` edits it by ``|h_i − μ_out,i|``: its spread about the reference,
      ``√E_t[(h_i − μ_out,i)²] = √(rms_i² − 2 μ_out,i m_i + μ_out,i²)`` from the spectrum
      (or ``components.token_rms`` with ``components.token_mean``); else the pooled
      ``std_i`` (the same formula over documents with the overall mean ≈ μ_out).
    - ``noise`` adds the same ``σ z`` whatever the dimensions, so its edit size is matched
      by construction; what differs is how large σ is next to a dimension's own spread, so
      the profile is that spread, ``√(rms_i² − m_i²)`` (spectrum, or token_rms with
      token_mean), else the pooled ``std_i``.

    ``(None, "uniform")`` when none of these is available.
    """
    def vec(value: Any, name: str) -> np.ndarray:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
        require(arr.shape == (d_model,), f"{kind}: {name} has {arr.size} entries, hidden size is {d_model}")
        return arr

    components = as_components(components)
    spec = _check_spectrum(spectrum, d_model)
    token_rms = None if components.token_rms is None else vec(components.token_rms, "token_rms")
    token_mean = None if components.token_mean is None else vec(components.token_mean, "token_mean")
    std = None if components.std is None else vec(components.std, "std")
    mean_out = None if components.mean_out is None else vec(components.mean_out, "mean_out")
    moments = None
    if spec is not None:
        moments = (spec["rms"], spec["mean"], "spectrum")
    elif token_rms is not None and token_mean is not None:
        moments = (token_rms, token_mean, "token_rms/token_mean")
    if kind == "ablate":
        if token_rms is not None:
            return token_rms, "token_rms"
        if spec is not None:
            return spec["rms"], "spectrum rms"
        if mean_out is not None and std is not None:
            return np.sqrt(mean_out**2 + std**2), "pooled rms"
        return None, "uniform"
    if kind == "mean_ablate":
        if moments is not None and mean_out is not None:
            rms, m, source = moments
            return np.sqrt(np.clip(rms**2 - 2 * mean_out * m + mean_out**2, 0, None)), f"spread about mean_out ({source})"
        if std is not None:
            return std, "pooled std"
        return None, "uniform"
    require(kind == "noise", f"control_profile: no dimension profile for {kind!r}")
    if moments is not None:
        rms, m, source = moments
        return np.sqrt(np.clip(rms**2 - m**2, 0, None)), f"token std ({source})"
    if std is not None:
        return std, "pooled std"
    return None, "uniform"


def matched_control(
    kind: str,
    components: ClusterComponents,
    d_model: int,
    magnitude: float = 1.0,
    seed: int = 0,
    spectrum: dict[str, Any] | None = None,
) -> Perturbation:
    """A random perturbation of the same size as ``build(kind, components, magnitude, seed)``.

    Size means the edit ``‖ĥ − h‖`` it makes on real states, not only its parameters:
    stage 03 selects R_k by raw S(i,k), which favours high-magnitude dimensions, and
    V_k by variance, so uniformly drawn dimensions or subspaces edit far less and
    "hurts more than its control" would measure size, not cluster.

    - ``ablate``/``mean_ablate``/``noise`` (same strength / σ / reference μ_out): each
      i ∈ R_k gets a random partner from its **magnitude stratum**, the eligible dimensions
      whose profile (:func:`control_profile`: token RMS for ablate, spread about μ_out for
      mean ablation, token spread for noise) lies within a factor
      :data:`MATCH_WINDOW` of profile_i; a stratum with fewer than :data:`MATCH_MIN_POOL`
      eligible dimensions left widens to that many nearest ones in log profile (the
      neighbouring strata). R_k is paired from its largest dimension down (those have the
      fewest partners). Eligible: dimensions outside R_k (a control that reused R_k's
      dimensions would share the effect it controls for) and outside
      ``components.massive_dims`` (never drawn; without that key, the spectrum's dimensions
      with ``ratio_max`` > :data:`MASSIVE_RATIO`). If fewer eligible dimensions exist than
      |R_k|, R_k's own become eligible too, then massive ones. Without any profile, the
      partners are drawn uniformly (the old behaviour).
    - ``project``: with ``spectrum`` (:func:`second_moment_spectrum` of the layer), a random
      rank-r subspace whose captured second moment ``tr(Bᵀ M B)`` matches V_k's: for each
      basis vector b_j of V_k (largest ``b_jᵀ M b_j`` first), an eigenvector of M from the
      same stratum of eigenvalue (window and widening as above), then the chosen set mixed
      by a random r × r rotation (a rotation within a set of eigenvectors keeps the trace,
      so the captured second moment is the sum of the chosen eigenvalues). Eligible:
      eigenvectors with at most half their weight in span(V_k); one with over half its
      weight on massive dimensions only for a b_j that has too (the attention sink's
      variance is matched by the sink's, never by ordinary directions). Without
      ``spectrum``: a uniformly random subspace (QR of a Gaussian matrix), the old behaviour.
    - ``shift``: a uniformly random direction with the same norm and α (same ‖α v‖).
    - ``gradient``: a shift by ``ε · s`` with a random sign vector s (same L∞ size ε and
      the same L2 norm ``ε√d`` as the gradient-sign step).
    - ``leace``: the LEACE formula ``r(x) = x − m · Ŵ⁺ P' Ŵ (x − μ)`` about the same mean μ,
      with the whitening approximated by the per-dimension spread, ``Ŵ = diag(std)⁻¹``
      (``components.std``; the identity without it), and ``P' = U'U'ᵀ`` the projection
      onto a random subspace of the same rank (QR of a Gaussian matrix). Like the fitted
      eraser, it is an oblique projection that removes rank-many coordinates of about unit
      variance each in standardised space (exactly 1 in expectation over U'). Rotating the
      fitted eraser instead would not match its size: ``W`` amplifies the low-variance
      directions, so a rotated ``W`` reads high-variance ones with a huge gain.

    Ablate, noise and project controls say in ``matching`` (shown by ``describe()`` and
    kept in ``to_json()``) how they were drawn and the edit ratio the profile predicts,
    ``√(Σ profile²_control / Σ profile²_R_k)`` (captured second moments for project).
    The draw is deterministic for ``(seed, components.layer, components.cluster)``, so
    each cluster's control is independent of the others'.
    """
    require(d_model >= 1, f"d_model must be positive, got {d_model}")
    components = as_components(components)
    target = build(kind, components, magnitude, seed)
    target.check(d_model)
    rng = np.random.default_rng(_control_entropy(seed, components))
    return KINDS[kind].control(target, components, d_model, rng, spectrum)


def matched_controls(
    kind: str,
    components: ClusterComponents,
    d_model: int,
    magnitude: float = 1.0,
    seed: int = 0,
    n_controls: int = 1,
    spectrum: dict[str, Any] | None = None,
) -> list[Perturbation]:
    """``n_controls`` independent matched controls; draw j is ``matched_control(…, seed + j)``.

    Draw 0 is the single control of :func:`matched_control` itself, so one draw reproduces
    it exactly. Stages 04 and 05 average the draws. ``spectrum`` as in :func:`matched_control`.
    """
    require(
        isinstance(n_controls, int) and not isinstance(n_controls, bool) and n_controls >= 1,
        f"n_controls must be a positive int (independent random-control draws), got {n_controls!r}",
    )
    components = as_components(components)
    return [matched_control(kind, components, d_model, magnitude, seed + draw, spectrum) for draw in range(n_controls)]


def _check_spectrum(spectrum: dict[str, Any] | None, d_model: int) -> dict[str, Any] | None:
    if spectrum is None:
        return None
    require(isinstance(spectrum, dict), f"spectrum must be second_moment_spectrum(...)'s dict, got {type(spectrum).__name__}")
    missing = [k for k in _SPECTRUM_KEYS if k not in spectrum]
    require(not missing, f"spectrum lacks {missing}; build it with second_moment_spectrum(states).")
    out = {k: np.asarray(spectrum[k], dtype=np.float64) for k in ("eigenvalues", "mean", "rms", "ratio_max")}
    out["eigenvectors"] = np.asarray(spectrum["eigenvectors"], dtype=np.float64)
    require(
        all(out[k].shape == (d_model,) for k in ("eigenvalues", "mean", "rms", "ratio_max"))
        and out["eigenvectors"].shape == (d_model, d_model),
        f"the spectrum is of width {out['eigenvalues'].shape}, hidden size is {d_model}: it belongs to another model.",
    )
    return out


def _massive_dims(components: ClusterComponents, spectrum: dict[str, Any] | None, d_model: int) -> np.ndarray:
    if components.massive_dims is not None:
        dims = np.asarray(components.massive_dims, dtype=np.int64).reshape(-1)
    elif spectrum is not None:
        dims = np.flatnonzero(np.asarray(spectrum["ratio_max"], dtype=np.float64) > MASSIVE_RATIO)
    else:
        dims = np.zeros(0, dtype=np.int64)
    return dims[(dims >= 0) & (dims < d_model)]


def _stratum_draw(
    rng: np.random.Generator, wanted: float, logs: np.ndarray, available: np.ndarray
) -> int:
    """A random index among ``available`` whose log magnitude lies within log(MATCH_WINDOW) of
    ``wanted``, or among the MATCH_MIN_POOL nearest when the stratum holds fewer."""
    candidates = np.flatnonzero(available)
    distance = np.abs(logs[candidates] - wanted)
    pool = candidates[distance <= math.log(MATCH_WINDOW)]
    if len(pool) < MATCH_MIN_POOL:
        pool = candidates[np.argsort(distance, kind="stable")[:MATCH_MIN_POOL]]
    return int(rng.choice(pool))


def _paired_draws(
    rng: np.random.Generator, own: np.ndarray, magnitudes: np.ndarray, available: np.ndarray
) -> list[int]:
    """One partner per entry of ``own`` (magnitudes, largest first) among ``available`` indices
    of ``magnitudes``, keeping the running sums of squares level.

    Entry i aims at ``√(own_i² + carry)``, clipped to ``[own_i / MATCH_CARRY, own_i · MATCH_CARRY]``,
    where ``carry = Σ (own² − partner²)`` over the entries before it: when the largest
    entries find only smaller partners (they have the fewest peers), the next ones draw
    from a stratum above their own.
    """
    available = available.copy()
    logs = np.log(np.maximum(magnitudes, 1e-300))
    carry, chosen = 0.0, []
    for value in own:
        value = max(float(value), 1e-300)
        aim = math.sqrt(max(value**2 + carry, 0.0))
        aim = min(max(aim, value / MATCH_CARRY), value * MATCH_CARRY)
        j = _stratum_draw(rng, math.log(max(aim, 1e-300)), logs, available)
        available[j] = False
        chosen.append(j)
        carry += value**2 - float(magnitudes[j]) ** 2
    return chosen


def _matched_dims(
    rng: np.random.Generator, dims: tuple[int, ...], profile: np.ndarray | None, massive: np.ndarray, d_model: int
) -> tuple[tuple[int, ...], str]:
    """Partners of ``dims`` (see :func:`matched_control`) and a note for ``matching``."""
    eligible = np.ones(d_model, dtype=bool)
    eligible[massive] = False
    eligible[list(dims)] = False
    note = ""
    if eligible.sum() < len(dims):  # R_k covers most of the width: R_k's own dims become eligible
        eligible[list(dims)] = True
        eligible[massive] = False
        note = ", R_k included (too few others)"
        if eligible.sum() < len(dims):
            eligible[:] = True
            note = ", every dimension eligible (too few others)"
    if profile is None:
        pool = np.flatnonzero(eligible)
        return tuple(int(i) for i in sorted(rng.choice(pool, size=len(dims), replace=False))), note
    order = sorted(dims, key=lambda i: (-profile[i], i))  # largest first: they have the fewest peers
    own = float((profile[list(dims)] ** 2).sum())
    chosen, predicted = _accepted(
        lambda: _paired_draws(rng, profile[order], profile, eligible),
        lambda picked: math.sqrt(float((profile[picked] ** 2).sum()) / max(own, 1e-300)),
    )
    return tuple(sorted(int(i) for i in chosen)), f"{note}, predicted edit ratio {predicted:.3g}"


def _accepted(draw: Any, predict: Any) -> tuple[list[int], float]:
    """The first of up to MATCH_TRIES draws whose predicted ratio is within MATCH_ACCEPT of 1,
    else the draw closest to 1 (in log ratio)."""
    best, best_ratio = None, math.nan
    for _ in range(MATCH_TRIES):
        picked = draw()
        ratio = predict(picked)
        if best is None or abs(math.log(max(ratio, 1e-300))) < abs(math.log(max(best_ratio, 1e-300))):
            best, best_ratio = picked, ratio
        if 1 / MATCH_ACCEPT <= ratio <= MATCH_ACCEPT:
            break
    return best, best_ratio


_RESTRICTED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _restricted_spectrum(spectrum: dict[str, Any], massive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (rows, zero on ``massive``) of M restricted to the
    other coordinates; the full spectrum when ``massive`` is empty."""
    values, vectors = spectrum["eigenvalues"], spectrum["eigenvectors"]
    if len(massive) == 0:
        return values, vectors
    key = (values.tobytes(), tuple(int(i) for i in massive))
    if key not in _RESTRICTED:
        keep = np.setdiff1d(np.arange(len(values)), massive)
        part = torch.as_tensor(vectors[:, keep])
        second = (part.T * torch.as_tensor(values)) @ part
        sub_values, sub_vectors = (t.numpy() for t in torch.linalg.eigh((second + second.T) / 2))
        rows = np.zeros((len(keep), len(values)))
        rows[:, keep] = sub_vectors[:, ::-1].T
        if len(_RESTRICTED) > 32:
            _RESTRICTED.clear()
        _RESTRICTED[key] = (np.clip(sub_values[::-1], 0, None), rows)
    return _RESTRICTED[key]


def _matched_basis(
    rng: np.random.Generator, target: Project, spectrum: dict[str, Any], massive: np.ndarray
) -> tuple[np.ndarray, str]:
    """A rank-r basis matched on V_k's captured second moment (see :func:`matched_control`).

    ``C = [V_k's weights on the massive dimensions | G^{1/2} R E_S]``: V_k's massive part is
    kept as it is (its edit of the attention sink, the same whatever the cluster), and the
    rest is a random rotation R of eigenvectors E_S of M restricted to the other
    coordinates, one per basis vector b_j from b_j's stratum of ``b̃_jᵀ M b̃_j`` (b̃_j: b_j's
    non-massive part, normalised), scaled by ``G = I − V_m V_mᵀ`` so that C's rows are
    orthonormal (``C Cᵀ = V_m V_mᵀ + G = I``). Without massive dimensions ``C = R E_S``.
    """
    full_values, full_vectors = spectrum["eigenvalues"], spectrum["eigenvectors"]
    V = target._orthonormal.numpy()  # [r, d]
    r = len(V)
    V_massive = np.zeros_like(V)
    V_massive[:, massive] = V[:, massive]
    V_rest = V - V_massive
    gram = V_rest @ V_rest.T  # G = I − V_m V_mᵀ
    w, Q = np.linalg.eigh((gram + gram.T) / 2)
    gram_root = (Q * np.sqrt(np.clip(w, 0, None))) @ Q.T
    values, vectors = _restricted_spectrum(spectrum, massive)
    norms = np.linalg.norm(V_rest, axis=1)
    directions = V_rest / np.maximum(norms, 1e-12)[:, None]
    coef = directions @ vectors.T  # [r, d']
    wanted = (coef**2 * values).sum(1)  # b̃_jᵀ M b̃_j
    span = np.linalg.svd(V_rest, full_matrices=False)
    span_rows = span[2][span[1] > 1e-8]
    in_target = ((span_rows @ vectors.T) ** 2).sum(0)  # weight of each eigenvector inside span(V_k)
    eligible = (in_target <= 0.5) & (values > 0)
    logs = np.log(np.maximum(np.sqrt(values), 1e-300))  # log RMS of h along each eigenvector
    captured = lambda C: float(((C @ full_vectors.T) ** 2 * full_values).sum())  # noqa: E731 - tr(C M Cᵀ)
    total = max(captured(V), 1e-300)
    state: dict[int, np.ndarray] = {}

    def draw() -> list[int]:
        available = eligible.copy()
        carry, chosen = 0.0, []
        for j in np.argsort(-wanted, kind="stable"):  # largest first, carrying the deficit as for dims
            pool = available if available.any() else (values > 0) & ~np.isin(np.arange(len(values)), chosen)
            own = math.sqrt(max(float(wanted[j]), 1e-300))
            aim = min(max(math.sqrt(max(own**2 + carry, 0.0)), own / MATCH_CARRY), own * MATCH_CARRY)
            k = _stratum_draw(rng, math.log(aim), logs, pool)
            available[k] = False
            chosen.append(k)
            carry += float(wanted[j] - values[k])
        q, t = np.linalg.qr(rng.standard_normal((r, r)))
        rotation = q * np.where(np.diag(t) < 0, -1.0, 1.0)  # Haar-distributed
        state[id(chosen)] = V_massive + gram_root @ (rotation @ vectors[chosen])
        return chosen

    chosen, predicted = _accepted(draw, lambda picked: math.sqrt(captured(state[id(picked)]) / total))
    note = f", massive part kept ({len(massive)} dims)" if np.abs(V_massive).sum() > 0 else ""
    return state[id(chosen)], f"{note}, predicted edit ratio {predicted:.3g}"


def _dims(components: ClusterComponents, kind: str) -> tuple[int, ...]:
    dims = components.need("dims", kind)
    require(len(dims) > 0, f"{kind}: R_k is empty for this cluster; lower τ or use top_k in notebook 03.")
    return dims


def _typical_std(components: ClusterComponents, dims: tuple[int, ...]) -> float:
    std = components.std
    if std is None:
        return 1.0
    if std.size == 1:
        return float(std[0])
    require(
        max(dims) < std.size,
        f"noise: the components' std has {std.size} entries but R_k reaches dimension {max(dims)}; "
        "it must hold one standard deviation per hidden dimension.",
    )
    return float(np.median(std[list(dims)]))


def _mean_gap(components: ClusterComponents, width: int) -> np.ndarray | None:
    if components.mean_in is None or components.mean_out is None:
        return None
    gap = components.mean_in - components.mean_out
    require(gap.shape == (width,), f"mean_in/mean_out have shape {gap.shape}, expected ({width},)")
    return gap


def _probe(components: ClusterComponents) -> tuple[np.ndarray, float]:
    probe = components.need("probe", "gradient", hint="notebook 03 stores a probe per cluster")
    require(bool(np.abs(probe.coef).sum() > 0), "gradient: the probe coefficients are all zero")
    return probe.coef, probe.intercept


def _control_entropy(seed: int, components: ClusterComponents) -> list[int]:
    extra = [components.layer, components.cluster]
    return [int(seed)] + [int(x) for x in extra if isinstance(x, (int, np.integer)) and int(x) >= 0]


__all__ = [
    "Perturbation",
    "Ablate",
    "Noise",
    "Shift",
    "Project",
    "Leace",
    "Gradient",
    "Kind",
    "KINDS",
    "MAGNITUDE_FIELD",
    "kinds",
    "build",
    "matched_control",
    "matched_controls",
    "second_moment_spectrum",
    "control_profile",
    "MATCH_WINDOW",
    "MATCH_MIN_POOL",
    "MATCH_CARRY",
    "fit_leace",
    "perturbation_from_dict",
    "registered_kinds",
]
