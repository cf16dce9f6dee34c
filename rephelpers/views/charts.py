"""Every chart the notebooks draw (altair), by stage.

Each function takes the table a stage wrote (or its frame helper's output) and returns an
altair chart; none computes a result (:func:`save_sweep_charts` also saves, through
:func:`rephelpers.views.render.save_chart`). Saving, the offline renderer and the HTML report are in
:mod:`rephelpers.views.render`, cluster names in :mod:`rephelpers.views.labels`; the ipywidgets explorers in :mod:`rephelpers.views.explorers`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd

from ..abilities.evaluation import ability_summary
from ..dimensions.association import NMFPatterns, top_dimensions
from ..errors import require
from ..perturbations.specificity import ARMS, SETS, metric_labels, specificity_long
from ..representations.activations import pca_2d
from .labels import cluster_label
from .render import save_chart

alt.data_transformers.disable_max_rows()


# -- Stage 01: corpus and clusters ---------------------------------------------------------


def _chart_frame(df: pd.DataFrame, labels: Sequence[int], names: Sequence[str]) -> pd.DataFrame:
    labels = np.asarray(labels, dtype=np.int64)
    return pd.DataFrame({
        "id": df["id"].astype(str).to_numpy(),
        "domain": df["domain"].astype(str).to_numpy(),
        "cluster": [f"{k}: {names[k]}" for k in labels],
        "snippet": [" ".join(t.split())[:160] for t in df["text"].astype(str)],
    })


def cluster_domain_chart(df: pd.DataFrame, labels: Sequence[int], names: Sequence[str]) -> Any:
    """Stacked bars: documents per cluster, split by metadata domain."""
    import altair as alt

    counts = _chart_frame(df, labels, names).groupby(["cluster", "domain"]).size().reset_index(name="documents")
    return alt.Chart(counts, title="Cluster sizes by domain").mark_bar().encode(
        x=alt.X("cluster:N", sort=None, title="cluster", axis=alt.Axis(labelAngle=-30, labelLimit=180)),
        y=alt.Y("documents:Q", title="documents"),
        color=alt.Color("domain:N", title="domain"),
        tooltip=["cluster", "domain", "documents"],
    )


def cluster_map_chart(df: pd.DataFrame, labels: Sequence[int], names: Sequence[str], coordinates: np.ndarray) -> Any:
    """Two linked 2-D scatters of the documents, coloured by cluster and by domain.

    Hovering shows a text snippet; clicking a cluster in the legend highlights it in both.
    """
    import altair as alt

    frame = _chart_frame(df, labels, names)
    frame["x"], frame["y"] = np.asarray(coordinates)[:, 0], np.asarray(coordinates)[:, 1]
    picked = alt.selection_point(fields=["cluster"], bind="legend")
    base = alt.Chart(frame).mark_circle(size=40).encode(
        x=alt.X("x:Q", title="UMAP 1", axis=alt.Axis(labels=False)),
        y=alt.Y("y:Q", title="UMAP 2", axis=alt.Axis(labels=False)),
        opacity=alt.condition(picked, alt.value(0.85), alt.value(0.1)),
        tooltip=["id", "cluster", "domain", "snippet"],
    ).properties(width=320, height=320)
    by_cluster = base.encode(color=alt.Color("cluster:N", title="cluster")).add_params(picked).properties(title="coloured by cluster")
    by_domain = base.encode(color=alt.Color("domain:N", title="domain")).properties(title="coloured by domain")
    return alt.hconcat(by_cluster, by_domain).resolve_scale(color="independent")


def contingency_chart(labels: Sequence[int], reference: Sequence[Any], names: Sequence[str]) -> Any:
    """Heatmap of documents per (cluster, domain) with the counts written in the cells."""
    import altair as alt

    labels = np.asarray(labels, dtype=np.int64)
    table = pd.crosstab(pd.Series([f"{k}: {names[k]}" for k in labels], name="cluster"), pd.Series(np.asarray(reference).astype(str), name="domain"))
    cells = table.stack().reset_index(name="documents")
    base = alt.Chart(cells, title="Clusters against domains").encode(
        x=alt.X("domain:N", title="domain"), y=alt.Y("cluster:N", sort=None, title="cluster"),
    )
    heat = base.mark_rect().encode(color=alt.Color("documents:Q", scale=alt.Scale(scheme="blues")), tooltip=["cluster", "domain", "documents"])
    text = base.mark_text(baseline="middle").encode(
        text="documents:Q",
        color=alt.condition(alt.datum.documents > float(cells["documents"].max()) / 2, alt.value("white"), alt.value("black")),
    )
    return heat + text


# -- Stage 02: representations -------------------------------------------------------------


def cluster_r2_chart(r2: pd.DataFrame, component: str = "resid") -> alt.Chart:
    """Between-cluster variance share R² per layer (``layer, between_cluster_R2``), a line."""
    return alt.Chart(r2).mark_line(point=True).encode(
        x=alt.X("layer:O"),
        y=alt.Y("between_cluster_R2:Q", title="between-cluster variance share"),
        tooltip=["layer", alt.Tooltip("between_cluster_R2:Q", format=".3f")],
    ).properties(title=f"Cluster structure in {component} per layer", width=360, height=220)


def pca_chart(docs: pd.DataFrame, X: np.ndarray, title: str, color: str = "cluster") -> alt.Chart:
    """Scatter of the 2-D PCA of pooled representations, coloured by ``color`` (cluster or domain).

    The other of the two labels sets the marks' shape, so a cluster that mixes domains shows it.
    """
    require(color in ("cluster", "domain"), f"pca_chart colours by 'cluster' or 'domain', not {color!r}.")
    xy = pca_2d(X)
    frame = docs[["id", "domain", "cluster"]].assign(
        pc1=xy[:, 0], pc2=xy[:, 1], snippet=docs["text"].str.slice(0, 80)
    )
    shape = "domain" if color == "cluster" else "cluster"
    return (
        alt.Chart(frame)
        .mark_circle(size=30, opacity=0.7)
        .encode(x="pc1:Q", y="pc2:Q", color=f"{color}:N", shape=f"{shape}:N",
                tooltip=["id", "domain", "cluster", "snippet"])
        .properties(title=title, width=420, height=320)
    )


# -- Stage 03: cluster dimensions ----------------------------------------------------------


def score_heatmap_chart(dimensions: pd.DataFrame, layer: int, per_cluster: int = 8) -> alt.LayerChart:
    """Clusters × top dimensions heatmap of S(i,k) at ``layer``; dots mark i ∈ R_k."""
    data = top_dimensions(dimensions, layer, per_cluster)
    order = data.sort_values(["cluster", "score"], ascending=[True, False]).drop_duplicates("dim").dim.tolist()
    # A few "massive activation" dimensions can be 100× larger than the rest; clipping the
    # colour scale at the 90th percentile of |S| keeps the others visible (tooltips are exact).
    limit = float(np.quantile(np.abs(data.score), 0.9)) or 1.0
    base = alt.Chart(data).encode(
        x=alt.X("dim:O", sort=order, title="dimension"),
        y=alt.Y("cluster:O", title="cluster"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("score:Q", title="S(i,k)",
                        scale=alt.Scale(scheme="redblue", reverse=True, domain=[-limit, limit], clamp=True)),
        tooltip=["cluster", "dim", alt.Tooltip("score:Q", format=".3f"),
                 alt.Tooltip("probe_weight:Q", format=".4f"), "selected"],
    )
    dots = base.transform_filter(alt.datum.selected).mark_circle(size=18, color="black")
    return (cells + dots).properties(
        title=f"Layer {layer}: S(i,k) of each cluster's top {per_cluster} dimensions (• = in R_k; colour clipped at ±{limit:.3g})",
        width=max(300, 14 * len(order)), height=30 * data.cluster.nunique(),
    )


def critical_set_chart(
    dimensions: pd.DataFrame, layer: int, cluster: int, massive_dims: Sequence[int] = (), title: str | None = None
) -> alt.LayerChart:
    """One cluster's critical set R_k at ``layer``: bars of S(i,k) for i ∈ R_k, ticks of the others' S(i,k′).

    A dimension whose bar stands far from every tick is specific to the cluster; one whose
    ticks sit as high as its bar is shared. Massive-activation dimensions are coloured apart.
    """
    at = dimensions[dimensions.layer == layer]
    chosen = at[(at.cluster == cluster) & at.selected].sort_values("score", ascending=False)
    require(len(chosen) > 0, f"cluster {cluster} has no selected dimension at layer {layer}; "
                             f"clusters there: {sorted(at.cluster.unique())}.")
    order = chosen.dim.tolist()
    massive = set(int(i) for i in massive_dims)
    bars = chosen.assign(kind=[("massive" if int(i) in massive else "in R_k") for i in chosen.dim])
    others = at[(at.cluster != cluster) & at.dim.isin(order)]
    x = alt.X("dim:O", sort=order, title="dimension (in R_k, by S)")
    bar = alt.Chart(bars).mark_bar().encode(
        x=x, y=alt.Y("score:Q", title="S(i,k)"),
        color=alt.Color("kind:N", scale=alt.Scale(domain=["in R_k", "massive"], range=["#4c78a8", "#e45756"]),
                        title=None),
        tooltip=["dim", alt.Tooltip("score:Q", format=".3f"), alt.Tooltip("probe_weight:Q", format=".4f")],
    )
    ticks = alt.Chart(others).mark_tick(color="black", thickness=1.5).encode(
        x=x, y="score:Q", tooltip=[alt.Tooltip("cluster:N", title="other cluster"), "dim",
                                   alt.Tooltip("score:Q", format=".3f")],
    )
    return (bar + ticks).properties(
        title=title or f"Cluster {cluster} at layer {layer}: S(i,k) over R_k (ticks: the other clusters)",
        width=max(300, 12 * len(order)), height=200,
    )


def overlap_chart(overlap: pd.DataFrame, columns: int = 5) -> alt.FacetChart:
    """Jaccard(R_a, R_b) heatmaps, one panel per layer."""
    base = alt.Chart().encode(x=alt.X("cluster_a:O", title="cluster"), y=alt.Y("cluster_b:O", title="cluster"))
    cells = base.mark_rect().encode(
        color=alt.Color("jaccard:Q", scale=alt.Scale(domain=[0, 1], scheme="blues"), title="Jaccard"),
        tooltip=["layer", "cluster_a", "cluster_b", alt.Tooltip("jaccard:Q", format=".2f")],
    )
    text = base.mark_text(fontSize=9).encode(
        text=alt.Text("jaccard:Q", format=".2f"),
        color=alt.condition(alt.datum.jaccard > 0.5, alt.value("white"), alt.value("black")),
    )
    size = 22 * overlap.cluster_a.nunique()
    return alt.layer(cells, text, data=overlap).properties(width=size, height=size).facet(
        facet=alt.Facet("layer:O", title="layer"), columns=columns,
        title="Overlap of the clusters' dimension sets R_k (Jaccard)",
    )


def explained_variance_chart(spectra: pd.DataFrame, columns: int = 5) -> alt.FacetChart:
    """Cumulative share of each cluster's variance captured by its first r principal directions."""
    return alt.Chart(spectra).mark_line(point=True).encode(
        x=alt.X("component:O", title="principal direction"),
        y=alt.Y("cumulative:Q", title="cumulative explained variance", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("cluster:N"),
        tooltip=["layer", "cluster", "component", alt.Tooltip("ratio:Q", format=".3f"),
                 alt.Tooltip("cumulative:Q", format=".3f")],
    ).properties(width=150, height=150).facet(
        facet=alt.Facet("layer:O", title="layer"), columns=columns,
        title="SVD of each cluster's centred activations: variance in V_k",
    )


def nmf_chart(patterns: NMFPatterns, layer: int) -> alt.Chart:
    """Clusters × NMF components heatmap of the code mean-difference score."""
    data = patterns.to_frame()
    limit = float(np.abs(data.score).max()) or 1.0
    return alt.Chart(data).mark_rect().encode(
        x=alt.X("component:O", title="NMF component"),
        y=alt.Y("cluster:O"),
        color=alt.Color("score:Q", title="S on codes",
                        scale=alt.Scale(scheme="redblue", reverse=True, domain=[-limit, limit])),
        tooltip=["cluster", "component", alt.Tooltip("score:Q", format=".3f")],
    ).properties(
        title=f"Layer {layer}: NMF ({patterns.nonnegative}"
        f"{', standardised' if (patterns.scale != 1).any() else ''}) parts per cluster, "
        f"relative reconstruction error {patterns.relative_error:.3f}",
        width=22 * data.component.nunique(), height=30 * data.cluster.nunique(),
    )


def probe_accuracy_chart(curve: pd.DataFrame, title: str = "Held-out probe accuracy per layer") -> alt.LayerChart:
    """Accuracy-per-layer lines (one per probe kind) over a dashed chance line."""
    lines = alt.Chart(curve).mark_line(point=True).encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("accuracy:Q", title="held-out accuracy (cluster prediction)", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("kind:N", title="probe"),
        tooltip=["layer", "kind", alt.Tooltip("accuracy:Q", format=".3f"),
                 alt.Tooltip("mean_binary_accuracy:Q", format=".3f")],
    )
    chance = alt.Chart(curve).mark_rule(strokeDash=[4, 4], color="gray").encode(y="mean(chance):Q")
    return (lines + chance).properties(title=title, width=380, height=240)


def mediation_chart(effects: pd.DataFrame) -> alt.FacetChart:
    """Indirect effect of each candidate dimension, one panel per cluster, largest first
    (a masked LM's effects, ``nll_kind = "pseudo-NLL"``, are labelled so)."""
    layer = int(effects.layer.iloc[0]) if "layer" in effects else None
    nll = str(effects["nll_kind"].iloc[0]) if "nll_kind" in effects.columns else "NLL"
    bars = alt.Chart().mark_bar().encode(
        x=alt.X("indirect_effect:Q", title=f"IE = Δ{nll} per token"),
        y=alt.Y("dim:N", sort="-x", title="dimension"),
        color=alt.condition(alt.datum.indirect_effect > 0, alt.value("#c0392b"), alt.value("#7f8c8d")),
        tooltip=["cluster", "dim", alt.Tooltip("value:Q", format=".3f"),
                 alt.Tooltip("indirect_effect:Q", format=".4f"), "rank"],
    ).properties(width=160, height=16 * int(effects.groupby("cluster").size().max()))
    return alt.layer(bars, data=effects).facet(
        facet=alt.Facet("cluster:O", title="cluster"), columns=5,
        title=f"Causal mediation at layer {layer}: do(h_i = μ_i^other) on cluster texts",
    ).resolve_scale(y="independent")


# -- Stage 04: perturbations ---------------------------------------------------------------


def specificity_chart(report: pd.DataFrame, title: str | None = None) -> alt.FacetChart:
    """Bars of Δ log-perplexity, CKA (and attention JS) on target vs rest texts, perturbation
    vs its random control (the mean over control draws), one column per cluster."""
    long = specificity_long(report)
    require(len(long) > 0, "specificity_chart: the report is empty.")
    kinds = ", ".join(sorted(report["kind"].unique()))
    chart = (
        alt.Chart(long)
        .mark_bar()
        .encode(
            x=alt.X("set:N", title=None, sort=list(SETS)),
            xOffset=alt.XOffset("arm:N", sort=list(ARMS)),
            y=alt.Y("mean(value):Q", title=None),
            color=alt.Color("arm:N", sort=list(ARMS), scale=alt.Scale(range=["#d62728", "#7f7f7f"])),
            tooltip=["cluster", "arm", "set", "metric", alt.Tooltip("mean(value):Q", format=".4f"),
                     alt.Tooltip("count():Q", title="draws"), "magnitude"],
        )
        .properties(width=90, height=140)
        .facet(row=alt.Row("metric:N", title=None, sort=list(metric_labels(report).values())),
               column=alt.Column("cluster:N", title="cluster"))
        .resolve_scale(y="independent")
        .properties(title=title or f"Specificity of {kinds} at layer {int(report['layer'].iloc[0])}")
    )
    return chart


def probe_chart(report: pd.DataFrame) -> alt.Chart:
    """Balanced accuracy of a fresh probe for each cluster before and after each arm (0.5 = chance)."""
    rows = report.dropna(subset=["probe_bacc_after"])
    require(len(rows) > 0, "probe_chart: no probe columns (pass probes= to specificity_report).")
    before = rows.drop_duplicates("cluster").assign(arm="original", bacc=lambda d: d["probe_bacc_before"])
    after = rows.assign(bacc=rows["probe_bacc_after"])
    frame = pd.concat([before, after])[["cluster", "arm", "bacc", "kind"]]
    bars = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("cluster:N"),
            xOffset=alt.XOffset("arm:N", sort=["original", *ARMS]),
            y=alt.Y("mean(bacc):Q", title="probe balanced accuracy", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("arm:N", sort=["original", *ARMS],
                            scale=alt.Scale(range=["#1f77b4", "#d62728", "#7f7f7f"])),
            tooltip=["cluster", "arm", alt.Tooltip("mean(bacc):Q", format=".3f")],
        )
    )
    chance = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
    return (bars + chance).properties(width=320, height=180, title="Is cluster k still linearly readable?")


