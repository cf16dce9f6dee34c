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
point's ``status.json`` records what each notebook received (``received``). A sweep runs
the stages no grid key reaches once and links their artifacts into every point; a point
whose ``status.json`` says done with the same parameters is skipped; a failing point is
recorded and the others go on; ``collect`` gathers every point's ``influence.parquet``.

One module per job, each importing only those above it in this list:

- :mod:`~rephelpers.runner.protocol`: the files and variables the watcher, the child and the kernel probe share;
- :mod:`~rephelpers.runner.processes`: is a process alive, its descendants, stopping all of them;
- :mod:`~rephelpers.runner.probe`: the probe inside each kernel (cell started, finished, its pid);
- :mod:`~rephelpers.runner.child`: the papermill child, ``python -m rephelpers.runner.child JOB``;
- :mod:`~rephelpers.runner.spec`: :class:`RunSpec` (the parameter file, checked) and :class:`ExecutionLimits`;
- :mod:`~rephelpers.runner.status`: a run directory's ``status.json``;
- :mod:`~rephelpers.runner.failures`: :class:`NotebookFailure`, :class:`RunInterrupted`, the signal handling;
- :mod:`~rephelpers.runner.progressline`: :class:`ProgressLine`, what a person watching sees;
- :mod:`~rephelpers.runner.watch`: one notebook executed under watch (:class:`~rephelpers.runner.watch.NotebookWatch`);
- :mod:`~rephelpers.runner.chain`: a run directory's notebooks in order, its status kept;
- :mod:`~rephelpers.runner.results`: one table from every point of a sweep;
- :mod:`~rephelpers.runner.sweep`: :func:`run_spec`, shared stages, points as tasks on an engine
  (:mod:`rephelpers.engines`).

The names below are imported from their module on first use (PEP 562): the kernel probe and
the child import this package at every notebook's start, and must not pay for pandas and
papermill, which only the runner's own process needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy table below gives, for type checkers and readers
    from ..engines import THREAD_ENV, available_cores, threads_per_job
    from .chain import execute_chain, run_point
    from .failures import NotebookFailure, RunInterrupted
    from .progressline import PROGRESS_EVERY, ProgressLine
    from .protocol import FAULT_ENV, WATCH
    from .results import SHARED, collect
    from .spec import (
        ExecutionLimits,
        RunSpec,
        available_notebooks,
        notebook_parameters,
        notebooks_dir,
        parameterize_chain,
        point_name,
    )
    from .status import STATUS
    from .sweep import run_point_task, run_spec, split_shared
    from .watch import NotebookWatch, watch_notebook

_EXPORTS = {
    "rephelpers.engines": ("THREAD_ENV", "available_cores", "threads_per_job"),
    f"{__name__}.chain": ("execute_chain", "run_point"),
    f"{__name__}.results": ("SHARED", "collect"),
    f"{__name__}.failures": ("NotebookFailure", "RunInterrupted"),
    f"{__name__}.progressline": ("PROGRESS_EVERY", "ProgressLine"),
    f"{__name__}.protocol": ("FAULT_ENV", "WATCH"),
    f"{__name__}.spec": ("ExecutionLimits", "RunSpec", "available_notebooks", "notebook_parameters", "notebooks_dir",
                         "parameterize_chain", "point_name"),
    f"{__name__}.status": ("STATUS",),
    f"{__name__}.sweep": ("run_point_task", "run_spec", "split_shared"),
    f"{__name__}.watch": ("NotebookWatch", "watch_notebook"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "FAULT_ENV", "PROGRESS_EVERY", "SHARED", "STATUS", "THREAD_ENV", "WATCH", "ExecutionLimits", "NotebookFailure",
    "NotebookWatch", "ProgressLine", "RunInterrupted", "RunSpec", "available_cores", "available_notebooks", "collect",
    "execute_chain", "notebook_parameters", "notebooks_dir", "parameterize_chain", "point_name", "run_point",
    "run_point_task", "run_spec", "split_shared", "threads_per_job", "watch_notebook",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # later look-ups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
