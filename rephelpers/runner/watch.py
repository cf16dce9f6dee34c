"""Executing one notebook under watch: the papermill child started, its events read, its limits kept.

Every notebook runs in a child process (papermill + its kernel, :mod:`rephelpers.runner.child`)
that this process watches rather than trusts: papermill's client can wait forever for a
reply the kernel already sent (papermill #705/#711, jupyter_client #922), and a timeout
alone would only notice that after the whole cell budget. The child reports what the
client does (cell started, sent, reply received) and a probe inside the kernel
(:mod:`rephelpers.runner.probe`) what the kernel does (ready, cell started, cell finished,
its pid); :class:`NotebookWatch` holds the rules that turn the two into a verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from ..artifacts import project_root
from ..progress import HEADLESS_ENV, PROGRESS_ENV
from .failures import STOP, NotebookFailure, RunInterrupted
from .processes import kill_tree, pid_alive
from .progressline import ProgressLine
from .protocol import KERNEL_EVENTS_ENV, JobFiles, Lines, read_cells, read_json, tail
from .spec import ExecutionLimits, notebooks_dir

CHILD_MODULE = f"{__package__}.child"
"""Run as ``python -m``; named, not imported, so that running it finds it imported nowhere else."""
POLL = 0.25  # seconds between the watcher's looks; small next to every limit
DEAD_KERNEL_GRACE = 10.0  # nbclient notices a dead kernel within ~1 s; give it time to say so itself
_START_TODO = ("raise `execution: start_timeout` (or --start-timeout) if the machine is busy, or check "
               "that `python -m ipykernel --version` works in this environment")
_OOM_TODO = ("a kernel killed mid-cell is most often out of memory (see `dmesg`); lower the batch "
             "size or the data size and re-run")
_CELL_TODO = "if the cell is only slow, raise `execution: cell_timeout` (or --cell-timeout; 0 = off)"


class NotebookWatch:
    """One notebook executed in a child process and watched until it ends.

    The watcher knows the kernel's state from the probe (``ready``, ``pre``/``post``
    around each cell, its pid) and the client's from the child (``start``, ``sent``,
    ``done`` per cell). It ends the child when:

    - no kernel reported ready within ``start_timeout`` (+ ``stall_timeout`` of grace,
      papermill's own limit usually fires first) -> ``kernel-start``;
    - the kernel is busy with one cell past ``cell_timeout`` + ``stall_timeout`` (nbclient's
      own timeout should have fired) -> ``cell-timeout``;
    - the kernel is idle or dead and neither side has moved for ``stall_timeout``: a dead
      kernel mid-cell -> ``kernel-died``; otherwise the client is stuck on a kernel that
      has nothing left to do -> ``stall`` (the only retryable kind).

    ``threads`` are the kernel's thread variables (:func:`rephelpers.engines.kernel_threads`);
    ``live``: rewrite one progress line in place (a terminal, one job) instead of logging lines.
    """

    def __init__(self, label: str, name: str, run_dir: Path, parameters: dict[str, Any], limits: ExecutionLimits,
                 log_output: bool, attempt: int, threads: dict[str, str] | None = None, live: bool = False) -> None:
        self.label, self.name, self.limits, self.log_output = label, name, limits, log_output
        out_dir = run_dir / "notebooks"
        self.files = JobFiles.under(out_dir, name)
        self.files.clear()
        self.log, self.output = out_dir / f"{name}.log", out_dir / f"{name}.ipynb"
        self.input = str(notebooks_dir() / f"{name}.ipynb")
        self.files.job.write_text(json.dumps({
            "notebook": name, "input": self.input, "output": str(self.output), "parameters": parameters,
            "cwd": str(project_root()), "start_timeout": limits.start_timeout, "cell_timeout": limits.cell_timeout,
            "attempt": attempt, "client_events": str(self.files.client), "result": str(self.files.result),
            "log": str(self.log),
        }, default=str))
        with open(self.log, "ab" if attempt > 1 else "wb") as f:
            if attempt > 1:
                f.write(f"[rephelpers] --- attempt {attempt}\n".encode())
            self.log_start = f.tell()
        self.proc = self._launch(threads or {})
        self.client, self.kernel = Lines(self.files.client), Lines(self.files.kernel)
        self.bars, self.echo = Lines(self.files.progress), Lines(self.log, self.log_start)
        self.progress = ProgressLine(label, name, self.input, live=live and not log_output)
        self.started = time.time()
        self.last_client: dict[str, Any] = {"e": "launch", "t": self.started}
        self.last_kernel: dict[str, Any] | None = None
        self.current: dict[str, Any] = {}  # the client's last "start": which cell, its first line
        self.kernel_pid: int | None = None

    def _launch(self, threads: dict[str, str]) -> subprocess.Popen:
        # HEADLESS_ENV: no one interacts with this kernel's widgets; the explorers draw their first view instead.
        env = {**os.environ, **threads, KERNEL_EVENTS_ENV: str(self.files.kernel),
               PROGRESS_ENV: str(self.files.progress), HEADLESS_ENV: "1"}
        with open(self.files.stderr, "wb") as f:
            return subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, str(self.files.job)],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(project_root()),
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches only us; we stop the child in order
            )

    def run(self) -> dict[str, Any]:
        """Watch until the child ends; the child's report (``kernel_peak_rss_mb``), or raise why it failed."""
        try:
            while True:
                ended = self.proc.poll() is not None
                self.read_events()
                if ended or self.check(time.time()):
                    break
                time.sleep(POLL)
        finally:
            self.progress.end()
            if self.proc.poll() is None:  # any exit, KeyboardInterrupt included, leaves no child
                kill_tree(self.proc, self.kernel_pid)
            elif self.kernel_pid and pid_alive(self.kernel_pid):
                kill_tree(self.proc, self.kernel_pid)
        return self.outcome()

    def read_events(self) -> None:
        """Take in what the client, the kernel and the kernel's progress bars reported since the last look."""
        for text in self.client.read():
            if text.strip():
                self.last_client = json.loads(text)
                if self.last_client["e"] == "start":
                    self.current = self.last_client
                    self.progress.cell(self.last_client["cell"], self.last_client["t"])
        for text in self.kernel.read():
            if text.strip():
                self.last_kernel = json.loads(text)
                self.kernel_pid = self.last_kernel.get("pid", self.kernel_pid)
        for text in self.bars.read():
            try:
                self.progress.bar(json.loads(text))
            except ValueError:  # a progress report is a courtesy: a garbled one must not stop the run
                pass
        if self.log_output:
            for line in self.echo.read():
                print(f"[{self.label}:{self.name}] {line}", flush=True)
        else:
            self.progress.show()

    def check(self, now: float) -> bool:
        """Apply the limits to a running child: raise on a stuck one, True when a finished one hangs on exit."""
        if STOP.is_set():
            kill_tree(self.proc, self.kernel_pid)
            raise RunInterrupted(STOP.signum)
        limits = self.limits
        if self.files.result.exists():
            # The notebook is finished and reported; a child that then hangs on exit
            # (kernel shutdown, atexit) has nothing more to give.
            if now - self.files.result.stat().st_mtime > limits.stall_timeout:
                kill_tree(self.proc, self.kernel_pid)
                return True
            return False
        if self.last_kernel is None:
            if now - self.started > limits.start_timeout + limits.stall_timeout:
                kill_tree(self.proc, None)
                raise self.fail("kernel-start", f"no kernel started within start_timeout={limits.start_timeout:.0f} s",
                                _START_TODO)
            return False
        alive = pid_alive(self.kernel_pid)
        if alive and self.last_kernel["e"] == "pre":
            busy_for = now - self.last_kernel["t"]
            if limits.cell_timeout and busy_for > limits.cell_timeout + limits.stall_timeout:
                kill_tree(self.proc, self.kernel_pid)
                raise self.fail("cell-timeout", f"the cell is still running after {busy_for:.0f} s, past "
                                f"cell_timeout={limits.cell_timeout:.0f} s, and the client did not stop it", _CELL_TODO)
            return False
        quiet = now - max(self.last_client["t"], self.last_kernel["t"])
        if quiet > (limits.stall_timeout if alive else min(limits.stall_timeout, DEAD_KERNEL_GRACE)):
            kill_tree(self.proc, self.kernel_pid)
            self._raise_quiet(alive, quiet)
        return False

    def _raise_quiet(self, alive: bool, quiet: float) -> NoReturn:
        """Say why a kernel that is idle or dead and a client that has not moved for ``quiet`` s are stuck."""
        sent = self.last_client["e"] == "sent"
        if not alive and sent:
            raise self.fail("kernel-died",
                            f"the kernel (pid {self.kernel_pid}) died during the cell and the client did not notice",
                            _OOM_TODO)
        if sent and self.last_kernel is not None and self.last_kernel["t"] < self.last_client["t"]:
            raise self.stall(f"the client sent the cell {quiet:.0f} s ago and the kernel never started it")
        if sent:
            raise self.stall(f"the kernel finished the cell {quiet:.0f} s ago but the client never received its reply")
        last = self.current.get("cell") == len(read_cells(self.input)) - 1
        raise self.stall(f"the cell finished but the client has not moved on for {quiet:.0f} s"
                         + (" (after the notebook's last cell)" if last else ""))

    def outcome(self) -> dict[str, Any]:
        """The child's report when the notebook finished; else the failure its result names."""
        result = read_json(self.files.result)
        if result.get("ok"):
            return result
        if not result:
            raise self.fail("process-died",
                            f"the papermill process exited with code {self.proc.returncode} without reporting a result",
                            "see the log; a negative code is the signal that killed it (-9: out of memory, most often)")
        kind, message, trace = result.get("type", "?"), result.get("message", ""), result.get("traceback", "")
        if kind == "DeadKernelError":
            raise self.fail("kernel-died", "the kernel died during the cell", _OOM_TODO, trace)
        if kind == "CellTimeoutError" and "IOPub" in message:
            raise self.stall("the kernel replied but its output stream went quiet (papermill's IOPub timeout)")
        if kind == "CellTimeoutError":
            raise self.fail("cell-timeout", f"the cell ran past cell_timeout={self.limits.cell_timeout:.0f} s",
                            _CELL_TODO, trace)
        if self.last_kernel is None and ("kernel" in message.lower() or kind in ("TimeoutError", "RuntimeError")):
            raise self.fail("kernel-start", f"the kernel did not start: {kind}: {message}", _START_TODO, trace)
        raise self.fail("error", f"the cell raised {message}" if kind == "PapermillExecutionError"
                        else f"{kind}: {message}", "fix the cause and re-run", trace)

    def fail(self, kind: str, what: str, todo: str, detail: str = "") -> NotebookFailure:
        cell = self.current.get("cell")
        where = f"notebook {self.name}" + (f", cell {cell} (`{self.current.get('src', '')}`)" if cell is not None else "")
        files_note = f"cell output: {self.log}; executed copy: {self.output}"
        if kind in ("kernel-start", "kernel-died", "process-died"):
            files_note += f"; papermill's and the kernel's own messages: {self.files.stderr}"
        return NotebookFailure(
            f"run {self.label}: {where}: {what}; {todo} ({files_note})",
            run=self.label, notebook=self.name, kind=kind, cell=cell, cell_source=self.current.get("src"),
            last_output=tail(self.log, self.log_start), log=str(self.log),
            detail=detail or "\n".join(tail(self.files.stderr, 0, 60)),
        )

    def stall(self, what: str) -> NotebookFailure:
        return self.fail(
            "stall",
            what,
            "this is the known client-side hang of papermill/jupyter_client (papermill #705, #711, "
            "jupyter_client #922), not a fault of the cell; the runner retries it once, and if it "
            "keeps happening, raise `execution: stall_timeout` (or --stall-timeout) only if the "
            "client is merely slow on this machine",
        )


def watch_notebook(label: str, name: str, run_dir: Path, parameters: dict[str, Any], limits: ExecutionLimits,
                   log_output: bool, attempt: int, threads: dict[str, str] | None = None,
                   live: bool = False) -> dict[str, Any]:
    """Execute one notebook in a child process and watch it until it ends (:class:`NotebookWatch`);
    raise :class:`NotebookFailure` on failure, else return the child's report (``kernel_peak_rss_mb``)."""
    return NotebookWatch(label, name, run_dir, parameters, limits, log_output, attempt, threads, live).run()
