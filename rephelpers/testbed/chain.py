"""The chain (notebooks 01–06) on ``f_all``: its run spec, running it, and reading its Φ per setting.

Part of :mod:`rephelpers.testbed.groundtruth` (which re-exports it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..artifacts import stable_hash
from ..errors import RephelpersError, require
from ..perturbations.kinds import KINDS
from ..runner import point_name
from ..validation import FITTED_IN_04, perturbation_kinds


CHAIN_NOTEBOOKS = (
    "01_corpus_clusters", "02_representations", "03_cluster_dimensions",
    "04_perturbations", "05_capability_impact", "06_influence_matrix",
)


SINGLE_ROUND = {"control_rounds": None, "stop_after_exceedances": None, "control_cap": None}
"""The control design the testbed's chain uses unless its ``chain_parameters`` name one: every draw
at once. The notebooks' defaults are the demo's sequential design, whose cap (300) pays where a
cell's p against its controls decides a finding; the testbed scores Φ against Φ*, not against the
controls' tail, and its chain usually leaves out notebook 04, whose verdicts gate those draws."""


# -- the chain on f_all ---------------------------------------------------------------------------------
def chain_spec(
    corpus_path: str | Path,
    model_dir: str | Path,
    abilities: Sequence[str],
    parameters: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]] | None = None,
    name: str = "chain",
    seed: int = 0,
    items_per_task: int | None = None,
    notebooks: Sequence[str] | None = None,
) -> Any:
    """The :class:`~rephelpers.runner.RunSpec` of notebooks 01–06 on ``model_dir`` and ``corpus_path``.

    ``items_per_task`` (the testbed's items per ability) makes stage 05 score the very items
    Φ* was measured on (same generator, same ``seed``). ``parameters`` are the chain's own
    (``n_clusters``, ``layers``, ``perturbation``, …);
    ``grid`` makes it a sweep (one point per perturbation kind × layer, say), whose stages
    01–03 run once. ``notebooks`` (default :data:`CHAIN_NOTEBOOKS`) may leave out stage 04:
    its specificity verdicts only gate how stage 06 words a cell, none of the figures
    :func:`setting_agreement` reads, and it takes most of a point's time.
    """
    from ..runner import RunSpec

    notebooks = list(notebooks) if notebooks else list(CHAIN_NOTEBOOKS)
    bad = [n for n in notebooks if n not in CHAIN_NOTEBOOKS]
    require(not bad, f"chain notebooks must be among {list(CHAIN_NOTEBOOKS)}, got {bad}")
    missing = [n for n in CHAIN_NOTEBOOKS if n not in notebooks and n != "04_perturbations"]
    require(not missing, f"the chain needs {missing}; only 04_perturbations may be left out")
    notebooks = [n for n in CHAIN_NOTEBOOKS if n in notebooks]

    params = {**SINGLE_ROUND, **dict(parameters), "seed": int(seed), "model_name": str(model_dir),
              "corpus": str(corpus_path), "abilities": list(abilities)}
    if items_per_task is not None:
        params["items_per_task"] = int(items_per_task)
    grid = {k: list(v) for k, v in (grid or {}).items()}
    named = perturbation_kinds(params.get("perturbation")).union(*map(perturbation_kinds, grid.get("perturbation", [])))
    learned = FITTED_IN_04 in named
    require(not learned or "04_perturbations" in notebooks,
            "the chain evaluates perturbation 'learned', whose subspace notebook 04_perturbations fits, but "
            "chain_notebooks leaves 04 out: add 04_perturbations to chain_notebooks (it also scores every kind's "
            "specificity, most of a point's time) or leave 'learned' out")
    clash = sorted(set(grid) & {"model_name", "corpus", "abilities"})
    require(not clash, f"chain_grid cannot vary {clash}: the testbed fixes them")
    return RunSpec(name=name, parameters=params, notebooks=notebooks, grid=grid)


def chain_grids(
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]] | None,
    parameters: Mapping[str, Any] | None = None,
) -> list[dict[str, list[Any]]]:
    """``chain_grid`` as a list of product grids.

    A mapping is one product (every combination of its values); a list of mappings is the
    union of their products, for a design a single product cannot express (three kinds at one
    layer, one kind at another, a scoring variant for one kind only). ``None`` or ``{}`` is a
    single run. The grids of a list share ``_shared/``, so they must vary the same keys: a key
    one grid leaves out takes its value from ``parameters`` (the chain's fixed parameters),
    and a key in neither is an error.
    """
    if grid is None or isinstance(grid, Mapping):
        return [{k: list(v) for k, v in (grid or {}).items()}]
    grids = [{k: list(v) for k, v in g.items()} for g in grid]
    require(grids and all(grids), "chain_grid: a list of grids needs at least one grid and no empty one")
    keys = sorted({k for g in grids for k in g})
    parameters = dict(parameters or {})
    for g in grids:
        missing = [k for k in keys if k not in g and k not in parameters]
        require(not missing, f"chain_grid: a grid leaves out {missing}, which other grids vary and chain_parameters "
                             "does not fix; give them a value in that grid or in chain_parameters (the grids must "
                             "vary the same keys, because they share stages 01-03)")
    return [{k: g[k] if k in g else [parameters[k]] for k in keys} for g in grids]