# -- Stage 05: abilities -------------------------------------------------------------------


def ability_chart(scores: pd.DataFrame, chance: Mapping[str, float] | None = None) -> Any:
    """Bars: mean item score under each cluster's perturbation (red) and its matched random
    control (grey), one column per ability and one row per setting θ = kind × magnitude;
    whiskers ±1 s.e.m. over items; dashed line: the unperturbed model; dotted line: chance.

    Several control draws of one θ are averaged item by item before the mean, so each
    (cluster, arm, θ) is one bar and the s.e.m. is over items, not over item × draw.
    """
    import altair as alt

    summary = ability_summary(scores, by=["cluster", "control", "kind", "magnitude", "ability"])
    summary["arm"] = np.where(summary["control"], "matched control", "cluster perturbation")
    summary["cluster_label"] = "k=" + summary["cluster"].astype(str)
    summary["theta"] = summary["kind"].astype(str) + " × " + summary["magnitude"].map("{:g}".format)
    summary["low"] = (summary["mean"] - summary["sem"]).clip(lower=0.0)
    summary["high"] = (summary["mean"] + summary["sem"]).clip(upper=1.0)
    base = summary[summary.cluster == -1].groupby("ability")["mean"].mean().rename("baseline").reset_index()
    bars = summary[summary.cluster >= 0].merge(base, on="ability", how="left")
    require(len(bars) > 0, "ability_chart: no perturbed config in scores (only the baseline).")
    if chance:
        bars["chance"] = bars["ability"].map(chance)
    color = alt.Color("arm:N", scale=alt.Scale(domain=["cluster perturbation", "matched control"],
                                                range=["#c0392b", "#95a5a6"]), title=None)
    tooltip = ["ability", "cluster_label", "arm", "theta", alt.Tooltip("mean:Q", format=".3f"),
               alt.Tooltip("baseline:Q", format=".3f"), "n"]
    layer = alt.Chart().encode(x=alt.X("cluster_label:N", title="perturbed cluster"), xOffset="arm:N")
    layers = [
        layer.mark_bar().encode(
            y=alt.Y("mean:Q", title="mean item score", scale=alt.Scale(domain=[0, 1]), stack=None),
            color=color, tooltip=tooltip,
        ),
        layer.mark_rule().encode(y="low:Q", y2="high:Q"),
        alt.Chart().mark_rule(strokeDash=[6, 3], color="black").encode(y="mean(baseline):Q"),
    ]
    if chance:
        layers.append(alt.Chart().mark_rule(strokeDash=[2, 2], color="#7f8c8d").encode(y="mean(chance):Q"))
    thetas = sorted(bars["theta"].unique(), key=lambda t: (t.split(" × ")[0], float(t.split(" × ")[1])))
    return (
        alt.layer(*layers, data=bars)
        .properties(width=alt.Step(18), height=150)
        .facet(column=alt.Column("ability:N", title=None), row=alt.Row("theta:N", title=None, sort=thetas))
        .properties(title="Abilities under each cluster's perturbation (dashed: unperturbed, dotted: chance)")
    )


