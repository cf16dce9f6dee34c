"""Token-level statistics collected in stage 02's forward pass, and massive activations.

For document ``d`` with real tokens ``t = 1..T_d`` and hidden states ``h(d, t) ∈ R^D`` at
one (layer, component) site, and ``s = skip_first`` (leading real tokens left out; the
first token of SmolLM2 is an attention sink that carries "massive activations", values
~7·10³ on a few dimensions), :class:`TokenStats` keeps, per document,

- ``sum[d]   = Σ_{t>s} h(d, t)``            ``[n, D]``, float64,
- ``sumsq[d] = Σ_{t>s} h(d, t)²``           ``[n, D]``, float64 (element-wise square),
- ``count[d] = T_d − s``                   ``[n]``,

(a document with ``T_d ≤ s`` real tokens keeps all of them instead: ``count = T_d``), so
that the mean-pooled vector is ``sum / count`` and any token-level mean or variance
over a group of documents is exact: ``μ_G = Σ_{d∈G} sum[d] / Σ_{d∈G} count[d]``,
``σ²_G = Σ_{d∈G} sumsq[d] / N_G − μ_G²`` with ``N_G = Σ_{d∈G} count[d]``.

It also keeps, per dimension ``i``, a massive-activation detector over **every** real
token (the skipped ones included, since the sink is what it must see):

``ratio_max[i] = max_{d,t} |h_i(d,t)| / median_j |h_j(d,t)|``

(median over the D dimensions of the same token; the mean of the two middle values when
D is even), the largest ``|h_i|``, and where the ratio peaks (document row, position
among the document's real tokens, 0 = first). :func:`massive_dimensions` lists the
dimensions whose ratio exceeds a threshold (default 100); :func:`massive_table` shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import require

MASSIVE_THRESHOLD = 100.0
_STAT_FIELDS = ("sum", "sumsq", "count", "ratio_max", "abs_max", "peak_doc", "peak_pos")


@dataclass(frozen=True, eq=False)
class TokenStats:
    """Per-document token moments and the per-dimension massive-activation detector of one layer.

    See the module docstring for the definitions. ``skip_first`` is the number of leading
    real tokens left out of ``sum``, ``sumsq`` and ``count`` (not out of the detector).
    """

    sum: np.ndarray  # [n, D] float64
    sumsq: np.ndarray  # [n, D] float64
    count: np.ndarray  # [n] int64
    ratio_max: np.ndarray  # [D] float64
    abs_max: np.ndarray  # [D] float64
    peak_doc: np.ndarray  # [D] int64, document row where ratio_max is reached
    peak_pos: np.ndarray  # [D] int64, position among that document's real tokens (0 = first)
    skip_first: int = 1

    @property
    def n_docs(self) -> int:
        return int(self.sum.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.sum.shape[1])

    def pooled(self) -> np.ndarray:
        """Mean-pooled vectors ``sum / count`` ``[n, D]`` (what stage 02's mean pooling stores)."""
        return self.sum / self.count[:, None]

    def rows(self, rows: np.ndarray | Sequence[int]) -> "TokenStats":
        """The moments of a subset of documents (a boolean mask or indices); the detector is kept."""
        rows = np.asarray(rows)
        return replace(self, sum=self.sum[rows], sumsq=self.sumsq[rows], count=self.count[rows])

    def token_rms(self) -> np.ndarray:
        """``√(Σ_d sumsq[d] / Σ_d count[d])`` per dimension: root-mean-square of h over the tokens."""
        return np.sqrt(self.sumsq.sum(0) / self.count.sum())

    def check(self, n_docs: int | None = None, d_model: int | None = None, layer: int | None = None) -> "TokenStats":
        where = "" if layer is None else f"layer {layer}: "
        n, d = self.sum.shape
        require(
            self.sumsq.shape == (n, d) and self.count.shape == (n,) and self.ratio_max.shape == (d,),
            f"{where}token statistics have inconsistent shapes (sum {self.sum.shape}, sumsq "
            f"{self.sumsq.shape}, count {self.count.shape}, ratio_max {self.ratio_max.shape}).",
        )
        require(n_docs is None or n == n_docs,
                f"{where}token statistics hold {n} documents, not {n_docs}: re-run notebook 02.")
        require(d_model is None or d == d_model,
                f"{where}token statistics have width {d}, not {d_model}: re-run notebook 02.")
        require(bool((self.count > 0).all()), f"{where}some documents have no counted tokens.")
        require(bool(np.isfinite(self.sum).all() and np.isfinite(self.sumsq).all()),
                f"{where}token statistics hold NaN or inf values: re-run notebook 02 in float32.")
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {**{f: getattr(self, f) for f in _STAT_FIELDS}, "skip_first": np.array(self.skip_first)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "TokenStats":
        missing = [f for f in (*_STAT_FIELDS, "skip_first") if f not in arrays]
        require(not missing, f"token statistics lack {missing}; re-run notebook 02.")
        return cls(**{f: np.asarray(arrays[f]) for f in _STAT_FIELDS}, skip_first=int(arrays["skip_first"]))

    @classmethod
    def from_tokens(cls, docs: Sequence[np.ndarray], skip_first: int = 1) -> "TokenStats":
        """Statistics of documents given as token matrices ``[T_d, D]`` (numpy reference path)."""
        require(len(docs) > 0, "from_tokens: no documents given.")
        parts = []
        for d, h in enumerate(docs):
            h = np.asarray(h, dtype=np.float64)
            require(h.ndim == 2 and len(h) > 0, f"document {d}: expected a non-empty [tokens, D] matrix.")
            part = batch_token_stats(torch.from_numpy(h)[None], torch.ones(1, len(h), dtype=torch.long), skip_first)
            parts.append(part)
        return merge_batches(parts, [np.array([d]) for d in range(len(docs))], len(docs), skip_first)


def _median_abs(a: torch.Tensor) -> torch.Tensor:
    """Median over the last axis (the mean of the two middle values when it has even length)."""
    s = a.sort(-1).values
    D = a.shape[-1]
    return (s[..., (D - 1) // 2] + s[..., D // 2]) / 2


def kept_mask(attention_mask: torch.Tensor, skip_first: int) -> torch.Tensor:
    """Boolean ``[b, s]``: real tokens after the row's first ``skip_first`` real ones.

    Works for left and right padding (the rank of a real token is the running count of
    real tokens up to it). A row with ``≤ skip_first`` real tokens keeps all of them.
    """
    require(isinstance(skip_first, (int, np.integer)) and skip_first >= 0,
            f"skip_first must be an integer ≥ 0, got {skip_first!r}.")
    real = attention_mask.bool()
    rank = real.long().cumsum(1)  # 1 at a row's first real token
    keep = real & (rank > skip_first)
    too_short = ~keep.any(1)
    return torch.where(too_short[:, None], real, keep)


def batch_token_stats(hidden: torch.Tensor, attention_mask: torch.Tensor, skip_first: int) -> dict[str, torch.Tensor]:
    """One batch's moments ``sum, sumsq [b, D]``, ``count [b]`` (float64) and detector parts.

    Detector parts: ``ratio_max, abs_max [D]`` and, per dimension, the batch row
    ``peak_row`` and real-token position ``peak_pos`` where the ratio peaks.
    """
    h = hidden.double()
    keep = kept_mask(attention_mask, skip_first)
    w = keep.to(h.dtype).unsqueeze(-1)
    real = attention_mask.bool().unsqueeze(-1)
    a = hidden.abs()  # the detector in the input's precision (a ratio needs no float64)
    ratio = a / _median_abs(a).clamp_min(torch.finfo(a.dtype).tiny).unsqueeze(-1)
    zero = torch.zeros((), dtype=a.dtype)
    b, s, D = h.shape
    ratio_max, flat = torch.where(real, ratio, zero).reshape(b * s, D).max(0)
    abs_max = torch.where(real, a, zero).reshape(b * s, D).max(0).values
    row, col = flat // s, flat % s
    mask = attention_mask.bool()
    first_pos = mask.long().argmax(1)  # position of each row's first real token
    return {
        "sum": (h * w).sum(1),
        "sumsq": (h * h * w).sum(1),
        "count": keep.sum(1).to(torch.int64),
        "ratio_max": ratio_max.double(),
        "abs_max": abs_max.double(),
        "peak_row": row,
        "peak_pos": col - first_pos[row],
    }


def merge_batches(parts: Sequence[Mapping[str, torch.Tensor]], rows: Sequence[np.ndarray], n_docs: int,
                  skip_first: int) -> TokenStats:
    """Assemble per-batch :func:`batch_token_stats` results (batch ``j`` holds documents ``rows[j]``)."""
    D = int(parts[0]["sum"].shape[1])
    out = {"sum": np.zeros((n_docs, D)), "sumsq": np.zeros((n_docs, D)), "count": np.zeros(n_docs, dtype=np.int64)}
    ratio_max, abs_max = np.full(D, -np.inf), np.zeros(D)
    peak_doc, peak_pos = np.zeros(D, dtype=np.int64), np.zeros(D, dtype=np.int64)
    for part, idx in zip(parts, rows):
        idx = np.asarray(idx)
        for f in ("sum", "sumsq", "count"):
            out[f][idx] = part[f].cpu().numpy()
        r = part["ratio_max"].cpu().numpy()
        better = r > ratio_max
        ratio_max[better] = r[better]
        peak_doc[better] = idx[part["peak_row"].cpu().numpy()[better]]
        peak_pos[better] = part["peak_pos"].cpu().numpy()[better]
        abs_max = np.maximum(abs_max, part["abs_max"].cpu().numpy())
    return TokenStats(**out, ratio_max=ratio_max, abs_max=abs_max, peak_doc=peak_doc, peak_pos=peak_pos,
                      skip_first=int(skip_first))


def _stats_of(stats: TokenStats | Mapping[int, TokenStats], layer: int | None) -> TokenStats:
    if isinstance(stats, TokenStats):
        return stats
    require(layer is not None, "give the layer when passing token statistics of several layers.")
    require(int(layer) in stats, f"no token statistics for layer {layer} (available: {sorted(stats)}).")
    return stats[int(layer)]


def massive_dimensions(
    stats: TokenStats | Mapping[int, TokenStats],
    layer: int | None = None,
    threshold: float = MASSIVE_THRESHOLD,
) -> list[int]:
    """Dimensions ``i`` with ``max_{d,t} |h_i(d,t)| / median_j |h_j(d,t)| > threshold``, largest ratio first."""
    s = _stats_of(stats, layer)
    require(threshold > 0, f"the massive-activation threshold must be > 0, got {threshold!r}.")
    dims = np.flatnonzero(s.ratio_max > threshold)
    return [int(i) for i in dims[np.argsort(-s.ratio_max[dims], kind="stable")]]


def massive_table(
    stats: TokenStats | Mapping[int, TokenStats],
    layer: int | None = None,
    threshold: float = MASSIVE_THRESHOLD,
    top: int = 8,
) -> pd.DataFrame:
    """The ``top`` dimensions by max ratio: ``dim, max_ratio, max_abs, peak_doc, peak_pos,
    at_first_token, massive`` (``massive``: ratio > threshold; every massive dim is listed)."""
    s = _stats_of(stats, layer)
    n_massive = int((s.ratio_max > threshold).sum())
    order = np.argsort(-s.ratio_max, kind="stable")[: max(top, n_massive)]
    return pd.DataFrame({
        "dim": order.astype(np.int64),
        "max_ratio": s.ratio_max[order],
        "max_abs": s.abs_max[order],
        "peak_doc": s.peak_doc[order],
        "peak_pos": s.peak_pos[order],
        "at_first_token": s.peak_pos[order] == 0,
        "massive": s.ratio_max[order] > threshold,
    })


def massive_summary(stats: Mapping[int, TokenStats], threshold: float = MASSIVE_THRESHOLD) -> pd.DataFrame:
    """One row per layer: ``layer, massive_dims, max_ratio, max_abs, at_first_token``.

    ``massive_dims`` lists the dimensions whose ratio exceeds ``threshold`` (largest first);
    ``max_ratio`` / ``max_abs`` are the layer's largest ratio and ``|h|`` over all dimensions;
    ``at_first_token`` says whether every massive dimension peaks at a document's first token.
    """
    rows = []
    for layer in sorted(stats):
        s = stats[layer]
        dims = massive_dimensions(s, threshold=threshold)
        rows.append({
            "layer": int(layer),
            "massive_dims": dims,
            "max_ratio": float(s.ratio_max.max()),
            "max_abs": float(s.abs_max.max()),
            "at_first_token": bool((s.peak_pos[dims] == 0).all()) if dims else None,
        })
    return pd.DataFrame(rows)


def token_mean_difference_scores(
    stats: TokenStats,
    labels: Sequence[int] | np.ndarray,
    n_clusters: int,
    standardize: bool = False,
) -> np.ndarray:
    """Token-level ``S [K, D]`` from per-document moments (``stats`` rows aligned with ``labels``).

    With ``N_k = Σ_{d∈D_k} count[d]`` tokens in cluster k and ``N_rest`` elsewhere,
    ``μ_k = Σ_{d∈D_k} sum[d] / N_k``, ``μ_rest = Σ_{d∉D_k} sum[d] / N_rest`` and
    ``S(i,k) = μ_k,i − μ_rest,i``: every token weighs the same, however long its document.
    ``standardize=True`` divides by the pooled within-group token standard deviation
    ``√((SS_k + SS_rest) / (N_k + N_rest − 2))`` with ``SS_G = Σ_{d∈G} sumsq[d] − N_G μ_G²``
    (Cohen's d over tokens; 0 where there is no spread).
    """
    labels = np.asarray(labels)
    require(len(labels) == stats.n_docs, f"{stats.n_docs} documents of token statistics for {len(labels)} labels.")
    onehot = np.eye(n_clusters)[labels]  # [n, K]
    count = stats.count.astype(np.float64)
    n_in = onehot.T @ count  # [K]
    n_out = count.sum() - n_in
    require(bool((n_in > 0).all() and (n_out > 0).all()), "every cluster and its rest need counted tokens.")
    sum_in = onehot.T @ stats.sum
    mean_in = sum_in / n_in[:, None]
    mean_out = (stats.sum.sum(0) - sum_in) / n_out[:, None]
    scores = mean_in - mean_out
    if not standardize:
        return scores
    sq_in = onehot.T @ stats.sumsq
    ss_in = sq_in - n_in[:, None] * mean_in**2
    ss_out = (stats.sumsq.sum(0) - sq_in) - n_out[:, None] * mean_out**2
    dof = (n_in + n_out - 2)[:, None]
    pooled = np.sqrt(np.clip(ss_in + ss_out, 0, None) / np.maximum(dof, 1))
    return np.divide(scores, pooled, out=np.zeros_like(scores), where=pooled > 0)


__all__ = [
    "MASSIVE_THRESHOLD",
    "TokenStats",
    "kept_mask",
    "batch_token_stats",
    "merge_batches",
    "massive_dimensions",
    "massive_table",
    "massive_summary",
    "token_mean_difference_scores",
]
