"""Stage-06 charts, report and item explorer: the right marks, a report that needs no network."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rephelpers.errors import RephelpersError
from rephelpers.views import charts, explorers, render
from rephelpers.influence import findings, impact


@pytest.fixture(scope="module")
def scores() -> pd.DataFrame:
    return impact.simulate_scores({(0, "math"): 0.9, (1, "code"): 0.1}, {"math": 0.8, "code": 0.7},
                                  items_per_task=40, control_effect=0.05, seed=2)


@pytest.fixture(scope="module")
def table(scores) -> pd.DataFrame:
    return findings.influence_table(scores, n_boot=100)


def test_heatmap_frame_marks_each_cell_by_its_verdict(table, scores):
    long = charts.phi_heatmap_frame(table, cluster_labels={0: "numbers"})
    assert len(long) == 3 * len(table)
    phi_panel = long[long.panel == charts.PHI_PANELS[0][0]].set_index(["cluster", "ability"])
    for row in table.itertuples(index=False):
        label = phi_panel.loc[(row.cluster, row.ability), "label"]
        assert label.split(" ")[0] == f"{row.phi:+.2f}"
        assert label.endswith("*") == row.verdict.startswith(("cluster-specific finding", "finding"))
    assert set(long.cluster_label) == {"0: numbers", "cluster 1"}
    # Cluster 0 hurts math far beyond 0 (Holm-significant); stage 04 calls its perturbation
    # non-specific: the chart must not star it, as the Φ ≠ 0 star of old did.
    gate = pd.DataFrame({"cluster": [0, 1], "arm": "perturbation", "specific": [False, True],
                         "specificity_verdict": ["non-specific damage", "specific"]})
    gated = findings.influence_table(scores, n_boot=20, specificity=gate)
    math0 = gated[(gated.cluster == 0) & (gated.ability == "math")].iloc[0]
    assert math0["significant"] and math0["verdict"] == "non-specific damage"
    marks = charts.phi_heatmap_frame(gated).set_index(["panel", "cluster", "ability"])["label"]
    assert marks[(charts.PHI_PANELS[0][0], 0, "math")] == f"{math0.phi:+.2f} ns"
    assert "*" not in marks[(charts.PHI_PANELS[2][0], 0, "math")]
    assert not marks.xs(charts.PHI_PANELS[1][0]).str.contains("[*a-z]", regex=True).any()  # the control panel: no verdict
    finding = table.assign(verdict=np.where(table.cluster == 0, "cluster-specific finding", "no effect"))
    labels = charts.phi_heatmap_frame(finding).query("panel == @charts.PHI_PANELS[0][0]").set_index("cluster")["label"]
    assert labels.loc[0].str.endswith(" **").all() and not labels.loc[1].str.contains("*", regex=False).any()
    assert charts.VERDICT_LEGEND in str(charts.phi_heatmap(gated).to_dict()["title"])


def test_heatmap_has_a_shared_diverging_scale_centred_at_zero(table):
    spec = charts.phi_heatmap(table).to_dict()
    assert len(spec["hconcat"]) == 3 and spec["resolve"]["scale"]["color"] == "shared"
    scale = spec["hconcat"][0]["layer"][0]["encoding"]["color"]["scale"]
    assert scale["domainMid"] == 0 and scale["domain"][0] == -scale["domain"][1]
    assert len(charts.phi_heatmap(table, with_difference=False).to_dict()["hconcat"]) == 2


def test_dose_response_chart_facets_cluster_by_ability(scores):
    spec = charts.dose_response_chart(impact.dose_response(scores)).to_dict()
    assert spec["facet"]["row"]["field"] == "cluster_label" and spec["facet"]["column"]["field"] == "ability"


def test_report_is_self_contained_and_escaped(table, scores):
    page = render.html_report(
        "Influence <test>",
        [("Matrix", charts.phi_heatmap(table)), ("Table", table), ("Note", "a < b\nsecond line")],
        intro="run: x",
    )
    assert page.count("<svg") == 1 and "<script" not in page and "<link" not in page
    assert "Influence &lt;test&gt;" in page and "<p>a &lt; b</p>" in page
    assert page.count("<tr") == len(table) + 1  # header + one row per cell


def test_item_explorer_builds_headless(scores, table):
    explorer = explorers.item_explorer(scores, table)
    cell_menu, config_menu, _ = explorer.children
    strongest = table.loc[table.phi.abs().idxmax()]
    assert cell_menu.value == (int(strongest.cluster), strongest.ability)
    config_menu.value = config_menu.options[1][1]  # a single config: no error on the switch
    cell_menu.value = cell_menu.options[-1][1]
    assert config_menu.value == config_menu.options[0][1]
    assert np.all([isinstance(label, str) for label, _ in config_menu.options])


def test_answer_explorer_pairs_each_answer_with_the_baseline(scores, capsys):
    explorer = explorers.answer_explorer(scores, max_rows=500)
    (ability_menu, config_menu), output = explorer.children[0].children, explorer.children[1]
    ability, config_id = ability_menu.value, config_menu.value
    # the header counts the items lost and gained against the unperturbed model, computed here independently
    base = scores[(scores.config_id == "baseline") & (scores.ability == ability)].set_index(["task", "item"])["score"]
    mine = scores[(scores.config_id == config_id) & (scores.ability == ability)].set_index(["task", "item"])["score"]
    change = (mine - base.loc[mine.index]).to_numpy()
    header = output.outputs[0]["text"] if output.outputs else capsys.readouterr().out
    assert f"{int((change < 0).sum())} lost, {int((change > 0).sum())} gained" in header
    assert all(label.endswith(f"[{cid}]") for label, cid in config_menu.options)
    assert "baseline" not in [cid for _, cid in config_menu.options] and len(config_menu.options) == scores.config_id.nunique() - 1
    ability_menu.value = ability_menu.options[-1]  # switching redraws without error


def test_in_a_batch_run_the_table_explorers_are_their_first_view(scores, table, capsys, monkeypatch):
    from rephelpers.progress import HEADLESS_ENV

    monkeypatch.setenv(HEADLESS_ENV, "1")
    answers = explorers.answer_explorer(scores, max_rows=500)
    header = capsys.readouterr().out
    assert isinstance(answers, pd.DataFrame)
    ability, rest = header.split(" under ", 1)  # the first menu entries, as the widgets show them
    first = rest.split(": ", 1)[0]
    assert ability == sorted(scores.ability.unique())[0] and first in set(scores.config_id) - {"baseline"}
    base = scores[(scores.config_id == "baseline") & (scores.ability == ability)].set_index(["task", "item"])["score"]
    mine = scores[(scores.config_id == first) & (scores.ability == ability)].set_index(["task", "item"])["score"]
    change = (mine - base.loc[mine.index]).to_numpy()
    assert f"{int((change < 0).sum())} lost, {int((change > 0).sum())} gained" in header
    assert len(answers) == len(mine) and (answers["score_pert"] - answers["score_base"]).abs().sum() == np.abs(change).sum()
    items = explorers.item_explorer(scores, table)
    header = capsys.readouterr().out
    strongest = table.loc[table.phi.abs().idxmax()]
    assert isinstance(items, pd.DataFrame) and f"× {strongest.ability}:" in header
    assert f"{int((items['direction'] == 'lost').sum())} items lost" in header


def test_phi_across_a_sweep_axis_is_drawn_and_saved_per_axis(tmp_path):
    from rephelpers.views.charts import save_sweep_charts

    rows = [{"cluster": k, "ability": a, "model_name": m, "intervention_layer": 15, "phi": 0.1 * k + (m == "b") * 0.2,
             "phi_low": 0.0, "phi_high": 0.5, "significant": k == 1 and m == "b"}
            for m in ("a", "b") for k in (0, 1) for a in ("code", "icl")]
    results = pd.DataFrame(rows)
    spec = charts.phi_across_chart(results, "model_name").to_dict()
    assert spec["facet"]["column"]["field"] == "ability"
    data = spec["datasets"][next(iter(spec["datasets"]))]
    assert len(data) == 8 and {d["value"] for d in data} == {"a", "b"}
    assert [d["phi"] for d in data if d["significant"]] == [pytest.approx(0.3)] * 2  # cluster 1 under b, both abilities
    layers = results.assign(intervention_layer=np.where(results.model_name == "a", 15, 3))
    spec = charts.phi_across_chart(layers, "intervention_layer").to_dict()
    assert spec["spec"]["layer"][1]["encoding"]["x"]["sort"] == ["3", "15"]  # numbers in numeric order
    # one chart per axis that varies: the layer takes one value here, so only the model axis is drawn
    written = save_sweep_charts(tmp_path, results, ["model_name", "intervention_layer"])
    assert [p.name for p in written] == ["phi_by_model_name.html"] and (tmp_path / "charts" / "phi_by_model_name.png").exists()
    with pytest.raises(RephelpersError, match="no column 'seed'"):
        charts.phi_across_chart(results, "seed")
