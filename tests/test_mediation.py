"""Causal mediation through nnsight against a plain torch forward hook."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rephelpers.errors import RephelpersError
from rephelpers.dimensions.mediation import mediation_by_cluster, mediation_effects, reference_means
from rephelpers.views.charts import mediation_chart
from rephelpers.representations.models import load_model, output_tensor, replace_output

pytestmark = pytest.mark.model

LAYER = 4
CLUSTER_TEXTS = ["def add(a, b):\n    return a + b", "for i in range(3):\n    print(i)"]
OTHER_TEXTS = ["The river flows gently to the sea.", "She bought bread at the market today."]


@pytest.fixture(scope="module")
def model():
    return load_model()


def hook_nll_per_token(model, texts, layer, dim=None, value=None):
    """Σ NLL / Σ tokens with h[..., dim] := value set by a forward hook, one unpadded text at a time."""

    def set_dimension(module, inputs, output):
        h = output_tensor(output).clone()
        h[..., dim] = value
        return replace_output(output, h)

    handle = model.module(layer, "resid").register_forward_hook(set_dimension) if dim is not None else None
    total, tokens = 0.0, 0
    try:
        for text in texts:
            ids = model.tokenizer(text, return_tensors="pt")["input_ids"][:, :32]
            with torch.no_grad():
                logits = model.hf(ids).logits
            total += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    finally:
        if handle is not None:
            handle.remove()
    return total / tokens


def test_indirect_effect_equals_hooked_nll_difference(model):
    dims, values = [5, 100], [0.0, 3.0]
    effects = mediation_effects(model, CLUSTER_TEXTS, None, LAYER, dims, values=values, max_length=32,
                                progress=False)
    original = hook_nll_per_token(model, CLUSTER_TEXTS, LAYER)
    assert effects.nll_original.iloc[0] == pytest.approx(original, rel=1e-4)
    for dim, value in zip(dims, values):
        row = effects.set_index("dim").loc[dim]
        expected = hook_nll_per_token(model, CLUSTER_TEXTS, LAYER, dim, value) - original
        assert row.indirect_effect == pytest.approx(expected, rel=1e-3, abs=1e-5)
        assert row.value == value
    assert list(effects["rank"]) == [1, 2]
    assert effects.indirect_effect.is_monotonic_decreasing
    assert effects.indirect_effect.abs().max() > 1e-4  # the intervention did something


def test_reference_means_are_token_means(model):
    captured = []
    handle = model.module(LAYER, "resid").register_forward_hook(
        lambda module, inputs, output: captured.append(output_tensor(output)[0].detach())
    )
    try:
        for text in OTHER_TEXTS:
            with torch.no_grad():
                model.hf(model.tokenizer(text, return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    expected = torch.cat(captured).double().mean(0).numpy()
    np.testing.assert_allclose(reference_means(model, OTHER_TEXTS, LAYER), expected, rtol=1e-4, atol=1e-4)


def test_bad_inputs_fail_before_compute(model):
    with pytest.raises(RephelpersError, match="out of range"):
        mediation_effects(model, CLUSTER_TEXTS, OTHER_TEXTS, LAYER, [model.d_model])
    with pytest.raises(RephelpersError, match="no cluster texts"):
        mediation_effects(model, [], OTHER_TEXTS, LAYER, [1])
    with pytest.raises(RephelpersError, match="give texts_other"):
        mediation_effects(model, CLUSTER_TEXTS, None, LAYER, [1])
    with pytest.raises(RephelpersError, match="out of range"):
        mediation_effects(model, CLUSTER_TEXTS, OTHER_TEXTS, 99, [1])


def test_mediation_by_cluster_uses_heldout_texts_and_subspace_means(model):
    documents = pd.DataFrame({
        "text": CLUSTER_TEXTS + OTHER_TEXTS,
        "cluster": [0, 0, 1, 1],
        "split": ["train", "heldout", "heldout", "train"],
    })
    d = model.d_model
    subspaces = [
        {"layer": LAYER, "cluster": k, "component": "resid", "dims": [7, 3, 9], "mean_out": list(np.full(d, 0.5))}
        for k in (0, 1)
    ]
    effects = mediation_by_cluster(model, documents, subspaces, LAYER, top_n=1, n_texts=4, max_length=32,
                                   progress=False)
    assert list(effects.cluster) == [0, 1] and list(effects.dim) == [7, 7]
    for k, text in ((0, CLUSTER_TEXTS[1]), (1, OTHER_TEXTS[0])):
        expected = hook_nll_per_token(model, [text], LAYER, 7, 0.5) - hook_nll_per_token(model, [text], LAYER)
        assert effects.set_index("cluster").loc[k, "indirect_effect"] == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert isinstance(mediation_chart(effects).to_dict(), dict)
    with pytest.raises(RephelpersError, match=r"covered layers \[4\]"):
        mediation_by_cluster(model, documents, subspaces, LAYER + 1)