# -- Stage 06: the influence matrix --------------------------------------------------------


def _symmetric_limit(*columns: pd.Series) -> float:
    """Half-width of a colour domain centred at 0 that holds every finite value (at least 0.05)."""
    values = pd.concat(columns).to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    return float(max(0.05, np.abs(values).max() if len(values) else 0.0))


PHI_PANELS = (
    # (panel title, estimate column, CI prefix, adjusted p column, significance column)
    ("Φ: cluster perturbation", "phi", "phi", "p_adjusted", "significant"),
    ("Φ_control: random dimensions", "phi_control", "phi_control", "p_control_adjusted", "control_significant"),
    ("Φ − Φ_control", "phi_minus_control", "phi_minus_control", "p_vs_controls_adjusted", "exceeds_controls"),
)
VERDICT_MARKS = {
    # A mark per verdict of findings.VERDICTS (stage 06): a reader of the chart alone must not take
    # "Φ ≠ 0" for a finding, so only the two finding verdicts get a star.
    "cluster-specific finding": "**",
    "finding (specificity not checked)": "*",
    "non-specific damage": "ns",
    "within random controls": "rc",
    "no effect": "",
    "baseline below floor": "",
}
VERDICT_LEGEND = ("** cluster-specific finding, * finding (specificity not checked), ns non-specific damage, "
                  "rc within random controls; unmarked: no effect")


