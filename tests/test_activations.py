import numpy as np
import pytest
import torch

from rephelpers.activations import (
    between_cluster_r2,
    extract_activations,
    load_activations,
    save_activations,
)
from rephelpers.artifacts import RunDir
from rephelpers.errors import RephelpersError

TEXTS = [
    "import os\nfor name in os.listdir('.'):\n    print(name)",
    "The licensee may redistribute the software provided that the above copyright notice is retained.",
    "Q: Tom has 3 apples and buys 4 more. How many apples? A: 3 + 4 = 7.",
    "Short text.",
    "A considerably longer piece of prose about documentation, describing how the interpreter evaluates "
    "expressions and statements in order, with several clauses to make it the longest one here.",
]


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPHELPERS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def hf_pooled(model, texts, layer, pooling):
    """Independent reference: HF output_hidden_states, one text at a time (no padding)."""
    rows = []
    for text in texts:
        enc = model.tokenizer(text, return_tensors="pt", truncation=True, max_length=64)
        with torch.inference_mode():
            hs = model.hf(**enc, output_hidden_states=True).hidden_states[layer + 1][0]
        rows.append(hs.mean(0) if pooling == "mean" else hs[-1])
    return torch.stack(rows).numpy()


@pytest.mark.model
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_activations_equal_hf_hidden_states(model, isolated_cache, pooling):
    layers = [0, 5, 17]
    acts = extract_activations(model, TEXTS, layers, pooling=pooling, batch_size=3, max_length=64, progress=False)
    for layer in layers:
        expected = hf_pooled(model, TEXTS, layer, pooling)
        assert acts[layer].shape == (len(TEXTS), model.d_model)
        # Tolerance 1e-4, relative for the few "massive activation" dims (|h| ≈ 7e3, where
        # float32 itself resolves only ~5e-4) and absolute for everything else.
        np.testing.assert_allclose(acts[layer], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.model
def test_cache_reuses_layers_and_detects_corruption(model, isolated_cache):
    first = extract_activations(model, TEXTS[:3], [2], max_length=32, progress=False)
    files = list(isolated_cache.rglob("L02.npy"))
    assert len(files) == 1
    # A cached layer is read back, bit for bit.
    again = extract_activations(model, TEXTS[:3], [2], max_length=32, progress=False)
    np.testing.assert_array_equal(first[2], again[2])
    files[0].write_bytes(b"not a numpy file")
    with pytest.raises(RephelpersError, match="corrupt.*Delete it"):
        extract_activations(model, TEXTS[:3], [2], max_length=32, progress=False)


@pytest.mark.model
def test_bad_inputs_fail_before_compute(model, isolated_cache):
    with pytest.raises(RephelpersError, match="out of range"):
        extract_activations(model, TEXTS, [3, 99], progress=False)
    with pytest.raises(RephelpersError, match="no texts"):
        extract_activations(model, [], [3], progress=False)
    with pytest.raises(RephelpersError, match="empty"):
        extract_activations(model, ["fine", "  "], [3], progress=False)
    with pytest.raises(RephelpersError, match="pooling"):
        extract_activations(model, TEXTS, [3], pooling="max", progress=False)


def test_save_and_load_round_trip(tmp_path):
    run = RunDir(tmp_path / "run")
    acts = {3: np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)}
    save_activations(run, ["a", "b", "c", "d"], acts, "resid", "mean", key="k1")
    ids, loaded, meta = load_activations(run)
    assert ids == ["a", "b", "c", "d"] and meta["component"] == "resid"
    np.testing.assert_array_equal(loaded[3], acts[3])
    with pytest.raises(RephelpersError, match=r"layers \[5\] were not extracted"):
        load_activations(run, layers=[5])


def test_between_cluster_r2_matches_sklearn_style_anova():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 20)
    X = rng.normal(size=(60, 5)) + labels[:, None] * 3.0
    total = ((X - X.mean(0)) ** 2).sum()
    within = sum(((X[labels == k] - X[labels == k].mean(0)) ** 2).sum() for k in range(3))
    assert between_cluster_r2(X, labels) == pytest.approx(1 - within / total)
