"""Run the notebook chain with papermill: one run, or a sweep over a parameter grid.

A parameter file (``papermill_params/*.yaml``) looks like::

    name: demo                 # run directory: runs/<name>/
    parameters: {...}          # passed to every notebook (each uses the names it declares)
    notebooks: [01_corpus_clusters, ...]   # optional; default: every notebook in order
    grid:                      # optional: makes it a sweep
      intervention_layer: [9, 15, 21]
      perturbation: [ablate, noise]

A sweep expands the grid into points and runs each into ``runs/<name>/<point>/``.
Stages whose parameters do not vary across the grid (and whose upstream stages do not
either) run once into ``runs/<name>/_shared/`` and their artifacts are linked into
every point, so only the stages the grid touches are recomputed. A point whose
``status.json`` says done with the same parameters is skipped (resume after an
interruption loses nothing); a failing point is recorded with its error and the
others go on. ``collect`` gathers every point's ``influence.parquet`` into one table.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .artifacts import MANIFEST, project_root, stable_hash
from .errors import RephelpersError, require

STATUS = "status.json"
SHARED = "_shared"


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def available_notebooks() -> list[str]:
    names = sorted(p.stem for p in notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    require(bool(names), f"no notebooks found in {notebooks_dir()}")
    return names


@dataclass
class RunSpec:
    name: str
    parameters: dict[str, Any]
    notebooks: list[str]
    grid: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RunSpec":
        path = Path(path)
        require(path.exists(), f"parameter file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RephelpersError(f"{path} is not valid YAML: {err}") from err
        require(isinstance(data, dict), f"{path} must hold a mapping with `parameters`")
        unknown = set(data) - {"name", "parameters", "notebooks", "grid", "description"}
        require(not unknown, f"{path}: unknown top-level keys {sorted(unknown)}")
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


def execute_chain(
    run_dir: Path,
    parameters: dict[str, Any],
    notebooks: list[str],
    log_output: bool = False,
) -> None:
    """Execute ``notebooks`` in order into ``run_dir`` (executed copies under ``notebooks/``)."""
    import papermill

    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {**parameters, "run_dir": str(run_dir)}
    for name in notebooks:
        declared = notebook_parameters(name)
        started = time.time()
        print(f"[rephelpers] {run_dir.name}: {name} ...", flush=True)
        papermill.execute_notebook(
            str(notebooks_dir() / f"{name}.ipynb"),
            str(out_dir / f"{name}.ipynb"),
            parameters={k: v for k, v in params.items() if k in declared},
            cwd=str(project_root()),
            log_output=log_output,
            progress_bar=False,
            kernel_name="python3",
        )
        print(f"[rephelpers] {run_dir.name}: {name} done in {time.time() - started:.0f}s", flush=True)


def _write_status(run_dir: Path, **status: Any) -> None:
    (run_dir / STATUS).write_text(json.dumps(status, indent=2, default=str))


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


def run_spec(
    spec: RunSpec,
    runs_root: str | os.PathLike | None = None,
    jobs: int = 1,
    log_output: bool = False,
    force: bool = False,
) -> Path:
    """Run a single chain or a whole sweep; returns the top run directory."""
    root = Path(runs_root) if runs_root else project_root() / "runs"
    top = (root / spec.name).resolve()
    top.mkdir(parents=True, exist_ok=True)
    points = spec.points()

    if not spec.grid:
        _run_point(top, spec.parameters, spec.notebooks, {}, log_output, force)
        status = _read_status(top)
        if status.get("state") != "done":
            raise RephelpersError(f"run {spec.name} failed: {status.get('error', 'see notebooks/')}")
        return top

    shared, per_point = split_shared(spec)
    base = top / SHARED
    if shared:
        _run_point(base, spec.parameters, shared, {}, log_output, force)
        require(
            _read_status(base).get("state") == "done",
            f"the shared stages {shared} failed; see {base / STATUS}",
        )

    def one(point: dict[str, Any]) -> tuple[str, str]:
        run_dir = top / point_name(point)
        if shared:
            _link_artifacts(base, run_dir)
        _run_point(run_dir, {**spec.parameters, **point}, per_point, point, log_output, force)
        return point_name(point), _read_status(run_dir).get("state", "?")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, p) for p in points]
        for fut in as_completed(futures):
            name, state = fut.result()
            print(f"[rephelpers] point {name}: {state}", flush=True)
    table = collect(top)
    print(f"[rephelpers] sweep {spec.name}: {len(points)} points, results in {top / 'results.parquet'} ({len(table)} rows)")
    return top


def _run_point(
    run_dir: Path,
    parameters: dict[str, Any],
    notebooks: list[str],
    point: dict[str, Any],
    log_output: bool,
    force: bool,
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = stable_hash(parameters, notebooks)
    status = _read_status(run_dir)
    if not force and status.get("state") == "done" and status.get("fingerprint") == fingerprint:
        print(f"[rephelpers] {run_dir.name}: already done, skipped", flush=True)
        return
    _write_status(run_dir, state="running", fingerprint=fingerprint, point=point, started=time.time())
    started = time.time()
    try:
        execute_chain(run_dir, parameters, notebooks, log_output=log_output)
    except Exception as err:  # one failing point must not stop a sweep
        _write_status(
            run_dir,
            state="failed",
            fingerprint=fingerprint,
            point=point,
            error=f"{type(err).__name__}: {err}"[:4000],
            traceback=traceback.format_exc()[-8000:],
            seconds=time.time() - started,
        )
        print(f"[rephelpers] {run_dir.name}: FAILED ({type(err).__name__})", flush=True)
        return
    _write_status(
        run_dir, state="done", fingerprint=fingerprint, point=point, seconds=round(time.time() - started, 1)
    )


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
