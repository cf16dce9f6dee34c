"""The interactive explorers of the notebooks (ipywidgets), one per stage that has one.

- 01: :func:`cluster_explorer` (a cluster's top terms, statistics and documents);
- 02: :func:`representation_explorer` (a layer's 2-D PCA of the pooled vectors and its
  between-cluster R²);
- 03: :func:`dimension_explorer` (a layer's S(i,k) heatmap and one cluster's critical set R_k
  against the other clusters' scores);
- 04: :func:`specificity_explorer` (perturbation kind, cluster, layer and magnitude redraw
  the specificity chart, computing new settings on demand);
- 05: :func:`answer_explorer` (an ability and a config: its answers beside the unperturbed model's);
- 06: :func:`item_explorer` (a cell of Φ and a config: the items that flipped).

Building an explorer runs nothing heavy. The charts they draw are
:mod:`rephelpers.views.charts`'. An explorer that draws one chart returns it from its
function (``widgets.interactive``) rather than ``display()``-ing it.

In a batch run (the runner's kernels, where :data:`HEADLESS_ENV` is set) an explorer
returns its first view as a plain chart or table instead of widgets: no one can interact
with it there, an executed notebook keeps no widget state, and a widget that displays into
its output area can leave nbclient waiting forever for the cell's reply (nbclient #312,
nbconvert #2029; seen here on notebook 02 at demo size, twice in one run).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from ..artifacts import RunDir
from ..dimensions.components import ClusterComponents, as_components
from ..errors import RephelpersError, require
from ..influence.impact import baseline_config, configs, flipped_items
from ..perturbations.kinds import KINDS
from ..perturbations.specificity import probe_activations, specificity_report
from ..progress import HEADLESS_ENV
from ..representations.activations import between_cluster_r2
from ..representations.models import Model
from .charts import (
    critical_set_chart,
    pca_chart,
    score_heatmap_chart,
    specificity_chart,
)
from .labels import cluster_label


def headless() -> bool:
    """Whether this kernel runs in a batch (no one to interact with widgets): :data:`HEADLESS_ENV` is set."""
    return bool(os.environ.get(HEADLESS_ENV))


def _explorer(draw: Any, **controls: Any) -> Any:
    """``widgets.interactive`` over ``draw`` showing its returned chart, or in a batch run
    (:func:`headless`) the chart of the controls' starting values."""
    import ipywidgets as widgets

    if headless():
        return draw(**{name: control.value for name, control in controls.items()})
    return widgets.interactive(draw, {"auto_display": True}, **controls)


def cluster_explorer(documents: pd.DataFrame, characterization: pd.DataFrame, n_samples: int = 3, seed: int = 0) -> Any:
    """An ipywidgets cluster picker: top terms, statistics, representative and sample documents."""
    import html

    import ipywidgets as widgets

    options = [(f"{row.cluster}: {row.name} ({row.size} docs)", int(row.cluster)) for row in characterization.itertuples()]
    picker = widgets.Dropdown(options=options, description="cluster")
    view = widgets.HTML()
    by_id = documents.set_index("id")
    statistic_columns = [c for c in characterization.columns if c not in ("cluster", "name", "top_terms", "representative_ids")]

    def card(doc_id: str) -> str:
        row = by_id.loc[doc_id]
        header = html.escape(f"{doc_id} · {row.get('domain', '')} · {row.get('source', '')}")
        return f"<details><summary><code>{header}</code></summary><pre style='white-space:pre-wrap'>{html.escape(str(row['text']))}</pre></details>"

    def show(cluster: int) -> None:
        row = characterization.set_index("cluster").loc[cluster]
        stats = "".join(f"<tr><td>{c}</td><td>{row[c]:.3f}</td></tr>" if isinstance(row[c], float) else f"<tr><td>{c}</td><td>{html.escape(str(row[c]))}</td></tr>" for c in statistic_columns)
        members = documents.loc[documents["cluster"] == cluster, "id"].astype(str)
        samples = members.sample(min(n_samples, len(members)), random_state=seed).tolist()
        view.value = (
            f"<h4>Top terms</h4><p>{html.escape(', '.join(row['top_terms']))}</p>"
            f"<h4>Statistics</h4><table>{stats}</table>"
            f"<h4>Closest to the centroid</h4>{''.join(card(i) for i in row['representative_ids'])}"
            f"<h4>Random members</h4>{''.join(card(i) for i in samples)}"
        )

    show(picker.value)
    if headless():
        from IPython.display import HTML

        return HTML(view.value)
    picker.observe(lambda change: show(change["new"]), names="value")
    return widgets.VBox([picker, view])


