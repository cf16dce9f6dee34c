"""How much a perturbation changes what the model computes: representations and attention.

- :func:`linear_cka`: linear Centered Kernel Alignment (Kornblith et al. 2019) between two
  representations of the same inputs, 1 for identical geometry, invariant to rotations
  and isotropic scaling.
- :func:`attention_js`: mean Jensen–Shannon divergence between two sets of attention
  distributions over the same tokens (original vs perturbed pass).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import require


def linear_cka(X: Any, Y: Any) -> float:
    """Linear CKA between ``X [n, p]`` and ``Y [n, q]`` (rows are the same n inputs).

    ``CKA(X, Y) = ‖Y_cᵀ X_c‖²_F / (‖X_cᵀ X_c‖_F · ‖Y_cᵀ Y_c‖_F)`` with column-centred
    ``X_c``, ``Y_c``. When n is smaller than the widths it is computed through the n × n
    Gram matrices (``‖Y_cᵀX_c‖²_F = ⟨X_cX_cᵀ, Y_cY_cᵀ⟩_F``, same value). Returns NaN when
    either representation is constant across the inputs (CKA is undefined there).
    """
    X = _as_matrix(X, "X")
    Y = _as_matrix(Y, "Y")
    require(
        X.shape[0] == Y.shape[0],
        f"linear_cka: X has {X.shape[0]} rows but Y has {Y.shape[0]}; rows must be the same inputs.",
    )
    Xc = X - X.mean(0)
    Yc = Y - Y.mean(0)
    if X.shape[0] < min(X.shape[1], Y.shape[1]):
        K, L = Xc @ Xc.T, Yc @ Yc.T
        cross, norm_x, norm_y = float((K * L).sum()), np.linalg.norm(K), np.linalg.norm(L)
    else:
        cross = float(np.linalg.norm(Yc.T @ Xc) ** 2)
        norm_x, norm_y = np.linalg.norm(Xc.T @ Xc), np.linalg.norm(Yc.T @ Yc)
    denominator = float(norm_x * norm_y)
    return cross / denominator if denominator > 0 else math.nan


def _as_matrix(A: Any, name: str) -> np.ndarray:
    if isinstance(A, torch.Tensor):
        A = A.detach().cpu().numpy()
    A = np.asarray(A, dtype=np.float64)
    require(A.ndim == 2, f"linear_cka: {name} must be a matrix [n, features], got shape {A.shape}")
    require(A.shape[0] >= 2, f"linear_cka: {name} has {A.shape[0]} row(s); CKA needs at least 2 inputs.")
    require(bool(np.isfinite(A).all()), f"linear_cka: {name} holds NaN or inf values")
    return A


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits along the last axis (0 = identical, 1 = disjoint).

    ``JS(P, Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M)``, ``M = (P + Q) / 2``, with ``0 log 0 = 0``.
    """
    p = p.double()
    q = q.double()
    m = (p + q) / 2
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return ((kl_pm + kl_qm) / (2 * math.log(2))).clamp_min(0)


def attention_js(
    original: torch.Tensor, perturbed: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per-row mean JS divergence between attention patterns ``[b, heads, query, key]``.

    Averages :func:`js_divergence` of each (head, real query token) distribution over
    heads and the real query positions of each row (``attention_mask [b, seq]``; padding
    queries are skipped). Returns ``[b]``, in bits.
    """
    require(
        original.shape == perturbed.shape and original.ndim == 4,
        f"attention_js: patterns must share a [batch, heads, query, key] shape, got "
        f"{tuple(original.shape)} and {tuple(perturbed.shape)}",
    )
    js = js_divergence(original, perturbed).mean(1)  # [b, query]
    real = attention_mask.to(js.dtype)
    return (js * real).sum(-1) / real.sum(-1).clamp_min(1)


__all__ = ["linear_cka", "js_divergence", "attention_js"]
