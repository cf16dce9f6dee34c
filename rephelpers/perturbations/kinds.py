"""Perturbation kinds as the stages use them: how each is built from a cluster's components, and its control.

:data:`KINDS` holds, per kind, how it is built from a stage-03 subspace and a unit-free
``magnitude`` (:func:`build`) and how its random perturbation of the same size is drawn
(:func:`matched_control`, the specificity control; the drawing itself lives in
:mod:`rephelpers.perturbations.controls`). The perturbation classes themselves (one frozen,
serialisable class per method) are :mod:`rephelpers.interventions.edits`; ``mean_ablate``
is an :class:`~rephelpers.interventions.edits.Ablate` towards the rest's mean, so there are
more kinds than classes. Every kind has one magnitude field (:data:`MAGNITUDE_FIELD`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generic, TypeVar

import numpy as np

from ..dimensions.components import (
    ClusterComponents,
    ControlStats,
    MeanDirection,
    MeanReference,
    ProbeStep,
    Selection,
    SpreadSelection,
    Subspace,
    as_components,
    eraser,
    learned_subspace,
)
from ..errors import require
from ..interventions.edits import Ablate, Gradient, LearnedProjection, Leace, Noise, Perturbation, Project, Shift
from .controls import (
    Spectrum,
    dims_control,
    control_entropy,
    gradient_control,
    leace_control,
    learned_control,
    project_control,
    shift_control,
)

N = TypeVar("N")


@dataclass(frozen=True)
class Kind(Generic[N]):
    """One perturbation kind as the stages use it (one entry of :data:`KINDS`).

    ``needs(components)`` takes from stage 03's :class:`ClusterComponents` the typed value
    this kind reads (e.g. :meth:`Selection.of`, R_k alone; :meth:`Subspace.of`, V_k), and
    raises a clear error naming what is missing; ``make(value, m, seed)`` builds the ``cls``
    perturbation from that value alone at the unit-free magnitude m, scaled so that m = 1 is
    "full strength" (``scaling`` says what that is); ``magnitude_field`` is the field m sets.
    ``control(target, stats, d_model, rng, spectrum)`` draws the random perturbation of the
    same size that controls for it (:func:`matched_control`), from the target and the
    components' :class:`ControlStats`. ``acts_on`` names the cluster component it changes:
    ``"R_k"`` (stage 03's selected dimensions, so how they were selected decides what it
    touches) or its own (``"SVD V_k"``, ``"LEACE"``, ...).
    Adding a kind means writing its class (if it is a new one), the typed value it needs (if
    none of :mod:`rephelpers.dimensions.components`' fits; a frozen dataclass with an ``of``
    classmethod) and one ``Kind`` in :data:`KINDS`; nothing else in the package lists kinds.
    """

    name: str
    cls: type[Perturbation]
    magnitude_field: str
    scaling: str
    acts_on: str
    make: Callable[[N, float, int], Perturbation] = field(repr=False)
    control: Callable[[Perturbation, ControlStats, int, np.random.Generator, Spectrum | None], Perturbation] = field(
        repr=False)
    needs: Callable[[ClusterComponents], N] = field(repr=False)


def _make_ablate(selection: Selection, m: float, seed: int) -> Perturbation:
    return Ablate(dims=selection.dims, strength=m)


def _make_mean_ablate(reference: MeanReference, m: float, seed: int) -> Perturbation:
    return Ablate(dims=reference.dims, values=reference.mean_out[list(reference.dims)], strength=m)


def _make_noise(spread: SpreadSelection, m: float, seed: int) -> Perturbation:
    return Noise(dims=spread.dims, sigma=m * spread.typical_std, seed=seed)


def _make_shift(mean: MeanDirection, m: float, seed: int) -> Perturbation:
    v = mean.direction
    return Shift(direction=v, alpha=m if mean.gap is None else -m * float(mean.gap @ v))


def _make_project(subspace: Subspace, m: float, seed: int) -> Perturbation:
    return Project(basis=subspace.basis, strength=m)


def _make_leace(fitted: Leace, m: float, seed: int) -> Perturbation:
    return replace(fitted, strength=m)


def _make_learned(fitted: LearnedProjection, m: float, seed: int) -> Perturbation:
    return replace(fitted, strength=m, matching=None)


def _make_gradient(step: ProbeStep, m: float, seed: int) -> Perturbation:
    coef, gap = step.coef, step.gap
    scale = 1.0 if gap is None else abs(float(coef @ gap)) / float(np.abs(coef).sum())
    return Gradient(coef=coef, intercept=step.intercept, epsilon=m * scale)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("ablate", Ablate, "strength", "strength m; ĥ_R = (1 − m)·h_R (m = 1 zeroes R_k)", "R_k",
         _make_ablate, dims_control("ablate"), Selection.of),
    Kind("mean_ablate", Ablate, "strength",
         "strength m towards the rest's mean; ĥ_R = (1 − m)·h_R + m·μ_out,R. Zeroing a dimension whose "
         "typical value is far from 0 (the 'massive activation' dimensions of many LMs) damages every input "
         "alike; setting it to the value it takes on other clusters' text removes only what is specific to "
         "cluster k",
         "R_k", _make_mean_ablate, dims_control("mean_ablate"), MeanReference.of),
    Kind("noise", Noise, "sigma",
         "σ = m · median_{i∈R_k} std_i, noise as large as the typical natural spread of those dimensions "
         "(raw σ = m if std is absent); the median, so that one massive dimension in R_k does not set the "
         "noise level of all the others",
         "R_k", _make_noise, dims_control("noise"), SpreadSelection.of),
    Kind("shift", Shift, "alpha",
         "ĥ = h + α v_k with α = m · (μ_out − μ_in)·v_k: at m = 1 the mean of cluster k lands on the mean "
         "of the rest along v_k (raw α = m without the means)",
         "mean direction", _make_shift, shift_control, MeanDirection.of),
    Kind("project", Project, "strength", "strength m on V_k (m = 1 removes it entirely)", "SVD V_k",
         _make_project, project_control, Subspace.of),
    Kind("leace", Leace, "strength", "strength m on the fitted eraser (m = 1 is full erasure)", "LEACE",
         _make_leace, leace_control, eraser),
    Kind("gradient", Gradient, "epsilon",
         "ε = m · |w·(μ_in − μ_out)| / ‖w‖₁: at m = 1 the step moves the probe's logit by the gap between "
         "cluster k's mean and the rest's mean (a sign step changes the logit by exactly ε‖w‖₁); raw ε = m "
         "without the means",
         "probe gradient", _make_gradient, gradient_control, ProbeStep.of),
    Kind("learned", LearnedProjection, "strength",
         "strength α = m on the learned subspace, ĥ = h − α·UUᵀ(h − μ) (m = 1 sets span(U) to the layer's mean)",
         "learned U", _make_learned, learned_control, learned_subspace),
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
    (or a dict of its fields, ``layer`` and ``cluster`` among them): ``dims`` (R_k),
    ``direction`` (unit v_k), ``basis`` (rows of V_k), ``probe``, ``mean_in``/``mean_out``
    (mean representation of cluster k / of the rest), ``std`` (per-dimension standard
    deviation) and ``leace`` (the fitted eraser). ``KINDS[kind].needs`` takes from it the
    typed value the kind reads, and says which field is missing if one is.

    ``magnitude`` m is scaled so that m = 1 is "full strength" for every kind
    (``KINDS[kind].scaling``):

    - ``ablate``: strength m; ``ĥ_R = (1 − m)·h_R`` (m = 1 zeroes R_k).
    - ``mean_ablate``: strength m towards the rest's mean; ``ĥ_R = (1 − m)·h_R + m·μ_out,R``.
    - ``noise``: ``σ = m · median_{i∈R_k} std_i``.
    - ``shift``: ``ĥ = h + α v_k`` with ``α = m · (μ_out − μ_in)·v_k``.
    - ``project``: strength m on V_k (m = 1 removes it entirely).
    - ``leace``: strength m on ``components.leace`` (m = 1 is full erasure).
    - ``gradient``: ``ε = m · |w·(μ_in − μ_out)| / ‖w‖₁``.
    - ``learned``: strength m on ``components.learned`` (``ĥ = h − m·UUᵀ(h − μ)``).

    ``seed`` seeds the noise draw.
    """
    require(kind in KINDS, f"unknown perturbation kind {kind!r}; use one of {sorted(KINDS)}")
    m = float(magnitude)
    require(math.isfinite(m), f"magnitude must be finite, got {magnitude}")
    entry = KINDS[kind]
    return entry.make(entry.needs(as_components(components)), m, seed)


def matched_control(
    kind: str,
    components: ClusterComponents,
    d_model: int,
    magnitude: float = 1.0,
    seed: int = 0,
    spectrum: Spectrum | None = None,
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
    - ``learned``: a random rank-r projection about the same μ through the same formula,
      drawn from the strata of the layer's variance about μ and its strength rescaled so
      that its predicted edit equals the learned one's (:func:`~rephelpers.perturbations.controls.learned_control`).

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
    stats = ControlStats.of(components)
    rng = np.random.default_rng(control_entropy(seed, stats))
    return KINDS[kind].control(target, stats, d_model, rng, spectrum)


def matched_controls(
    kind: str,
    components: ClusterComponents,
    d_model: int,
    magnitude: float = 1.0,
    seed: int = 0,
    n_controls: int = 1,
    spectrum: Spectrum | None = None,
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


__all__ = ["Kind", "KINDS", "MAGNITUDE_FIELD", "kinds", "build", "fit_leace", "matched_control", "matched_controls"]
