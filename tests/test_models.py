import pytest
import torch

from rephelpers.errors import RephelpersError
from rephelpers.interventions.intervene import Intervention, run_logits
from rephelpers.representations.models import load_model
from rephelpers.interventions.edits import Ablate


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


# -- device, dtype, device_map -------------------------------------------------------------


def test_device_and_dtype_choices_fail_before_any_weights_are_read():
    with pytest.raises(RephelpersError, match="dtype 'int8' is not one.*float32', 'bfloat16', 'float16'"):
        load_model(dtype="int8")
    with pytest.raises(RephelpersError, match="pass device .* or device_map .*not both"):
        load_model(device="cpu", device_map="auto")
    with pytest.raises(RephelpersError, match="device='tpu'"):
        load_model(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RephelpersError, match="torch sees no CUDA GPU here.*device='cpu'"):
            load_model(device="cuda")


@pytest.mark.model
def test_a_bfloat16_model_hands_on_float32_activations_close_to_float32s(model):
    """Weights in bfloat16 (as on a GPU), activations gathered to CPU float32; keys tell the two apart."""
    from rephelpers.representations.activations import extract_activations
    from rephelpers.representations.models import model_fingerprint

    half = load_model(dtype="bfloat16", device="cpu")
    assert half.hf.dtype == torch.bfloat16 and model_fingerprint(half) != model_fingerprint(model)
    assert model_fingerprint(model).count("|") == 3  # float32's key is the one written before dtypes existed
    texts = ["Photosynthesis turns light into chemical energy.", "def add(a, b):\n    return a + b"]
    full = extract_activations(model, texts, [3, 15], use_cache=False, progress=False)
    low = extract_activations(half, texts, [3, 15], use_cache=False, progress=False)
    for layer in (3, 15):
        assert low[layer].dtype.name == full[layer].dtype.name == "float32"
        error = float(((low[layer] - full[layer]) ** 2).sum() ** 0.5 / (full[layer] ** 2).sum() ** 0.5)
        assert error < 0.05, f"layer {layer}: bfloat16 activations {error:.3f} away (relative) from float32's"
    # A perturbation acts on bfloat16 hidden states as a plain hook does. bfloat16 keeps ~3 digits, so two
    # op orders (the nnsight trace, the bare module) already differ unperturbed, by an amount that depends
    # on the CPU's bfloat16 kernels (0.046 in mean |logit| on an AVX-512 BF16 CPU, ~0.06 on another): that
    # floor is measured here, the same way, and the perturbed gap must stay within twice it, with the
    # perturbation's own effect at least 10x the gap.
    batch = half.encode(texts)
    with torch.inference_mode():
        plain = half.hf(**batch).logits
    real = batch["attention_mask"].bool()
    floor = (run_logits(half, batch, []).float() - plain.float()).abs()[real].mean().item()
    dims = list(range(1, half.d_model, 8))
    logits = run_logits(half, batch, [Intervention(layer=9, perturbation=Ablate(dims=dims))])

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[..., dims] = 0
        return output

    handle = half.hf.model.layers[9].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            expected = half.hf(**batch).logits
    finally:
        handle.remove()
    assert logits.dtype == torch.bfloat16
    gap = (logits.float() - expected.float()).abs()[real].mean().item()
    effect = (plain.float() - expected.float()).abs()[real].mean().item()
    assert floor < 0.1 and gap < 2 * floor + 0.01 and effect > 10 * gap, (floor, gap, effect)
    assert torch.equal(logits.argmax(-1)[real], expected.argmax(-1)[real])


@pytest.mark.model
def test_device_map_auto_reaches_from_pretrained_and_gives_the_same_logits(model, monkeypatch):
    """On a machine without GPUs accelerate keeps every layer on the CPU; the map must still reach it."""
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    placed = load_model(device_map="auto", max_length=2047)  # a max_length of its own: not the memoised copy
    assert seen.get("device_map") == "auto"
    batch = model.encode(["The quick brown fox jumps over the lazy dog."])
    with torch.inference_mode():
        expected = model.hf(**batch).logits
        got = placed.hf(**{k: v.to(placed.device) for k, v in batch.items()}).logits
    assert torch.allclose(got.cpu(), expected, atol=1e-5)
