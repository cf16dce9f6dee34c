"""A run directory's ``status.json``: what its chain is doing, did, or why it runs again.

Written atomically at every step (running in a notebook, each notebook's wall time and
peak memory, done, failed with where and why, interrupted with the signal and the cell);
a point whose status says done with the same parameters is skipped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from .processes import pid_alive
from .protocol import WATCH, Lines, read_json

STATUS = "status.json"


def write_status(run_dir: Path, **status: Any) -> None:
    # Atomic: a kill between two writes must never leave a half-written status behind.
    tmp = run_dir / f".{STATUS}.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(json.dumps(status, indent=2, default=str))
    os.replace(tmp, run_dir / STATUS)


def read_status(run_dir: Path) -> dict[str, Any]:
    """``run_dir``'s status, ``{}`` where there is none yet."""
    return read_json(run_dir / STATUS)


def explain_redo(run_dir: Path, label: str, notebooks: list[str], fingerprint: str, force: bool) -> None:
    """Say why a point that ran before will run again (nothing for new or finished points)."""
    status = read_status(run_dir)
    state = status.get("state")
    if not state or not notebooks:
        return
    where = status.get("notebook")
    at = f" in {where}" + (f" cell {status['cell']}" if status.get("cell") is not None else "") if where else ""
    when = time.strftime(" at %Y-%m-%d %H:%M:%S", time.localtime(status["ended"])) if status.get("ended") else ""
    if state == "done":
        if force:
            why = "is done but --force was given"
        elif status.get("fingerprint") != fingerprint:
            why = "is done with other parameters or notebooks"
        else:
            return
    elif state == "interrupted":
        why = f"was interrupted by {status.get('signal', 'a signal')}{at}{when}"
    elif state == "failed":
        why = f"failed{at}{when} ({str(status.get('error', '?')).splitlines()[0][:200]})"
    elif state == "running":
        pid = status.get("pid")
        if pid and pid != os.getpid() and pid_alive(pid):
            print(
                f"[rephelpers] warning: {label}: {STATUS} says another runner (pid {pid}) is running it; "
                "two runners on one run directory overwrite each other's artifacts, stop one of them",
                flush=True,
            )
        why = f"was stopped without recording its state (killed{at}; status still says running)"
    else:
        why = f"is in state {state!r}"
    print(
        f"[rephelpers] {label} {why}: will run {', '.join(notebooks)} again "
        "(stages whose inputs did not change reuse their cached artifacts)",
        flush=True,
    )


def last_cell(run_dir: Path, name: str | None) -> int | None:
    """The cell the client last started in ``name`` (from its event file), if any."""
    if not name:
        return None
    path = run_dir / "notebooks" / WATCH / f"{name}.client.jsonl"
    cell = None
    for line in Lines(path).read():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("e") == "start":
            cell = event.get("cell")
    return cell


