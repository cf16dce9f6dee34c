"""Stage 02: per-document hidden representations, read through nnsight.

For document ``d`` with real tokens ``t = 1..T`` and hidden states ``h_l(d, t)`` at the
chosen ``(layer l, component)`` site, pooling gives one vector per document:

- ``mean``: ``A_l(d) = (1/(T−s)) Σ_{t>s} h_l(d, t)`` (padding excluded) with
  ``s = skip_first`` leading real tokens left out (default 1: SmolLM2's first token is an
  attention sink whose "massive activations", ~7·10³ on a few dimensions, would otherwise
  dominate the mean and make it track the document's length). A document with
  ``T ≤ s`` tokens is averaged over all its tokens instead. ``skip_first=0`` is the plain
  mean over every real token.
- ``last``: ``A_l(d) = h_l(d, T)``.

The same pass can also collect token-level statistics (per-document sums, sums of
squares and token counts, and a massive-activation detector; see
:mod:`rephelpers.representations.tokenstats`), so that stage 03 can compute exact token-level scores.

One nnsight trace per batch saves every requested layer at once. Results are cached in
the user cache keyed by (model, texts, component, pooling, max_length, skip_first), one
file per layer (plus one ``.stats.npz`` per layer for the token statistics), so adding a
layer later computes only that layer.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import nnsight
import numpy as np
import torch

from ..artifacts import RunDir, stable_hash
from ..errors import RephelpersError, require
from ..paths import cache_subdir
from ..progress import progress_bar
from .models import Model, model_fingerprint, output_tensor
from .tokenstats import TokenStats, batch_token_stats, kept_mask, merge_batches

POOLINGS = ("mean", "last")
ACTIVATIONS_DIR = "activations"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, skip_first: int = 1) -> torch.Tensor:
    """Pool ``hidden [b, s, d]`` over real tokens given an ``attention_mask [b, s]`` (left or right padding).

    ``mean`` leaves out each row's first ``skip_first`` real tokens (the attention sink, or
    a masked LM's [CLS]; a row with ``≤ skip_first`` real tokens is averaged over all of
    them); ``last`` takes each row's last real token (a masked LM's [SEP]) and ignores
    ``skip_first``.
    """
    if pooling == "mean":
        mask = kept_mask(attention_mask, skip_first).to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_real_index(attention_mask).to(hidden.device)]
    raise RephelpersError(f"unknown pooling {pooling!r}: use one of {POOLINGS}")


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[b]``: each row's last position with ``attention_mask = 1`` (the final position under left padding)."""
    from_end = torch.flip(attention_mask.bool(), dims=[1]).int().argmax(dim=1)
    return attention_mask.shape[1] - 1 - from_end


def _extract_batches(
    model: Model,
    texts: Sequence[str],
    layers: Sequence[int],
    component: str,
    pooling: str,
    batch_size: int,
    max_length: int,
    progress: bool,
    skip_first: int,
) -> tuple[dict[int, np.ndarray], dict[int, TokenStats], int]:
    out = {l: np.zeros((len(texts), model.d_model), dtype=np.float32) for l in layers}
    parts: dict[int, list] = {l: [] for l in layers}
    rows: list[np.ndarray] = []
    too_short = 0
    # Longest first: padding waste is smallest and a too-long batch fails early.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    bar = progress_bar(total=len(texts), desc=f"activations ({len(layers)} layers)", disable=not progress, unit="doc")
    sites = {l: model.envoy(l, component) for l in layers}
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = model.encode([texts[j] for j in idx], max_length=max_length)
        with torch.inference_mode():
            with model.trace(dict(batch)) as tracer:
                # One dict made and saved in the block (a remote run sends back only what the
                # block saves), filled by a plain loop: nnsight runs the block's own code, and
                # names bound inside a comprehension's scope are not handed back.
                saved = nnsight.save({})
                for l, site in sites.items():
                    saved[l] = output_tensor(site.output)
                # Nothing past the deepest requested layer is needed: not the layers after
                # it, and not the output head (a 576 x 49,152 product per token for SmolLM2,
                # about a fifth of the whole forward pass).
                tracer.stop()
        mask = batch["attention_mask"]
        too_short += int((mask.sum(1) <= skip_first).sum())
        rows.append(idx)
        for l, hidden in saved.items():
            out[l][idx] = pool(hidden.float(), mask, pooling, skip_first).cpu().numpy()
            parts[l].append(batch_token_stats(hidden.float(), mask, skip_first))
        bar.update(len(idx))
    bar.close()
    stats = {l: merge_batches(parts[l], rows, len(texts), skip_first) for l in layers}
    return out, stats, too_short


