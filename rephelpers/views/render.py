"""Saving charts next to the results, rendering them offline, and the HTML report.

``save_chart`` writes both an interactive HTML file and a static PNG (through
``vl-convert-python``) into ``<run_dir>/charts/``, so a papermill run leaves pictures a
person can open without Jupyter. The HTML file carries its own JavaScript (vega, vega-lite
and vega-embed, inlined by vl-convert), so it renders with no network.
:func:`use_offline_renderer` (called by every notebook's first code cell; importing this module
changes nothing in altair's renderers) makes the ``rephelpers-offline`` renderer altair's active
one: charts shown in JupyterLab go to its own vega-lite renderer, so they render on an offline
machine too; elsewhere altair's default HTML output is kept (``alt.renderers.enable("default")``
uses it everywhere).

The charts themselves are built in :mod:`rephelpers.views.charts`; stage 06 writes a
self-contained HTML report with :func:`html_report`. :func:`cluster_names` (from
:mod:`rephelpers.views.labels`, re-exported here) gives charts, the report and the explorers
their cluster labels.
"""

from __future__ import annotations

from html import escape
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import altair as alt
import pandas as pd

from ..artifacts import RunDir, stable_hash
from ..errors import RephelpersError
from .labels import (  # noqa: F401  (re-exported: render.cluster_names is the public name)
    _name_clusters_in_table, _name_clusters_in_text, _run_root, cluster_label, cluster_names)

alt.data_transformers.disable_max_rows()