def verdict_mark(verdict: object) -> str:
    """The mark a heatmap cell carries for its stage-06 verdict (:data:`VERDICT_MARKS`; "" if unknown)."""
    return VERDICT_MARKS.get(str(verdict), "") if isinstance(verdict, str) else ""


def _phi_labels(values: pd.Series, marks: Sequence[str]) -> list[str]:
    return ["n/a" if not np.isfinite(v) else f"{v:+.2f}" + (f" {m}" if m else "") for v, m in zip(values, marks)]


def phi_heatmap_frame(table: pd.DataFrame, cluster_labels: Mapping[int, str] | None = None) -> pd.DataFrame:
    """The influence table in long form for :func:`phi_heatmap`: one row per panel × cluster × ability."""
    frames = []
    for panel, value, ci, p_adj, flag in PHI_PANELS:
        part = table[["cluster", "ability", "n_items", "baseline_score"]].copy()
        part["panel"] = panel
        part["value"] = table[value]
        part["low"], part["high"] = table[f"{ci}_low"], table[f"{ci}_high"]
        part["p_adjusted"] = table[p_adj]
        part["significant"] = table[flag].fillna(False).astype(bool)
        part["verdict"] = table["verdict"] if "verdict" in table.columns else ""
        # A cluster split by setting (stage 04 judged its settings differently) has a row per setting.
        split = table.duplicated(["cluster", "ability"], keep=False)
        part["setting"] = (table["phi_settings"].where(split, "").fillna("").astype(str)
                           if "phi_settings" in table.columns else "")
        # The cell's verdict is about the cluster's perturbation; the control panel shows no verdict.
        part["mark"] = "" if value == "phi_control" else [verdict_mark(v) for v in part["verdict"]]
        frames.append(part)
    long = pd.concat(frames, ignore_index=True)
    long["cluster_label"] = [cluster_label(k, cluster_labels) for k in long["cluster"]]
    if long["setting"].ne("").any():
        long["cluster_label"] = [f"{c} · {s}" if s else c for c, s in zip(long["cluster_label"], long["setting"])]
    long["ci"] = [f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in zip(long["low"], long["high"])]
    long["label"] = _phi_labels(long["value"], long["mark"])
    return long


