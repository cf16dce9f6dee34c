"""The explorers the way a person uses them: JupyterLab in Chromium, a notebook run, a control changed.

JupyterLab starts on a free local port with a token; Chromium opens CI-size notebooks 01 and
04 (the copies ``scripts/test.sh`` parameterises into ``runs/_nbmake``, reading and writing
the CI-size run ``runs/ci_nbmake`` that nbmake just produced), runs every cell through the
Run menu's command, and checks that the explorer renders and that picking another cluster
changes what it shows. Every request that leaves the local server is refused and recorded.

It runs after the notebooks (``after_notebooks``, see tests/conftest.py). Without a
finished CI-size run it skips; to run it alone::

    bash scripts/test.sh -k "jupyterlab or browser"     # or, with a CI-size run already there:
    python -m pytest tests/test_jupyterlab.py

Screenshots: ``runs/_browser/jupyterlab_*.png``.
"""

from __future__ import annotations

import os
from pathlib import Path
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from browser_support import ROOT, SCREENSHOTS, chromium_context, ink_fraction, offline_page, screenshot

CI_RUN = Path(os.environ.get("REPHELPERS_CI_RUN", ROOT / "runs" / "ci_nbmake"))
CI_NOTEBOOKS = Path(os.environ.get("REPHELPERS_CI_NOTEBOOKS", ROOT / "runs" / "_nbmake"))
RUN_ALL_TIMEOUT_S = 600
CHART = ".jp-RenderedVegaLite svg.marks"  # drawn by JupyterLab's own vega-lite renderer

