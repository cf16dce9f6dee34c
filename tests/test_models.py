import pytest
import torch

from rephelpers.errors import RephelpersError
from rephelpers.perturbations.intervene import Intervention, run_logits
from rephelpers.representations.models import load_model
from rephelpers.perturbations.kinds import Ablate


def test_unknown_model_offline_is_a_clear_error():
    with pytest.raises(RephelpersError, match="not available offline.*huggingface-cli download"):
        load_model("no-such-org/no-such-model-xyz")


@pytest.mark.model
def test_embedded_model_shape(model):
    assert (model.n_layers, model.d_model) == (30, 576)
    assert model.hf.dtype == torch.float32
    assert model.tokenizer.padding_side == "left"


@pytest.mark.model
@pytest.mark.parametrize("layer", [30, -31, 100])
def test_layer_out_of_range(model, layer):
    with pytest.raises(RephelpersError, match="out of range.*0..29"):
        model.check_layer(layer)


@pytest.mark.model
def test_unknown_component(model):
    with pytest.raises(RephelpersError, match="unknown component"):
        model.envoy(3, "mlp_out")


@pytest.mark.model
@pytest.mark.parametrize("component", ["resid", "mlp", "attn"])
def test_nnsight_ablation_equals_plain_torch_hook(model, component):
    """The same zeroing done by nnsight and by a hand-written forward hook gives the same logits."""
    batch = model.encode(["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b"])
    dims = [0, 7, 100, 575]
    layer = 6

    def hook(module, args, output):
        if isinstance(output, tuple):
            hidden = output[0].clone()
            hidden[..., dims] = 0
            return (hidden,) + output[1:]
        hidden = output.clone()
        hidden[..., dims] = 0
        return hidden

    handle = model.module(layer, component).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            expected = model.hf(**batch).logits
    finally:
        handle.remove()
    with torch.inference_mode():
        clean = model.hf(**batch).logits
    got = run_logits(model, batch, [Intervention(Ablate(tuple(dims)), layer=layer, component=component)])
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
    assert (got - clean).abs().max() > 1e-2  # the edit did something


@pytest.mark.model
def test_last_position_scope_only_changes_last_token_state(model):
    batch = model.encode(["one two three four", "alpha beta"])
    iv = Intervention(Ablate(tuple(range(50))), layer=4, positions="last")
    clean = run_logits(model, batch, [])
    edited = run_logits(model, batch, [iv])
    # Earlier positions cannot see a later position (causal attention): unchanged.
    assert torch.allclose(edited[:, :-1], clean[:, :-1], atol=1e-4)
    assert (edited[:, -1] - clean[:, -1]).abs().max() > 1e-2
