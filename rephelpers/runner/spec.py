"""The run spec: a parameter file read and checked (:class:`RunSpec`), its limits (:class:`ExecutionLimits`).

A parameter file (``papermill_params/*.yaml``) names the run, the parameters every
notebook gets (each only the names it declares), the chain's notebooks, an optional grid
(a sweep) and the execution limits. :meth:`RunSpec.check` refuses a wrong parameter, grid
key or path before any notebook starts (:func:`rephelpers.validation.check_run`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import nbformat
import papermill
import yaml
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from ..artifacts import project_root
from ..errors import RephelpersError, require
from ..validation import check_run, suggest


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
    def from_mapping(cls, data: Any, where: str = "execution") -> ExecutionLimits:
        if data is None:
            return cls()
        require(isinstance(data, dict), f"{where} must be a mapping like {{cell_timeout: 7200}}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        require(not unknown, f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls().with_overrides(**data, _where=where)

    def with_overrides(self, _where: str = "execution", **values: Any) -> ExecutionLimits:
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
    def from_yaml(cls, path: str | os.PathLike) -> RunSpec:
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
    return set(papermill.inspect_notebook(str(notebooks_dir() / f"{name}.ipynb")))


def parameterize_chain(spec: RunSpec, out: str | os.PathLike, run_dir: str | os.PathLike) -> list[Path]:
    """Copies of the chain's notebooks with ``spec.parameters`` injected, for nbmake.

    nbmake runs notebooks as they are; this gives it CI-sized parameters the same way
    papermill would (an ``injected-parameters`` cell after the ``parameters`` cell).
    Both ``out`` and ``run_dir`` are emptied first so every CI run starts clean.
    """
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
