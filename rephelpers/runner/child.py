"""The papermill child: runs one notebook and reports what its client does, as it goes.

The watcher (:mod:`rephelpers.runner.watch`) starts ``python -m rephelpers.runner.child JOB``
for each notebook and never trusts it: this process reports client events (``start``/
``sent``/``done`` per cell, numbered as in the source notebook, i.e. without papermill's
injected-parameters cell) to ``job["client_events"]``, the cells' stdout/stderr with a
marker per cell to ``job["log"]``, and the outcome to ``job["result"]``; its own stdout and
stderr, which the kernel shares, hold only papermill's and the kernel's diagnostics. The
kernel it starts runs the probe (:mod:`rephelpers.runner.probe`).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from .probe import kernel_argument
from .processes import exit_with_parent
from .protocol import FAULT_ENV, plain, read_cells


class ClientEvents:
    """papermill's cell hooks (``on_cell_start``/``on_cell_execute``/``on_cell_executed``) as events.

    ``stall_last``: the fault injection of :data:`FAULT_ENV`, hang (forever) after the
    kernel's reply to the last code cell.
    """

    def __init__(self, events: IO[str], out: IO[str], last_code: int | None, stall_last: bool) -> None:
        self.events, self.out = events, out
        self.last_code, self.stall_last = last_code, stall_last
        self.injected_before: dict[int, int] = {}
        self.injected: set[int] = set()
        self.seen_injected = 0

    def source_index(self, index: int) -> int:
        # Papermill's injected cell follows the parameters cell; count it as that cell.
        return index - self.injected_before.get(index, 0) - (1 if index in self.injected else 0)

    def emit(self, event: str, index: int, **extra: Any) -> None:
        line = {"e": event, "t": time.time(), "cell": self.source_index(index), **extra}
        self.events.write(json.dumps(line) + "\n")
        self.events.flush()

    def on_start(self, cell: Any, cell_index: int, **_: Any) -> None:
        is_injected = "injected-parameters" in cell.get("metadata", {}).get("tags", [])
        self.injected_before[cell_index] = self.seen_injected
        if is_injected:
            self.seen_injected += 1
            self.injected.add(cell_index)
        first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
        self.emit("start", cell_index, src="(injected parameters)" if is_injected else first[:120])
        if not is_injected and cell.cell_type == "code" and cell.source.strip():
            self.out.write(f"[rephelpers] --- cell {self.source_index(cell_index)}: {first[:100]}\n")

    def on_execute(self, cell: Any, cell_index: int, **_: Any) -> None:
        self.emit("sent", cell_index)

    def on_executed(self, cell: Any, cell_index: int, **_: Any) -> None:
        self.emit("done", cell_index)
        if self.stall_last and cell_index not in self.injected and self.source_index(cell_index) == self.last_code:
            self.out.write("[rephelpers] fault injection: client stalls after the last cell\n")
            threading.Event().wait()


def main(job_path: str) -> int:
    """Run the notebook of the job file ``job_path``; 0 when it finished, 1 when it did not.

    ``$REPHELPERS_INJECT_FAULT`` (:data:`FAULT_ENV`) is honoured on the first attempt only,
    so a retry runs clean.
    """
    # Imported here, not at the top: __main__ below first keeps nbformat's jsonschema from
    # loading rfc3987_syntax, which papermill's import would otherwise pull in.
    import papermill

    exit_with_parent()
    job = json.loads(Path(job_path).read_text())
    events = open(job["client_events"], "a", buffering=1)
    out = open(job["log"], "a", buffering=1)
    code_cells = [i for i, c in enumerate(read_cells(job["input"])) if c.get("cell_type") == "code"]
    fault = os.environ.get(FAULT_ENV, "")
    hooks = ClientEvents(events, out, code_cells[-1] if code_cells else None,
                         stall_last=job["attempt"] == 1 and fault == f"stall-after-last-cell:{job['notebook']}")
    result: dict[str, Any]
    try:
        papermill.execute_notebook(
            job["input"],
            job["output"],
            parameters=job["parameters"],
            cwd=job["cwd"],
            progress_bar=False,
            kernel_name="python3",
            start_timeout=job["start_timeout"],
            execution_timeout=job["cell_timeout"],
            stdout_file=out,
            stderr_file=out,
            extra_arguments=[kernel_argument()],
            on_cell_start=hooks.on_start,
            on_cell_execute=hooks.on_execute,
            on_cell_executed=hooks.on_executed,
        )
        result = {"ok": True, "kernel_peak_rss_mb": children_peak_rss_mb()}
    except BaseException as err:  # the parent needs to hear about every way this ends
        message = plain(str(err))
        if hasattr(err, "ename"):  # papermill's PapermillExecutionError: the cell raised
            message = f"{err.ename}: {plain(str(err.evalue))}"
        result = {"ok": False, "type": type(err).__name__, "message": message, "traceback": plain(traceback.format_exc())}
        out.write(f"[rephelpers] {type(err).__name__}: {message}\n")
    Path(job["result"] + ".tmp").write_text(json.dumps(result))
    os.replace(job["result"] + ".tmp", job["result"])
    return 0 if result["ok"] else 1


def children_peak_rss_mb() -> int:
    """The largest resident memory any finished child of this process reached (the kernel's,
    once papermill has shut it down), in MiB."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # Linux reports KiB


if __name__ == "__main__":
    # nbformat's jsonschema pulls in rfc3987_syntax when installed; that module compiles a
    # grammar at import (2-6 s of CPU per notebook on this project's 2-core CI) for the "iri"
    # format, which nbformat's schemas never use.
    sys.modules.setdefault("rfc3987_syntax", None)
    sys.exit(main(sys.argv[1]))
