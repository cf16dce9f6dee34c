"""A run file checked before any notebook starts: every name read, every path present.

The runner (:func:`rephelpers.runner.run_spec`) hands each notebook only the parameters its
``parameters`` cell declares. Without this check a misspelt name (``n_control``) or a grid
key that no notebook declares would be dropped and the run would go on with the notebooks'
defaults, exit 0, and say nothing. So, before any kernel starts:

- every parameter and grid key must be declared by at least one notebook of the chain (a
  parameter that only some of them read is fine); notebook 07's nested ``chain_parameters``
  and ``chain_grid`` are held against the notebooks of the chain it runs (01-06);
- every path the run names (a corpus file or folder, ``lm_eval_task_paths`` folders, a local
  model folder) must exist, so a typo fails in seconds rather than after stages 01-04.

All problems are gathered into one :class:`~rephelpers.errors.RephelpersError`, each with the
file and line it sits on and, for an unknown name, the nearest known names (``difflib``).

This module reads notebooks through a ``declared`` callable the runner passes in, so it
imports nothing of the runner (the runner imports it).
"""

from __future__ import annotations

import ast
import difflib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from .artifacts import project_root
from .errors import RephelpersError

#: Set by the runner for every notebook (``runs/<name>/...``); a run file that sets it would be overridden.
RESERVED = ("run_dir",)
#: Parameters of notebook 07 that hold parameters (and grid keys) of the chain 01-06 it runs.
NESTED_PARAMETERS = "chain_parameters"
NESTED_GRID = "chain_grid"
NESTED_NOTEBOOKS = "chain_notebooks"
#: Parameters naming a corpus: ``"builtin"``, ``"hf:<id>"``, or a file or folder that must exist.
CORPUS_KEYS = ("corpus",)
#: Parameters naming a model: an embedded name, a Hugging Face id (``org/name``) or a local folder.
MODEL_KEYS = ("model_name", "base_model")
#: Parameters holding folders of the user's own lm-eval task YAMLs.
TASK_PATH_KEYS = ("lm_eval_task_paths", "task_paths")

Declared = Callable[[str], "set[str]"]


def notebook_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """The values a notebook's ``parameters`` cell assigns (what a hand run of it uses).

    Read through papermill's own parser (``inspect_notebook``, the names the runner sends)
    and ``ast.literal_eval`` of each default; a default that is not a literal is an error,
    since it could not be compared with a run file's value.
    """
    import papermill

    values = {}
    for name, info in papermill.inspect_notebook(str(path)).items():
        try:
            values[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError) as err:
            raise RephelpersError(
                f"{path}: the default of {name} ({info['default']!r}) is not a Python literal; write it as a "
                "literal so it can be checked against the run files"
            ) from err
    return values


