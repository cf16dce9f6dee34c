"""Interventions inside the forward pass (nnsight) against plain torch forward hooks."""

import numpy as np
import pytest
import torch

from rephelpers.representations.activations import pool
from rephelpers.errors import RephelpersError
from rephelpers.interventions.intervene import (
    Intervention, eager_attention, forward_readout, forward_readouts, run_logits, sequence_nll,
)
from rephelpers.interventions.edits import Ablate, Gradient, Leace, Noise, Project, Shift
from rephelpers.interventions.tokenkeys import token_keys

pytestmark = pytest.mark.model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b"]
LAYER = 5


@pytest.fixture(scope="module")
def batch(model):
    return model.encode(TEXTS, max_length=16)


@pytest.fixture(scope="module")
def clean(model, batch):
    with torch.inference_mode():
        return model.hf(**batch).logits


def _hooked_logits(model, batch, edits):
    """Logits of a plain HF forward with ``edits = [(layer, fn(h) -> h)]`` as forward hooks."""
    handles = []
    for layer, fn in edits:
        def hook(module, args, output, fn=fn):
            return fn(output)
        handles.append(model.module(layer, "resid").register_forward_hook(hook))
    try:
        with torch.inference_mode():
            return model.hf(**batch).logits
    finally:
        for handle in handles:
            handle.remove()


def _cases(d):
    rng = np.random.default_rng(0)
    dims = [3, 50, 400]
    v = rng.normal(size=d)
    basis = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
    w = rng.normal(size=d)
    mean, left, right = rng.normal(size=d), rng.normal(size=(1, d)) / 10, rng.normal(size=(1, d)) / 10
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731

    def zero(h):
        h = h.clone()
        h[..., dims] = 0
        return h

    return [
        (Ablate(dims), zero),
        (Shift(v, alpha=0.5), lambda h: h + 0.5 * f32(v)),
        (Project(basis), lambda h: h - (h @ f32(basis).T) @ f32(basis)),
        (Gradient(w, epsilon=0.3), lambda h: h - 0.3 * torch.sign(f32(w))),
        (Leace(mean, left, right), lambda h: h - ((h - f32(mean)) @ f32(right).T) @ f32(left)),
    ]


@pytest.mark.parametrize("case", range(5), ids=["ablate", "shift", "project", "gradient", "leace"])
def test_each_perturbation_equals_a_hook(model, batch, clean, case):
    perturbation, formula = _cases(model.d_model)[case]
    expected = _hooked_logits(model, batch, [(LAYER, formula)])
    got = run_logits(model, batch, [Intervention(perturbation, LAYER)])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (got - clean).abs().max() > 1e-2, "the perturbation must change the logits"


def test_noise_is_placed_like_a_hook(model, batch):
    # The noise draw itself is tested in test_perturbations; this checks the site and the keys.
    noise = Noise([1, 2, 3], sigma=3.0, seed=5)
    keys = token_keys(batch["input_ids"], batch["attention_mask"]).keys
    expected = _hooked_logits(model, batch, [(LAYER, lambda h: noise.apply(h, keys))])
    got = run_logits(model, batch, [Intervention(noise, LAYER)])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


NOISE = Noise(tuple(range(0, 576, 4)), sigma=4.0, seed=3)
ALONE = "Noise must not depend on the company a text keeps."
LONGER = "def mean(values):\n    total = sum(values)\n    return total / len(values)  # a longer row"


@pytest.mark.parametrize("positions", ["all", "last"])
def test_noise_is_batch_invariant(model, positions):
    # The same text alone, and left-padded in the second row of a batch with a longer text.
    ivs = [Intervention(NOISE, LAYER, positions=positions)]
    alone = model.encode([ALONE])
    batch = model.encode([LONGER, ALONE])
    n = alone["input_ids"].shape[1]
    assert batch["attention_mask"][1].sum() == n < batch["input_ids"].shape[1]  # padded, at another row
    got_alone = run_logits(model, alone, ivs)[0]
    got_batch = run_logits(model, batch, ivs)[1, -n:]
    torch.testing.assert_close(got_batch, got_alone, atol=2e-3, rtol=1e-4)
    with torch.inference_mode():
        clean = model.hf(**alone).logits[0]
    assert (got_alone - clean).abs().max() > 0.5, "the noise must change the logits"
    # Per-text perplexity goes through the same keys.
    nll_alone, _ = sequence_nll(model, [ALONE], ivs, progress=False)
    nll_batch, _ = sequence_nll(model, [LONGER, ALONE], ivs, progress=False)
    assert abs(nll_alone[0] - nll_batch[1]) < 1e-3


def test_noise_is_keyed_by_the_input_not_the_batch_position(model):
    # Two different texts at the same row and padding get different noise.
    readout = {}
    for text in (ALONE, ALONE.replace("company", "friends")):
        batch = model.encode([text])
        readout[text] = forward_readout(model, batch, [Intervention(NOISE, LAYER)], read_layers=[LAYER]).pooled[LAYER]
        clean = forward_readout(model, batch, (), read_layers=[LAYER]).pooled[LAYER]
        readout[text] = (readout[text] - clean)[0, list(NOISE.dims)]
    first, second = readout.values()
    assert (first - second).abs().max() > 0.1