def phi_heatmap(
    table: pd.DataFrame,
    cluster_labels: Mapping[int, str] | None = None,
    with_difference: bool = True,
    cell_size: int = 56,
) -> alt.HConcatChart:
    """Φ (clusters × abilities) beside the random-control Φ (and Φ − Φ_control).

    ``table`` is :func:`rephelpers.influence.findings.influence_table`. One diverging colour scale,
    centred at 0 and shared by the panels (red = the ability got worse, blue = better);
    each cell of the Φ and Φ − Φ_control panels shows its value with the mark of its
    verdict (:data:`VERDICT_MARKS`: a star only for a finding, not for Φ ≠ 0 alone); the
    tooltip carries the verdict, the bootstrap CI, the adjusted p, ``M(f, a)`` and the item count.
    """
    long = phi_heatmap_frame(table, cluster_labels)
    panels = [p[0] for p in PHI_PANELS[: 3 if with_difference else 2]]
    long = long[long["panel"].isin(panels)]
    limit = _symmetric_limit(long["value"])
    colour = alt.Color(
        "value:Q", title="Φ (relative loss)",
        scale=alt.Scale(scheme="redblue", reverse=True, domain=[-limit, limit], domainMid=0),
    )
    clusters = sorted(long["cluster_label"].unique(), key=lambda s: long.loc[long.cluster_label == s, "cluster"].iloc[0])
    tooltip = [
        alt.Tooltip("cluster_label:N", title="cluster"), alt.Tooltip("ability:N"),
        alt.Tooltip("value:Q", title="estimate", format="+.3f"), alt.Tooltip("ci:N", title="bootstrap CI"),
        alt.Tooltip("p_adjusted:Q", title="adjusted p", format=".3g"), alt.Tooltip("verdict:N"),
        alt.Tooltip("baseline_score:Q", title="M(f, a)", format=".3f"), alt.Tooltip("n_items:Q", title="items"),
    ]
    charts = []
    for panel in panels:
        base = alt.Chart(long[long["panel"] == panel]).encode(
            x=alt.X("ability:N", title="ability", axis=alt.Axis(labelAngle=-30)),
            y=alt.Y("cluster_label:N", title="cluster", sort=clusters),
        )
        cells = base.mark_rect(stroke="white").encode(color=colour, tooltip=tooltip)
        text = base.mark_text(fontSize=12).encode(
            text="label:N",
            color=alt.condition(f"abs(datum.value) > {0.6 * limit}", alt.value("white"), alt.value("black")),
            tooltip=tooltip,
        )
        charts.append((cells + text).properties(
            title=panel, width=cell_size * long["ability"].nunique(), height=cell_size * len(clusters)
        ))
    note = VERDICT_LEGEND if "verdict" in table.columns else ""
    return alt.hconcat(*charts).resolve_scale(color="shared").properties(
        title=alt.TitleParams("Data Influence Matrix", subtitle=[note] if note else [])
    )


