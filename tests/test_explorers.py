"""The explorers of notebooks 02 and 03, built headless: what each view shows against an independent computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rephelpers.dimensions.association import find_cluster_components
from rephelpers.errors import RephelpersError
from rephelpers.views.charts import critical_set_chart, pca_chart
from rephelpers.views.explorers import dimension_explorer, representation_explorer

K, PER, D = 3, 20, 16


@pytest.fixture(scope="module")
def planted():
    """Layer 9 separates the clusters (cluster k shifted on dims 2k, 2k+1); layer 3 is noise."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(K), PER)
    noise = rng.normal(size=(len(labels), D))
    shifted = noise.copy()
    for k in range(K):
        shifted[np.ix_(labels == k, [2 * k, 2 * k + 1])] += 4.0
    docs = pd.DataFrame({
        "id": [f"d{i}" for i in range(len(labels))],
        "domain": np.where(labels == 0, "math", "prose"),
        "cluster": labels,
        "text": [f"text {i}" for i in range(len(labels))],
        "split": np.where(np.arange(len(labels)) % 4 == 3, "heldout", "train"),
    })
    return docs, {3: noise.astype(np.float32), 9: shifted.astype(np.float32)}


def r2_by_hand(X, labels):
    X = X.astype(np.float64)
    total = ((X - X.mean(0)) ** 2).sum()
    within = sum(((X[labels == k] - X[labels == k].mean(0)) ** 2).sum() for k in np.unique(labels))
    return 1 - within / total


def chart_rows(chart_dict):
    return chart_dict["datasets"][next(iter(chart_dict["datasets"]))]


def test_representation_explorer_titles_each_layer_with_its_r2(planted):
    docs, acts = planted
    explorer = representation_explorer(docs, acts, "resid", "mean")
    layer_menu, colour = explorer.children[:2]
    assert layer_menu.value == 9  # the middle of [3, 9]
    title = explorer.result.to_dict()["title"]
    assert f"R² = {r2_by_hand(acts[9], docs.cluster.to_numpy()):.3f}" in title
    layer_menu.value = 3
    title = explorer.result.to_dict()["title"]
    assert title.startswith("Layer 3") and f"R² = {r2_by_hand(acts[3], docs.cluster.to_numpy()):.3f}" in title
    colour.value = "domain"
    encoding = explorer.result.to_dict()["encoding"]
    assert encoding["color"]["field"] == "domain" and encoding["shape"]["field"] == "cluster"


def test_representation_explorer_refuses_activations_of_other_documents(planted):
    docs, acts = planted
    with pytest.raises(RephelpersError, match="9 has 5 vectors for 60 documents"):
        representation_explorer(docs, {9: acts[9][:5]})
    with pytest.raises(RephelpersError, match="'cluster' or 'domain'"):
        pca_chart(docs, acts[9], "t", color="split")


def test_dimension_explorer_shows_the_chosen_clusters_critical_set(planted):
    docs, acts = planted
    dimensions, components = find_cluster_components(
        acts, docs.cluster.to_numpy(), docs.split.to_numpy(), top_k=4, progress=False
    )
    explorer = dimension_explorer(dimensions, components)
    layer_menu, cluster_menu, top = explorer.children[:3]
    assert layer_menu.value == 9
    cluster_menu.value = 2
    heatmap, critical = explorer.result.to_dict()["vconcat"]
    bars = [row for row in explorer.result.to_dict()["datasets"].values() if row and "kind" in row[0]][0]
    by_hand = components[[c.layer == 9 and c.cluster == 2 for c in components].index(True)]
    assert sorted(row["dim"] for row in bars) == sorted(by_hand.dims)
    assert {4, 5} <= {row["dim"] for row in bars}  # the planted dimensions of cluster 2
    # bars in descending S(i,k), each S as stage 03 scored it
    scores = [row["score"] for row in bars]
    assert scores == sorted(scores, reverse=True)
    at = dimensions[(dimensions.layer == 9) & (dimensions.cluster == 2)].set_index("dim").score
    assert all(row["score"] == pytest.approx(at[row["dim"]]) for row in bars)
    assert f"|R_k| = {len(by_hand.dims)}" in critical["title"] and "probe held-out accuracy" in critical["title"]


def test_critical_set_chart_marks_massive_dimensions_and_other_clusters():
    rows = [{"layer": 5, "cluster": k, "dim": i, "score": float(10 * (k == 0) + i), "probe_weight": 0.1,
             "selected": k == 0 and i < 3} for k in range(2) for i in range(4)]
    spec = critical_set_chart(pd.DataFrame(rows), 5, 0, massive_dims=[1]).to_dict()
    datasets = list(spec["datasets"].values())
    bars = next(d for d in datasets if d and "kind" in d[0])
    ticks = next(d for d in datasets if d and "kind" not in d[0])
    assert [(r["dim"], r["kind"]) for r in bars] == [(2, "in R_k"), (1, "massive"), (0, "in R_k")]
    assert sorted((r["cluster"], r["dim"]) for r in ticks) == [(1, 0), (1, 1), (1, 2)]
    with pytest.raises(RephelpersError, match="cluster 1 has no selected dimension at layer 5"):
        critical_set_chart(pd.DataFrame(rows), 5, 1)


def test_in_a_batch_run_each_explorer_is_its_first_view(planted, monkeypatch):
    """The runner's kernels (HEADLESS_ENV set) get plain charts, the same as the widgets' first
    view, and no widget that displays into its output area (the nbclient hang)."""
    import altair as alt

    from rephelpers.progress import HEADLESS_ENV

    docs, acts = planted
    dimensions, components = find_cluster_components(
        acts, docs.cluster.to_numpy(), docs.split.to_numpy(), top_k=4, progress=False
    )
    interactive = (representation_explorer(docs, acts).result.to_dict(),
                   dimension_explorer(dimensions, components).result.to_dict())
    monkeypatch.setenv(HEADLESS_ENV, "1")
    batch = (representation_explorer(docs, acts), dimension_explorer(dimensions, components))
    assert all(isinstance(chart, alt.TopLevelMixin) for chart in batch)
    assert tuple(chart.to_dict() for chart in batch) == interactive
