"""Charts are keyed artifacts: the same chart leaves its files alone, another one moves them to .history/."""

from __future__ import annotations

import json

import altair as alt
import pandas as pd

from rephelpers.artifacts import MANIFEST, RunDir, stable_hash
from rephelpers.views import render


def _chart(y: list[int]) -> alt.Chart:
    pick = alt.selection_point(fields=["x"])  # an unnamed selection: altair 6 names it by its content
    data = pd.DataFrame({"x": [1, 2], "y": y})
    return alt.Chart(data).mark_bar().encode(x="x:O", y="y:Q").add_params(pick)


def test_a_chart_is_keyed_by_its_spec_and_a_changed_one_moves_the_old_files_to_history(tmp_path):
    run = RunDir(tmp_path)
    first = render.save_chart(_chart([3, 4]), run, "bars")
    key = json.loads((tmp_path / MANIFEST).read_text())["charts/bars.html"]["key"]
    assert key == render.chart_key(_chart([3, 4]))  # a second, identically drawn chart: same key
    assert render.chart_key(_chart([3, 5])) != key
    assert key == stable_hash("chart", json.dumps(_chart([3, 4]).to_dict(), sort_keys=True))

    stamps = {k: p.stat().st_mtime_ns for k, p in first.items()}
    render.save_chart(_chart([3, 4]), run, "bars")  # same chart: nothing rewritten
    assert {k: p.stat().st_mtime_ns for k, p in first.items()} == stamps
    assert not (tmp_path / ".history").exists()

    old_html = first["html"].read_text()
    render.save_chart(_chart([3, 5]), run, "bars")  # other data: the old files are kept in .history/
    history = sorted(p.name for p in (tmp_path / ".history").iterdir())
    assert [h.split(".")[0:2] for h in history] == [["charts__bars", "html"], ["charts__bars", "png"]]
    assert all(f".{key}." in h for h in history)
    kept = next(p for p in (tmp_path / ".history").iterdir() if p.name.startswith("charts__bars.html"))
    assert kept.read_text() == old_html and first["html"].read_text() != old_html
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["charts/bars.png"]["key"] == manifest["charts/bars.html"]["key"] == render.chart_key(_chart([3, 5]))
