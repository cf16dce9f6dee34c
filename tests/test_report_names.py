"""Cluster names and chart links in report.html; chart HTML that carries its own JavaScript."""

from __future__ import annotations

import json
from pathlib import Path
import re

import altair as alt
import pandas as pd
import nbformat
import pytest

from rephelpers.views import explorers, render
from rephelpers.artifacts import RunDir
from rephelpers.errors import RephelpersError

CLUSTERS = {
    "names": ["old name 0", "old name 1", "old name 2"],
    "clusters": [
        {"cluster": 0, "name": "def, self, return", "top_terms": ["def", "self", "return", "none"]},
        {"cluster": 1, "name": "", "top_terms": ["license", "copyright", "software", "use"]},
    ],
}


@pytest.fixture
def run(tmp_path):
    (tmp_path / "clusters.json").write_text(json.dumps(CLUSTERS))
    return RunDir(tmp_path)


def _chart() -> alt.Chart:
    return alt.Chart(pd.DataFrame({"x": [1, 2], "y": [3, 4]})).mark_bar().encode(x="x:O", y="y:Q")


def test_cluster_names_prefer_the_characterisation(run, tmp_path):
    # name, else the first three top terms, else the clustering's names; RunDir and paths alike
    expected = {0: "def, self, return", 1: "license, copyright, software", 2: "old name 2"}
    assert render.cluster_names(run) == expected
    assert render.cluster_names(tmp_path) == expected and render.cluster_names(str(tmp_path)) == expected
    assert render.cluster_names(tmp_path / "elsewhere") == {}
    (tmp_path / "clusters.json").write_text("{broken")
    with pytest.raises(RephelpersError, match="re-run notebook 01"):
        render.cluster_names(tmp_path)


def test_save_chart_embeds_its_javascript_and_accepts_a_path(tmp_path):
    files = render.save_chart(_chart(), tmp_path, "bars")  # a Path's .root is "/": must not land there
    assert files["html"] == tmp_path / "charts" / "bars.html" and files["png"].exists()
    html = files["html"].read_text()
    assert not re.search(r"<script[^>]+src=", html) and "cdn.jsdelivr" not in html
    assert "window.vegaEmbed" in html and len(html) > 300_000


def _fake_kernel(monkeypatch, metadata):
    import types

    import IPython

    shell = types.SimpleNamespace(kernel=types.SimpleNamespace(get_parent=lambda: {"metadata": metadata}))
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setitem(render._FRONTEND, "jupyterlab", False)


@pytest.fixture
def offline_renderer():
    before = alt.renderers.active
    assert render.use_offline_renderer() == "rephelpers-offline" and render.use_offline_renderer() == "rephelpers-offline"
    yield
    alt.renderers.enable(before)