def phi_across_chart(results: pd.DataFrame, axis: str) -> alt.FacetChart:
    """Φ of every (cluster, ability) cell across the values of one sweep axis (``model_name``, a layer, ...).

    ``results`` is a sweep's ``results.parquet`` (every point's influence table with the
    point's parameters as columns). One panel per ability; per cluster a line through the
    axis' values with Φ's bootstrap interval; a filled point where the adjusted p-value is
    below α. Across models, compare clusters by name: a cluster's number is its k-means
    label, the same across models only where they chunk the corpus alike (one tokenizer).
    """
    require(axis in results.columns, f"results have no column {axis!r}; the sweep's axes are the point parameters.")
    require("phi" in results.columns, "results hold no Φ column (phi): collect a sweep of notebook 06's influence.parquet.")
    data = results.assign(
        value=results[axis].astype(str),
        significant=results.get("significant", pd.Series(False, index=results.index)).fillna(False).astype(bool),
    )
    values = list(pd.unique(results[axis]))
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)
    order = [str(v) for v in (sorted(values) if numeric else values)]  # layers 3 < 15, models as listed
    x = alt.X("value:N", title=axis, sort=order, axis=alt.Axis(labelAngle=-30))
    base = alt.Chart().encode(x=x, color=alt.Color("cluster:N", title="cluster"))
    lines = base.mark_line(opacity=0.6).encode(y=alt.Y("phi:Q", title="Φ (relative loss)"))
    bars = base.mark_rule().encode(y="phi_low:Q", y2="phi_high:Q")
    points = base.mark_point(size=60).encode(
        y="phi:Q",
        fill=alt.condition("datum.significant", alt.Color("cluster:N", legend=None), alt.value("white")),
        tooltip=["cluster", "ability", alt.Tooltip("value:N", title=axis), alt.Tooltip("phi:Q", format="+.3f"),
                 alt.Tooltip("phi_low:Q", format="+.3f"), alt.Tooltip("phi_high:Q", format="+.3f"), "significant"],
    )
    zero = alt.Chart().mark_rule(color="gray", strokeDash=[4, 4]).encode(y=alt.datum(0))
    return alt.layer(zero, bars, lines, points, data=data).properties(width=max(160, 60 * len(order)), height=200).facet(
        column=alt.Column("ability:N", title=None)
    ).properties(title=f"Φ across {axis} (filled: adjusted p < α)")


def dose_response_chart(
    dose: pd.DataFrame,
    cluster_labels: Mapping[int, str] | None = None,
    magnitude_col: str = "magnitude",
    width: int = 150,
    height: int = 110,
) -> alt.FacetChart:
    """Small multiples of ability score against perturbation magnitude.

    ``dose`` is :func:`rephelpers.influence.impact.dose_response` (with the same ``magnitude_col``).
    Rows = cluster, columns = ability;
    the perturbation (red) and its matched random control (grey) as lines, the
    unperturbed ``M(f, a)`` as a dashed rule. A dose-response relation shows as the red
    line falling away from the rule while the grey one stays on it.
    """
    data = dose.copy()
    data["cluster_label"] = [cluster_label(k, cluster_labels) for k in data["cluster"]]
    data["site"] = [f"{kind} @ L{layer}" for kind, layer in zip(data["kind"], data["layer"])]
    clusters = sorted(data["cluster_label"].unique(), key=lambda s: data.loc[data.cluster_label == s, "cluster"].iloc[0])
    arm = alt.Color("arm:N", title=None, scale=alt.Scale(domain=["perturbation", "control"], range=["#c0392b", "#8c8c8c"]))
    lines = alt.Chart().mark_line(point=True).encode(
        x=alt.X(f"{magnitude_col}:Q", title=magnitude_col),
        y=alt.Y("score:Q", title="ability score"),
        color=arm,
        strokeDash=alt.StrokeDash("site:N", title="kind @ layer"),
        detail="site:N",
        tooltip=["arm:N", "site:N", alt.Tooltip(f"{magnitude_col}:Q"), alt.Tooltip("score:Q", format=".3f"),
                 alt.Tooltip("ais:Q", title="AIS", format="+.3f"), alt.Tooltip("baseline_score:Q", format=".3f")],
    )
    baseline = alt.Chart().mark_rule(strokeDash=[4, 3], color="black", opacity=0.6).encode(y="mean(baseline_score):Q")
    return alt.layer(lines, baseline, data=data).properties(width=width, height=height).facet(
        row=alt.Row("cluster_label:N", title=None, sort=clusters),
        column=alt.Column("ability:N", title=None),
    ).properties(title="Dose-response: ability score vs perturbation magnitude (dashed: unperturbed)")