def run_chain(
    model: Any,
    trained: Mapping[str, Any],
    model_cache: Path,
    corpus_path: str | Path,
    abilities: Sequence[str],
    parameters: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]] | None,
    run_dir: str | Path,
    seed: int = 0,
    name: str = "chain",
    items_per_task: int | None = None,
    notebooks: Sequence[str] | None = None,
) -> tuple[list[Any], Path]:
    """Save ``f_all`` as a model folder (cached by its weights' key) and run notebooks 01–06 on it.

    The chain runs into ``run_dir/name`` through :func:`rephelpers.runner.run_spec`, once per
    grid of :func:`chain_grids` (they share ``_shared/``: the same keys vary in each), so a
    finished chain (or sweep point) with the same parameters is skipped on a re-run.
    Returns ``(specs, chain_dir)``.
    """
    from .finetune import save_model_folder
    from ..representations.models import model_fingerprint
    from ..runner import run_spec

    key = stable_hash(model_fingerprint(model), {k: stable_hash(v.numpy()) for k, v in sorted(trained.items())})
    folder = save_model_folder(model, trained, Path(model_cache) / f"f_all-{key}")
    specs = [chain_spec(corpus_path, folder, abilities, parameters, g, name=name, seed=seed,
                        items_per_task=items_per_task, notebooks=notebooks)
             for g in chain_grids(grid, parameters)]
    for spec in specs:
        run_spec(spec, runs_root=Path(run_dir))
    return specs, Path(run_dir) / name


def chain_documents(chain_dir: str | Path, spec: Any) -> pd.DataFrame:
    """The clustered texts of the chain (stage 01's ``documents.parquet``; ``_shared/`` for a sweep)."""
    chain_dir = Path(chain_dir)
    for path in (chain_dir / "documents.parquet", chain_dir / "_shared" / "documents.parquet"):
        if path.exists():
            return pd.read_parquet(path)
    raise RephelpersError(f"no documents.parquet under {chain_dir}: stage 01 of the chain did not finish")


SETTING_KEYS = ("perturbation", "intervention_layer", "leace_layers", "magnitude", "method", "standardize", "token_level",
                "component")


def chain_influence(chain_dir: str | Path, spec: Any) -> pd.DataFrame:
    """Φ of every setting of the chain: ``influence.parquet`` rows with a ``setting`` label.

    ``spec`` is a :class:`~rephelpers.runner.RunSpec` or the list :func:`run_chain` returns.
    For a sweep, each point's own ``influence.parquet`` (a point in several grids once); for
    a single run, its ``influence.parquet``. The setting columns (perturbation kind,
    intervention layer, magnitude, scoring method, …) come from the point, else from the
    run's parameters.
    """
    chain_dir = Path(chain_dir)
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    frames = []
    if any(s.grid for s in specs):
        seen = set()
        for s, point in ((s, p) for s in specs for p in s.points()):
            if point_name(point) in seen:
                continue
            seen.add(point_name(point))
            path = chain_dir / point_name(point) / "influence.parquet"
            status = chain_dir / point_name(point) / "status.json"
            state = json.loads(status.read_text()).get("state") if status.exists() else None
            if state != "done" or not path.exists():
                print(f"[groundtruth] chain point {point_name(point)} is {state or 'missing'}: left out", flush=True)
                continue
            frames.append(with_setting(pd.read_parquet(path), {**s.parameters, **point}, point_name(point)))
    else:
        path = chain_dir / "influence.parquet"
        require(path.exists(), f"{path} is missing: the chain did not finish (see {chain_dir / 'status.json'})")
        frames.append(with_setting(pd.read_parquet(path), specs[0].parameters, "run"))
    require(frames, f"no chain point finished under {chain_dir}; see the status.json files there")
    return pd.concat(frames, ignore_index=True)


def intervention_layers(grid: Any, parameters: Mapping[str, Any]) -> list[int]:
    """Every layer a chain point of ``grid`` (see :func:`chain_grids`) intervenes at (multi-layer LEACE's too)."""
    layers = set()
    for g in chain_grids(grid, parameters):
        for layer in g.get("intervention_layer", [parameters.get("intervention_layer")]):
            if layer is not None:
                layers.add(int(layer))
        for sites in g.get("leace_layers", [parameters.get("leace_layers")]):
            layers.update(int(l) for l in sites or [])
    return sorted(layers)


def scoring_name(params: Mapping[str, Any]) -> str:
    """How a setting chose what it perturbs, in the issue's words: raw S, Cohen's d, token-level, probe, SVD, LEACE.

    Kinds on R_k (``KINDS[kind].acts_on == "R_k"``) take stage 03's selection: ``method``
    (the probe methods by their weights, else S(i,k)), ``standardize`` (Cohen's d instead of
    the raw mean difference) and ``token_level`` (S over tokens instead of pooled texts). The
    other kinds carry their own (``acts_on``): ``project`` the rank-r SVD basis V_k,
    ``leace`` the fitted eraser, ``shift`` v_k, ``gradient`` the probe.
    """
    kind = str(params.get("perturbation", "ablate"))
    acts_on = KINDS[kind].acts_on if kind in KINDS else kind
    if acts_on != "R_k":
        return acts_on
    method = str(params.get("method", "mean_diff"))
    if method != "mean_diff":
        return {"probe_l1": "probe (L1)", "probe_l2": "probe (L2)", "mlp": "MLP probe"}.get(method, method)
    name = "Cohen's d" if _truthy(params.get("standardize", False)) else "raw S"
    return f"token-level {name}" if _truthy(params.get("token_level", False)) else name


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def with_setting(table: pd.DataFrame, params: Mapping[str, Any], point: str) -> pd.DataFrame:
    def text(value: Any) -> str:
        return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    table = table.copy()
    for key in SETTING_KEYS:
        if key in params:
            table[key] = text(params[key])
    table["scoring"] = scoring_name(params)
    parts = [f"{key}={text(params[key])}" for key in ("perturbation", "intervention_layer", "leace_layers", "magnitude")
             if params.get(key) is not None]
    table["setting"] = ", ".join([*parts, f"scoring={scoring_name(params)}"]) if parts else point
    table["point"] = point
    return table
