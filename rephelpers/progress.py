"""Progress bars that the runner can follow from outside the kernel.

Inside a notebook, ``tqdm.auto`` draws a widget, which papermill keeps in the executed
notebook but never streams: a batch run (``python -m rephelpers run``) would show nothing
while a stage works for twenty minutes. :func:`progress_bar` is ``tqdm.auto.tqdm`` that
also appends its state, at most once a second, as a JSON line to the file named by
``$REPHELPERS_PROGRESS`` (:data:`PROGRESS_ENV`, set by the runner for each notebook), which
the runner turns into its progress line. Without that variable it is plain tqdm.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from tqdm.auto import tqdm as _tqdm

PROGRESS_ENV = "REPHELPERS_PROGRESS"
# Set by the runner for its kernels: a batch run, where no one interacts with widgets
# (rephelpers.views.explorers draws each explorer's first view instead).
HEADLESS_ENV = "REPHELPERS_HEADLESS"
REPORT_EVERY = 1.0
"""Seconds between two reports of one bar (its first and last state are always reported)."""


class progress_bar(_tqdm):  # noqa: N801 - used like tqdm, named like a function
    """``tqdm.auto.tqdm`` that reports ``{"desc", "n", "total", "unit", "t", "closed"}`` to the runner."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._report_path = os.environ.get(PROGRESS_ENV)
        self._reported_at = 0.0
        super().__init__(*args, **kwargs)
        self._report(force=True)

    def update(self, n: float | None = 1) -> bool | None:
        out = super().update(n)
        self._report()
        return out

    def close(self) -> None:
        if not getattr(self, "_closed_report", False) and hasattr(self, "_report_path"):
            self._closed_report = True
            self._report(force=True, closed=True)
        super().close()

    def _report(self, force: bool = False, closed: bool = False) -> None:
        if not self._report_path or self.disable:
            return
        now = time.time()
        if not force and now - self._reported_at < REPORT_EVERY:
            return
        self._reported_at = now
        line = {"desc": self.desc or "", "n": self.n, "total": self.total, "unit": self.unit, "t": now,
                "closed": closed}
        try:
            with open(self._report_path, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError:
            self._report_path = None  # the runner's directory went away: stop reporting, keep drawing


def describe(report: dict[str, Any]) -> str:
    """``desc n/total unit (p%)`` of one report, as the runner prints it."""
    n, total = report.get("n", 0), report.get("total")
    count = f"{n:g}/{total:g}" if total else f"{n:g}"
    unit = report.get("unit") or ""
    unit = "" if unit == "it" else f" {unit}"
    share = f" ({100 * n / total:.0f}%)" if total else ""
    return f"{report.get('desc') or 'progress'} {count}{unit}{share}".strip()
