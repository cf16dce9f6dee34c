"""Processes of a watched notebook: is one alive, what runs under it, stopping all of it.

A notebook runs as a papermill child in a session of its own, whose kernel jupyter_client
starts in yet another; a notebook that runs notebooks itself (07 runs the chain through this
runner) has children and kernels of its own below that. Stopping a notebook must stop all of
them, and a child whose watcher vanished must stop itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie, which answers ``kill(0)``, does not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def descendants(pids: Sequence[int | None]) -> list[int]:
    """Every live descendant of ``pids``, whatever session or group it moved to (from ``/proc``;
    empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [p for p in pids if p]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(proc: subprocess.Popen, kernel_pid: int | None) -> None:
    """Kill the papermill child (its own session), the kernel (jupyter_client gives it another)
    and every process under them, so that no grandchild is orphaned (collected before the
    first kill: an orphan is re-parented and can no longer be traced to us)."""
    for pid in descendants([proc.pid, kernel_pid]):
        _kill(pid)
    for pgid in (proc.pid, kernel_pid):
        if not pgid:
            continue
        try:
            if os.getpgid(pgid) == pgid:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def exit_with_parent() -> None:
    """Stop this process, its kernel and everything under them once the process that started it is gone.

    A watcher killed outright (SIGKILL, an out-of-memory kill, a dask worker lost) cannot
    stop its child; without this the orphaned notebook would go on writing into a run
    directory that a re-run (or dask's re-submission of the point) is writing too.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        for pid in descendants([os.getpid()]):
            _kill(pid)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