def extract_activations(
    model: Model,
    texts: Sequence[str],
    layers: Sequence[int],
    component: str = "resid",
    pooling: str = "mean",
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool = True,
    use_cache: bool = True,
    skip_first: int = 1,
    return_stats: bool = False,
) -> dict[int, np.ndarray] | tuple[dict[int, np.ndarray], dict[int, TokenStats]]:
    """Pooled activations ``{layer: float32 array [len(texts), d_model]}`` in ``texts`` order.

    ``skip_first`` (default 1) is the number of leading real tokens of each text left out
    of mean pooling and of the token statistics (0: the old plain mean; texts with
    ``≤ skip_first`` tokens are averaged over all their tokens, with a warning). With
    ``return_stats=True`` the result is ``(acts, stats)`` with ``stats[layer]`` a
    :class:`~rephelpers.representations.tokenstats.TokenStats` (per-text token sums, sums of squares and
    counts, and the massive-activation detector), computed in the same forward pass.

    Everything is validated before the first forward pass: layers, component, pooling,
    non-empty texts. Cached layers are read back; only missing layers are computed.
    """
    require(len(texts) > 0, "extract_activations: no texts given.")
    empty = [i for i, t in enumerate(texts) if not str(t).strip()]
    require(not empty, f"extract_activations: texts {empty[:5]} are empty; drop them from the corpus.")
    require(pooling in POOLINGS, f"unknown pooling {pooling!r}: use one of {POOLINGS}")
    require(len(layers) > 0, "extract_activations: no layers requested.")
    layers = sorted({model.check_layer(int(l)) for l in layers})
    model.check_component(component)
    require(batch_size >= 1 and max_length >= 2, "batch_size must be ≥1 and max_length ≥2")
    require(isinstance(skip_first, (int, np.integer)) and 0 <= skip_first < max_length,
            f"skip_first must be an integer in 0..{max_length - 1} (max_length − 1), got {skip_first!r}.")
    skip_first = int(skip_first)

    key = stable_hash(model_fingerprint(model), list(texts), component, pooling, max_length,
                      {"skip_first": skip_first})
    folder = cache_subdir("activations") / key
    result: dict[int, np.ndarray] = {}
    stats: dict[int, TokenStats] = {}
    if use_cache:
        for l in layers:
            path = folder / f"L{l:02d}.npy"
            stats_path = folder / f"L{l:02d}.stats.npz"
            if path.exists() and (not return_stats or stats_path.exists()):
                result[l] = _read_cached(path, len(texts), model.d_model)
                if return_stats:
                    stats[l] = _read_stats(stats_path, len(texts), model.d_model)
    missing = [l for l in layers if l not in result]
    if missing:
        fresh, fresh_stats, too_short = _extract_batches(
            model, texts, missing, component, pooling, batch_size, max_length, progress, skip_first
        )
        if too_short:
            warnings.warn(
                f"{too_short} texts have ≤ skip_first = {skip_first} tokens: they are averaged over "
                "all their tokens (the first included).", stacklevel=2,
            )
        for l, arr in fresh.items():
            require(
                bool(np.isfinite(arr).all()),
                f"layer {l} produced non-finite activations (NaN/inf): check the model's dtype "
                "(float16 on CPU overflows) and its inputs.",
            )
            if use_cache:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f"L{l:02d}.stats.tmp.npz"
                np.savez(tmp, **fresh_stats[l].to_arrays())
                tmp.replace(folder / f"L{l:02d}.stats.npz")
                tmp = folder / f"L{l:02d}.tmp.npy"
                np.save(tmp, arr)
                tmp.replace(folder / f"L{l:02d}.npy")
        result.update(fresh)
        stats.update(fresh_stats)
    acts = {l: result[l] for l in layers}
    if return_stats:
        return acts, {l: stats[l] for l in layers}
    return acts


def _read_stats(path: Path, n: int, d: int) -> TokenStats:
    try:
        with np.load(path) as data:
            stats = TokenStats.from_arrays({k: data[k] for k in data.files})
        return stats.check(n, d)
    except Exception as err:  # truncated, foreign or inconsistent file
        raise RephelpersError(
            f"the token-statistics file {path} is corrupt or inconsistent ({err}). Delete it (or "
            "its folder) and run again; it will be recomputed."
        ) from err


def _read_cached(path: Path, n: int, d: int) -> np.ndarray:
    try:
        arr = np.load(path)
    except Exception as err:  # truncated or foreign file
        raise RephelpersError(
            f"the activation cache file {path} is corrupt ({err}). Delete it (or its folder) and "
            "run again; it will be recomputed."
        ) from err
    if arr.shape != (n, d) or not np.isfinite(arr).all():
        raise RephelpersError(
            f"the activation cache file {path} has shape {arr.shape} (expected {(n, d)}) or "
            "non-finite values. Delete it and run again; it will be recomputed."
        )
    return arr


