"""Token-level statistics, token-level S(i,k) and the massive-activation detector (synthetic data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rephelpers.dimensions.association import find_cluster_components
from rephelpers.errors import RephelpersError
from rephelpers.representations.tokenstats import (
    TokenStats,
    batch_token_stats,
    kept_mask,
    massive_dimensions,
    massive_table,
    merge_batches,
    token_mean_difference_scores,
)

D = 12


def random_docs(rng, lengths, d=D):
    return [rng.normal(size=(t, d)) for t in lengths]


def test_from_tokens_matches_brute_force():
    rng = np.random.default_rng(0)
    docs = random_docs(rng, [5, 1, 3, 8])
    stats = TokenStats.from_tokens(docs, skip_first=1)
    for d, h in enumerate(docs):
        kept = h[1:] if len(h) > 1 else h  # a one-token document keeps its only token
        np.testing.assert_allclose(stats.sum[d], kept.sum(0))
        np.testing.assert_allclose(stats.sumsq[d], (kept**2).sum(0))
        assert stats.count[d] == len(kept)
    np.testing.assert_allclose(stats.pooled()[0], docs[0][1:].mean(0))
    everything = np.concatenate([h[1:] if len(h) > 1 else h for h in docs])
    np.testing.assert_allclose(stats.token_rms(), np.sqrt((everything**2).mean(0)))
    # The detector sees every token, the skipped first ones included.
    tokens = np.concatenate(docs)
    ratio = np.abs(tokens) / np.median(np.abs(tokens), axis=1, keepdims=True)
    np.testing.assert_allclose(stats.ratio_max, ratio.max(0))
    np.testing.assert_allclose(stats.abs_max, np.abs(tokens).max(0))


def test_left_padded_batches_equal_per_document_stats():
    rng = np.random.default_rng(1)
    lengths = [6, 2, 4, 1]
    docs = random_docs(rng, lengths)
    S = max(lengths)
    hidden = torch.zeros(len(docs), S, D, dtype=torch.float64)
    mask = torch.zeros(len(docs), S, dtype=torch.long)
    for b, h in enumerate(docs):
        hidden[b, S - len(h):] = torch.from_numpy(h)
        hidden[b, : S - len(h)] = 1e6  # padding garbage must not leak into anything
        mask[b, S - len(h):] = 1
    assert kept_mask(mask, 1).sum(1).tolist() == [5, 1, 3, 1]
    # two batches, documents in shuffled order
    order = [np.array([2, 0]), np.array([3, 1])]
    parts = [batch_token_stats(hidden[idx], mask[idx], 1) for idx in order]
    batched = merge_batches(parts, order, len(docs), 1)
    reference = TokenStats.from_tokens(docs, skip_first=1)
    for field in ("sum", "sumsq", "count", "ratio_max", "abs_max", "peak_doc", "peak_pos"):
        np.testing.assert_allclose(getattr(batched, field), getattr(reference, field), err_msg=field)


def test_massive_dimension_is_detected_at_the_first_token():
    rng = np.random.default_rng(2)
    docs = random_docs(rng, [4, 7, 3])
    for h in docs:
        h[0, 5] = 3000.0  # the sink: huge on dim 5 at each document's first token
    docs[1][3, 9] = 50.0  # large, but below the threshold's ratio
    stats = TokenStats.from_tokens(docs, skip_first=1)
    assert massive_dimensions(stats) == [5]
    assert massive_dimensions({7: stats}, layer=7, threshold=10) == [5, 9]
    table = massive_table(stats, top=3)
    row = table.iloc[0]
    assert row.dim == 5 and row.massive and row.at_first_token and row.max_abs == pytest.approx(3000.0)
    assert table.massive.sum() == 1 and len(table) == 3
    assert table.set_index("dim").loc[9, "peak_pos"] == 3 and table.set_index("dim").loc[9, "peak_doc"] == 1
    # skipped for the moments
    assert abs(stats.pooled()[:, 5]).max() < 10


def brute_force_token_scores(docs, labels, k, standardize):
    inside = np.concatenate([h for h, y in zip(docs, labels) if y == k])
    outside = np.concatenate([h for h, y in zip(docs, labels) if y != k])
    diff = inside.mean(0) - outside.mean(0)
    if not standardize:
        return diff
    ss = ((inside - inside.mean(0)) ** 2).sum(0) + ((outside - outside.mean(0)) ** 2).sum(0)
    return diff / np.sqrt(ss / (len(inside) + len(outside) - 2))


@pytest.mark.parametrize("standardize", [False, True])
def test_token_level_scores_match_brute_force(standardize):
    rng = np.random.default_rng(3)
    lengths = [3, 9, 2, 5, 6, 4, 7]
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    docs = random_docs(rng, lengths)
    for h, y in zip(docs, labels):
        h[:, y] += 1.5
    stats = TokenStats.from_tokens(docs, skip_first=0)
    S = token_mean_difference_scores(stats, labels, 3, standardize)
    for k in range(3):
        np.testing.assert_allclose(S[k], brute_force_token_scores(docs, labels, k, standardize), atol=1e-12)


@pytest.fixture(scope="module")
def sink_corpus():
    """Token matrices where dim 3 is the sink (huge at position 0) and cluster-dependent there,
    plus a planted cluster signal on dims 10+k; long documents in cluster 0 only."""
    rng = np.random.default_rng(4)
    K, per, d = 3, 12, 24
    labels = np.repeat(np.arange(K), per)
    docs = []
    for y in labels:
        h = rng.normal(size=(int(rng.integers(4, 9)) + (8 if y == 0 else 0), d))
        h[:, 10 + y] += 1.0
        h[0, 3] = 2000.0 + 500.0 * y  # massive, and it differs between clusters
        docs.append(h)
    split = np.where(np.arange(len(labels)) % 4 == 3, "heldout", "train")
    stats = TokenStats.from_tokens(docs, skip_first=0)  # keep the sink in the moments
    return {"docs": docs, "labels": labels, "split": split, "stats": stats}


def test_find_cluster_components_keeps_massive_dims_out_of_r_k(sink_corpus):
    c = sink_corpus
    acts = {2: c["stats"].pooled()}
    kwargs = dict(top_k=2, rank=1, with_probe=False, with_leace=False, progress=False)
    _, kept = find_cluster_components(acts, c["labels"], c["split"], keep_massive=True,
                                      token_stats={2: c["stats"]}, **kwargs)
    _, default = find_cluster_components(acts, c["labels"], c["split"], token_stats={2: c["stats"]}, **kwargs)
    assert 3 in kept[2].dims  # cluster 2 has the largest sink value: dim 3 tops its raw S
    for s in default:
        assert s.massive_dims == (3,) and 3 not in s.dims and s.keep_massive is False
        assert 10 + s.cluster in s.dims
    train = c["split"] == "train"
    tokens = np.concatenate([h for h, t in zip(c["docs"], train) if t])
    np.testing.assert_allclose(default[0].token_rms, np.sqrt((tokens**2).mean(0)))
    # Without token statistics nothing is detected and token_rms is None.
    _, plain = find_cluster_components(acts, c["labels"], c["split"], **kwargs)
    assert plain[0].massive_dims == () and plain[0].token_rms is None


def test_token_level_scores_in_find_cluster_components(sink_corpus):
    c = sink_corpus
    acts = {2: c["stats"].pooled()}
    dims, subspaces = find_cluster_components(
        acts, c["labels"], c["split"], top_k=2, rank=1, with_probe=False, with_leace=False, progress=False,
        token_stats={2: c["stats"]}, token_level=True, standardize=True,
    )
    train = c["split"] == "train"
    docs = [h for h, t in zip(c["docs"], train) if t]
    for k in range(3):
        expected = brute_force_token_scores(docs, c["labels"][train], k, standardize=True)
        got = dims[dims.cluster == k].sort_values("dim").score.to_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-10)
        assert subspaces[k].token_level is True and subspaces[k].dims[0] == 10 + k
    assert all(s.massive_dims == (3,) and 3 not in s.dims for s in subspaces)


def test_massive_exclusion_edge_cases(sink_corpus):
    c = sink_corpus
    acts = {2: c["stats"].pooled()}
    base = dict(rank=1, with_probe=False, with_leace=False, progress=False)
    with pytest.warns(UserWarning, match="fewer than top_k"):
        _, subspaces = find_cluster_components(acts, c["labels"], c["split"], top_k=24,
                                               token_stats={2: c["stats"]}, **base)
    assert sorted(subspaces[0].dims) == [i for i in range(24) if i != 3]
    with pytest.raises(RephelpersError, match="selects no dimension"):
        find_cluster_components(acts, c["labels"], c["split"], tau=5.0, top_k=None,
                                token_stats={2: c["stats"]}, **base)
    with pytest.raises(RephelpersError, match="token_level=True needs"):
        find_cluster_components(acts, c["labels"], c["split"], top_k=2, token_level=True, **base)
    with pytest.raises(RephelpersError, match="token_stats lack layers"):
        find_cluster_components(acts, c["labels"], c["split"], top_k=2, token_stats={5: c["stats"]}, **base)
