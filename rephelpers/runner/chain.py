"""Chains: a run directory's notebooks executed in order, its status kept at every step.

:func:`execute_chain` runs the notebooks (each watched, a stall retried once);
:func:`run_point` wraps it for one run directory: skipped when its status says done with
the same parameters, else run with every step, failure or interruption recorded in
``status.json`` (:mod:`rephelpers.runner.status`).
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..artifacts import stable_hash
from ..validation import received_parameters
from .failures import NotebookFailure, RunInterrupted
from .spec import ExecutionLimits, notebook_parameters
from .status import explain_redo, last_cell, read_status, write_status
from .watch import watch_notebook


def execute_chain(
    run_dir: Path,
    parameters: dict[str, Any],
    notebooks: list[str],
    log_output: bool = False,
    limits: ExecutionLimits | None = None,
    label: str | None = None,
    on_notebook: Callable[[str], None] | None = None,
    on_done: Callable[[str, dict[str, Any]], None] | None = None,
    threads: dict[str, str] | None = None,
    live: bool = False,
) -> list[dict[str, Any]]:
    """Execute ``notebooks`` in order into ``run_dir`` (executed copies under ``notebooks/``).

    Each notebook runs watched (:class:`rephelpers.runner.watch.NotebookWatch`); a stall is
    retried once. Returns the retries that happened (one record each) so the caller can keep
    them in its status.
    ``on_notebook(name)`` is called as a notebook starts, ``on_done(name, record)`` as it
    ends, with its wall time and its kernel's peak resident memory
    (``{"seconds": …, "peak_rss_mb": …}``, retries included). ``threads``: the kernels' thread
    variables (:func:`rephelpers.engines.kernel_threads`; none: the kernels inherit this
    process's environment); ``live``: one progress line rewritten in place (a terminal).
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
                result = watch_notebook(
                    label, name, run_dir, {k: v for k, v in params.items() if k in declared},
                    limits, log_output, attempt, threads=threads, live=live,
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


def run_point(
    run_dir: Path,
    label: str,
    parameters: dict[str, Any],
    notebooks: list[str],
    point: dict[str, Any],
    log_output: bool,
    force: bool,
    limits: ExecutionLimits | None = None,
    explain: bool = True,
    threads: dict[str, str] | None = None,
    live: bool = False,
) -> None:
    """Run ``notebooks`` into ``run_dir`` unless its status says done with the same parameters
    and notebooks (and not ``force``); record the outcome in its ``status.json``.

    A failing notebook is recorded (``"state": "failed"``, where, why, the last output) and
    this returns, so one failing point does not stop a sweep; an interruption is recorded
    (``"state": "interrupted"``, the signal and the cell) and re-raised.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = stable_hash(parameters, notebooks)
    status = read_status(run_dir)
    if not force and status.get("state") == "done" and status.get("fingerprint") == fingerprint:
        print(f"[rephelpers] {label}: already done, skipped", flush=True)
        return
    if explain:
        explain_redo(run_dir, label, notebooks, fingerprint, force)
    started = time.time()
    # Each finished notebook's wall time and kernel peak memory, kept in every status written after it.
    stages: dict[str, dict[str, Any]] = {}
    common = {"fingerprint": fingerprint, "point": point, "started": started, "pid": os.getpid(), "stages": stages,
              "received": received_parameters({**parameters, "run_dir": str(run_dir)}, notebooks, notebook_parameters)}
    now_in: dict[str, str] = {}

    def entering(name: str) -> None:
        now_in["notebook"] = name
        write_status(run_dir, state="running", notebook=name, **common)

    def finished(name: str, record: dict[str, Any]) -> None:
        stages[name] = record
        write_status(run_dir, state="running", notebook=name, **common)

    write_status(run_dir, state="running", **common)
    try:
        retries = execute_chain(run_dir, parameters, notebooks, log_output=log_output, limits=limits,
                                label=label, on_notebook=entering, on_done=finished, threads=threads, live=live)
    except RunInterrupted as err:
        write_status(
            run_dir, state="interrupted", signal=signal.Signals(err.signum).name, notebook=now_in.get("notebook"),
            cell=last_cell(run_dir, now_in.get("notebook")), ended=time.time(),
            seconds=round(time.time() - started, 1), **common,
        )
        print(f"[rephelpers] {label}: interrupted in {now_in.get('notebook')}, state recorded", flush=True)
        raise
    except NotebookFailure as err:
        write_status(
            run_dir, state="failed", error=str(err)[:4000], **err.record(),
            traceback=(err.detail or traceback.format_exc())[-8000:], attempts=2 if err.retryable else 1,
            retries=err.retries,
            ended=time.time(), seconds=round(time.time() - started, 1), **common,
        )
        print(f"[rephelpers] {label}: FAILED in {err.notebook} ({err.kind})", flush=True)
        return
    except Exception as err:  # one failing point must not stop a sweep
        write_status(
            run_dir, state="failed", notebook=now_in.get("notebook"), error=f"{type(err).__name__}: {err}"[:4000],
            traceback=traceback.format_exc()[-8000:], ended=time.time(),
            seconds=round(time.time() - started, 1), **common,
        )
        print(f"[rephelpers] {label}: FAILED ({type(err).__name__})", flush=True)
        return
    write_status(run_dir, state="done", retries=retries, ended=time.time(),
                  seconds=round(time.time() - started, 1), **common)