def save_chart(chart: alt.TopLevelMixin, run_dir: str | Path | RunDir, name: str, scale: float = 2.0) -> dict[str, Path]:
    """Save ``chart`` as ``charts/<name>.html`` and ``charts/<name>.png``; return the paths.

    The HTML file embeds vega, vega-lite and vega-embed (about 0.9 MB, from vl-convert), so it
    opens offline and stays readable in an archived run directory. Both files are artifacts of
    the run directory keyed by :func:`chart_key` (the chart's spec, its data included): the same
    chart again leaves them as they are, another one moves the old files to ``.history/``. The
    chart object is remembered with its files, so :func:`html_report` can link a section to them.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    key = chart_key(chart)
    html, png = f"charts/{name}.html", f"charts/{name}.png"
    if not (run.is_fresh(html, key) and run.is_fresh(png, key)):
        run.save(html, key, lambda tmp: write_offline_chart_html(chart, tmp))
        run.save(png, key, lambda tmp: chart.save(str(tmp), format="png", scale_factor=scale), scale=scale)
    files = {"html": run.path(html), "png": run.path(png)}
    _SAVED_CHARTS[id(chart)] = (chart, files)
    return files


def chart_key(chart: alt.TopLevelMixin) -> str:
    """``stable_hash`` of the chart's Vega-Lite spec (``to_dict()``: marks, encodings and the data
    inline). altair 6 names unnamed selections and views by a hash of their content
    (``param_54dd…``), not by a per-session counter, so the same chart has the same key in any session."""
    return stable_hash("chart", json.dumps(chart.to_dict(), sort_keys=True, default=str))


_OFFLINE_PAGE_HEAD = (
    "<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n"
    "<style>#vis.vega-embed{width:100%;display:flex}</style>\n<script type='text/javascript'>\n"
)
_OFFLINE_PAGE_BODY = "\n</script>\n</head>\n<body>\n<div id='vis'></div>\n<script type='text/javascript'>\nvegaEmbed('#vis', "
_OFFLINE_PAGE_TAIL = ", {\"mode\": \"vega-lite\"}).catch(console.error);\n</script>\n</body>\n</html>\n"

# Written by a child process: with the ~1 MB page assembled inside a notebook's kernel, nbclient
# (papermill, nbmake) hung on stage 03's later ``interact`` cell in 4 of 27 runs (0 of 35 with
# altair's CDN page; 1 of 19 this way, which may be nbclient's own flake), so the kernel only
# hands over the spec.
_PAGE_WRITER = Path(__file__).with_name("offline_page.py")


def write_offline_chart_html(chart: alt.TopLevelMixin, path: str | Path) -> Path:
    """Write a whole HTML page that draws ``chart`` with vega, vega-lite and vega-embed inlined."""
    import subprocess
    import sys

    spec = json.dumps(chart.to_dict()).replace("</", "<\\/")  # no "</script>" inside the script
    done = subprocess.run(
        [sys.executable, "-I", str(_PAGE_WRITER), str(_vega_bundle_path()), str(path),
         _OFFLINE_PAGE_HEAD, _OFFLINE_PAGE_BODY, _OFFLINE_PAGE_TAIL],
        input=spec, text=True, capture_output=True, timeout=120,
    )
    if done.returncode != 0:
        raise RephelpersError(f"could not write {path}: {done.stderr[-500:]}")
    return Path(path)


def _vega_bundle_path() -> Path:
    """vega + vega-lite + vega-embed as one script (vl-convert), cached on disk; its path.

    Made in a child process: vl-convert's bundler, run inside a notebook's kernel, makes
    nbclient (papermill, nbmake) hang on a later ``interact`` cell (3 of 4 runs of stage 03).
    """
    import subprocess
    import sys

    import vl_convert
    from altair.utils._importers import vl_version_for_vl_convert

    from ..paths import cache_dir

    version = vl_version_for_vl_convert()
    path = cache_dir() / f"vega-bundle-{vl_convert.__version__}-{version}.js"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        code = ("import sys, vl_convert; sys.stdout.buffer.write("
                f"vl_convert.javascript_bundle(vl_version={version!r}).encode())")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
        if done.returncode != 0 or b"vegaEmbed" not in done.stdout:
            raise RephelpersError(f"vl-convert could not bundle vega {version} for the chart files: "
                                  f"{done.stderr.decode(errors='replace')[-500:]} (reinstall vl-convert-python)")
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(done.stdout)
        partial.replace(path)
    return path


# Charts saved in this session and their files, by id (the chart is kept so an id is never reused).
_SAVED_CHARTS: dict[int, tuple[alt.TopLevelMixin, dict[str, Path]]] = {}


def saved_files(chart: object) -> dict[str, Path]:
    """The files :func:`save_chart` last wrote for this very chart object ({} if none)."""
    entry = _SAVED_CHARTS.get(id(chart))
    return dict(entry[1]) if entry is not None and entry[0] is chart else {}


# -- charts in a notebook, offline ------------------------------------------------------------
# JupyterLab ships a vega-lite renderer of its own (no network needed); it registers the v5
# mimetype, and altair's v6 specs use nothing it cannot draw.
NOTEBOOK_MIMETYPE = "application/vnd.vegalite.v5+json"
_FRONTEND = {"jupyterlab": False}


def _in_jupyterlab() -> bool:
    """Whether this kernel has run a cell for JupyterLab (or Notebook 7), remembered once seen.

    JupyterLab sends ``cellId`` and ``recordTiming`` with every execute request; papermill and
    nbmake (nbclient) send neither.
    """
    if not _FRONTEND["jupyterlab"]:
        try:
            from IPython import get_ipython

            kernel = getattr(get_ipython(), "kernel", None)
            metadata = (kernel.get_parent() or {}).get("metadata") or {} if kernel is not None else {}
        except Exception:  # no IPython, an older kernel: not JupyterLab as far as we can tell
            metadata = {}
        _FRONTEND["jupyterlab"] = "cellId" in metadata and "recordTiming" in metadata
    return _FRONTEND["jupyterlab"]


def _offline_renderer(spec: dict, **metadata: Any) -> Any:
    """Charts in JupyterLab go to its own vega renderer (SVG), so they draw with no network.

    Elsewhere (papermill, nbmake, other frontends) altair's default HTML output is kept:
    nbclient can hang on a vega-lite mimebundle, or on any output of a few hundred kB, shown
    inside an ``interact``, so the spec is handed over as JSON only where JupyterLab draws it
    and the 0.9 MB vega bundle is never put into a notebook.
    """
    if not _in_jupyterlab():
        from altair.vegalite.v6.display import html_renderer

        return html_renderer(spec, **metadata)
    title = spec.get("title")
    title = title.get("text") if isinstance(title, dict) else title
    text = f"<altair chart: {title}>" if isinstance(title, str) and title else "<altair chart>"
    embed = {"renderer": "svg", **(metadata.get("embed_options") or {})}
    return {NOTEBOOK_MIMETYPE: spec, "text/plain": text}, {NOTEBOOK_MIMETYPE: {"embed_options": embed}}


OFFLINE_RENDERER = "rephelpers-offline"


def use_offline_renderer() -> str:
    """Make ``rephelpers-offline`` (:func:`_offline_renderer`) altair's active renderer; its name.

    Altair's renderer is process-wide state, so switching it is an explicit call (each notebook's
    first code cell makes it), never a side effect of importing this module.
    ``alt.renderers.enable("default")`` switches back. Calling it again changes nothing.
    """
    if OFFLINE_RENDERER not in alt.renderers.names():
        alt.renderers.register(OFFLINE_RENDERER, _offline_renderer)
    alt.renderers.enable(OFFLINE_RENDERER)
    return OFFLINE_RENDERER


# -- the HTML report -------------------------------------------------------------------------
def chart_svg(chart: alt.TopLevelMixin) -> str:
    """``chart`` rendered to an SVG string (vl-convert), for a report that needs no JavaScript."""
    buffer = io.StringIO()
    chart.save(buffer, format="svg")
    return buffer.getvalue()


def html_report(
    title: str,
    sections: Sequence[tuple],
    intro: str = "",
    cluster_labels: Mapping[int, str] | None = None,
    base_dir: str | Path | None = None,
) -> str:
    """A self-contained HTML page: a heading and, per section, a chart, a table or text.

    ``sections`` is a list of ``(heading, content)`` or ``(heading, content, files)`` where
    content is an altair chart (inlined as SVG), a DataFrame (an HTML table, numbers to 3
    significant digits) or a string (escaped, one paragraph per line). No script, stylesheet
    or font is fetched.

    Each section links its chart files: ``files`` (paths, or the dict :func:`save_chart`
    returns), else, for a chart, the files :func:`save_chart` wrote for that chart. Links are
    relative to ``base_dir``, by default the run directory the charts were saved in (where
    ``report.html`` is written). With cluster names (``cluster_labels``, by default
    :func:`cluster_names` of that run directory; ``{}`` for none) the page lists them, every
    ``cluster 3`` in the text reads ``cluster 3 (name)`` and every table with a ``cluster``
    column gets a ``cluster name`` column beside it.
    """
    normalised = []
    for section in sections:
        if len(section) not in (2, 3):
            raise RephelpersError(
                f"a report section is (heading, content) or (heading, content, files), got {len(section)} items: {section!r:.80}"
            )
        normalised.append((section[0], section[1], section[2] if len(section) == 3 else saved_files(section[1])))
    if cluster_labels is None:
        saved = [Path(f["html"]) for *_, f in normalised if isinstance(f, Mapping) and "html" in f]
        cluster_labels = cluster_names(saved[0].parent.parent) if saved else {}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title><style>{_REPORT_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        *(f"<p>{escape(_name_clusters_in_text(line, cluster_labels))}</p>" for line in intro.splitlines() if line.strip()),
    ]
    if cluster_labels:
        legend = "; ".join(f"{k}: {name}" for k, name in sorted(cluster_labels.items()))
        parts.append(f"<p class='clusters'>Clusters (named by their top terms): {escape(legend)}</p>")
    for heading, content, files in normalised:
        parts.append(f"<section><h2>{escape(_name_clusters_in_text(str(heading), cluster_labels))}</h2>")
        links = _file_links(files, base_dir)
        if links:
            parts.append(f"<p class='files'>Chart files: {links}</p>")
        if isinstance(content, alt.TopLevelMixin):
            parts.append(f"<div class='scroll'>{chart_svg(content)}</div>")
        elif isinstance(content, pd.DataFrame):
            table = _name_clusters_in_table(content, cluster_labels).to_html(
                index=False, border=0, classes="table", na_rep="–", float_format=_fmt
            )
            parts.append(f"<div class='scroll'>{table}</div>")
        else:
            parts.extend(
                f"<p>{escape(_name_clusters_in_text(line, cluster_labels))}</p>"
                for line in str(content).splitlines() if line.strip()
            )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _file_links(files: Mapping[str, str | Path] | Sequence[str | Path] | None, base_dir: str | Path | None) -> str:
    """``<a href>`` tags to ``files``, relative to ``base_dir`` (default: the parent of their ``charts/``)."""
    paths = [Path(p) for p in (files.values() if isinstance(files, Mapping) else files or [])]
    links = []
    for path in paths:
        base = Path(base_dir) if base_dir is not None else (
            path.parent.parent if path.parent.name == "charts" else path.parent
        )
        href = Path(os.path.relpath(path, base)).as_posix() if path.is_absolute() == base.is_absolute() else path.as_posix()
        label = path.suffix.lstrip(".").upper() or path.name
        links.append(f"<a href='{escape(href, quote=True)}'>{escape(path.name)}</a> ({label})")
    return ", ".join(links)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


_REPORT_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
    "h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}"
    ".table{border-collapse:collapse;font-size:13px}.table td,.table th{padding:3px 8px;text-align:right}"
    ".table tr:nth-child(even){background:#f6f6f6}.table th{background:#eee}.scroll{overflow-x:auto}"
    ".files{font-size:13px;color:#555}.clusters{background:#f6f6f6;padding:.5em}"
)


# -- the item explorer -----------------------------------------------------------------------
