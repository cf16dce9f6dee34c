"""Charts and the report in a real browser (Debian's Chromium), with every network request refused.

The first tests make their own charts; the ``after_notebooks`` ones open what the CI-size chain
wrote (``runs/ci_nbmake``, or ``$REPHELPERS_CI_RUN``) and run after the notebooks in
``scripts/test.sh`` (see ``tests/conftest.py``). Screenshots land in ``runs/_browser/``.
"""

from __future__ import annotations

import os
from pathlib import Path
import re

import altair as alt
import pandas as pd
import pytest

from browser_support import ROOT, chromium_context, ink_fraction, offline_page, screenshot
from rephelpers.views import render

CI_RUN = Path(os.environ.get("REPHELPERS_CI_RUN", ROOT / "runs" / "ci_nbmake"))
MARKS = ".vega-embed .marks"  # the chart itself, not vega-embed's menu icon


@pytest.fixture(scope="module")
def browser():
    with chromium_context() as context:
        yield context


def _bars(title: str) -> alt.Chart:
    data = pd.DataFrame({"cluster": ["0: def, self, return", "1: license, copyright, software"], "phi": [0.4, -0.1]})
    return alt.Chart(data, title=title).mark_bar().encode(x="cluster:N", y="phi:Q", tooltip=["cluster", "phi"])


def _open_chart(browser, path: Path, name: str) -> float:
    """Open a chart file offline; assert it drew, needed no network and raised nothing; return its ink."""
    with offline_page(browser) as (page, blocked, errors):
        page.goto(path.as_uri())
        page.wait_for_selector(MARKS, timeout=30_000)
        page.wait_for_timeout(200)  # let vega finish its first paint
        png, _ = screenshot(page.locator(MARKS).first, name)
        assert blocked == [], f"{path.name} tried to load {blocked} (it must carry its JavaScript)"
        assert errors == [], f"{path.name}: {errors}"
    return ink_fraction(browser, png)


def test_saved_chart_renders_offline(browser, tmp_path):
    files = render.save_chart(_bars("offline chart"), tmp_path, "bars")
    text = files["html"].read_text()
    assert not re.search(r"<script[^>]+src=", text), "the chart loads a script from elsewhere"
    assert "cdn.jsdelivr" not in text and "vegaEmbed" in text
    assert files["png"].stat().st_size > 1000
    ink = _open_chart(browser, files["html"], "offline_chart")
    assert ink > 0.02, f"the chart drew almost nothing ({ink:.1%} of its pixels)"


def test_report_renders_offline_with_cluster_names_and_links(browser, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "clusters.json").write_text(
        '{"names": ["a", "b"], "clusters": [{"cluster": 0, "name": "def, self, return", "top_terms": ["def"]},'
        ' {"cluster": 1, "name": "license, copyright, software", "top_terms": ["license"]}]}'
    )
    chart = _bars("Φ by cluster")
    render.save_chart(chart, run, "06_bars")
    table = pd.DataFrame({"cluster": [0, 1], "ability": ["code", "icl"], "phi": [0.4, -0.1]})
    page_html = render.html_report("Report", [("Summary", "cluster 0 → code: Φ = +0.40."), ("Matrix", chart), ("Table", table)])
    (run / "report.html").write_text(page_html)
    with offline_page(browser) as (page, blocked, errors):
        page.goto((run / "report.html").as_uri())
        assert page.locator("svg").count() == 1
        body = page.inner_text("body")
        assert "cluster 0 (def, self, return) → code" in body
        assert "1: license, copyright, software" in body  # the legend of cluster names
        assert page.locator("th", has_text="cluster name").count() == 1
        png, _ = screenshot(page, "report_synthetic")
        links = page.locator("section a").evaluate_all("links => links.map(a => a.href)")
        assert [Path(link).name for link in links] == ["06_bars.html", "06_bars.png"]
        page.locator("section a", has_text="06_bars.html").click()
        page.wait_for_selector(MARKS, timeout=30_000)
        assert page.url.endswith("/run/charts/06_bars.html")
        assert blocked == [] and errors == [], (blocked, errors)
    assert ink_fraction(browser, png) > 0.01


# -- what the CI-size chain wrote (runs after the notebooks) -----------------------------------
def _ci_run() -> Path:
    if not (CI_RUN / "report.html").exists():
        pytest.skip(f"no finished CI-size run at {CI_RUN}: scripts/test.sh runs the notebooks into it before this test "
                    "(or point REPHELPERS_CI_RUN at a run directory holding report.html)")
    return CI_RUN


@pytest.mark.after_notebooks
def test_ci_run_charts_render_offline(browser):
    charts = sorted((_ci_run() / "charts").glob("*.html"))
    assert len(charts) >= 5, f"only {len(charts)} chart files in {CI_RUN / 'charts'}"
    blank = {}
    for path in charts:
        ink = _open_chart(browser, path, f"ci_charts/{path.stem}")
        if ink < 0.005:
            blank[path.name] = ink
        assert path.with_suffix(".png").exists(), f"{path.name} has no PNG beside it"
    assert not blank, f"charts drawn (almost) blank: {blank}"


@pytest.mark.after_notebooks
def test_ci_run_report_renders_offline(browser):
    run = _ci_run()
    names = render.cluster_names(run)
    assert names, f"{run / 'clusters.json'} names no cluster"
    with offline_page(browser) as (page, blocked, errors):
        page.goto((run / "report.html").as_uri())
        assert page.locator("section svg").count() >= 2, "the report's charts are missing"
        body = page.inner_text("body")
        for k, name in names.items():
            assert f"{k}: {name}" in body, f"cluster {k} is not named ({name!r}) in the report"
        hrefs = page.locator("section a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
        assert any(h.endswith(".html") for h in hrefs), "no section links its chart file"
        missing = [h for h in hrefs if not (run / h).exists()]
        assert not missing, f"report links to files that do not exist: {missing}"
        png, _ = screenshot(page, "ci_report")
        assert blocked == [] and errors == [], (blocked, errors)
    assert ink_fraction(browser, png) > 0.01
