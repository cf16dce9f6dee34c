"""The kernel probe: tells the watcher what the kernel does (ready, each cell's start and end, its pid).

The watcher starts every kernel with :func:`kernel_argument`, which makes IPython call
:func:`install` at start-up (``IPKernelApp.exec_lines``). The call is one expression that
binds no name, so the notebook's own namespace and cell numbering are untouched. The probe
appends ``{"e": "ready"|"pre"|"post", "t": time, "pid": pid}`` lines to the file named by
``$REPHELPERS_KERNEL_EVENTS`` and removes that variable, so that a notebook which runs
notebooks itself (07) does not hand it on to their kernels.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from .protocol import KERNEL_EVENTS_ENV


class KernelProbe:
    """Appends the kernel's events to one file; IPython calls :meth:`emit` from its own thread."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def emit(self, event: str, *_: Any) -> None:
        with self.lock:
            self.file.write(json.dumps({"e": event, "t": time.time(), "pid": os.getpid()}) + "\n")
            self.file.flush()


def install(shell: Any) -> None:
    """Register ``pre``/``post`` events on ``shell`` (the kernel's ``get_ipython()``) and report ``ready``;
    nothing where the kernel was not started by the watcher.

    Returns None: IPython would display an exec line's value in the kernel's first output.
    """
    path = os.environ.pop(KERNEL_EVENTS_ENV, None)
    if not path:
        return
    probe = KernelProbe(path)
    shell.events.register("pre_run_cell", lambda *a: probe.emit("pre"))
    shell.events.register("post_run_cell", lambda *a: probe.emit("post"))
    probe.emit("ready")


def kernel_argument() -> str:
    """The kernel's command-line argument that runs :func:`install` at start-up."""
    return f"--IPKernelApp.exec_lines=__import__({__name__!r}, fromlist=['install']).install(get_ipython())"
