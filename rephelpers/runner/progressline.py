"""The progress line: which cell of which notebook runs, and the running stage's own progress bar."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..progress import describe as describe_progress
from .protocol import read_cells

PROGRESS_EVERY = 30.0
"""Seconds between two progress lines of one cell when the output is not a terminal."""


class ProgressLine:
    """What one notebook is doing, for a person watching the runner: cell n of m and the
    running stage's own progress bar (:mod:`rephelpers.progress`).

    ``live`` (a terminal, one job): one line rewritten in place. Otherwise (a log file, CI,
    parallel jobs): a line per code cell that starts, and the bar at most every
    :data:`PROGRESS_EVERY` seconds, so a log stays readable.
    """

    def __init__(self, label: str, name: str, notebook: str | Path, live: bool = False, stream: Any = None) -> None:
        cells = read_cells(str(notebook))
        self.code = [i for i, c in enumerate(cells) if c.get("cell_type") == "code"]
        self.label, self.name, self.live = label, name, live
        self.stream = stream or sys.stdout
        self.current: int | None = None
        self.started = 0.0
        self.report: dict[str, Any] | None = None
        self.shown, self.shown_at, self.shown_cell, self.width = "", 0.0, None, 0

    def cell(self, index: int, t: float) -> None:
        if index in self.code:
            self.current, self.started, self.report = index, t, None

    def bar(self, report: dict[str, Any]) -> None:
        if report.get("t", 0) >= self.started:  # a bar of an earlier cell is over
            self.report = None if report.get("closed") else report

    def text(self) -> str:
        if self.current is None:
            return ""
        position = f"cell {self.code.index(self.current) + 1}/{len(self.code)}"
        bar = f" · {describe_progress(self.report)}" if self.report else ""
        return f"[rephelpers] {self.label}: {self.name} {position}{bar}"

    def show(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        text = self.text()
        if not text or text == self.shown:
            return
        same_cell = self.current == self.shown_cell
        if not self.live and same_cell and self.report is None:
            return  # a bar that ended: the log already says which cell this is
        if self.live:
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.width = len(text)
        elif same_cell and now - self.shown_at < PROGRESS_EVERY:
            return
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown, self.shown_at, self.shown_cell = text, now, self.current

    def end(self) -> None:
        """Clear a live line, so the next message starts on an empty line."""
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
