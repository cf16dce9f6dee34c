"""Causal mediation (Vig et al., 2020): does a dimension carry a cluster's computation?

A high S(i,k) says dimension ``i`` *differs* on cluster k; mediation asks whether the
model *uses* that difference. For cluster-k texts ``x`` and a candidate dimension ``i`` at
a ``(layer, component)`` site, the indirect effect is

    IE_i = NLL(x | do(h_i = μ_i^other)) − NLL(x),

where ``NLL`` is the next-token negative log-likelihood per predicted token over the
texts (``Σ NLL / Σ tokens``; for a masked LM the pseudo-NLL ``−Σ PLL / Σ tokens``, each
token masked in turn, and the effects table gets ``nll_kind = "pseudo-NLL"``) and ``do(h_i = μ_i^other)`` sets dimension ``i`` at that site,
at every token, to its mean on other-cluster inputs, leaving everything upstream
untouched: the mediator takes the value of the control condition while the input
stays cluster k. ``IE_i > 0`` means the cluster-specific value of ``h_i`` helps the model
predict cluster-k text. The intervention is
``Ablate(dims=(i,), values=(μ_i^other,))`` applied through nnsight by
:func:`rephelpers.interventions.intervene.forward_readouts`, the forward pass stage 04 uses (the layers
below ``layer`` run once for all candidate dimensions).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .components import ClusterComponents, MeanReference, as_components
from ..errors import require
from ..interventions.intervene import Intervention, forward_readouts, likelihood_names, site_states
from ..interventions.edits import Ablate
from ..progress import progress_bar
from ..representations.models import Model


def reference_means(
    model: Model,
    texts: Sequence[str],
    layer: int,
    component: str = "resid",
    batch_size: int = 8,
    max_length: int = 128,
) -> np.ndarray:
    """``μ [d]``: mean of ``h`` at ``(layer, component)`` over every real token of ``texts``."""
    require(len(texts) > 0, "reference_means: no texts given.")
    layer = model.check_layer(layer)
    model.check_component(component)
    total = torch.zeros(model.d_model, dtype=torch.float64)
    tokens = 0.0
    for batch, hidden in site_states(model, texts, layer, component, batch_size, max_length):
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float64)
        total += (hidden.to(torch.float64) * mask).sum((0, 1)).cpu()
        tokens += float(mask.sum())
    return (total / tokens).numpy()


def _nll_per_token(
    model: Model, texts: Sequence[str], arms: Mapping[int, Sequence[Intervention]], batch_size: int, max_length: int,
    progress: bool, desc: str,
) -> dict[int | None, float]:
    """``Σ NLL / Σ predicted tokens`` over ``texts``, unperturbed (key None) and under each arm.

    Batched as :func:`rephelpers.interventions.intervene.sequence_nll` batches (longest texts
    first); per batch the layers below the arms' layer run once
    (:func:`rephelpers.interventions.intervene.forward_readouts`)."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    nll = dict.fromkeys([None, *arms], 0.0)
    count = 0.0
    for start in progress_bar(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
        batch = model.encode([texts[j] for j in order[start : start + batch_size]], max_length=max_length)
        original, perturbed = forward_readouts(model, batch, arms)
        for key, readout in ((None, original), *perturbed.items()):
            nll[key] += float(readout.nll.double().sum())
        count += float(original.count.sum())
    return {key: value / count for key, value in nll.items()}


def mediation_effects(
    model: Model,
    texts_k: Sequence[str],
    texts_other: Sequence[str] | None,
    layer: int,
    dims: Sequence[int],
    component: str = "resid",
    values: Sequence[float] | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool = True,
) -> pd.DataFrame:
    """Indirect effect ``IE_i`` of each dimension in ``dims`` on the NLL of ``texts_k``.

    ``values`` gives μ_i^other directly (e.g. a subspace's ``mean_out``, the mean pooled
    activation of the other clusters' training documents); without it μ^other is the
    token mean over ``texts_other`` (:func:`reference_means`). Costs ``len(dims) + 1``
    forward passes over ``texts_k``: keep both short.

    Returns one row per dimension, largest effect first: ``dim, value (μ_i^other),
    nll_original, nll_intervened`` (per token) ``, indirect_effect, rank`` (and, for a
    masked LM, ``nll_kind``: the NLLs are pseudo-NLLs).
    """
    require(len(texts_k) > 0, "mediation_effects: no cluster texts given (is the cluster empty?).")
    dims = [int(i) for i in dims]
    require(len(dims) > 0, "mediation_effects: no candidate dimensions given.")
    require(len(set(dims)) == len(dims), f"mediation_effects: dims repeat: {dims}.")
    layer = model.check_layer(layer)
    model.check_component(component)
    bad = [i for i in dims if not 0 <= i < model.d_model]
    require(not bad, f"dimensions {bad} are out of range for hidden size {model.d_model}.")
    if values is None:
        require(
            texts_other is not None and len(texts_other) > 0,
            "mediation_effects: give texts_other (to measure μ^other) or values (μ^other itself).",
        )
        values = reference_means(model, texts_other, layer, component, batch_size, max_length)[dims]
    values = [float(v) for v in values]
    require(len(values) == len(dims), f"{len(values)} reference values for {len(dims)} dimensions.")
    require(bool(np.isfinite(values).all()), "mediation_effects: the reference values hold NaN or inf.")

    arms = {dim: [Intervention(Ablate(dims=(dim,), values=(value,)), layer, component)] for dim, value in zip(dims, values)}
    per_token = _nll_per_token(model, texts_k, arms, batch_size, max_length, progress, f"mediation L{layer}")
    original = per_token.pop(None)
    rows = [{"dim": dim, "value": value, "nll_original": original, "nll_intervened": per_token[dim],
             "indirect_effect": per_token[dim] - original} for dim, value in zip(dims, values)]
    effects = pd.DataFrame(rows).sort_values("indirect_effect", ascending=False, kind="stable")
    effects = effects.assign(rank=np.arange(1, len(effects) + 1)).reset_index(drop=True)
    return effects.assign(nll_kind=likelihood_names(model).nll) if model.masked else effects


def mediation_by_cluster(
    model: Model,
    documents: pd.DataFrame,
    components: Sequence[ClusterComponents],
    layer: int,
    top_n: int = 8,
    n_texts: int = 8,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`mediation_effects` for every cluster's first ``top_n`` dimensions of R_k at ``layer``.

    Texts are the cluster's first ``n_texts`` *held-out* documents (the dimensions were
    chosen on training documents, so the test is not circular); μ^other is the
    components' ``mean_out``. Returns the rows of every cluster with a ``cluster`` column.
    """
    require(top_n >= 1 and n_texts >= 1, "top_n and n_texts must be ≥ 1.")
    missing = {"text", "cluster", "split"} - set(documents.columns)
    require(not missing, f"documents lack columns {sorted(missing)} (documents.parquet from notebook 01).")
    components = [as_components(c) for c in components]
    at_layer = sorted((c for c in components if c.layer == layer), key=lambda c: c.cluster)
    require(
        bool(at_layer),
        f"no cluster components at layer {layer}; stage 03 covered layers {sorted({c.layer for c in components})}.",
    )
    model.check_layer(layer)
    texts = {}
    for c in at_layer:
        rows = documents[(documents.cluster == c.cluster) & (documents.split == "heldout")]
        require(len(rows) > 0, f"cluster {c.cluster} has no held-out documents to measure mediation on.")
        texts[c.cluster] = rows.text.head(n_texts).tolist()
    frames = []
    for c in progress_bar(at_layer, desc="clusters", disable=not progress, leave=False):
        reference = MeanReference.of(c, "mediation")
        dims, mean_out = list(reference.dims[:top_n]), reference.mean_out
        component = c.component or "resid"
        effects = mediation_effects(
            model, texts[c.cluster], None, layer, dims, component,
            values=[float(mean_out[i]) for i in dims], batch_size=batch_size, max_length=max_length,
            progress=progress,
        )
        frames.append(effects.assign(cluster=c.cluster, layer=layer, component=component))
    return pd.concat(frames, ignore_index=True)


__all__ = ["reference_means", "mediation_effects", "mediation_by_cluster"]
