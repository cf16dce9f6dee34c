"""Sweeps: a run or a whole grid, shared stages once, every point as one task on an engine.

A sweep expands the grid into points and runs each into ``runs/<name>/<point>/``. Stages
whose parameters do not vary across the grid (and whose upstream stages do not either) run
once into ``runs/<name>/_shared/`` and their artifacts are linked into every point, so only
the stages the grid touches are recomputed. Every run directory, shared or a point's, is
one task (:func:`run_point_task`) that an engine (:mod:`rephelpers.engines`) executes:
local threads or dask workers, with the same results.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import MANIFEST, project_root, stable_hash
from ..engines import (
    THREAD_ENV,
    check_engine,
    dask_client,
    kernel_threads,
    run_tasks,
    worker_threads,
)
from ..errors import RephelpersError, require
from .chain import run_point
from .failures import STOP, RunInterrupted, interruptible
from .results import SHARED, collect
from .spec import ExecutionLimits, RunSpec, notebook_parameters, point_name
from .status import STATUS, explain_redo, read_status


def link_artifacts(src: Path, dst: Path) -> None:
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
    live: bool = False,
) -> tuple[str, str]:
    """One run directory's notebooks as a self-contained task, the unit every engine executes.

    Links ``link_from``'s artifacts (the shared stages) in first, gives the kernels the thread
    variables ``threads`` (``None``: this machine's :func:`rephelpers.engines.worker_threads`),
    runs :func:`rephelpers.runner.chain.run_point` (skipped when done with the same
    parameters) and returns ``(point, state)``. Only arguments and the file system cross to
    the worker.
    """
    folder = Path(run_dir)
    name = folder.name if point else label
    if STOP.is_set():
        return name, "not started"
    require(folder.parent.is_dir(),
            f"{folder.parent} is not visible on {os.uname().nodename}: every worker must see the run directory "
            "at the same path (put --runs-root on a shared file system).")
    if threads is None:
        threads = {var: str(worker_threads()) for var in THREAD_ENV}
    if link_from:
        link_artifacts(Path(link_from), folder)
    run_point(folder, label, parameters, notebooks, point, log_output, force, limits, explain=explain,
              threads=threads, live=live)
    return name, read_status(folder).get("state", "?")


@dataclass(frozen=True)
class _Tasks:
    """What every task of one :func:`run_spec` call shares, and the engine that runs them."""

    engine: str
    jobs: int
    log_output: bool
    force: bool
    limits: ExecutionLimits
    threads: dict[str, str] | None  # None: each worker's own (a remote cluster)
    live: bool

    def task(self, run_dir: Path, label: str, parameters: dict[str, Any], notebooks: list[str],
             point: dict[str, Any], link_from: Path | None, explain: bool) -> tuple[Any, ...]:
        """The arguments of one :func:`run_point_task`."""
        return (str(run_dir), label, parameters, notebooks, point, self.log_output, self.force, self.limits,
                self.threads, str(link_from) if link_from else None, explain, self.live)

    def run(self, tasks: list[tuple[Any, ...]], workers: int, client: Any) -> Any:
        """Each ``(point, state)`` as its task ends."""
        return run_tasks(self.engine, run_point_task, tasks, jobs=workers, client=client, stopped=STOP.is_set)


def _stop_if_interrupted() -> None:
    if STOP.is_set():
        raise RunInterrupted(STOP.signum)


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
    running notebook is stopped and recorded. Each kernel gets
    :func:`rephelpers.engines.threads_per_job` threads (``OMP_NUM_THREADS`` etc.; a value
    already set in the environment is kept), so ``jobs`` × threads ≤ cores; on a remote
    cluster each worker's own ``OMP_NUM_THREADS``.
    """
    spec.check()
    check_engine(engine, scheduler if client is None else None)
    require(client is None or engine == "dask", "a dask client was given: pass engine='dask' to run on it.")
    remote = engine == "dask" and (scheduler is not None or client is not None)
    tasks = _Tasks(engine, jobs, log_output, force, limits or spec.execution,
                   threads=None if remote else kernel_threads(jobs),
                   live=jobs == 1 and engine == "local" and sys.stdout.isatty())
    root = Path(runs_root) if runs_root else project_root() / "runs"
    top = (root / spec.name).resolve()
    top.mkdir(parents=True, exist_ok=True)
    with interruptible(), (dask_client(jobs, scheduler, client) if engine == "dask" else nullcontext()) as connected:
        if not spec.grid:
            list(tasks.run([tasks.task(top, spec.name, spec.parameters, spec.notebooks, {}, None, True)], 1, connected))
            _stop_if_interrupted()
            status = read_status(top)
            if status.get("state") != "done":
                raise RephelpersError(f"run {spec.name} failed: {status.get('error', 'see notebooks/')}")
            return top
        _run_sweep(spec, top, tasks, connected)
    table = collect(top)
    print(f"[rephelpers] sweep {spec.name}: {len(spec.points())} points, results in {top / 'results.parquet'} "
          f"({len(table)} rows)")
    _draw_sweep_charts(spec, top, table)
    return top


def _run_sweep(spec: RunSpec, top: Path, tasks: _Tasks, client: Any) -> None:
    """The shared stages once into ``top/_shared``, then every point's own stages."""
    shared, per_point = split_shared(spec)
    base = top / SHARED
    if shared:
        list(tasks.run([tasks.task(base, f"{spec.name}/{SHARED}", spec.parameters, shared, {}, None, True)], 1,
                       client))
        _stop_if_interrupted()
        require(
            read_status(base).get("state") == "done",
            f"the shared stages {shared} failed: {read_status(base).get('error', '?')}; "
            f"see {base / STATUS}, fix the cause and re-run",
        )
    points = spec.points()
    _announce(spec, top, points, per_point, tasks.force)
    point_tasks = [
        tasks.task(top / point_name(point), f"{spec.name}/{point_name(point)}", {**spec.parameters, **point},
                   per_point, point, base if shared else None, False)
        for point in points
    ]
    try:
        for name, state in tasks.run(point_tasks, tasks.jobs, client):
            print(f"[rephelpers] point {name}: {state}", flush=True)
    except RunInterrupted:
        pass
    _stop_if_interrupted()


def _announce(spec: RunSpec, top: Path, points: list[dict[str, Any]], per_point: list[str], force: bool) -> None:
    """Say, before any point runs, which points run again and why, and which were never reached."""
    fresh = []
    for point in points:
        params = {**spec.parameters, **point}
        if not (top / point_name(point) / STATUS).exists():
            fresh.append(point_name(point))
        explain_redo(top / point_name(point), f"{spec.name}/{point_name(point)}", per_point,
                     stable_hash(params, per_point), force)
    if fresh and len(fresh) < len(points):  # a resumed sweep: say what was never reached
        print(f"[rephelpers] {spec.name}: {len(fresh)} point(s) not started before, will run: "
              f"{', '.join(fresh[:10])}{' ...' if len(fresh) > 10 else ''}", flush=True)


def _draw_sweep_charts(spec: RunSpec, top: Path, table: Any) -> None:
    try:
        # views pulls in altair and vl-convert; only a finished sweep draws, so only it pays for them.
        from ..views.charts import save_sweep_charts

        for path in save_sweep_charts(top, table, list(spec.grid)):
            print(f"[rephelpers]   {path}", flush=True)
    except Exception as err:  # a chart must not cost the sweep its results, which are already written
        print(f"[rephelpers] the sweep's charts were not drawn ({type(err).__name__}: {err})", flush=True)