def baseline_chart(ability_table: pd.DataFrame) -> alt.LayerChart:
    """Bar chart of the unperturbed model's ability scores ``M(f, a)``.

    ``ability_table`` is :func:`rephelpers.influence.impact.ability_scores` (the baseline rows are
    picked out) or any frame with ``ability``, ``score`` and ``n_items``.
    """
    data = ability_table
    if "cluster" in data.columns:
        data = data[data["cluster"] == -1]
    base = alt.Chart(data).encode(
        x=alt.X("ability:N", title="ability", sort="-y", axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("score:Q", title="M(f, a): mean item score", scale=alt.Scale(domain=[0, max(1.0, float(data["score"].max()))])),
        tooltip=["ability:N", alt.Tooltip("score:Q", format=".3f"), alt.Tooltip("n_items:Q", title="items")],
    )
    bars = base.mark_bar(color="#4c72b0")
    labels = base.mark_text(dy=-6).encode(text=alt.Text("score:Q", format=".2f"))
    return (bars + labels).properties(title="Unperturbed model: ability scores", width=60 * data["ability"].nunique(), height=200)


# -- Notebook 07: the known-answer testbed -------------------------------------------------


def scatter_chart(cells: pd.DataFrame) -> Any:
    """Φ (chain) against Φ* (fine-tunes), one point per cell, a panel per setting; diagonal cells filled."""
    import altair as alt

    data = cells.assign(cell=cells["planted"] + " → " + cells["ability"],
                        kind=np.where(cells["diagonal"], "own skill (diagonal)", "other skill"))
    # Layers without data of their own, so that the facet splits every layer by setting.
    x_title = "Φ* (leave-cluster-out fine-tuning)"
    base = alt.Chart().encode(
        x=alt.X("phi_star:Q", title=x_title),
        y=alt.Y("phi:Q", title="Φ (representation perturbation)"),
    )
    points = base.mark_point(size=70, filled=True).encode(
        color=alt.Color("planted:N", title="planted cluster"),
        shape=alt.Shape("kind:N", title="cell"),
        tooltip=["setting", "cell", alt.Tooltip("phi:Q", format="+.3f"), alt.Tooltip("phi_star:Q", format="+.3f"),
                 "exceeds", "flagged", "null"],
    )
    errors = base.mark_errorbar(opacity=0.5).encode(x=alt.X("phi_star_low:Q", title=x_title), x2="phi_star_high:Q",
                                                    color="planted:N")
    zero = alt.Chart().mark_rule(strokeDash=[3, 3], color="grey").encode(y=alt.datum(0))
    return (
        alt.layer(errors, points, zero, data=data)
        .properties(width=220, height=200)
        .facet(facet=alt.Facet("setting:N", title=None), columns=3)
        .properties(title="Does Φ from perturbing representations track Φ* from leaving the cluster out?")
    )


def scores_chart(scores: pd.DataFrame, chance: float = 0.25) -> Any:
    """Mean planted-ability score of f_all and each f_{−p} (bars; ± s.e. over items and seeds) and chance."""
    import altair as alt

    summary = scores.groupby(["model", "ability"])["score"].agg(["mean", "sem"]).reset_index()
    summary["low"], summary["high"] = summary["mean"] - summary["sem"], summary["mean"] + summary["sem"]
    bars = alt.Chart(summary).mark_bar().encode(
        x=alt.X("model:N", title=None), y=alt.Y("mean:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("model:N", legend=None),
    )
    err = alt.Chart(summary).mark_errorbar().encode(x="model:N", y="low:Q", y2="high:Q")
    rule = alt.Chart(pd.DataFrame({"chance": [chance]})).mark_rule(strokeDash=[4, 4]).encode(y="chance:Q")
    return (alt.layer(bars, err, rule).properties(width=160, height=180)
            .facet(column=alt.Column("ability:N", title=None), data=summary)
            .properties(title="Planted abilities with and without their cluster (dashed: chance)"))


def loss_chart(runs: pd.DataFrame, cache: Path) -> Any:
    """Training loss per step of every fine-tune (a 10-step moving average)."""
    import altair as alt

    frames = []
    for row in runs.itertuples(index=False):
        meta = json.loads((Path(cache) / row.key / "meta.json").read_text())
        loss = pd.Series(meta["losses"]).rolling(10, min_periods=1).mean()
        frames.append(pd.DataFrame({"step": np.arange(1, len(loss) + 1), "loss": loss,
                                    "model": row.model, "seed": row.seed}))
    data = pd.concat(frames, ignore_index=True)
    return alt.Chart(data).mark_line().encode(
        x="step:Q", y=alt.Y("loss:Q", title="next-token loss (nats)"), color="model:N", detail="seed:N",
    ).properties(width=420, height=200, title="Fine-tuning loss (10-step moving average)")


# -- Stage 06: Φ by estimator (issue 26) ----------------------------------------------------


def estimator_phi_frame(phi: pd.DataFrame, cluster_labels: Mapping[int, str] | None = None) -> pd.DataFrame:
    """``estimators/phi.parquet`` for :func:`estimator_phi_chart`: Φ scaled per estimator, ``scaled = Φ / max|Φ|``.

    The estimators' Φ have no common unit (relative loss, summed cosine, BM25), so each
    panel's colour is its own Φ over its largest |Φ|; the cell text is the raw Φ.
    """
    require({"cluster", "ability", "phi", "estimator"} <= set(phi.columns),
            "estimator_phi_chart needs estimators/phi.parquet's columns cluster, ability, phi, estimator")
    long = phi.copy()
    scale = long.groupby("estimator")["phi"].transform(lambda s: np.nanmax(np.abs(s)) if s.notna().any() else np.nan)
    long["scaled"] = long["phi"] / scale.replace(0, np.nan)
    long["cluster_label"] = [cluster_label(k, cluster_labels) for k in long["cluster"]]
    significant = long["p_adjusted"] < 0.05 if "p_adjusted" in long else pd.Series(False, index=long.index)
    long["label"] = ["n/a" if not np.isfinite(v) else f"{v:+.3g}" + ("*" if s else "")
                     for v, s in zip(long["phi"], significant.fillna(False))]
    return long


def estimator_phi_chart(phi: pd.DataFrame, cluster_labels: Mapping[int, str] | None = None,
                        cell_size: int = 52) -> alt.HConcatChart:
    """Φ (clusters × abilities) side by side, one panel per estimator (red = the cluster helps the ability).

    Colour: Φ over the panel's largest |Φ| (:func:`estimator_phi_frame`); ``*``: the
    permutation test's adjusted p < 0.05 (document-scored estimators only).
    """
    long = estimator_phi_frame(phi, cluster_labels)
    order = long.drop_duplicates("cluster_label").sort_values("cluster")["cluster_label"].tolist()
    colour = alt.Color("scaled:Q", title="Φ / max|Φ|",
                       scale=alt.Scale(scheme="redblue", reverse=True, domain=[-1, 1], domainMid=0))
    tooltip = [alt.Tooltip("estimator:N"), alt.Tooltip("cluster_label:N", title="cluster"), alt.Tooltip("ability:N"),
               alt.Tooltip("phi:Q", title="Φ", format="+.4g")]
    if "p_adjusted" in long:
        tooltip.append(alt.Tooltip("p_adjusted:Q", title="permutation p (adjusted)", format=".3g"))
    panels = []
    for estimator in dict.fromkeys(long["estimator"]):
        base = alt.Chart(long[long["estimator"] == estimator]).encode(
            x=alt.X("ability:N", title="ability", axis=alt.Axis(labelAngle=-30)),
            y=alt.Y("cluster_label:N", title="cluster", sort=order),
        )
        cells = base.mark_rect(stroke="white").encode(color=colour, tooltip=tooltip)
        text = base.mark_text(fontSize=11).encode(
            text="label:N", tooltip=tooltip,
            color=alt.condition("abs(datum.scaled) > 0.6", alt.value("white"), alt.value("black")))
        panels.append((cells + text).properties(title=estimator, width=cell_size * long["ability"].nunique(),
                                                height=cell_size * len(order)))
    return alt.hconcat(*panels).resolve_scale(color="shared").properties(
        title=alt.TitleParams("Φ by estimator", subtitle=["each panel scaled by its own largest |Φ|; "
                                                          "* permutation p (adjusted) < 0.05"]))


def rank_agreement_chart(agreement: pd.DataFrame) -> alt.Chart:
    """Spearman ρ between two estimators' Φ over the clusters, per ability (:func:`rephelpers.estimators.aggregate.rank_agreement`)."""
    frame = agreement.assign(pair=agreement["estimator_a"] + " ~ " + agreement["estimator_b"])
    base = alt.Chart(frame).encode(
        x=alt.X("ability:N", axis=alt.Axis(labelAngle=-30)), y=alt.Y("pair:N", title="estimators"))
    cells = base.mark_rect(stroke="white").encode(
        color=alt.Color("rho:Q", title="Spearman ρ", scale=alt.Scale(scheme="purpleorange", domain=[-1, 1])),
        tooltip=[alt.Tooltip("pair:N"), alt.Tooltip("ability:N"), alt.Tooltip("rho:Q", format="+.2f"),
                 alt.Tooltip("p_value:Q", format=".3g"), alt.Tooltip("n_clusters:Q")])
    text = base.mark_text(fontSize=11).encode(text=alt.Text("rho:Q", format="+.2f"))
    return (cells + text).properties(title="Rank agreement of Φ over the clusters, per ability")


def layer_change_chart(change: pd.DataFrame, interventions: Mapping[str, int] | None = None) -> Any:
    """Relative weight change ‖ΔW_l‖/‖W_l‖ per decoder layer (bars, one colour per fine-tune), with a
    rule at every layer a chain setting intervenes at: does the chain perturb where the skill was learned?

    ``change``: :func:`rephelpers.testbed.groundtruth.weight_change` rows with a ``model`` column;
    ``interventions``: setting label → intervention layer.
    """
    bars = alt.Chart(change).mark_bar(opacity=0.7).encode(
        x=alt.X("layer:O", title="decoder layer"),
        y=alt.Y("relative_change:Q", title="‖ΔW‖ / ‖W‖", stack=None),
        color=alt.Color("model:N", title="fine-tune"),
        tooltip=["model", "layer", alt.Tooltip("relative_change:Q", format=".4f")],
    )
    if not interventions:
        return bars.properties(width=520, height=200, title="Where the fine-tunes changed the model")
    marks = pd.DataFrame([{"setting": k, "layer": int(v)} for k, v in interventions.items()])
    rules = alt.Chart(marks).mark_rule(color="black", strokeDash=[4, 3]).encode(
        x="layer:O", tooltip=["setting", "layer"])
    return alt.layer(bars, rules).properties(
        width=520, height=200, title="Where the fine-tunes changed the model (dashed: where the chain intervenes)")


def dose_chart(curve: pd.DataFrame, dose_phi: pd.DataFrame | None = None) -> Any:
    """Φ* of the kept share of a planted set against its dose (line with its interval) and, beside it,
    every setting's Φ of that set on its own skill at the same doses (one line per setting).

    ``curve``: :func:`rephelpers.testbed.groundtruth.dose_curve`; ``dose_phi``: ``setting``,
    ``dose``, ``phi`` (:func:`rephelpers.testbed.groundtruth.dose_phi`).
    """
    star = alt.Chart(curve).encode(x=alt.X("dose:Q", title="share of the planted set kept in the fine-tune"))
    truth = alt.layer(
        star.mark_area(opacity=0.2).encode(y=alt.Y("phi_star_low:Q", title="Φ* (kept share)"), y2="phi_star_high:Q"),
        star.mark_line(point=True, color="black").encode(y="phi_star:Q"),
    ).properties(width=260, height=220, title="Φ* along the dose axis")
    if dose_phi is None or not len(dose_phi):
        return truth
    est = alt.Chart(dose_phi).mark_line(point=True).encode(
        x=alt.X("dose:Q", title="share of the planted set kept in the fine-tune"),
        y=alt.Y("phi:Q", title="Φ (chain, own skill)"), color=alt.Color("setting:N", title="setting"),
        tooltip=["setting", "dose", alt.Tooltip("phi:Q", format="+.3f")],
    ).properties(width=260, height=220, title="Every setting's Φ at the same doses")
    return alt.hconcat(truth, est)


def save_sweep_charts(top: str | Path, results: pd.DataFrame, axes: Sequence[str]) -> list[Path]:
    """Save :func:`phi_across_chart` for every axis of a sweep that takes
    more than one value in ``results``, as ``<top>/charts/phi_by_<axis>.html/.png``; returns the HTML paths."""
    written = []
    for axis in axes:
        if axis in results.columns and "phi" in results.columns and results[axis].astype(str).nunique() > 1:
            written.append(save_chart(phi_across_chart(results, axis), top, f"phi_by_{axis}")["html"])
    return written