def representation_explorer(
    docs: pd.DataFrame, activations: Mapping[int, np.ndarray], component: str = "resid", pooling: str = "mean"
) -> Any:
    """02: pick a layer and a colouring; see the 2-D PCA of that layer's pooled vectors.

    The title gives the layer's between-cluster variance share
    ``R² = Σ_k n_k ‖μ_k − μ‖² / Σ_d ‖A(d) − μ‖²`` (:func:`between_cluster_r2`), so stepping
    through the layers shows where the clusters separate. ``docs`` needs ``id, domain,
    cluster, text`` in the order of the activations' rows.
    """
    import ipywidgets as widgets

    layers = list(activations)
    require(len(layers) > 0, "representation_explorer: no layers of activations to explore")
    for layer in layers:
        require(len(activations[layer]) == len(docs),
                f"representation_explorer: layer {layer} has {len(activations[layer])} vectors for "
                f"{len(docs)} documents; pass the activations notebook 02 extracted for these documents.")
    labels = docs["cluster"].to_numpy()
    r2: dict[int, float] = {}

    def draw(layer: int, colour: str) -> Any:
        if layer not in r2:
            r2[layer] = between_cluster_r2(activations[layer], labels)
        title = f"Layer {layer} ({component}, {pooling}-pooled): PCA; between-cluster R² = {r2[layer]:.3f}"
        return pca_chart(docs, activations[layer], title, color=colour)

    return _explorer(
        draw,
        layer=widgets.Dropdown(options=layers, value=layers[len(layers) // 2], description="layer"),
        colour=widgets.ToggleButtons(options=["cluster", "domain"], value="cluster", description="colour by"),
    )


def dimension_explorer(dimensions: pd.DataFrame, components: Sequence[ClusterComponents], per_cluster: int = 8) -> Any:
    """03: pick a layer, a cluster and how many top dimensions; see where R_k stands.

    Above, the clusters × top-dimensions heatmap of S(i,k) at the layer (dots: i ∈ R_k);
    below, the chosen cluster's R_k as bars of S(i,k) with ticks at the other clusters'
    S(i,k′) of the same dimensions, its size, its probe's held-out accuracy and its
    massive-activation dimensions (coloured apart) in the title.
    """
    import ipywidgets as widgets

    components = [as_components(c) for c in components]
    require(len(components) > 0, "dimension_explorer: no cluster components; run notebook 03's first cells")
    by_key = {(c.layer, c.cluster): c for c in components}
    layers = sorted({c.layer for c in components})
    clusters = sorted({c.cluster for c in components})

    def draw(layer: int, cluster: int, top: int) -> Any:
        part = by_key.get((layer, cluster))
        if part is None:
            print(f"no components for cluster {cluster} at layer {layer}")
            return None
        probe = "" if part.probe is None else f", probe held-out accuracy {part.probe.accuracy:.2f}"
        massive = sorted(set(part.dims) & set(part.massive_dims or ()))
        title = (f"Cluster {cluster} at layer {layer}: |R_k| = {len(part.dims)}{probe}"
                 + (f"; massive dims in R_k: {massive}" if massive else ""))
        below = critical_set_chart(dimensions, layer, cluster, massive_dims=part.massive_dims or (), title=title)
        return alt.vconcat(score_heatmap_chart(dimensions, layer, top), below).resolve_scale(color="independent")

    return _explorer(
        draw,
        layer=widgets.Dropdown(options=layers, value=layers[len(layers) // 2], description="layer"),
        cluster=widgets.Dropdown(options=clusters, value=clusters[0], description="cluster"),
        top=widgets.IntSlider(value=per_cluster, min=2, max=24, description="top dims", continuous_update=False),
    )


def specificity_explorer(
    model: Model,
    documents_df: pd.DataFrame,
    components: Sequence[ClusterComponents],
    report: pd.DataFrame,
    kinds: Sequence[str] | None = None,
    run_dir: RunDir | str | None = None,
    **options: Any,
) -> Any:
    """An ipywidgets panel: perturbation type, cluster, layer and magnitude redraw the chart.

    Settings already in ``report`` are drawn from it; new ones are computed for the
    chosen cluster only (with ``options`` passed to :func:`specificity_report`) and kept,
    so returning to them is instant. With ``run_dir`` the probe columns of new settings
    use stage 02's activations at the chosen layer (:func:`probe_activations`). A setting
    that cannot be built (say, LEACE without activations) shows why instead of a chart.
    The chart is the interactive's return value, not a ``display()`` inside it: the
    latter can leave nbclient waiting forever under papermill (nbclient #312).
    """
    import ipywidgets as widgets

    components = [as_components(c) for c in components]
    layers = sorted({c.layer for c in components})
    clusters = sorted({c.cluster for c in components})
    first = report.iloc[0]
    cache = {"report": report}

    def draw(kind: str, cluster: int, layer: int, magnitude: float) -> Any:
        known = cache["report"]
        rows = known[
            (known["kind"] == kind) & (known["cluster"] == cluster)
            & (known["layer"] == layer) & np.isclose(known["magnitude"], magnitude)
        ]
        if rows.empty:
            component = options.get("component", "resid")
            try:
                probes = None if run_dir is None else probe_activations(run_dir, documents_df, layer, component)
                rows = specificity_report(
                    model, documents_df, components, kind, layer, magnitude, clusters=[cluster],
                    probes=probes, **options,
                )
            except RephelpersError as err:
                print(f"cannot show {kind} at layer {layer} for cluster {cluster}: {err}")
                return
            cache["report"] = pd.concat([known, rows], ignore_index=True)
        return specificity_chart(rows, title=f"{kind} × {magnitude:g} at layer {layer}, cluster {cluster}")

    return _explorer(
        draw,
        kind=widgets.Dropdown(options=list(kinds or KINDS), value=first["kind"], description="perturbation"),
        cluster=widgets.Dropdown(options=clusters, value=int(first["cluster"]), description="cluster"),
        layer=widgets.SelectionSlider(options=layers, value=int(first["layer"]), description="layer",
                                      continuous_update=False),
        magnitude=widgets.FloatSlider(value=float(first["magnitude"]), min=0.0, max=4.0, step=0.25,
                                      description="magnitude", continuous_update=False),
    )


def answer_explorer(scores: pd.DataFrame, max_rows: int = 30, prompt_chars: int = 120) -> Any:
    """An ipywidgets panel over stage 05's scores: pick an ability and a config, read its answers.

    Each item of the ability under the chosen config beside the unperturbed model's: the
    end of the prompt, the target, both scores (and margins, for multiple choice) and,
    for generation, both responses. Items whose score changed come first; ``max_rows``
    rows are shown. The header counts the items lost and gained.
    """
    import ipywidgets as widgets
    from IPython.display import display

    require(len(scores) > 0, "answer_explorer: no scores to explore")
    base_id = baseline_config(scores)
    abilities = sorted(scores["ability"].unique())
    table = configs(scores)
    perturbed = table[table["config_id"] != base_id]
    require(len(perturbed) > 0, "answer_explorer: the scores hold the baseline only")
    labels = [(f"{'control ' if r.control else ''}k={r.cluster} {r.kind} m={r.magnitude:g}  [{r.config_id}]", r.config_id)
              for r in perturbed.itertuples(index=False)]
    ability_menu = widgets.Dropdown(options=abilities, description="ability")
    config_menu = widgets.Dropdown(options=labels, description="config", layout=widgets.Layout(width="460px"))
    output = widgets.Output()
    columns = [c for c in ("score", "margin", "response") if c in scores.columns]
    keys = ["task", "item"]

    def rows(ability: str, config_id: str) -> pd.DataFrame:
        sub = scores[scores["ability"] == ability]
        base = sub[sub["config_id"] == base_id][[*keys, *(c for c in ("prompt", "target") if c in sub.columns), *columns]]
        mine = sub[sub["config_id"] == config_id][[*keys, *columns]]
        both = base.merge(mine, on=keys, suffixes=("_base", "_pert"))
        both["change"] = both["score_pert"] - both["score_base"]
        if "prompt" in both.columns:
            both["prompt"] = both["prompt"].astype(str).str[-prompt_chars:]
        if "response_base" in both.columns and both["response_base"].isna().all():
            both = both.drop(columns=["response_base", "response_pert"])
        return both.assign(changed=both["change"] != 0).sort_values(["changed", "task", "item"], ascending=[False, True, True])

    def view() -> tuple[str, pd.DataFrame]:
        both = rows(ability_menu.value, config_menu.value)
        lost, gained = int((both["change"] < 0).sum()), int((both["change"] > 0).sum())
        return (f"{ability_menu.value} under {config_menu.value}: {len(both)} items, {lost} lost, {gained} gained "
                f"against the unperturbed model"), both.drop(columns="changed").head(max_rows)

    if headless():
        summary, table = view()
        print(summary)
        return table

    def show(*_: object) -> None:
        summary, table = view()
        output.clear_output()
        with output:
            print(summary)
            display(table)

    show()
    ability_menu.observe(show, names="value")
    config_menu.observe(show, names="value")
    return widgets.VBox([widgets.HBox([ability_menu, config_menu]), output])


def item_explorer(
    scores: pd.DataFrame, table: pd.DataFrame, only_changed: bool = True, cluster_labels: Mapping[int, str] | None = None
):
    """An ipywidgets explorer: pick a (cluster, ability) cell and a config, see which items flipped.

    Cells are listed strongest |Φ| first; the config menu offers every perturbation of the
    cluster and its controls. Shows the count of lost / gained items and the item rows of
    :func:`rephelpers.influence.impact.flipped_items`. Building it runs nothing heavy, so a headless
    (papermill) run just renders the first cell. With ``cluster_labels``
    (:func:`cluster_names`) the cells read ``3: name × ability``.
    """
    import ipywidgets as widgets
    from IPython.display import display

    ranked = table.assign(strength=table["phi"].abs()).sort_values("strength", ascending=False, na_position="last")
    cells = [
        (f"{cluster_label(r.cluster, cluster_labels)} × {r.ability}  (Φ = {r.phi:+.3f}{' *' if r.significant else ''})",
         (int(r.cluster), r.ability))
        for r in ranked.itertuples(index=False)
    ]
    every = configs(scores)
    cell_menu = widgets.Dropdown(options=cells, description="cell", layout=widgets.Layout(width="460px"))
    config_menu = widgets.Dropdown(description="config", layout=widgets.Layout(width="460px"))
    output = widgets.Output()

    every_config = "every perturbation of the cluster"

    def config_options(cluster: int) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [(every_config, every_config)]
        for row in every[every["cluster"] == cluster].itertuples(index=False):
            label = f"{'control ' if row.control else ''}{row.kind} m={row.magnitude:g} @ L{row.layer}  [{row.config_id}]"
            options.append((label, (row.config_id, bool(row.control))))
        return options

    def view() -> tuple[str, pd.DataFrame]:
        cluster, ability = cell_menu.value
        theta, control = (None, False) if config_menu.value == every_config else config_menu.value
        items = flipped_items(scores, cluster, ability, theta=theta, control=control, only_changed=only_changed)
        lost = int((items["direction"] == "lost").sum())
        gained = int((items["direction"] == "gained").sum())
        return f"{cluster_label(cluster, cluster_labels)} × {ability}: {lost} items lost, {gained} gained", items

    def show(*_: object) -> None:
        summary, items = view()
        output.clear_output()
        with output:
            print(summary)
            display(items)

    def on_cell(change: dict) -> None:
        config_menu.unobserve(show, names="value")  # one render per pick, not one per menu reset
        config_menu.options = config_options(change["new"][0])
        config_menu.value = every_config
        config_menu.observe(show, names="value")
        show()

    if cells:
        config_menu.options = config_options(cells[0][1][0])
        config_menu.value = every_config
        if headless():
            summary, items = view()
            print(summary)
            return items
        show()
    cell_menu.observe(on_cell, names="value")
    config_menu.observe(show, names="value")
    return widgets.VBox([cell_menu, config_menu, output])