def test_last_position_only(model, batch, clean):
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))

    def last(h):
        h = h.clone()
        h[:, -1] += 2.0 * v
        return h

    expected = _hooked_logits(model, batch, [(LAYER, last)])
    got = run_logits(model, batch, [Intervention(Shift(v.numpy(), alpha=2.0), LAYER, positions="last")])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    # earlier positions see nothing (causal attention), up to kernel rounding
    assert (got[:, :-1] - clean[:, :-1]).abs().max() < 1e-3 < (got[:, -1] - clean[:, -1]).abs().max()


def test_composition_applies_in_order(model, batch):
    dims = [7, 8, 9]
    v = np.zeros(model.d_model)
    v[dims] = 5.0
    basis = np.eye(model.d_model)[[100]]

    def shift_then_ablate(h):
        h = h + torch.as_tensor(v, dtype=h.dtype)
        h[..., dims] = 0
        return h

    def project(h):
        h = h.clone()
        h[..., 100] = 0
        return h

    expected = _hooked_logits(model, batch, [(3, shift_then_ablate), (7, project)])
    # given out of forward order across sites: validate sorts sites, keeps order within one
    ivs = [Intervention(Project(basis), 7), Intervention(Shift(v), 3), Intervention(Ablate(dims), 3)]
    got = run_logits(model, batch, ivs)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    reversed_order = run_logits(model, batch, [ivs[0], ivs[2], ivs[1]])
    assert (reversed_order - got).abs().max() > 1e-2


def test_readout_matches_plain_forward(model, batch):
    shift = Intervention(Shift(np.full(model.d_model, 0.5)), LAYER)
    implementation = model.hf.config._attn_implementation
    base = forward_readout(model, batch, (), read_layers=[LAYER, 9], attention_layers=[9])
    perturbed = forward_readout(model, batch, [shift], read_layers=[LAYER, 9], attention_layers=[9])
    assert model.hf.config._attn_implementation == implementation, "eager attention is switched back off"
    with eager_attention(model), torch.inference_mode():
        out = model.hf(**batch, output_hidden_states=True, output_attentions=True)
    mask = batch["attention_mask"]
    for layer in (LAYER, 9):
        torch.testing.assert_close(base.pooled[layer], pool(out.hidden_states[layer + 1], mask, "mean"),
                                   atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(base.attention[9], out.attentions[9], atol=1e-5, rtol=1e-5)
    # the read-out at the intervention site is the perturbed state
    torch.testing.assert_close(perturbed.pooled[LAYER], base.pooled[LAYER] + 0.5, atol=1e-4, rtol=1e-5)
    assert (perturbed.attention[9] - base.attention[9]).abs().max() > 1e-4
    nll, count = sequence_nll(model, TEXTS, max_length=16, progress=False)
    np.testing.assert_allclose(base.nll.numpy(), nll, rtol=1e-4)
    np.testing.assert_array_equal(base.count.numpy(), count)


@pytest.mark.parametrize(
    "perturbation, message",
    [(Ablate([576]), "out of range"), (Shift([1.0] * 10), "direction has"), (Project([]), "rank 0")],
)
def test_bad_perturbations_fail_before_compute(model, perturbation, message):
    with pytest.raises(RephelpersError, match=message):
        sequence_nll(model, TEXTS, [Intervention(perturbation, LAYER)], progress=False)


def test_arms_sharing_the_layers_below_them_read_out_exactly_as_full_passes(model):
    batch = model.encode(TEXTS + ["Licensed under the Apache License, Version 2.0."], max_length=24)
    arms = {
        "ablate9": [Intervention(Ablate(tuple(range(0, 576, 4))), 9)],
        "noise12": [Intervention(Noise(tuple(range(60)), sigma=3.0, seed=2), 12)],
        "shift9+ablate20": [Intervention(Shift(tuple([0.3] * 576)), 9), Intervention(Ablate((1, 2, 3)), 20)],
    }
    read = [3, 10, 29]  # layer 3 lies below every arm: its readout is the unperturbed one
    original, shared = forward_readouts(model, batch, arms, read)
    expected_original = forward_readout(model, batch, (), read)
    assert original.state is None  # the kept state is dropped once every arm has used it
    torch.testing.assert_close(original.nll, expected_original.nll, rtol=0, atol=0)
    for arm, ivs in arms.items():
        full = forward_readout(model, batch, ivs, read)
        torch.testing.assert_close(shared[arm].nll, full.nll, rtol=0, atol=0)
        for layer in read:
            torch.testing.assert_close(shared[arm].pooled[layer], full.pooled[layer], rtol=0, atol=0)
        assert (shared[arm].nll - original.nll).abs().max() > 0.01
    with pytest.raises(RephelpersError, match="resumes at layer 9"):
        forward_readout(model, batch, arms["ablate9"], [3], resume=(9, None))