def save_activations(
    run_dir: RunDir | str,
    ids: Sequence[str],
    acts: dict[int, np.ndarray],
    component: str,
    pooling: str,
    key: str,
    stats: Mapping[int, TokenStats] | None = None,
    **meta: object,
) -> Path:
    """Write ``activations/{component}_L{layer:02d}.npy`` + ``index.json`` into the run dir.

    With ``stats`` (from ``extract_activations(..., return_stats=True)``) every layer's
    token statistics go to ``{component}_L{layer:02d}.stats.npz`` too (read them back with
    :func:`load_token_stats`); ``index.json`` records ``token_stats`` and ``skip_first``.
    """
    run = RunDir(run_dir)
    if stats is not None:
        absent = sorted(set(acts) - set(stats))
        require(not absent, f"save_activations: no token statistics for layers {absent}.")
        skips = {int(stats[l].skip_first) for l in acts}
        require(len(skips) == 1, f"save_activations: the layers' token statistics mix skip_first values {skips}.")
        meta.setdefault("skip_first", skips.pop())
    index = {
        "ids": list(map(str, ids)),
        "layers": sorted(acts),
        "component": component,
        "pooling": pooling,
        "d_model": int(next(iter(acts.values())).shape[1]),
        "key": key,
        "token_stats": stats is not None,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **meta,
    }

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for layer, arr in acts.items():
            np.save(tmp / f"{component}_L{layer:02d}.npy", arr.astype(np.float32, copy=False))
            if stats is not None:
                np.savez(tmp / f"{component}_L{layer:02d}.stats.npz", **stats[layer].to_arrays())
        (tmp / "index.json").write_text(json.dumps(index, indent=2))

    return run.save(ACTIVATIONS_DIR, key, write, component=component, pooling=pooling, layers=index["layers"])


def load_activations(
    run_dir: RunDir | str,
    layers: Sequence[int] | None = None,
) -> tuple[list[str], dict[int, np.ndarray], dict]:
    """Read stage 02's output: ``(document ids, {layer: array}, index metadata)``."""
    run = RunDir(run_dir)
    folder = run.require(ACTIVATIONS_DIR, "notebook 02_representations")
    try:
        meta = json.loads((folder / "index.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RephelpersError(
            f"{folder / 'index.json'} is missing or corrupt ({err}); re-run notebook 02."
        ) from err
    available = meta["layers"]
    wanted = available if layers is None else [int(l) for l in layers]
    absent = [l for l in wanted if l not in available]
    require(
        not absent,
        f"layers {absent} were not extracted (available: {available}). Add them to `layers` "
        "in notebook 02 and re-run it.",
    )
    acts = {}
    for l in wanted:
        path = folder / f"{meta['component']}_L{l:02d}.npy"
        acts[l] = _read_cached(path, len(meta["ids"]), meta["d_model"])
    return meta["ids"], acts, meta


def load_token_stats(
    run_dir: RunDir | str,
    layers: Sequence[int] | None = None,
) -> dict[int, TokenStats] | None:
    """Stage 02's token statistics ``{layer: TokenStats}``, or None when that run has none.

    None means notebook 02 ran before token statistics existed (or was given none):
    token-level scores and massive-dimension detection are then unavailable until it is
    re-run.
    """
    ids, _, meta = load_activations(run_dir, layers=[])
    if not meta.get("token_stats"):
        return None
    folder = RunDir(run_dir).path(ACTIVATIONS_DIR)
    wanted = meta["layers"] if layers is None else [int(l) for l in layers]
    absent = [l for l in wanted if l not in meta["layers"]]
    require(not absent, f"layers {absent} were not extracted (available: {meta['layers']}).")
    return {
        l: _read_stats(folder / f"{meta['component']}_L{l:02d}.stats.npz", len(ids), meta["d_model"])
        for l in wanted
    }


def between_cluster_r2(X: np.ndarray, labels: np.ndarray) -> float:
    """Share of variance explained by cluster means.

    ``R² = Σ_k n_k ‖μ_k − μ‖² / Σ_d ‖A(d) − μ‖²`` (0: no cluster structure, 1: all of it).
    """
    X = np.asarray(X, dtype=np.float64)
    mu = X.mean(0)
    total = ((X - mu) ** 2).sum()
    between = sum(
        (labels == k).sum() * ((X[labels == k].mean(0) - mu) ** 2).sum() for k in np.unique(labels)
    )
    return float(between / total) if total > 0 else 0.0


def pca_2d(X: np.ndarray) -> np.ndarray:
    """First two principal-component scores of ``X`` (centred SVD)."""
    Xc = np.asarray(X, dtype=np.float64) - np.mean(X, axis=0)
    u, s, _ = np.linalg.svd(Xc, full_matrices=False)
    return u[:, :2] * s[:2]


