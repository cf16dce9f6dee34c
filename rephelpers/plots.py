"""Charts (altair) and saving them next to the results.

``save_chart`` writes both an interactive HTML file and a static PNG (through
``vl-convert-python``) into ``<run_dir>/charts/``, so a papermill run leaves pictures a
person can open without Jupyter.
"""

from __future__ import annotations

from pathlib import Path

import altair as alt

alt.data_transformers.disable_max_rows()


def save_chart(chart: alt.TopLevelMixin, run_dir: str | Path, name: str, scale: float = 2.0) -> dict[str, Path]:
    """Save ``chart`` as ``charts/<name>.html`` and ``charts/<name>.png``; return the paths."""
    root = Path(getattr(run_dir, "root", run_dir)) / "charts"
    root.mkdir(parents=True, exist_ok=True)
    html = root / f"{name}.html"
    png = root / f"{name}.png"
    chart.save(str(html))
    chart.save(str(png), scale_factor=scale)
    return {"html": html, "png": png}
