import numpy as np
import pytest
import torch

from rephelpers.representations.activations import (
    between_cluster_r2,
    extract_activations,
    load_activations,
    load_token_stats,
    save_activations,
)
from rephelpers.artifacts import RunDir
from rephelpers.errors import RephelpersError
from rephelpers.representations.tokenstats import TokenStats

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


_HF_CACHE: dict = {}


def hf_hidden(model, text, layer, max_length=64):
    """Independent reference: HF output_hidden_states of one text (no padding), ``[T, d]``.

    One forward per text, shared by every layer and test of this module."""
    if text not in _HF_CACHE:
        enc = model.tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
        with torch.inference_mode():
            _HF_CACHE[text] = model.hf(**enc, output_hidden_states=True).hidden_states
    return _HF_CACHE[text][layer + 1][0].double()


def hf_pooled(model, texts, layer, pooling, skip_first=1):
    """Mean over positions skip_first..T−1 of each text (all of them if T ≤ skip_first), or the last."""
    rows = []
    for text in texts:
        hs = hf_hidden(model, text, layer)
        kept = hs[skip_first:] if len(hs) > skip_first else hs
        rows.append(kept.mean(0) if pooling == "mean" else hs[-1])
    return torch.stack(rows).numpy()


@pytest.mark.model
@pytest.mark.parametrize("pooling, skip_first", [("mean", 1), ("mean", 0), ("last", 1)])
def test_activations_equal_hf_hidden_states(model, isolated_cache, pooling, skip_first):
    layers = [0, 5, 17]
    acts = extract_activations(model, TEXTS, layers, pooling=pooling, batch_size=3, max_length=64, progress=False,
                               skip_first=skip_first)
    for layer in layers:
        expected = hf_pooled(model, TEXTS, layer, pooling, skip_first)
        assert acts[layer].shape == (len(TEXTS), model.d_model)
        # Tolerance 1e-4, relative for the few "massive activation" dims (|h| ≈ 7e3, where
        # float32 itself resolves only ~5e-4) and absolute for everything else.
        np.testing.assert_allclose(acts[layer], expected, atol=1e-4, rtol=1e-4)


SHORT = ["Hi", "The cat sat on the mat.", "Q: 3 + 4 = ? A: 7. Next, 5 + 6 = 11."]  # 1, 7 and 20 tokens


@pytest.mark.model
def test_skip_first_pooling_and_token_stats_equal_hand_computation(model, isolated_cache):
    layers = [3, 15]
    with pytest.warns(UserWarning, match="1 texts have ≤ skip_first = 1 tokens"):
        acts, stats = extract_activations(model, SHORT, layers, batch_size=3, max_length=64, progress=False,
                                          return_stats=True)
    for layer in layers:
        hidden = [hf_hidden(model, text, layer).numpy() for text in SHORT]
        assert [len(h) for h in hidden][0] == 1 and len({len(h) for h in hidden}) == 3
        kept = [h[1:] if len(h) > 1 else h for h in hidden]  # the one-token text falls back to its token
        expected = np.stack([k.mean(0) for k in kept])
        np.testing.assert_allclose(acts[layer], expected, atol=1e-4, rtol=1e-4)
        s = stats[layer]
        assert s.count.tolist() == [len(k) for k in kept] and s.skip_first == 1
        np.testing.assert_allclose(s.sum, np.stack([k.sum(0) for k in kept]), atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(s.sumsq, np.stack([(k**2).sum(0) for k in kept]), rtol=1e-4, atol=1e-3)
        # The detector: max over every token, the first (sink) token included.
        tokens = np.concatenate(hidden)
        ratio = np.abs(tokens) / np.median(np.abs(tokens), axis=1, keepdims=True)
        np.testing.assert_allclose(s.ratio_max, ratio.max(0), rtol=1e-3)
        np.testing.assert_allclose(s.abs_max, np.abs(tokens).max(0), rtol=1e-4, atol=1e-4)
        top = int(ratio.max(0).argmax())
        starts = np.cumsum([0] + [len(h) for h in hidden])
        doc = int(np.searchsorted(starts, ratio[:, top].argmax(), side="right") - 1)
        assert (s.peak_doc[top], s.peak_pos[top]) == (doc, ratio[:, top].argmax() - starts[doc])
    # skip_first is part of the cache key: the plain mean is computed afresh, not served.
    plain = extract_activations(model, SHORT, [3], max_length=64, progress=False, skip_first=0)
    np.testing.assert_allclose(plain[3], np.stack([hf_hidden(model, t, 3).numpy().mean(0) for t in SHORT]),
                               atol=1e-4, rtol=1e-4)
    # and read back from the cache with the same statistics
    again, stats_again = extract_activations(model, SHORT, layers, max_length=64, progress=False, return_stats=True)
    np.testing.assert_array_equal(again[15], acts[15])
    np.testing.assert_array_equal(stats_again[15].sumsq, stats[15].sumsq)


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
    assert load_token_stats(run) is None  # a run without token statistics
    stats = TokenStats.from_tokens([np.random.default_rng(d).normal(size=(d + 2, 8)) for d in range(4)])
    save_activations(run, ["a", "b", "c", "d"], {3: stats.pooled()}, "resid", "mean", key="k2", stats={3: stats})
    back = load_token_stats(run)
    assert load_activations(run)[2]["skip_first"] == 1 and list(back) == [3]
    for field in ("sum", "sumsq", "count", "ratio_max", "peak_pos"):
        np.testing.assert_array_equal(getattr(back[3], field), getattr(stats, field))


def test_between_cluster_r2_matches_sklearn_style_anova():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 20)
    X = rng.normal(size=(60, 5)) + labels[:, None] * 3.0
    total = ((X - X.mean(0)) ** 2).sum()
    within = sum(((X[labels == k] - X[labels == k].mean(0)) ** 2).sum() for k in range(3))
    assert between_cluster_r2(X, labels) == pytest.approx(1 - within / total)
