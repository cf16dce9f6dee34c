"""Perturbations of hidden states: one small frozen, serialisable class per method.

Each class maps a hidden-state tensor ``h`` of shape ``[..., d]`` to ``ĥ`` with the same
shape; where it is applied (layer, component, token positions) is the business of
:class:`rephelpers.intervene.Intervention`. ``to_dict()``/``perturbation_from_dict()``
round-trip every perturbation through plain JSON types, so a configuration travels in
papermill parameters and is written into every result row.

Notation: ``R`` is a set of dimension indices (R_k of cluster k), ``v`` a direction,
``V`` an orthonormal basis (rows) of a subspace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

import torch

from .errors import RephelpersError, require

_REGISTRY: dict[str, type["Perturbation"]] = {}


@dataclass(frozen=True)
class Perturbation:
    """Base class. Subclasses set ``kind`` and implement :meth:`apply`."""

    kind: ClassVar[str] = "base"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
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
            out[f.name] = list(map(_plain, value)) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """A short human label (no vectors), for tables and chart legends."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
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


@dataclass(frozen=True)
class Ablate(Perturbation):
    """Zero (or mean-) ablation of the dimensions in R.

    ``ĥ_i = h_i · (1 − 𝟙[i ∈ R])`` (zero), or ``ĥ_i = μ_i`` for ``i ∈ R`` when ``values``
    holds the reference means μ (mean ablation).
    """

    kind: ClassVar[str] = "ablate"
    dims: tuple[int, ...]
    values: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(i) for i in self.dims))
        if self.values is not None:
            object.__setattr__(self, "values", tuple(float(v) for v in self.values))
            require(
                len(self.values) == len(self.dims),
                f"ablate: {len(self.values)} mean values for {len(self.dims)} dimensions",
            )

    def check(self, d_model: int) -> None:
        _check_dims(self.kind, self.dims, d_model)

    @cached_property
    def _index(self) -> torch.Tensor:
        return torch.tensor(self.dims, dtype=torch.long)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        idx = self._index.to(h.device)
        out = h.clone()
        if self.values is None:
            out[..., idx] = 0
        else:
            out[..., idx] = _vector(self.values, h)
        return out


@dataclass(frozen=True)
class Noise(Perturbation):
    """Gaussian noise on the dimensions in R: ``ĥ_i = h_i + 𝟙[i ∈ R] · ε_i``, ε ~ N(0, σ²).

    The noise is drawn from a generator seeded with ``seed`` on every call, so the same
    input shape always receives the same noise (reproducible runs, paired statistics).
    """

    kind: ClassVar[str] = "noise"
    dims: tuple[int, ...]
    sigma: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(i) for i in self.dims))
        require(self.sigma >= 0, f"noise: sigma must be ≥ 0, got {self.sigma}")

    def check(self, d_model: int) -> None:
        _check_dims(self.kind, self.dims, d_model)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor(self.dims, dtype=torch.long, device=h.device)
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
        eps = torch.randn(*h.shape[:-1], len(self.dims), generator=gen, dtype=torch.float32)
        out = h.clone()
        out[..., idx] = out[..., idx] + float(self.sigma) * eps.to(h.device, h.dtype)
        return out


@dataclass(frozen=True)
class Shift(Perturbation):
    """Directional shift along a cluster direction: ``ĥ = h + α · v`` (v as given)."""

    kind: ClassVar[str] = "shift"
    direction: tuple[float, ...]
    alpha: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))

    def check(self, d_model: int) -> None:
        require(
            len(self.direction) == d_model,
            f"shift: direction has {len(self.direction)} entries, hidden size is {d_model}",
        )

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h + float(self.alpha) * _vector(self.direction, h)


@dataclass(frozen=True)
class Project(Perturbation):
    """Orthogonal projection out of a subspace: ``ĥ = h − Σ_{v∈V} (h·v) v``.

    ``basis`` holds the rows of V; they are re-orthonormalised (QR) before use so a
    slightly non-orthogonal basis still yields an exact projection. ``strength`` in
    [0, 1] scales the removed component (1 removes it entirely).
    """

    kind: ClassVar[str] = "project"
    basis: tuple[tuple[float, ...], ...]
    strength: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "basis", tuple(tuple(float(x) for x in row) for row in self.basis)
        )

    def check(self, d_model: int) -> None:
        require(len(self.basis) > 0, "project: the subspace has rank 0; give at least one basis vector.")
        widths = {len(r) for r in self.basis}
        require(widths == {d_model}, f"project: basis rows have widths {widths}, hidden size is {d_model}")

    @cached_property
    def _orthonormal(self) -> torch.Tensor:
        v = torch.tensor(self.basis, dtype=torch.float64)
        q, r = torch.linalg.qr(v.T)
        keep = r.diagonal().abs() > 1e-10
        if not bool(keep.any()):
            raise RephelpersError("project: the basis vectors are all zero.")
        return q[:, keep].T.contiguous()  # [rank, d]

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        v = self._orthonormal.to(h.device, h.dtype)
        return h - float(self.strength) * (h @ v.T) @ v


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


__all__ = [
    "Perturbation",
    "Ablate",
    "Noise",
    "Shift",
    "Project",
    "perturbation_from_dict",
    "registered_kinds",
]
