"""What the watcher, the papermill child and the kernel probe share: variable names and files.

The three run in three processes (the runner, ``python -m rephelpers.runner.child``, the
notebook's kernel) and talk only through files under ``<run>/notebooks/.watch/``: the job
the watcher writes for the child, the events each side appends as JSON lines, the child's
result. This module names them and reads them; it imports nothing heavy, since the child
and the kernel import it at start-up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WATCH = ".watch"  # per-notebook job, event and result files, under <run>/notebooks/

#: Fault injection for the tests, honoured by the child on the first attempt only:
#: ``stall-after-last-cell:<notebook>`` makes the client hang (forever) right after the
#: kernel's reply to the notebook's last code cell, the way papermill #705 hangs.
FAULT_ENV = "REPHELPERS_INJECT_FAULT"
KERNEL_EVENTS_ENV = "REPHELPERS_KERNEL_EVENTS"
"""The file the kernel probe appends its events to (the probe removes it from the kernel's environment)."""
LAST_LINES = 20


@dataclass(frozen=True)
class JobFiles:
    """One notebook's files under ``<run>/notebooks/.watch/``: ``job.json`` (what the child
    runs), ``client.jsonl`` (the child's events), ``kernel.jsonl`` (the probe's),
    ``result.json`` (the child's outcome), ``stderr`` (papermill's and the kernel's own
    messages) and ``progress.jsonl`` (the kernel's progress bars)."""

    job: Path
    client: Path
    kernel: Path
    result: Path
    stderr: Path
    progress: Path

    @classmethod
    def under(cls, notebooks_out: Path, name: str) -> JobFiles:
        watch = notebooks_out / WATCH
        return cls(*(watch / f"{name}.{suffix}" for suffix in
                     ("job.json", "client.jsonl", "kernel.jsonl", "result.json", "stderr", "progress.jsonl")))

    def clear(self) -> None:
        """Remove what an earlier attempt left, so no old event is read as new."""
        self.job.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.job, self.client, self.kernel, self.result, self.stderr, self.progress):
            path.unlink(missing_ok=True)


def read_cells(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text()).get("cells", [])


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` where it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` without ANSI colour codes (tracebacks from the kernel carry them)."""
    return _ANSI.sub("", text)


class Lines:
    """New complete lines appended to a file since the last call."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset, self.partial = path, offset, b""

    def read(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        return [ln.decode("utf-8", "replace") for ln in lines]


def tail(path: Path, start: int, n: int = LAST_LINES) -> list[str]:
    """The last ``n`` non-blank lines of ``path`` written after byte ``start``, colour codes removed."""
    try:
        with open(path, "rb") as f:
            f.seek(max(start, path.stat().st_size - 65536))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    lines = [ln for ln in plain(text).splitlines() if ln.strip()]
    return lines[-n:]