def key_lines(source: str | os.PathLike) -> dict[tuple[Any, ...], int]:
    """1-based line of every key of a YAML file, by its path (``("parameters", "top_k")``;
    list items by index), from ``yaml.compose`` (the node tree keeps each node's position)."""
    try:
        root = yaml.compose(Path(source).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = path + (key.value,)
                lines[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


class _Where:
    """``file:line`` of a key path in the run file (or a plain description without one)."""

    def __init__(self, source: str | os.PathLike | None) -> None:
        self.source = str(source) if source else None
        self.lines = key_lines(source) if source else {}

    def __call__(self, *path: Any) -> str:
        for end in range(len(path), 0, -1):  # the key itself, else the nearest enclosing key found
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return f"{self.source}:{line}"
        dotted = ".".join(str(p) for p in path)
        return f"{self.source} ({dotted})" if self.source else dotted


def suggest(name: str, known: Iterable[str]) -> str:
    """``did you mean 'x'?`` with the nearest of ``known`` (``difflib``, ratio ≥ 0.6), or a list of all."""
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    return (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
            else f"none is close; known: {', '.join(sorted(known))}")


def _unknown(name: str, what: str, known: set[str], chain: Sequence[str]) -> str:
    hint = suggest(name, known)
    return f"{what} {name!r} is read by no notebook of the chain ({', '.join(chain)}), so it would be dropped; {hint}"


def _grids(grid: Any) -> list[tuple[tuple[Any, ...], Mapping[str, Any]]]:
    """A grid (mapping) or a list of grids, each with its path below the grid's key."""
    if isinstance(grid, Mapping):
        return [((), grid)]
    if isinstance(grid, (list, tuple)):
        return [((i,), g) for i, g in enumerate(grid) if isinstance(g, Mapping)]
    return []


def check_names(
    parameters: Mapping[str, Any],
    grid: Mapping[str, Any],
    notebooks: Sequence[str],
    declared: Declared,
    available: Sequence[str],
    where: _Where,
) -> list[str]:
    """Problems with names: a parameter or grid key that no notebook of ``notebooks`` declares,
    ``run_dir`` (the runner's), and the same for notebook 07's nested chain parameters/grid."""
    problems = []
    known = set().union(*(declared(n) for n in notebooks)) if notebooks else set()
    for name in RESERVED:
        for section, keys in (("parameters", parameters), ("grid", grid)):
            if name in keys:
                problems.append(f"{where(section, name)}: {name} is set by the runner (runs/<name>/, or "
                                "--runs-root); remove it from the run file")
    for name in parameters:
        if name not in known and name not in RESERVED:
            problems.append(f"{where('parameters', name)}: " + _unknown(name, "parameter", known, notebooks))
    for name in grid:
        if name not in known and name not in RESERVED:
            problems.append(f"{where('grid', name)}: " + _unknown(
                name, "grid key", known, notebooks) + " (every point would run with the same parameters)")

    if NESTED_PARAMETERS in parameters or NESTED_GRID in parameters:
        # The chain notebook 07 runs: chain_notebooks, else every notebook that does not run a chain itself.
        chain = parameters.get(NESTED_NOTEBOOKS) or [n for n in available if NESTED_PARAMETERS not in declared(n)]
        chain = [n for n in chain if n in available]
        inner = set().union(*(declared(n) for n in chain)) if chain else set()
        nested = parameters.get(NESTED_PARAMETERS) or {}
        for name in nested if isinstance(nested, Mapping) else ():
            if name not in inner or name in RESERVED:
                problems.append(f"{where('parameters', NESTED_PARAMETERS, name)}: "
                                + _unknown(name, f"{NESTED_PARAMETERS} entry", inner, chain))
        for path, g in _grids(parameters.get(NESTED_GRID)):
            for name in g:
                if name not in inner or name in RESERVED:
                    problems.append(f"{where('parameters', NESTED_GRID, *path, name)}: "
                                    + _unknown(name, f"{NESTED_GRID} key", inner, chain))
    return problems


def _path_like(spec: str) -> bool:
    """A model spec that can only be a local folder: absolute, ``./``, ``../``, ``~``, or more
    than one ``/`` (a Hugging Face id is ``org/name``)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _resolve(value: str) -> Path:
    # The kernels run with the project root as working directory (the runner's cwd for papermill).
    path = Path(value).expanduser()
    return path if path.is_absolute() else project_root() / path


def _values(key: str, parameters: Mapping[str, Any], grid: Mapping[str, Any]) -> Iterable[tuple[tuple[Any, ...], Any]]:
    """Every value ``key`` takes: the parameter's and each grid value, with its key path."""
    if key in parameters:
        yield ("parameters", key), parameters[key]
    for path, g in _grids(grid):
        if key in g and isinstance(g[key], (list, tuple)):
            for i, v in enumerate(g[key]):
                yield ("grid", *path, key, i), v


def check_paths(parameters: Mapping[str, Any], grid: Mapping[str, Any], where: _Where) -> list[str]:
    """Problems with paths: a corpus file or folder, an lm-eval task folder or a local model
    folder named by the run (top level, grid values, notebook 07's chain) that does not exist."""
    problems: list[str] = []
    nested = parameters.get(NESTED_PARAMETERS)
    scopes = [((), parameters, grid)]
    if isinstance(nested, Mapping):
        scopes.append(((NESTED_PARAMETERS,), nested, {}))
    nested_grid = parameters.get(NESTED_GRID)
    if nested_grid:
        scopes.append(((NESTED_GRID,), {}, nested_grid))

    for prefix, params, grd in scopes:
        def at(path: tuple[Any, ...]) -> str:
            # Nested scopes sit under parameters: in the file.
            return where(*(("parameters", *prefix, *path[1:]) if prefix else path))

        for key in CORPUS_KEYS:
            for path, value in _values(key, params, grd):
                text = str(value)
                if value is None or text == "builtin" or text.startswith("hf:"):
                    continue
                if not _resolve(text).exists():
                    problems.append(f"{at(path)}: {key} {text!r}: {_resolve(text)} does not exist; give an existing "
                                    ".jsonl/.parquet file or dataset folder (relative paths are read from the project "
                                    f"root, {project_root()}), 'builtin', or 'hf:<dataset_id>'")
        for key in MODEL_KEYS:
            for path, value in _values(key, params, grd):
                if isinstance(value, str) and _path_like(value) and not _resolve(value).is_dir():
                    problems.append(f"{at(path)}: {key} {value!r} names a local model folder, but "
                                    f"{_resolve(value)} is not a folder; fix the path (or give a Hugging Face id, "
                                    "org/name)")
        for key in TASK_PATH_KEYS:
            for path, value in _values(key, params, grd):
                folders = value if isinstance(value, (list, tuple)) else [value]
                for i, folder in enumerate(folders):
                    if folder is not None and not _resolve(str(folder)).is_dir():
                        problems.append(f"{at((*path, i) if folders is value else path)}: {key} entry {str(folder)!r}: "
                                        f"{_resolve(str(folder))} is not a folder; it must hold your lm-eval task "
                                        "YAMLs (relative paths are read from the project root)")
    return problems


#: The kind whose subspace notebook 04 fits and notebook 05 only reads back (``perturbations.learned``).
FITTED_IN_04 = "learned"


def perturbation_kinds(value: Any) -> set[str]:
    """The perturbation kinds a ``perturbation`` value names (one kind, or a list of them)."""
    if isinstance(value, str):
        return {value}
    return {v for v in value if isinstance(v, str)} if isinstance(value, (list, tuple)) else set()


def check_learned_chain(parameters: Mapping[str, Any], declared: Declared, available: Sequence[str],
                        where: _Where) -> list[str]:
    """Problems with notebook 07's nested chain: a ``learned`` perturbation (in ``chain_parameters``
    or any ``chain_grid`` value) in a chain that runs notebook 05 but not notebook 04. Stage 05
    evaluates the subspace notebook 04 fits and caches in each point's run directory; without
    04 in the chain every such point would fail after the fine-tunes, stages 01-03 included."""
    if NESTED_PARAMETERS not in parameters and NESTED_GRID not in parameters:
        return []
    chain = parameters.get(NESTED_NOTEBOOKS) or [n for n in available if NESTED_PARAMETERS not in declared(n)]
    if "04_perturbations" in chain or "05_capability_impact" not in chain:
        return []
    nested = parameters.get(NESTED_PARAMETERS) or {}
    in_parameters = isinstance(nested, Mapping) and FITTED_IN_04 in perturbation_kinds(nested.get("perturbation"))
    found = [(NESTED_PARAMETERS, "perturbation")] if in_parameters else []
    for path, g in _grids(parameters.get(NESTED_GRID)):
        values = g.get("perturbation")
        for i, value in enumerate(values if isinstance(values, (list, tuple)) else []):
            if FITTED_IN_04 in perturbation_kinds(value):
                found.append((NESTED_GRID, *path, "perturbation", i))
    return [f"{where('parameters', *path)}: perturbation 'learned' is fitted by notebook 04_perturbations, which "
            f"{NESTED_NOTEBOOKS} ({', '.join(chain)}) leaves out, so stage 05 would find no fitted subspace; add "
            f"04_perturbations to {NESTED_NOTEBOOKS} (it also scores every kind's specificity, most of a chain "
            "point's time) or leave 'learned' out of the chain" for path in found]


def check_run(
    parameters: Mapping[str, Any],
    grid: Mapping[str, Any] | None,
    notebooks: Sequence[str],
    declared: Declared,
    available: Sequence[str],
    source: str | os.PathLike | None = None,
) -> None:
    """Raise one :class:`RephelpersError` listing every problem of a run, or return.

    ``declared(name)`` is the set of names notebook ``name``'s ``parameters`` cell declares
    (:func:`rephelpers.runner.notebook_parameters`), so a parameter added to a notebook is
    known here at once; ``available`` every notebook of the project; ``source`` the run file,
    for ``file:line`` in the messages.
    """
    where = _Where(source)
    grid = dict(grid or {})
    problems = check_names(parameters, grid, notebooks, declared, available, where)
    problems += check_paths(parameters, grid, where)
    problems += check_learned_chain(parameters, declared, available, where)
    if problems:
        what = f"run file {source}" if source else "this run"
        raise RephelpersError(
            f"{what} has {len(problems)} problem(s); nothing was run:\n  - " + "\n  - ".join(problems)
        )


def received_parameters(parameters: Mapping[str, Any], notebooks: Sequence[str], declared: Declared) -> dict[str, dict[str, Any]]:
    """What each notebook receives: the run's parameters its ``parameters`` cell declares."""
    return {n: {k: v for k, v in parameters.items() if k in declared(n)} for n in notebooks}
