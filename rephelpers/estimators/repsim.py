"""Representation similarity (RepSim): cosine between an item's and a document's pooled hidden states.

For layer ``l`` of stage 02's activations, a document's vector ``A_l(d)`` is its pooled
hidden state and an item's ``A_l(x)`` the same pooling (same component, pooling,
``skip_first`` and token budget, through the same extraction code) over ``context +
answer``. The score is the cosine averaged over the chosen layers ``L``:

    score(d, x) = (1/|L|) Σ_{l∈L} ⟨A_l(d), A_l(x)⟩ / (‖A_l(d)‖ ‖A_l(x)‖).

Rank evidence only: a higher similarity says a document resembles an item in the
model's own representation, not that training on it caused the ability (no causal
scale; read Φ from it through rank agreement and the permutation test).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import require
from ..representations.activations import extract_activations
from ..representations.models import Model


def cosine_scores(doc_vectors: Mapping[int, np.ndarray], item_vectors: Mapping[int, np.ndarray]) -> np.ndarray:
    """``[n_docs, n_items]``: cosine of every document with every item, averaged over the layers of both maps."""
    layers = sorted(doc_vectors)
    require(layers and sorted(item_vectors) == layers,
            f"cosine_scores: documents have layers {layers}, items {sorted(item_vectors)}; they must match.")
    total = None
    for l in layers:
        d = np.asarray(doc_vectors[l], dtype=np.float64)
        x = np.asarray(item_vectors[l], dtype=np.float64)
        d = d / np.clip(np.linalg.norm(d, axis=1, keepdims=True), 1e-12, None)
        x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
        total = d @ x.T if total is None else total + d @ x.T
    return total / len(layers)


def repsim_scores(
    model: Model,
    documents: pd.DataFrame,
    items: pd.DataFrame,
    activations: tuple[Sequence[str], Mapping[int, np.ndarray], Mapping],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    use_cache: bool = True,
) -> pd.DataFrame:
    """Document-level scores (``id, ability, item_id, score``) by :func:`cosine_scores`.

    ``activations`` is :func:`rephelpers.representations.activations.load_activations`'s
    ``(ids, {layer: array}, meta)`` of the run; ``layers`` a subset of its layers (``None``:
    all of them). The items are run through ``model`` (which must be the model stage 02
    read) with the pooling recorded in ``meta``; ``use_cache`` reads and writes their pooled
    states in the user cache like stage 02's.
    """
    ids, acts, meta = activations
    available = sorted(int(l) for l in acts)
    chosen = available if layers is None else sorted({int(l) for l in layers})
    absent = [l for l in chosen if l not in available]
    require(chosen and not absent, f"repsim: layers {absent or chosen} are not among stage 02's activations "
                                   f"{available}; pick from those or add them in notebook 02.")
    if meta.get("model") is not None:
        require(meta["model"] == model.name,
                f"repsim: stage 02's activations come from {meta['model']!r} but the model given is {model.name!r}; "
                "set model_name to the model of notebook 02.")
    max_length = meta.get("max_tokens")
    require(max_length is not None, "repsim: stage 02's activations do not record max_tokens; re-run notebook 02.")
    position = {str(i): j for j, i in enumerate(ids)}
    doc_ids = documents["id"].astype(str).tolist()
    missing = [i for i in doc_ids if i not in position]
    require(not missing, f"repsim: {len(missing)} documents (e.g. {missing[:3]}) have no stage-02 activations; "
                         "re-run notebook 02 on this run's documents.")
    rows = np.array([position[i] for i in doc_ids])
    texts = (items["context"] + items["answer"]).astype(str).tolist()
    item_acts = extract_activations(model, texts, chosen, component=meta["component"], pooling=meta["pooling"],
                                    batch_size=batch_size, max_length=int(max_length),
                                    skip_first=int(meta.get("skip_first", 1)), progress=progress,
                                    use_cache=use_cache)
    scores = cosine_scores({l: np.asarray(acts[l])[rows] for l in chosen}, item_acts)
    return pd.DataFrame({
        "id": np.repeat(np.array(doc_ids, dtype=object), len(items)),
        "ability": np.tile(items["ability"].to_numpy(), len(doc_ids)),
        "item_id": np.tile(items["item_id"].astype(str).to_numpy(), len(doc_ids)),
        "score": scores.ravel(),
    })
