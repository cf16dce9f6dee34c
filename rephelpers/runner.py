"""Run the notebook chain with papermill: one run, or a sweep over a parameter grid.

A parameter file (``papermill_params/*.yaml``) looks like::

    name: demo                 # run directory: runs/<name>/
    parameters: {...}          # passed to every notebook (each gets the names it declares)
    notebooks: [01_corpus_clusters, ...]   # optional; default: every notebook in order
    grid:                      # optional: makes it a sweep
      intervention_layer: [9, 15, 21]
      perturbation: [ablate, noise]

Before any notebook starts, every parameter and grid key must be declared by some notebook
of the chain and every path the run names must exist (:mod:`rephelpers.validation`); each
point's ``status.json`` records what each notebook received (``received``).

A sweep expands the grid into points and runs each into ``runs/<name>/<point>/``.
Stages whose parameters do not vary across the grid (and whose upstream stages do not
either) run once into ``runs/<name>/_shared/`` and their artifacts are linked into
every point, so only the stages the grid touches are recomputed. A point whose
``status.json`` says done with the same parameters is skipped (resume after an
interruption loses nothing); a failing point is recorded with its error and the
others go on. ``collect`` gathers every point's ``influence.parquet`` into one table.

Every notebook runs in a child process (papermill + its kernel) that this process
watches rather than trusts: papermill's client can wait forever for a reply the kernel
already sent (papermill #705/#711, jupyter_client #922), and a timeout alone would
only notice that after the whole cell budget. The child reports what the client does
(cell sent, reply received) and a probe inside the kernel reports what the kernel does
(cell started, cell finished, its pid); see :func:`_watch_notebook` for the rules and
:class:`ExecutionLimits` for the three limits (``execution:`` in the parameter file or
``--cell-timeout/--start-timeout/--stall-timeout``). A client stall is retried once; a
signal (SIGINT/SIGTERM) stops the children and records ``"state": "interrupted"``.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import yaml

from .artifacts import MANIFEST, project_root, stable_hash
from .errors import RephelpersError, require
from .progress import HEADLESS_ENV, PROGRESS_ENV
from .progress import describe as describe_progress
from .validation import check_run, received_parameters, suggest

STATUS = "status.json"
SHARED = "_shared"
WATCH = ".watch"  # per-notebook job, event and result files, under <run>/notebooks/

#: Fault injection for the tests, honoured by the child on the first attempt only:
#: ``stall-after-last-cell:<notebook>`` makes the client hang (forever) right after the
#: kernel's reply to the notebook's last code cell, the way papermill #705 hangs.
FAULT_ENV = "REPHELPERS_INJECT_FAULT"
_KERNEL_EVENTS_ENV = "REPHELPERS_KERNEL_EVENTS"
# torch, OpenMP and the BLAS libraries each start one thread per core in every kernel; with
# several notebooks at once they oversubscribe the cores (two stage-02 kernels on 2 cores ran
# at a third of one kernel's speed), so each job gets its share.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_THREADS: dict[str, str] = {}
_POLL = 0.25  # seconds between the watcher's looks; small next to every limit
PROGRESS_EVERY = 30.0
"""Seconds between two progress lines of one cell when the output is not a terminal."""
_LIVE = threading.Event()  # set while one job writes to a terminal: the progress line is rewritten in place
_DEAD_KERNEL_GRACE = 10.0  # nbclient notices a dead kernel within ~1 s; give it time to say so itself
_LAST_LINES = 20


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def available_notebooks() -> list[str]:
    names = sorted(p.stem for p in notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    require(bool(names), f"no notebooks found in {notebooks_dir()}")
    return names


@dataclass(frozen=True)
class ExecutionLimits:
    """How long a notebook may take before the runner calls it stuck (seconds).

    - ``cell_timeout`` (default 7200 = 2 h; 0 or null disables): one cell's budget while
      the kernel is busy with it. It only has to catch a kernel that is busy for good (a
      deadlock inside the kernel), since a kernel that finished is caught by
      ``stall_timeout``; so it is generous: the demo's slowest stage (05) took 809 s for all
      its cells on 2 quiet cores (the README's "What the demo does and finds"), and
      contention made a stage 9x slower (issue 15).
    - ``start_timeout`` (default 120): kernel start-up. A kernel started in 2-9 s on this
      project's busy 2-core machine; twice papermill's 60 s default leaves room for a
      machine busier than that.
    - ``stall_timeout`` (default 60): how long the kernel may sit idle (or dead) while
      the client has not moved on. Between a cell's end in the kernel and the client's
      next step lie only message delivery, papermill's 4 s wait for the output stream
      and a notebook save; 60 s is many times that, and a stall (the hang of papermill
      #705) surfaces one minute after the stage's work is done instead of never.
    """

    cell_timeout: float | None = 7200.0
    start_timeout: float = 120.0
    stall_timeout: float = 60.0

    @classmethod
    def from_mapping(cls, data: Any, where: str = "execution") -> "ExecutionLimits":
        if data is None:
            return cls()
        require(isinstance(data, dict), f"{where} must be a mapping like {{cell_timeout: 7200}}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        require(not unknown, f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls().with_overrides(**data, _where=where)

    def with_overrides(self, _where: str = "execution", **values: Any) -> "ExecutionLimits":
        """A copy with every non-None value replaced (CLI flags left unset stay as they are)."""
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            require(ok, f"{_where}: {key} must be a number of seconds >= 0, got {value!r}")
            if key != "cell_timeout":
                require(value > 0, f"{_where}: {key} must be > 0 seconds (only cell_timeout can be 0 = off)")
            changes[key] = float(value) if key != "cell_timeout" or value > 0 else None
        return replace(self, **changes)


@dataclass
class RunSpec:
    name: str
    parameters: dict[str, Any]
    notebooks: list[str]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    execution: ExecutionLimits = field(default_factory=ExecutionLimits)
    source: str | None = None  # the run file, for file:line in the messages of check()

    def check(self) -> None:
        """Raise before any notebook starts if a parameter, grid key or path is wrong
        (:func:`rephelpers.validation.check_run`)."""
        check_run(self.parameters, self.grid, self.notebooks, notebook_parameters, available_notebooks(), self.source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RunSpec":
        path = Path(path)
        require(path.exists(), f"parameter file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RephelpersError(f"{path} is not valid YAML: {err}") from err
        require(isinstance(data, dict), f"{path} must hold a mapping with `parameters`")
        top_level = ("name", "parameters", "notebooks", "grid", "description", "execution")
        unknown = set(data) - set(top_level)
        require(not unknown, f"{path}: unknown top-level keys {sorted(unknown)}: "
                + "; ".join(f"{k!r}: {suggest(str(k), top_level)}" for k in sorted(unknown, key=str)))
        notebooks = data.get("notebooks") or available_notebooks()
        known = available_notebooks()
        bad = [n for n in notebooks if n not in known]
        require(not bad, f"{path}: unknown notebooks {bad}; available: {known}")
        grid = data.get("grid") or {}
        for k, values in grid.items():
            require(
                isinstance(values, list) and len(values) > 0,
                f"{path}: grid entry {k!r} must be a non-empty list",
            )
        return cls(
            name=str(data.get("name") or path.stem),
            parameters=dict(data.get("parameters") or {}),
            notebooks=list(notebooks),
            grid=grid,
            execution=ExecutionLimits.from_mapping(data.get("execution"), f"{path}: execution"),
            source=str(path),
        )

    def points(self) -> list[dict[str, Any]]:
        if not self.grid:
            return [{}]
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    if not point:
        return "run"
    text = ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def notebook_parameters(name: str) -> set[str]:
    """Names declared in a notebook's ``parameters`` cell."""
    import papermill

    return set(papermill.inspect_notebook(str(notebooks_dir() / f"{name}.ipynb")))


# ---------------------------------------------------------------------------------------
# Failures and interruption


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


class _Stop:
    """Set from the signal handler; every watcher polls it and stops its child."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = signal.SIGINT

    def set(self, signum: int) -> None:
        self.signum = signum
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


_STOP = _Stop()


@contextmanager
def _interruptible() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into an orderly stop; a second one aborts at once."""
    _STOP.event.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if _STOP.is_set():
            raise KeyboardInterrupt
        _STOP.set(signum)
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


# ---------------------------------------------------------------------------------------
# The watched child: papermill in its own process, a probe in its kernel

# Runs inside the kernel at start-up (IPKernelApp.exec_lines) in a private namespace, so
# the notebook's own namespace and cell numbering are untouched.
_KERNEL_PROBE = f'''
import json, os, threading, time
path = os.environ.pop({_KERNEL_EVENTS_ENV!r}, None)
if path:
    f = open(path, "a", buffering=1)
    lock = threading.Lock()
    def emit(event, *_):
        with lock:
            f.write(json.dumps({{"e": event, "t": time.time(), "pid": os.getpid()}}) + "\\n")
            f.flush()
    get_ipython().events.register("pre_run_cell", lambda *a: emit("pre"))
    get_ipython().events.register("post_run_cell", lambda *a: emit("post"))
    emit("ready")
'''


def _probe_argument() -> str:
    code = base64.b64encode(_KERNEL_PROBE.encode()).decode()
    return f"--IPKernelApp.exec_lines=exec(__import__('base64').b64decode('{code}').decode(), {{'get_ipython': get_ipython}})"


def _exit_with_parent() -> None:
    """Stop this child, its kernel and everything under them once the watcher that started it is gone.

    A watcher killed outright (SIGKILL, an out-of-memory kill, a dask worker lost) cannot
    stop its child; without this the orphaned notebook would go on writing into a run
    directory that a re-run (or dask's re-submission of the point) is writing too.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        for pid in _descendants([os.getpid()]):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _child_main(job_path: str) -> int:
    """Entry point of the child process: run one notebook with papermill, report as it goes.

    Writes client events (``start``/``sent``/``done`` per cell, numbered as in the source
    notebook, i.e. without papermill's injected-parameters cell) to ``job["client_events"]``,
    the cells' stdout/stderr with a marker per cell to ``job["log"]``, and the outcome to
    ``job["result"]``; its own stdout/stderr, which the kernel shares, hold only papermill's
    and the kernel's diagnostics. ``$REPHELPERS_INJECT_FAULT`` (:data:`FAULT_ENV`) is honoured on the
    first attempt only, so a retry runs clean.
    """
    import papermill

    _exit_with_parent()
    job = json.loads(Path(job_path).read_text())
    events = open(job["client_events"], "a", buffering=1)
    out = open(job["log"], "a", buffering=1)
    injected_before: dict[int, int] = {}
    injected: set[int] = set()
    seen_injected = 0
    code_cells = [i for i, c in enumerate(_read_cells(job["input"])) if c.get("cell_type") == "code"]
    last_code = code_cells[-1] if code_cells else None
    fault = os.environ.get(FAULT_ENV, "")
    stall_last = job["attempt"] == 1 and fault == f"stall-after-last-cell:{job['notebook']}"

    def source_index(index: int) -> int:
        # Papermill's injected cell follows the parameters cell; count it as that cell.
        return index - injected_before.get(index, 0) - (1 if index in injected else 0)

    def emit(event: str, index: int, **extra: Any) -> None:
        src = source_index(index)
        events.write(json.dumps({"e": event, "t": time.time(), "cell": src, **extra}) + "\n")
        events.flush()

    def on_start(cell: Any, cell_index: int, **_: Any) -> None:
        nonlocal seen_injected
        is_injected = "injected-parameters" in cell.get("metadata", {}).get("tags", [])
        injected_before[cell_index] = seen_injected
        if is_injected:
            seen_injected += 1
            injected.add(cell_index)
        first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
        emit("start", cell_index, src="(injected parameters)" if is_injected else first[:120])
        if not is_injected and cell.cell_type == "code" and cell.source.strip():
            out.write(f"[rephelpers] --- cell {source_index(cell_index)}: {first[:100]}\n")

    def on_execute(cell: Any, cell_index: int, **_: Any) -> None:
        emit("sent", cell_index)

    def on_executed(cell: Any, cell_index: int, **_: Any) -> None:
        emit("done", cell_index)
        if stall_last and cell_index not in injected and source_index(cell_index) == last_code:
            out.write("[rephelpers] fault injection: client stalls after the last cell\n")
            threading.Event().wait()

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
            extra_arguments=[_probe_argument()],
            on_cell_start=on_start,
            on_cell_execute=on_execute,
            on_cell_executed=on_executed,
        )
        result = {"ok": True, "kernel_peak_rss_mb": _children_peak_rss_mb()}
    except BaseException as err:  # the parent needs to hear about every way this ends
        message = _plain(str(err))
        if hasattr(err, "ename"):  # papermill's PapermillExecutionError: the cell raised
            message = f"{err.ename}: {_plain(str(err.evalue))}"
        result = {"ok": False, "type": type(err).__name__, "message": message, "traceback": _plain(traceback.format_exc())}
        out.write(f"[rephelpers] {type(err).__name__}: {message}\n")
    Path(job["result"] + ".tmp").write_text(json.dumps(result))
    os.replace(job["result"] + ".tmp", job["result"])
    return 0 if result["ok"] else 1


def _children_peak_rss_mb() -> int:
    """The largest resident memory any finished child of this process reached (the kernel's,
    once papermill has shut it down), in MiB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # Linux reports KiB


# The child imports nbformat, whose jsonschema pulls in rfc3987_syntax when installed;
# that module compiles a grammar at import (2-6 s of CPU per notebook on this project's
# 2-core CI) for the "iri" format, which nbformat's schemas never use.
_CHILD = (
    "import sys; sys.modules.setdefault('rfc3987_syntax', None); "
    "from rephelpers.runner import _child_main; sys.exit(_child_main(sys.argv[1]))"
)


def _read_cells(path: str) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text()).get("cells", [])


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie answers kill(0) but runs nothing
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _descendants(pids: Sequence[int | None]) -> list[int]:
    """Every live descendant of ``pids``, whatever session or group it moved to (from ``/proc``;
    empty where there is none). A notebook that runs notebooks itself (07 runs the chain
    through this runner) has a papermill child and a kernel in sessions of their own."""
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


def _kill_tree(proc: subprocess.Popen, kernel_pid: int | None) -> None:
    """Kill the papermill child (its own session), the kernel (jupyter_client gives it another)
    and every process under them, so that no grandchild is orphaned (collected before the
    first kill: an orphan is re-parented and can no longer be traced to us)."""
    below = _descendants([proc.pid, kernel_pid])
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
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


class _Lines:
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


def _tail(path: Path, start: int, n: int = _LAST_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(start, path.stat().st_size - 65536))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    lines = [ln for ln in _plain(text).splitlines() if ln.strip()]
    return lines[-n:]


class ProgressLine:
    """What one notebook is doing, for a person watching the runner: cell n of m and the
    running stage's own progress bar (:mod:`rephelpers.progress`).

    ``live`` (a terminal, one job): one line rewritten in place. Otherwise (a log file, CI,
    parallel jobs): a line per code cell that starts, and the bar at most every
    :data:`PROGRESS_EVERY` seconds, so a log stays readable.
    """

    def __init__(self, label: str, name: str, notebook: str | Path, live: bool = False, stream: Any = None) -> None:
        cells = _read_cells(str(notebook))
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


def _watch_notebook(
    label: str,
    name: str,
    run_dir: Path,
    parameters: dict[str, Any],
    limits: ExecutionLimits,
    log_output: bool,
    attempt: int,
) -> dict[str, Any]:
    """Execute one notebook in a child process and watch it until it ends; raise on failure,
    else return the child's report (``kernel_peak_rss_mb``).

    The watcher knows the kernel's state from the probe (``ready``, ``pre``/``post``
    around each cell, its pid) and the client's from the child (``start``, ``sent``,
    ``done`` per cell). It ends the child when:

    - no kernel reported ready within ``start_timeout`` (+ grace, papermill's own limit
      usually fires first) -> ``kernel-start``;
    - the kernel is busy with one cell past ``cell_timeout`` + ``stall_timeout`` (nbclient's
      own timeout should have fired) -> ``cell-timeout``;
    - the kernel is idle or dead and neither side has moved for ``stall_timeout``: a dead
      kernel mid-cell -> ``kernel-died``; otherwise the client is stuck on a kernel that
      has nothing left to do -> ``stall`` (the only retryable kind).
    """
    out_dir = run_dir / "notebooks"
    watch = out_dir / WATCH
    watch.mkdir(parents=True, exist_ok=True)
    files = {k: watch / f"{name}.{k}"
             for k in ("job.json", "client.jsonl", "kernel.jsonl", "result.json", "stderr", "progress.jsonl")}
    for path in files.values():
        path.unlink(missing_ok=True)
    log = out_dir / f"{name}.log"
    output = out_dir / f"{name}.ipynb"
    job = {
        "notebook": name,
        "input": str(notebooks_dir() / f"{name}.ipynb"),
        "output": str(output),
        "parameters": parameters,
        "cwd": str(project_root()),
        "start_timeout": limits.start_timeout,
        "cell_timeout": limits.cell_timeout,
        "attempt": attempt,
        "client_events": str(files["client.jsonl"]),
        "result": str(files["result.json"]),
        "log": str(log),
    }
    files["job.json"].write_text(json.dumps(job, default=str))
    # HEADLESS_ENV: no one interacts with this kernel's widgets; the explorers draw their first view instead.
    env = {**os.environ, **_THREADS, _KERNEL_EVENTS_ENV: str(files["kernel.jsonl"]), PROGRESS_ENV: str(files["progress.jsonl"]),
           HEADLESS_ENV: "1"}
    with open(log, "ab" if attempt > 1 else "wb") as f:
        if attempt > 1:
            f.write(f"[rephelpers] --- attempt {attempt}\n".encode())
        log_start = f.tell()
    with open(files["stderr"], "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(files["job.json"])],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(project_root()),
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches only us; we stop the child in order
        )
    client, kernel = _Lines(files["client.jsonl"]), _Lines(files["kernel.jsonl"])
    bars = _Lines(files["progress.jsonl"])
    progress = ProgressLine(label, name, job["input"], live=_LIVE.is_set() and not log_output)
    echo = _Lines(log, log_start)
    started = time.time()
    last_client: dict[str, Any] = {"e": "launch", "t": started}
    last_kernel: dict[str, Any] | None = None
    current: dict[str, Any] = {}  # the client's last "start": which cell, its first line
    kernel_pid: int | None = None

    def fail(kind: str, what: str, todo: str, detail: str = "") -> NotebookFailure:
        cell = current.get("cell")
        where = f"notebook {name}" + (f", cell {cell} (`{current.get('src', '')}`)" if cell is not None else "")
        files_note = f"cell output: {log}; executed copy: {output}"
        if kind in ("kernel-start", "kernel-died", "process-died"):
            files_note += f"; papermill's and the kernel's own messages: {files['stderr']}"
        return NotebookFailure(
            f"run {label}: {where}: {what}; {todo} ({files_note})",
            run=label, notebook=name, kind=kind, cell=cell, cell_source=current.get("src"),
            last_output=_tail(log, log_start), log=str(log),
            detail=detail or "\n".join(_tail(files["stderr"], 0, 60)),
        )

    def stall(what: str) -> NotebookFailure:
        return fail(
            "stall",
            what,
            "this is the known client-side hang of papermill/jupyter_client (papermill #705, #711, "
            "jupyter_client #922), not a fault of the cell; the runner retries it once, and if it "
            "keeps happening, raise `execution: stall_timeout` (or --stall-timeout) only if the "
            "client is merely slow on this machine",
        )

    try:
        while True:
            rc = proc.poll()
            for text in client.read():
                if text.strip():
                    last_client = json.loads(text)
                    if last_client["e"] == "start":
                        current = last_client
                        progress.cell(last_client["cell"], last_client["t"])
            for text in kernel.read():
                if text.strip():
                    last_kernel = json.loads(text)
                    kernel_pid = last_kernel.get("pid", kernel_pid)
            for text in bars.read():
                try:
                    progress.bar(json.loads(text))
                except ValueError:  # a progress report is a courtesy: a garbled one must not stop the run
                    pass
            if not log_output:
                progress.show()
            if log_output:
                for line in echo.read():
                    print(f"[{label}:{name}] {line}", flush=True)
            if rc is not None:
                break
            if _STOP.is_set():
                _kill_tree(proc, kernel_pid)
                raise RunInterrupted(_STOP.signum)
            now = time.time()
            if files["result.json"].exists():
                # The notebook is finished and reported; a child that then hangs on exit
                # (kernel shutdown, atexit) has nothing more to give.
                if now - files["result.json"].stat().st_mtime > limits.stall_timeout:
                    _kill_tree(proc, kernel_pid)
                    break
            elif last_kernel is None:
                if now - started > limits.start_timeout + limits.stall_timeout:
                    _kill_tree(proc, None)
                    raise fail(
                        "kernel-start",
                        f"no kernel started within start_timeout={limits.start_timeout:.0f} s",
                        "raise `execution: start_timeout` (or --start-timeout) if the machine is busy, "
                        "or check that `python -m ipykernel --version` works in this environment",
                    )
            else:
                alive = _pid_alive(kernel_pid)
                if alive and last_kernel["e"] == "pre":
                    busy_for = now - last_kernel["t"]
                    if limits.cell_timeout and busy_for > limits.cell_timeout + limits.stall_timeout:
                        _kill_tree(proc, kernel_pid)
                        raise fail(
                            "cell-timeout",
                            f"the cell is still running after {busy_for:.0f} s, past cell_timeout="
                            f"{limits.cell_timeout:.0f} s, and the client did not stop it",
                            "if the cell is only slow, raise `execution: cell_timeout` (or --cell-timeout; 0 = off)",
                        )
                else:
                    quiet = now - max(last_client["t"], last_kernel["t"])
                    if quiet > (limits.stall_timeout if alive else min(limits.stall_timeout, _DEAD_KERNEL_GRACE)):
                        _kill_tree(proc, kernel_pid)
                        if not alive and last_client["e"] == "sent":
                            raise fail(
                                "kernel-died",
                                f"the kernel (pid {kernel_pid}) died during the cell and the client did not notice",
                                "a kernel killed mid-cell is most often out of memory (see `dmesg`); lower the "
                                "batch size or the data size and re-run",
                            )
                        if last_client["e"] == "sent" and last_kernel["t"] < last_client["t"]:
                            raise stall(f"the client sent the cell {quiet:.0f} s ago and the kernel never started it")
                        if last_client["e"] == "sent":
                            raise stall(
                                f"the kernel finished the cell {quiet:.0f} s ago but the client never received its reply"
                            )
                        raise stall(
                            f"the cell finished but the client has not moved on for {quiet:.0f} s"
                            + (" (after the notebook's last cell)" if _is_last(job["input"], current) else "")
                        )
            time.sleep(_POLL)
    finally:
        progress.end()
        if proc.poll() is None:  # any exit from this function, KeyboardInterrupt included, leaves no child
            _kill_tree(proc, kernel_pid)
        elif kernel_pid and _pid_alive(kernel_pid):
            _kill_tree(proc, kernel_pid)

    result = _read_json(files["result.json"])
    if result.get("ok"):
        return result
    if not result:
        raise fail(
            "process-died",
            f"the papermill process exited with code {proc.returncode} without reporting a result",
            "see the log; a negative code is the signal that killed it (-9: out of memory, most often)",
        )
    kind, message = result.get("type", "?"), result.get("message", "")
    if kind == "DeadKernelError":
        raise fail("kernel-died", "the kernel died during the cell",
                   "a kernel killed mid-cell is most often out of memory (see `dmesg`); lower the batch "
                   "size or the data size and re-run", result.get("traceback", ""))
    if kind == "CellTimeoutError" and "IOPub" in message:
        raise stall("the kernel replied but its output stream went quiet (papermill's IOPub timeout)")
    if kind == "CellTimeoutError":
        raise fail("cell-timeout", f"the cell ran past cell_timeout={limits.cell_timeout:.0f} s",
                   "if the cell is only slow, raise `execution: cell_timeout` (or --cell-timeout; 0 = off)",
                   result.get("traceback", ""))
    if last_kernel is None and ("kernel" in message.lower() or kind in ("TimeoutError", "RuntimeError")):
        raise fail("kernel-start", f"the kernel did not start: {kind}: {message}",
                   "raise `execution: start_timeout` (or --start-timeout) if the machine is busy, or check "
                   "that `python -m ipykernel --version` works in this environment", result.get("traceback", ""))
    raise fail("error", f"the cell raised {message}" if result.get("type") == "PapermillExecutionError"
               else f"{kind}: {message}", "fix the cause and re-run", result.get("traceback", ""))


def _is_last(input_path: str, current: dict[str, Any]) -> bool:
    cells = _read_cells(input_path)
    return current.get("cell") == len(cells) - 1


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def execute_chain(
    run_dir: Path,
    parameters: dict[str, Any],
    notebooks: list[str],
    log_output: bool = False,
    limits: ExecutionLimits | None = None,
    label: str | None = None,
    on_notebook: Any = None,
    on_done: Any = None,
) -> list[dict[str, Any]]:
    """Execute ``notebooks`` in order into ``run_dir`` (executed copies under ``notebooks/``).

    Each notebook runs watched (:func:`_watch_notebook`); a stall is retried once. Returns
    the retries that happened (one record each) so the caller can keep them in its status.
    ``on_notebook(name)`` is called as a notebook starts, ``on_done(name, record)`` as it
    ends, with its wall time and its kernel's peak resident memory
    (``{"seconds": …, "peak_rss_mb": …}``, retries included).
    """
    limits = limits or ExecutionLimits()
    label = label or run_dir.name
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    params = {**parameters, "run_dir": str(run_dir)}
    retries: list[dict[str, Any]] = []
    for name in notebooks:
        declared = notebook_parameters(name)
        started = time.time()
        print(f"[rephelpers] {label}: {name} ...", flush=True)
        if on_notebook:
            on_notebook(name)
        for attempt in (1, 2):
            try:
                result = _watch_notebook(
                    label, name, run_dir, {k: v for k, v in params.items() if k in declared},
                    limits, log_output, attempt,
                )
                break
            except NotebookFailure as err:
                if not err.retryable or attempt == 2:
                    err.retries = retries
                    raise
                retries.append({**err.record(), "error": str(err), "at": time.time()})
                print(f"[rephelpers] {label}: {name} stalled, retrying once: {err}", flush=True)
        record = {"seconds": round(time.time() - started, 1), "peak_rss_mb": result.get("kernel_peak_rss_mb")}
        if on_done:
            on_done(name, record)
        peak = f", kernel peak {record['peak_rss_mb'] / 1024:.1f} GB" if record["peak_rss_mb"] else ""
        print(f"[rephelpers] {label}: {name} done in {record['seconds']:.0f}s{peak}", flush=True)
    return retries


def _write_status(run_dir: Path, **status: Any) -> None:
    # Atomic: a kill between two writes must never leave a half-written status behind.
    tmp = run_dir / f".{STATUS}.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(json.dumps(status, indent=2, default=str))
    os.replace(tmp, run_dir / STATUS)


def _read_status(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATUS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _link_artifacts(src: Path, dst: Path) -> None:
    """Hard-link (or copy) ``src``'s artifacts into ``dst``, merging manifests."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in (STATUS, MANIFEST, "notebooks") or item.name.startswith("."):
            continue
        target = dst / item.name
        if target.exists():
            continue
        if item.is_dir():
            shutil.copytree(item, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, target)
    manifest = json.loads((src / MANIFEST).read_text()) if (src / MANIFEST).exists() else {}
    mine = json.loads((dst / MANIFEST).read_text()) if (dst / MANIFEST).exists() else {}
    (dst / MANIFEST).write_text(json.dumps({**manifest, **mine}, indent=2, sort_keys=True))


def _link_or_copy(src: Any, dst: Any) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def split_shared(spec: RunSpec) -> tuple[list[str], list[str]]:
    """Notebooks that no grid key reaches (run once) and the rest (run per point)."""
    if not spec.grid:
        return [], list(spec.notebooks)
    varying = set(spec.grid)
    shared: list[str] = []
    for i, name in enumerate(spec.notebooks):
        if notebook_parameters(name) & varying:
            return shared, spec.notebooks[i:]
        shared.append(name)
    return shared, []


def _explain_redo(run_dir: Path, label: str, notebooks: list[str], fingerprint: str, force: bool) -> None:
    """Say why a point that ran before will run again (nothing for new or finished points)."""
    status = _read_status(run_dir)
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
        if pid and pid != os.getpid() and _pid_alive(pid):
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


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """``max(1, cores // jobs)``: the threads each of ``jobs`` concurrent kernels may use."""
    return max(1, (cores or available_cores()) // max(1, jobs))


def run_spec(
    spec: RunSpec,
    runs_root: str | os.PathLike | None = None,
    jobs: int = 1,
    log_output: bool = False,
    force: bool = False,
    limits: ExecutionLimits | None = None,
    engine: str = "local",
    scheduler: str | None = None,
    client: Any = None,
) -> Path:
    """Run a single chain or a whole sweep; returns the top run directory.

    ``engine`` says where the points run (:mod:`rephelpers.engines`): ``"local"`` threads, or
    ``"dask"`` tasks on a local cluster of ``jobs`` workers, on the scheduler at ``scheduler``,
    or through ``client`` (a connected ``distributed.Client``, e.g. to a dask-jobqueue
    cluster). The semantics do not depend on it: shared stages once, finished points skipped,
    failures recorded, ``results.parquet`` from every point. ``limits`` overrides
    ``spec.execution``. Raises :class:`RunInterrupted` after a SIGINT/SIGTERM once every
    running notebook is stopped and recorded. Each kernel gets :func:`threads_per_job`
    threads (``OMP_NUM_THREADS`` etc.; a value already set in the environment is kept), so
    ``jobs`` × threads ≤ cores; on a remote cluster each worker's own ``OMP_NUM_THREADS``.
    """
    from .engines import check_engine, dask_client, run_tasks

    spec.check()
    check_engine(engine, scheduler if client is None else None)
    require(client is None or engine == "dask", "a dask client was given: pass engine='dask' to run on it.")
    threads = str(threads_per_job(jobs))
    _THREADS.clear()
    _THREADS.update({name: os.environ.get(name, threads) for name in THREAD_ENV})
    remote = engine == "dask" and (scheduler is not None or client is not None)
    task_threads = None if remote else dict(_THREADS)
    if jobs == 1 and engine == "local" and sys.stdout.isatty():
        _LIVE.set()
    else:
        _LIVE.clear()
    root = Path(runs_root) if runs_root else project_root() / "runs"
    top = (root / spec.name).resolve()
    top.mkdir(parents=True, exist_ok=True)
    limits = limits or spec.execution
    points = spec.points()

    def run(tasks: list[tuple[Any, ...]], workers: int) -> list[tuple[str, str]]:
        return list(run_tasks(engine, run_point_task, tasks, jobs=workers, client=connected, stopped=_STOP.is_set))

    with _interruptible(), (dask_client(jobs, scheduler, client) if engine == "dask" else _no_client()) as connected:
        if not spec.grid:
            run([(str(top), spec.name, spec.parameters, spec.notebooks, {}, log_output, force, limits,
                  task_threads, None, True)], 1)
            if _STOP.is_set():
                raise RunInterrupted(_STOP.signum)
            status = _read_status(top)
            if status.get("state") != "done":
                raise RephelpersError(f"run {spec.name} failed: {status.get('error', 'see notebooks/')}")
            return top

        shared, per_point = split_shared(spec)
        base = top / SHARED
        if shared:
            run([(str(base), f"{spec.name}/{SHARED}", spec.parameters, shared, {}, log_output, force, limits,
                  task_threads, None, True)], 1)
            if _STOP.is_set():
                raise RunInterrupted(_STOP.signum)
            require(
                _read_status(base).get("state") == "done",
                f"the shared stages {shared} failed: {_read_status(base).get('error', '?')}; "
                f"see {base / STATUS}, fix the cause and re-run",
            )
        fresh = []
        for point in points:
            params = {**spec.parameters, **point}
            if not (top / point_name(point) / STATUS).exists():
                fresh.append(point_name(point))
            _explain_redo(top / point_name(point), f"{spec.name}/{point_name(point)}", per_point,
                          stable_hash(params, per_point), force)
        if fresh and len(fresh) < len(points):  # a resumed sweep: say what was never reached
            print(f"[rephelpers] {spec.name}: {len(fresh)} point(s) not started before, will run: "
                  f"{', '.join(fresh[:10])}{' ...' if len(fresh) > 10 else ''}", flush=True)

        tasks = [
            (str(top / point_name(point)), f"{spec.name}/{point_name(point)}", {**spec.parameters, **point},
             per_point, point, log_output, force, limits, task_threads, str(base) if shared else None, False)
            for point in points
        ]
        try:
            for name, state in run_tasks(engine, run_point_task, tasks, jobs=jobs, client=connected,
                                         stopped=_STOP.is_set):
                print(f"[rephelpers] point {name}: {state}", flush=True)
        except RunInterrupted:
            pass
        if _STOP.is_set():
            raise RunInterrupted(_STOP.signum)
    table = collect(top)
    print(f"[rephelpers] sweep {spec.name}: {len(points)} points, results in {top / 'results.parquet'} ({len(table)} rows)")
    try:
        from .views.render import save_sweep_charts

        for path in save_sweep_charts(top, table, list(spec.grid)):
            print(f"[rephelpers]   {path}", flush=True)
    except Exception as err:  # a chart must not cost the sweep its results, which are already written
        print(f"[rephelpers] the sweep's charts were not drawn ({type(err).__name__}: {err})", flush=True)
    return top


@contextmanager
def _no_client() -> Iterator[None]:
    yield None


def run_point_task(
    run_dir: str,
    label: str,
    parameters: dict[str, Any],
    notebooks: list[str],
    point: dict[str, Any],
    log_output: bool,
    force: bool,
    limits: ExecutionLimits | None,
    threads: dict[str, str] | None,
    link_from: str | None,
    explain: bool,
) -> tuple[str, str]:
    """One run directory's notebooks as a self-contained task, the unit every engine executes.

    Links ``link_from``'s artifacts (the shared stages) in first, sets the kernel's thread
    variables (``threads``; ``None``: this machine's :func:`rephelpers.engines.worker_threads`),
    runs :func:`_run_point` (skipped when done with the same parameters) and returns
    ``(point, state)``. Only arguments and the file system cross to the worker.
    """
    from .engines import worker_threads

    folder = Path(run_dir)
    name = folder.name if point else label
    if _STOP.is_set():
        return name, "not started"
    require(folder.parent.is_dir(),
            f"{folder.parent} is not visible on {os.uname().nodename}: every worker must see the run directory "
            "at the same path (put --runs-root on a shared file system).")
    if threads is None and not _THREADS:
        _THREADS.update({var: str(worker_threads()) for var in THREAD_ENV})
    elif threads is not None:
        _THREADS.update(threads)
    if link_from:
        _link_artifacts(Path(link_from), folder)
    _run_point(folder, label, parameters, notebooks, point, log_output, force, limits, explain=explain)
    return name, _read_status(folder).get("state", "?")


def _run_point(
    run_dir: Path,
    label: str,
    parameters: dict[str, Any],
    notebooks: list[str],
    point: dict[str, Any],
    log_output: bool,
    force: bool,
    limits: ExecutionLimits | None = None,
    explain: bool = True,
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = stable_hash(parameters, notebooks)
    status = _read_status(run_dir)
    if not force and status.get("state") == "done" and status.get("fingerprint") == fingerprint:
        print(f"[rephelpers] {label}: already done, skipped", flush=True)
        return
    if explain:
        _explain_redo(run_dir, label, notebooks, fingerprint, force)
    started = time.time()
    # Each finished notebook's wall time and kernel peak memory, kept in every status written after it.
    stages: dict[str, dict[str, Any]] = {}
    common = {"fingerprint": fingerprint, "point": point, "started": started, "pid": os.getpid(), "stages": stages,
              "received": received_parameters({**parameters, "run_dir": str(run_dir)}, notebooks, notebook_parameters)}
    now_in: dict[str, str] = {}

    def entering(name: str) -> None:
        now_in["notebook"] = name
        _write_status(run_dir, state="running", notebook=name, **common)

    def finished(name: str, record: dict[str, Any]) -> None:
        stages[name] = record
        _write_status(run_dir, state="running", notebook=name, **common)

    _write_status(run_dir, state="running", **common)
    try:
        retries = execute_chain(run_dir, parameters, notebooks, log_output=log_output, limits=limits,
                                label=label, on_notebook=entering, on_done=finished)
    except RunInterrupted as err:
        _write_status(
            run_dir, state="interrupted", signal=signal.Signals(err.signum).name, notebook=now_in.get("notebook"),
            cell=_last_cell(run_dir, now_in.get("notebook")), ended=time.time(),
            seconds=round(time.time() - started, 1), **common,
        )
        print(f"[rephelpers] {label}: interrupted in {now_in.get('notebook')}, state recorded", flush=True)
        raise
    except NotebookFailure as err:
        _write_status(
            run_dir, state="failed", error=str(err)[:4000], **err.record(),
            traceback=(err.detail or traceback.format_exc())[-8000:], attempts=2 if err.retryable else 1,
            retries=err.retries,
            ended=time.time(), seconds=round(time.time() - started, 1), **common,
        )
        print(f"[rephelpers] {label}: FAILED in {err.notebook} ({err.kind})", flush=True)
        return
    except Exception as err:  # one failing point must not stop a sweep
        _write_status(
            run_dir, state="failed", notebook=now_in.get("notebook"), error=f"{type(err).__name__}: {err}"[:4000],
            traceback=traceback.format_exc()[-8000:], ended=time.time(),
            seconds=round(time.time() - started, 1), **common,
        )
        print(f"[rephelpers] {label}: FAILED ({type(err).__name__})", flush=True)
        return
    _write_status(run_dir, state="done", retries=retries, ended=time.time(),
                  seconds=round(time.time() - started, 1), **common)


def _last_cell(run_dir: Path, name: str | None) -> int | None:
    """The cell the client last started in ``name`` (from its event file), if any."""
    if not name:
        return None
    path = run_dir / "notebooks" / WATCH / f"{name}.client.jsonl"
    cell = None
    for line in _Lines(path).read():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("e") == "start":
            cell = event.get("cell")
    return cell


def collect(top: str | os.PathLike, artifact: str = "influence.parquet") -> pd.DataFrame:
    """Concatenate ``artifact`` from every point of a sweep, with the point's parameters as columns."""
    top = Path(top)
    frames, failures = [], []
    for status_file in sorted(top.glob(f"*/{STATUS}")):
        run_dir = status_file.parent
        if run_dir.name == SHARED:
            continue
        status = _read_status(run_dir)
        if status.get("state") != "done":
            failures.append({"point": run_dir.name, "state": status.get("state"), "error": status.get("error")})
            continue
        path = run_dir / artifact
        if path.exists():
            df = pd.read_parquet(path)
            for k, v in (status.get("point") or {}).items():
                df[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
            df["point"] = run_dir.name
            frames.append(df)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if frames:
        table.to_parquet(top / "results.parquet", index=False)
    pd.DataFrame(failures, columns=["point", "state", "error"]).to_csv(top / "failures.csv", index=False)
    return table


def parameterize_chain(spec: RunSpec, out: str | os.PathLike, run_dir: str | os.PathLike) -> list[Path]:
    """Copies of the chain's notebooks with ``spec.parameters`` injected, for nbmake.

    nbmake runs notebooks as they are; this gives it CI-sized parameters the same way
    papermill would (an ``injected-parameters`` cell after the ``parameters`` cell).
    Both ``out`` and ``run_dir`` are emptied first so every CI run starts clean.
    """
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    require(not spec.grid, "parameterize takes a single run, not a sweep")
    spec.check()
    out = Path(out) if Path(out).is_absolute() else project_root() / out
    target_run = Path(run_dir) if Path(run_dir).is_absolute() else project_root() / run_dir
    for folder in (out, target_run):
        if folder.exists():
            shutil.rmtree(folder)
    out.mkdir(parents=True)
    params = {**spec.parameters, "run_dir": str(target_run)}
    written = []
    for name in spec.notebooks:
        nb = load_notebook_node(str(notebooks_dir() / f"{name}.ipynb"))  # normalises cell tags
        declared = notebook_parameters(name)
        nb = parameterize_notebook(nb, {k: v for k, v in params.items() if k in declared})
        path = out / f"{name}.ipynb"
        nbformat.write(nb, path)
        written.append(path)
    return written