def test_importing_the_views_leaves_altairs_renderer_alone():
    import subprocess
    import sys

    code = ("import altair as alt; before = alt.renderers.active; "
            "import rephelpers.views.render, rephelpers.views.charts, rephelpers.views.explorers; "
            "print(before, alt.renderers.active)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after = done.stdout.split()
    assert after == before != "rephelpers-offline"


NOTEBOOKS = sorted(Path(__file__).resolve().parents[1].glob("notebooks/[0-9]*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_switches_to_the_offline_renderer_in_its_first_cell(path):
    cells = [c for c in nbformat.read(path, as_version=4).cells
             if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]
    assert "\nuse_offline_renderer()" in "\n" + cells[0].source, f"{path.name}: its first code cell does not call use_offline_renderer()"


def test_notebook_renderer_hands_charts_to_jupyterlab_and_stays_small(monkeypatch, offline_renderer):
    assert alt.renderers.active == "rephelpers-offline"
    _fake_kernel(monkeypatch, {"cellId": "c1", "recordTiming": False, "deletedCells": []})  # what JupyterLab sends
    data, metadata = _chart().properties(title="t")._repr_mimebundle_()
    assert set(data) == {render.NOTEBOOK_MIMETYPE, "text/plain"}  # no text/html that would fetch vega from a CDN
    assert data[render.NOTEBOOK_MIMETYPE]["mark"]["type"] == "bar" and data["text/plain"] == "<altair chart: t>"
    assert metadata[render.NOTEBOOK_MIMETYPE]["embed_options"]["renderer"] == "svg"
    assert len(json.dumps(data)) < 5_000  # the vega bundle never goes into a notebook
    # remembered for the kernel: an explorer redrawn from a widget message has no cell metadata
    render._FRONTEND["jupyterlab"] = True
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert render.NOTEBOOK_MIMETYPE in _chart()._repr_mimebundle_()[0]


def test_notebook_renderer_keeps_altairs_html_for_papermill_and_nbmake(monkeypatch, offline_renderer):
    _fake_kernel(monkeypatch, {})  # nbclient sends no cell metadata
    bundle = _chart()._repr_mimebundle_()
    assert set(bundle) == {"text/html"} and "vegaEmbed" in bundle["text/html"]
    assert render._FRONTEND["jupyterlab"] is False


def test_report_names_clusters_everywhere_and_links_chart_files(run):
    chart = _chart()
    files = render.save_chart(chart, run, "06_phi_heatmap")
    table = pd.DataFrame({"cluster": [0, 1, -1], "ability": ["code", "icl", "code"], "phi": [0.4, 0.1, 0.0]})
    page = render.html_report(
        "R", [("Summary", "cluster 0 → code: Φ = +0.40.\ncluster 7 is unnamed"), ("Matrix", chart), ("Table", table)],
        intro="cluster 1 and cluster 10",
    )
    assert "cluster 0 (def, self, return) → code" in page and "cluster 7 is unnamed" in page
    assert "cluster 1 (license, copyright, software) and cluster 10" in page
    assert "0: def, self, return; 1: license, copyright, software; 2: old name 2" in page
    header = re.search(r"<thead>.*?</thead>", page, re.S).group(0)
    assert re.findall(r"<th>(.*?)</th>", header) == ["cluster", "cluster name", "ability", "phi"]
    assert "<td>def, self, return</td>" in page
    hrefs = re.findall(r"href='([^']+)'", page)
    assert hrefs == ["charts/06_phi_heatmap.html", "charts/06_phi_heatmap.png"]
    assert all((run.root / h).exists() for h in hrefs) and files["html"] == run.root / hrefs[0]
    assert "<script" not in page


def test_report_takes_explicit_names_files_and_no_names(run, tmp_path):
    chart = _chart()
    table = pd.DataFrame({"cluster": [0], "phi": [0.4]})
    other = render.save_chart(_chart(), tmp_path / "elsewhere", "other")
    page = render.html_report("R", [("A", chart, other), ("T", table)], cluster_labels={0: "maths"}, base_dir=tmp_path)
    assert re.findall(r"href='([^']+)'", page) == ["elsewhere/charts/other.html", "elsewhere/charts/other.png"]
    assert "<td>maths</td>" in page
    plain = render.html_report("R", [("T", table), ("S", "cluster 0 → code")])  # no saved chart: no names
    assert "cluster name" not in plain and "cluster 0 → code" in plain
    with pytest.raises(RephelpersError, match=r"\(heading, content\)"):
        render.html_report("R", [("only a heading",)])


def test_item_explorer_names_its_cells():
    from rephelpers.influence import impact

    scores = impact.simulate_scores({(0, "math"): 0.9}, {"math": 0.8, "code": 0.7}, items_per_task=10, seed=2)
    table = pd.DataFrame({"cluster": [0, 1], "ability": ["math", "code"], "phi": [0.9, 0.1], "significant": [True, False]})
    menu = explorers.item_explorer(scores, table, cluster_labels={0: "numbers"}).children[0]
    assert [label for label, _ in menu.options] == ["0: numbers × math  (Φ = +0.900 *)", "cluster 1 × code  (Φ = +0.100)"]
