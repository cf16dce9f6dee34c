"""The offline chart page's writer, a script run in a child process (rephelpers/views/offline_page.py)."""

import subprocess
import sys

from rephelpers.views import render
from rephelpers.views.offline_page import write_page


def test_the_page_is_the_pieces_in_order_and_replaces_an_old_one(tmp_path):
    bundle = tmp_path / "bundle.js"
    bundle.write_text("function vegaEmbed() {}\n" * 3, encoding="utf-8")
    target = tmp_path / "chart.html"
    target.write_text("an older page")
    write_page(str(bundle), str(target), "<head>", "<body>", "</html>", '{"mark": "bar"}')
    assert target.read_text() == "<head>" + bundle.read_text() + "<body>" + '{"mark": "bar"}' + "</html>"
    assert not (tmp_path / "chart.html.part").exists()


def test_render_runs_it_as_a_script_in_isolated_mode(tmp_path):
    # As write_offline_chart_html does: `python -I` finds no rephelpers, the script needs none.
    bundle = tmp_path / "bundle.js"
    bundle.write_text("js", encoding="utf-8")
    target = tmp_path / "chart.html"
    done = subprocess.run([sys.executable, "-I", str(render._PAGE_WRITER), str(bundle), str(target), "H", "B", "T"],
                          input="{}", text=True, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert target.read_text() == "HjsB{}T"