pytestmark = pytest.mark.after_notebooks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def notebooks() -> Path:
    """Copies of the CI-size notebooks 01 and 04 under runs/_browser/lab (the originals stay untouched)."""
    names = ["01_corpus_clusters.ipynb", "04_perturbations.ipynb"]
    missing = [n for n in names if not (CI_NOTEBOOKS / n).exists()]
    if missing:
        pytest.skip(f"no CI-size notebooks in {CI_NOTEBOOKS} (missing {missing}): scripts/test.sh writes them "
                    "(or point REPHELPERS_CI_NOTEBOOKS at a folder holding them)")
    folder = SCREENSHOTS / "lab"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(CI_NOTEBOOKS / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def lab(notebooks):
    """``(base_url, token)`` of a JupyterLab serving the project root; stopped afterwards."""
    port, token = _free_port(), secrets.token_hex(16)
    scratch = Path(tempfile.mkdtemp(prefix="rephelpers-lab-"))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(scratch / "config"), "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"),
        "JUPYTER_DATA_DIR": str(scratch / "data"), "JUPYTER_PLATFORM_DIRS": "1",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}", "--expose-app-in-browser",
        "--LabApp.extension_manager=readonly", "--LabApp.news_url=None", "--ServerApp.terminals_enabled=False",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        f"--LabApp.workspaces_dir={scratch / 'workspaces'}", f"--LabApp.user_settings_dir={scratch / 'settings'}",
    ]
    # No "get notified about Jupyter news?" toast over the notebook (and no fetch it would make).
    notification = scratch / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    log = open(scratch / "lab.log", "w")
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start ({command}):\n{(scratch / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    with chromium_context(viewport=(1400, 1000)) as context:
        yield context


def _require_stage(artifact: str, stage: str) -> None:
    if not (CI_RUN / artifact).exists():
        pytest.skip(f"no {CI_RUN / artifact}: the CI-size notebooks up to {stage} (scripts/test.sh runs them before this "
                    "test) must have run, or point REPHELPERS_CI_RUN at a run that has it")


def _run_notebook(page, base: str, token: str, path: Path) -> None:
    """Open ``path`` in JupyterLab, run all its cells (the Run menu's command) and wait for the kernel."""
    relative = path.relative_to(ROOT).as_posix()
    page.goto(f"{base}/lab/tree/{relative}?token={token}")
    # JupyterLab may restore other notebooks first: wait until this one is the current, idle one.
    page.wait_for_function(
        """(path) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                       const s = w && w.sessionContext;
                       return s && s.path === path && s.session && s.session.kernel
                              && s.session.kernel.status === 'idle'; }""",
        arg=relative, timeout=120_000,
    )
    page.evaluate(
        """() => { window.__runAll = undefined;
                   window.jupyterapp.commands.execute('notebook:run-all-cells').then(
                       ok => { window.__runAll = ok ? 'ok' : 'a cell failed'; },
                       err => { window.__runAll = 'error: ' + err; }); }"""
    )
    page.wait_for_function("() => window.__runAll !== undefined", timeout=RUN_ALL_TIMEOUT_S * 1000)
    outcome = page.evaluate("() => window.__runAll")
    if outcome != "ok":
        errors = page.evaluate(
            """() => { const found = [];
                       const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
                       for (let i = 0; i < cells.length; i++) {
                           const outputs = cells.get(i).toJSON().outputs || [];
                           for (const o of outputs) if (o.output_type === 'error')
                               found.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
                       }
                       return found; }"""
        )
        screenshot(page, f"jupyterlab_{path.stem}_failed")
        pytest.fail(f"running {path.name} in JupyterLab: {outcome}: " + "; ".join(errors))


def test_cluster_explorer_works_in_jupyterlab(lab, notebooks, browser):
    _require_stage("clusters.json", "01_corpus_clusters")
    base, token = lab
    with offline_page(browser, allow=[base]) as (page, blocked, _):
        _run_notebook(page, base, token, notebooks / "01_corpus_clusters.ipynb")
        charts = page.locator(CHART)  # JupyterLab skips drawing cells out of view: attached, not visible
        charts.first.wait_for(state="attached", timeout=30_000)
        assert charts.count() >= 3, f"{charts.count()} of notebook 01's 3 charts were drawn"
        marks = charts.evaluate_all("svgs => svgs.map(s => s.querySelectorAll('path, rect, text, symbol').length)")
        assert min(marks) > 10, f"charts drawn without marks: {marks}"
        charts.first.scroll_into_view_if_needed()
        screenshot(page, "jupyterlab_01_chart")
        explorer = page.locator(".widget-vbox", has=page.locator(".widget-dropdown label", has_text="cluster")).last
        explorer.scroll_into_view_if_needed()
        view = explorer.locator(".widget-html")
        before = view.inner_text()
        assert "Top terms" in before and "Closest to the centroid" in before, before[:500]
        menu = explorer.locator("select")
        options = menu.locator("option").all_inner_texts()
        assert len(options) >= 2, f"the cluster explorer offers {options}"
        menu.select_option(index=1)
        page.wait_for_function("([el, old]) => el.innerText !== old", arg=[view.element_handle(), before], timeout=30_000)
        after = view.inner_text()
        assert "Top terms" in after and after != before
        explorer.scroll_into_view_if_needed()
        screenshot(page, "jupyterlab_01_cluster_explorer")
        assert blocked == [], f"JupyterLab or the notebook reached out to {blocked}"


def test_specificity_explorer_works_in_jupyterlab(lab, notebooks, browser):
    _require_stage("specificity.parquet", "04_perturbations")
    base, token = lab
    with offline_page(browser, allow=[base]) as (page, blocked, _):
        _run_notebook(page, base, token, notebooks / "04_perturbations.ipynb")
        explorer = page.locator(".widget-interact").last
        chart = explorer.locator(CHART)
        chart.wait_for(state="attached", timeout=60_000)
        explorer.scroll_into_view_if_needed()
        before = chart.text_content()
        assert "cluster" in before, before[:300]
        menu = explorer.locator(".widget-dropdown", has=page.locator("label", has_text="cluster")).locator("select")
        values = menu.locator("option").all_inner_texts()
        assert len(values) >= 2, f"the explorer offers clusters {values}"
        current = menu.evaluate("el => el.options[el.selectedIndex].text")
        other = next(v for v in values if v != current)
        menu.select_option(label=other)
        page.wait_for_function(
            "([root, sel, k]) => { const svg = root.querySelector(sel);"
            " return svg && svg.textContent.includes('cluster ' + k); }",
            arg=[explorer.element_handle(), CHART, other], timeout=120_000,
        )
        after = chart.text_content()
        assert after != before and f"cluster {other}" in after
        explorer.scroll_into_view_if_needed()
        screenshot(page, "jupyterlab_04_specificity_explorer")
        assert ink_fraction(browser, chart.screenshot()) > 0.02, "the explorer's chart is (almost) blank"
        assert blocked == [], f"JupyterLab or the notebook reached out to {blocked}"
