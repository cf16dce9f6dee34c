"""How a run stops: a notebook that failed (:class:`NotebookFailure`), or a signal (:class:`RunInterrupted`).

A SIGINT/SIGTERM is process-wide, so the flag it sets (:data:`STOP`) is too: the handler
that :func:`interruptible` installs sets it, and every watcher, whichever thread it runs
in, polls it and stops its child.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import RephelpersError
from .status import STATUS


class NotebookFailure(RephelpersError):
    """A notebook that did not finish, with where it stopped and what it printed last.

    ``kind`` is one of ``error`` (a cell raised), ``cell-timeout``, ``kernel-died``,
    ``kernel-start``, ``stall`` (the kernel was idle, the client stuck: retryable) and
    ``process-died`` (the papermill child itself vanished).
    """

    def __init__(
        self,
        message: str,
        *,
        run: str,
        notebook: str,
        kind: str,
        cell: int | None = None,
        cell_source: str | None = None,
        last_output: list[str] | None = None,
        log: str | None = None,
        detail: str = "",
    ):
        super().__init__(message)
        self.run, self.notebook, self.kind = run, notebook, kind
        self.cell, self.cell_source = cell, cell_source
        self.last_output = last_output or []
        self.log = log
        self.detail = detail
        self.retries: list[dict[str, Any]] = []  # stalls retried earlier in the same chain

    @property
    def retryable(self) -> bool:
        # Only a stall is known to leave nothing half-done: the kernel had finished the
        # cell and the stages cache their artifacts, so running the notebook again is cheap.
        return self.kind == "stall"

    def record(self) -> dict[str, Any]:
        return {
            "notebook": self.notebook,
            "cell": self.cell,
            "cell_source": self.cell_source,
            "kind": self.kind,
            "last_output": self.last_output,
            "log": self.log,
        }


class RunInterrupted(RephelpersError):
    """SIGINT/SIGTERM stopped the run; the state of every point touched is recorded."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}; the points that were running are recorded "
            f'as "state": "interrupted" in their {STATUS}; run the same command again to finish '
            "(finished points are skipped, finished stages reuse their cached artifacts)"
        )


class Stop:
    """Set from the signal handler; every watcher polls it and stops its child."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = signal.SIGINT

    def set(self, signum: int) -> None:
        self.signum = signum
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


STOP = Stop()


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into an orderly stop; a second one aborts at once."""
    STOP.event.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set(signum)
        print(
            f"[rephelpers] {signal.Signals(signum).name}: stopping the running notebooks and recording "
            "their state (send it again to abort at once)",
            flush=True,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
