"""Matched random controls: a random perturbation that edits the state as much as the one it controls for.

A control must change the model as much as the perturbation it controls for, or "hurts more
than its control" measures size, not cluster. Here, per kind, is how its control is drawn
(magnitude strata of dimensions, second-moment strata of eigenvectors, a random eraser of the
same rank; see :func:`rephelpers.perturbations.kinds.matched_control` for the whole
description), and the token statistics of a layer that the matching reads
(:func:`second_moment_spectrum`). :data:`rephelpers.perturbations.kinds.KINDS` names each
kind's drawer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..dimensions.components import ClusterComponents, ControlStats, as_components
from ..errors import require
from ..interventions.edits import Ablate, LearnedProjection, Leace, Noise, Perturbation, Project, Shift

def dims_control(kind: str) -> Callable[..., Perturbation]:
    """Partners of R_k from its magnitude strata (ablate, mean_ablate, noise; see :func:`matched_control`)."""
    def control(target: Any, stats: ControlStats, d_model: int, rng: np.random.Generator,
                spectrum: Spectrum | None) -> Perturbation:
        profile, source = control_profile(kind, stats, d_model, spectrum)
        massive = _massive_dims(stats, spectrum, d_model)
        dims, note = _matched_dims(rng, target.dims, profile, massive, d_model)
        matching = f"uniform{note}" if profile is None else f"{source} strata{note}"
        if isinstance(target, Noise):
            return Noise(dims=dims, sigma=target.sigma, seed=target.seed, matching=matching)
        values = None
        if target.values is not None:  # mean ablation: the control uses the same reference
            require(stats.mean_out is not None, f"{kind}: the control needs the rest's mean (mean_out)")
            values = stats.mean_out[list(dims)]
        return Ablate(dims=dims, values=values, strength=target.strength, matching=matching)
    return control


def project_control(target: Any, stats: ControlStats, d_model: int, rng: np.random.Generator,
                     spectrum: Spectrum | None) -> Perturbation:
    spec = _check_spectrum(spectrum, d_model)
    if spec is None:
        q, _ = np.linalg.qr(rng.standard_normal((d_model, target.rank)))
        return Project(basis=q.T, strength=target.strength, matching="uniform (no spectrum)")
    basis, note = _matched_basis(rng, target, spec, _massive_dims(stats, spectrum, d_model))
    return Project(basis=basis, strength=target.strength, matching=f"spectrum variance strata{note}")


def shift_control(target: Any, stats: ControlStats, d_model: int, rng: np.random.Generator,
                   spectrum: Spectrum | None) -> Perturbation:
    v = rng.standard_normal(d_model)
    v *= np.linalg.norm(target.direction) / np.linalg.norm(v)
    return Shift(direction=v, alpha=target.alpha)


def gradient_control(target: Any, stats: ControlStats, d_model: int, rng: np.random.Generator,
                      spectrum: Spectrum | None) -> Perturbation:
    signs = rng.choice([-1.0, 1.0], size=d_model)
    return Shift(direction=signs, alpha=target.epsilon)


def leace_control(target: Any, stats: ControlStats, d_model: int, rng: np.random.Generator,
                  spectrum: Spectrum | None) -> Perturbation:
    """A random rank-r eraser in diag-standardised space about the same μ, of the same edit size.

    The control removes r random orthonormal coordinates ``u`` of ``(h − μ)/std`` (``left =
    (std ∘ u)ᵀ``, ``right = (u / std)ᵀ``). An eraser ``ĥ = h − s·leftᵀ right (h − μ)`` moves
    ``E‖ĥ − h‖² = s² tr((L Lᵀ)(R C_μ Rᵀ))`` (L, R: left, right; ``C_μ = E[(h − μ)(h − μ)ᵀ]``,
    from the spectrum as :func:`learned_control` computes it, else ``diag(std²)``). The fitted
    eraser acts on the directions that carry the concept, which need not have the variance of
    random ones (on the demo's layers the unscaled control moved the state 5–8× less), so the
    control's strength is ``s' = s·√(E_target / E_control)``: a control must change the state as
    much as the perturbation it controls for (s' may pass 1: the edit size is matched, not the
    formula's range).
    """
    spread = np.ones(d_model) if stats.std is None else np.asarray(stats.std, dtype=np.float64)
    require(spread.shape == (d_model,), f"leace: the components' std has shape {spread.shape}, expected ({d_model},)")
    gain = np.divide(1.0, spread, out=np.zeros(d_model), where=spread > 1e-12)
    u, _ = np.linalg.qr(rng.standard_normal((d_model, target.rank)))
    left, right = (spread[:, None] * u).T, (gain[:, None] * u).T
    mu = np.asarray(target.mean, dtype=np.float64)
    spec = _check_spectrum(spectrum, d_model)
    cov = _covariance_about(spec, mu) if spec is not None else np.diag(spread**2)

    def moved(L: np.ndarray, R: np.ndarray) -> float:  # tr((L Lᵀ)(R C Rᵀ)): the expected squared edit at s = 1
        return float(np.trace((L @ L.T) @ (R @ cov @ R.T)))

    edit_target = moved(np.asarray(target.left, dtype=np.float64), np.asarray(target.right, dtype=np.float64))
    edit_control = moved(left, right)
    strength = target.strength * math.sqrt(edit_target / edit_control) if edit_control > 1e-300 else target.strength
    return Leace(mean=target.mean, left=left, right=right, strength=strength)


def _covariance_about(spec: Spectrum, mu: np.ndarray) -> np.ndarray:
    """``C_μ = M − m μᵀ − μ mᵀ + μ μᵀ`` from the spectrum's second moment M and mean m."""
    M = (spec.eigenvectors.T * spec.eigenvalues) @ spec.eigenvectors
    m = spec.mean
    return M - np.outer(m, mu) - np.outer(mu, m) + np.outer(mu, mu)


def learned_control(target: Any, stats: ControlStats, d_model: int, rng: np.random.Generator,
                    spectrum: Spectrum | None) -> Perturbation:
    """A random rank-r :class:`LearnedProjection` about the same mean μ, of the same edit size.

    The edit ``α·UUᵀ(h − μ)`` has ``E‖·‖² = α² tr(Uᵀ C_μ U)`` with ``C_μ = E[(h − μ)(h − μ)ᵀ]
    = M − m μᵀ − μ mᵀ + μ μᵀ`` (M, m: the spectrum's second moment and mean). U' is drawn
    as :func:`project_control` draws a subspace, but on the eigenvectors of C_μ (stratum
    partners of U's captured variance, mixed by a random rotation, at most half their
    weight inside span(U)), then its strength is set to ``α' = α √(tr(UᵀC_μU) / tr(U'ᵀC_μU'))``
    so that the predicted edit ratio is exactly 1 on the spectrum's tokens (α' may pass 1:
    the edit size is what is matched, not the formula's range). Without a spectrum: a
    uniformly random U' (QR of a Gaussian matrix) rescaled with ``C_μ ≈ diag(std²)`` from
    ``stats.std``, or not rescaled without it.
    """
    U = target._orthonormal.numpy()  # [r, d]
    mu = np.asarray(target.mean, dtype=np.float64)
    spec = _check_spectrum(spectrum, d_model)
    if spec is None:
        q, _ = np.linalg.qr(rng.standard_normal((d_model, len(U))))
        basis = q.T
        if stats.std is None:
            return LearnedProjection(basis=basis, mean=mu, strength=target.strength, matching="uniform (no spectrum, no std)")
        var = np.asarray(stats.std, dtype=np.float64) ** 2
        captured = lambda B: float((B**2 * var).sum())  # noqa: E731 - tr(B diag(std²) Bᵀ)
        strength = target.strength * math.sqrt(captured(U) / max(captured(basis), 1e-300))
        return LearnedProjection(basis=basis, mean=mu, strength=strength, matching="uniform, rescaled by std")
    cov = _covariance_about(spec, mu)
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    centred = Spectrum(eigenvalues=np.clip(values[::-1], 0, None), eigenvectors=vectors[:, ::-1].T.copy(), mean=mu,
                       rms=spec.rms, ratio_max=spec.ratio_max, n_tokens=spec.n_tokens, source=f"{spec.source}, about μ")
    basis, note = _matched_basis(rng, Project(basis=U), centred, _massive_dims(stats, spectrum, d_model))
    captured = lambda B: float(np.einsum("ij,jk,ik->", B, cov, B))  # noqa: E731 - tr(B C_μ Bᵀ)
    strength = target.strength * math.sqrt(captured(U) / max(captured(basis), 1e-300))
    return LearnedProjection(basis=basis, mean=mu, strength=strength,
                             matching=f"variance about μ strata{note}, strength rescaled ×{strength / max(target.strength, 1e-300):.3g}")


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


@dataclass(frozen=True, eq=False)
class Spectrum:
    """The token statistics of one (layer, component) site that matched controls read.

    ``eigenvalues [d]`` (descending, ≥ 0) and ``eigenvectors [d, d]`` (row i the i-th unit
    eigenvector) of the second moment about zero ``M = (1/n) Σ_t h_t h_tᵀ``; ``mean [d]``
    ``= (1/n) Σ_t h_t``; ``rms [d] = √diag(M)``; ``ratio_max [d] = max_t |h_ti| / median_j
    |h_tj|`` (the massive-activation detector); ``n_tokens`` and ``source`` (a label).
    Built by :func:`second_moment_spectrum`; :meth:`to_dict`/:meth:`from_dict` round-trip
    it through plain JSON types.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    mean: np.ndarray
    rms: np.ndarray
    ratio_max: np.ndarray
    n_tokens: int
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("eigenvalues", "mean", "rms", "ratio_max", "eigenvectors"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        d = self.eigenvalues.shape[0] if self.eigenvalues.ndim == 1 else -1
        require(
            d > 0 and all(getattr(self, k).shape == (d,) for k in ("mean", "rms", "ratio_max"))
            and self.eigenvectors.shape == (d, d),
            "a spectrum needs eigenvalues, mean, rms and ratio_max of one width d and eigenvectors [d, d]; "
            f"got {[getattr(self, k).shape for k in ('eigenvalues', 'eigenvectors', 'mean', 'rms', 'ratio_max')]}",
        )
        object.__setattr__(self, "n_tokens", int(self.n_tokens))
        object.__setattr__(self, "source", str(self.source))

    @property
    def width(self) -> int:
        return int(self.eigenvalues.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (v.tolist() if isinstance(v := getattr(self, f.name), np.ndarray) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Spectrum":
        missing = [f.name for f in fields(cls) if f.name != "source" and f.name not in data]
        require(not missing, f"the spectrum lacks {missing}; build it with second_moment_spectrum(states).")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def second_moment_spectrum(states: Any, source: str = "") -> Spectrum:
    """The token statistics of one (layer, component) site that matched controls use.

    ``states [n_tokens, d]`` are hidden states ``h_t`` at the site (every real token of
    some training texts: what the perturbation acts on). Returns a :class:`Spectrum`:

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
    return Spectrum(
        eigenvalues=values.flip(0).clamp_min(0.0).numpy(),
        eigenvectors=vectors.flip(1).T.contiguous().numpy(),
        mean=X.mean(0).numpy(),
        rms=second.diagonal().clamp_min(0.0).sqrt().numpy(),
        ratio_max=(X.abs() / median[:, None]).max(0).values.numpy(),
        n_tokens=int(n),
        source=str(source),
    )


def control_profile(
    kind: str, components: ControlStats | ClusterComponents | Mapping[str, Any], d_model: int,
    spectrum: Spectrum | None = None,
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

    stats = components if isinstance(components, ControlStats) else ControlStats.of(as_components(components))
    spec = _check_spectrum(spectrum, d_model)
    token_rms = None if stats.token_rms is None else vec(stats.token_rms, "token_rms")
    token_mean = None if stats.token_mean is None else vec(stats.token_mean, "token_mean")
    std = None if stats.std is None else vec(stats.std, "std")
    mean_out = None if stats.mean_out is None else vec(stats.mean_out, "mean_out")
    moments = None
    if spec is not None:
        moments = (spec.rms, spec.mean, "spectrum")
    elif token_rms is not None and token_mean is not None:
        moments = (token_rms, token_mean, "token_rms/token_mean")
    if kind == "ablate":
        if token_rms is not None:
            return token_rms, "token_rms"
        if spec is not None:
            return spec.rms, "spectrum rms"
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


def _check_spectrum(spectrum: Spectrum | None, d_model: int) -> Spectrum | None:
    if spectrum is None:
        return None
    require(isinstance(spectrum, Spectrum),
            f"spectrum must be a Spectrum (second_moment_spectrum(states), or Spectrum.from_dict of its to_dict()), "
            f"got {type(spectrum).__name__}")
    require(spectrum.width == d_model,
            f"the spectrum is of width {spectrum.width}, hidden size is {d_model}: it belongs to another model.")
    return spectrum


def _massive_dims(stats: ControlStats, spectrum: Spectrum | None, d_model: int) -> np.ndarray:
    if stats.massive_dims is not None:
        dims = np.asarray(stats.massive_dims, dtype=np.int64).reshape(-1)
    elif spectrum is not None:
        dims = np.flatnonzero(np.asarray(spectrum.ratio_max, dtype=np.float64) > MASSIVE_RATIO)
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


def _restricted_spectrum(spectrum: Spectrum, massive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (rows, zero on ``massive``) of M restricted to the
    other coordinates; the full spectrum when ``massive`` is empty."""
    values, vectors = spectrum.eigenvalues, spectrum.eigenvectors
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
    rng: np.random.Generator, target: Project, spectrum: Spectrum, massive: np.ndarray
) -> tuple[np.ndarray, str]:
    """A rank-r basis matched on V_k's captured second moment (see :func:`matched_control`).

    ``C = [V_k's weights on the massive dimensions | G^{1/2} R E_S]``: V_k's massive part is
    kept as it is (its edit of the attention sink, the same whatever the cluster), and the
    rest is a random rotation R of eigenvectors E_S of M restricted to the other
    coordinates, one per basis vector b_j from b_j's stratum of ``b̃_jᵀ M b̃_j`` (b̃_j: b_j's
    non-massive part, normalised), scaled by ``G = I − V_m V_mᵀ`` so that C's rows are
    orthonormal (``C Cᵀ = V_m V_mᵀ + G = I``). Without massive dimensions ``C = R E_S``.
    """
    full_values, full_vectors = spectrum.eigenvalues, spectrum.eigenvectors
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


def control_entropy(seed: int, stats: ControlStats) -> list[int]:
    """The seed of a control's draw: ``[seed, layer, cluster]`` (negative ids left out, as numpy's entropy must be ≥ 0)."""
    return [int(seed)] + [int(x) for x in (stats.layer, stats.cluster) if int(x) >= 0]
