"""Known answers: score the workbench's Φ against leave-cluster-out fine-tuning (notebook 07).

The testbed (see :mod:`rephelpers.testbed.planted` and :mod:`rephelpers.testbed.finetune`):

1. a corpus = the builtin demo corpus + one planted cluster ``D_p`` per planted skill ``p``;
2. ``f_all``: the embedded model fine-tuned on the whole corpus; ``f_{−p}``: the same
   fine-tune (same steps, batch, block length, seed) without ``D_p``, its token share
   taken by more blocks of the rest; each for every seed in ``seeds``;
3. the measured influence of cluster ``p`` on ability ``a``:

   ``Φ*_{p,a} = (M(f_all, a) − M(f_{−p}, a)) / M(f_all, a)``,

   ``M`` the mean item score over the ability's held-out items and over seeds, with a
   percentile bootstrap interval that resamples items (paired: the same items for every
   model) and seeds. A cell is *null* when that interval covers 0;
4. the chain (notebooks 01–06) on ``f_all`` and the same corpus, clustered as a user would
   (no planted labels), gives ``Φ_{k,a}`` per setting (perturbation kind, layer, …). A
   discovered cluster ``k`` stands for the planted cluster ``p`` that holds most of
   ``D_p``'s texts, provided ``p`` is also the majority of ``k`` (purity ≥ 1/2).

Agreement of ``Φ`` with ``Φ*``, per setting, over the cells ``(p, a)``:

- Spearman ``ρ = corr(rank Φ, rank Φ*)`` (average ranks for ties) with a percentile
  bootstrap interval over cells;
- diagonal recovery: the share of planted clusters whose own skill's cell lies beyond its
  random controls and has the largest Φ among the row's cells that do. "Beyond its
  controls" is ``Φ − Φ_control > 0`` with stage 06's 95% interval over items and control
  draws (``phi_minus_control_low > 0``). Stage 06's stricter ``exceeds_controls`` (rank of
  Φ among the control draws, BH-adjusted across cells) gives ``diagonal_recovery_strict``;
  with ``n`` draws its smallest p-value is ``1/(n + 1)``, so with the testbed's 2 draws it
  can never pass α = 0.05 and that share is 0 by construction (``min_p_vs_controls``
  records it);
- off-diagonal false positives: off-diagonal cells flagged by stage 06 (``finding`` where
  that column exists, else ``significant``) whose Φ* is null.

Each chain point is scored twice: by ``Φ`` itself and by ``Φ − Φ_control`` (the loss beyond
that of random edits of the same size), the ``score`` part of a setting's label.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..abilities.suite import ABILITIES, TaskInfo
from ..artifacts import stable_hash
from ..corpus.loaders import load_corpus
from ..errors import RephelpersError, require
from ..perturbations.kinds import KINDS
from .planted import PLANTED, planted_ability, planted_corpus

CHAIN_NOTEBOOKS = (
    "01_corpus_clusters", "02_representations", "03_cluster_dimensions",
    "04_perturbations", "05_capability_impact", "06_influence_matrix",
)
REST = "rest"


# -- the corpus ---------------------------------------------------------------------------------
def testbed_corpus(
    docs_per_domain: int = 20,
    docs_per_skill: int = 60,
    skills: Sequence[str] = tuple(PLANTED),
    seed: int = 0,
) -> pd.DataFrame:
    """The builtin demo corpus plus the planted clusters: ``id, text, source, domain, planted``.

    ``planted`` is the skill a document teaches, or ``"rest"`` for the demo corpus. The
    planted documents' ``domain`` is ``planted_<skill>``, so stage 01's validation against
    domains also shows how well the clustering finds them.
    """
    demo = load_corpus("builtin", docs_per_domain=docs_per_domain, seed=seed)
    demo = demo[["id", "text", "source", "domain"]].assign(planted=REST)
    frame = pd.concat([demo, planted_corpus(skills, docs_per_skill, seed)], ignore_index=True)
    require(frame["id"].is_unique, "planted and demo document ids collide; report this bug")
    return frame


def write_corpus(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the corpus as JSON Lines (``id, text, source, domain``), the chain's ``corpus`` input."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        json.dumps({k: row[k] for k in ("id", "text", "source", "domain")}, ensure_ascii=False) + "\n"
        for row in frame.to_dict("records")
    )
    if not (path.exists() and path.read_text(encoding="utf-8") == text):
        path.write_text(text, encoding="utf-8")
    return path


def item_overlaps(items: Sequence[Mapping[str, Any]], texts: Sequence[str]) -> list[str]:
    """Prompts of ``items`` that occur verbatim in any of ``texts`` (should be none)."""
    joined = "\n\x00".join(texts)
    return [it["prompt"] for it in items if it["prompt"].strip() and it["prompt"] in joined]


# -- the fine-tuning inputs ------------------------------------------------------------------------
def training_blocks(model: Any, corpus: pd.DataFrame, config: Any, cache: Path | None = None) -> tuple[Any, Any]:
    """The corpus packed into blocks (one group per planted skill, ``rest`` for the demo corpus)
    and the frozen layers' hidden states entering the first trained layer, cached under
    ``cache`` keyed by the model, the blocks and that layer.
    """
    from .finetune import first_trained_layer, pack_blocks, prefix_states
    from ..representations.models import model_fingerprint

    blocks = pack_blocks(corpus["text"].tolist(), corpus["planted"].tolist(), model.tokenizer, config.block_tokens)
    start = first_trained_layer(model, config.train_layers)
    key = stable_hash("prefix-v1", model_fingerprint(model), blocks.ids.numpy(), blocks.group.astype(str), start)
    states = prefix_states(model, blocks, start, cache=Path(cache) / f"states-{key}.pt" if cache else None)
    return blocks, states


# -- Φ* from leave-cluster-out fine-tunes -----------------------------------------------------------
def variant_name(left_out: str | None) -> str:
    """``"all"`` for ``f_all``, ``"-<skill>"`` for ``f_{−skill}``."""
    return "all" if not left_out else f"-{left_out}"


def leave_out_scores(
    model: Any,
    blocks: Any,
    states: Any,
    config: Any,
    skills: Sequence[str],
    seeds: Sequence[int],
    tasks: Mapping[str, TaskInfo],
    cache: Path,
    progress: bool = True,
    batch_size: int = 8,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fine-tune ``f_all`` and every ``f_{−p}`` for each seed (cached), and score each on ``tasks``.

    Returns ``(scores, runs)``: one row per seed × model × item (``seed``, ``model``,
    ``left_out``, ``ability``, ``item``, ``score``, ``p_correct``), and one row per
    fine-tune (``seed``, ``model``, ``left_out``, ``key``, ``seconds``, ``tokens``,
    ``first_loss``, ``last_loss``, ``cached``). An interrupted run resumes: finished
    fine-tunes and their scores are read back from ``cache``.
    """
    from dataclasses import replace

    from ..artifacts import file_hash
    from ..abilities.evaluation import evaluate_abilities
    from .finetune import cached_finetune, finetune_key, using_weights

    task_key = stable_hash({name: file_hash(info.data_path) for name, info in tasks.items()})
    frames, runs = [], []
    for seed in seeds:
        cfg = replace(config, seed=int(seed))
        for left_out in [None, *skills]:
            exclude = [left_out] if left_out else []
            name = variant_name(left_out)
            key = finetune_key(model, blocks, cfg, exclude)
            cached = (Path(cache) / key / ".complete").exists()
            if progress:
                print(f"[groundtruth] seed {seed}, f_{name}: {'cached' if cached else 'fine-tuning'} ...", flush=True)
            trained, meta = cached_finetune(model, blocks, states, cfg, exclude, cache, progress=progress)
            score_file = Path(cache) / key / f"scores-{task_key}.parquet"
            if score_file.exists():
                scores = pd.read_parquet(score_file)
            else:
                with using_weights(model, trained):
                    raw = evaluate_abilities(model, tasks, {name: []}, batch_size=batch_size, progress=False)
                scores = raw[["ability", "item", "score", "p_correct"]].copy()
                scores.to_parquet(score_file, index=False)
            frames.append(scores.assign(seed=int(seed), model=name, left_out=left_out or ""))
            runs.append({"seed": int(seed), "model": name, "left_out": left_out or "", "key": key,
                         "seconds": meta["seconds"], "tokens": meta["tokens"], "first_loss": meta["first_loss"],
                         "last_loss": meta["last_loss"], "cached": cached})
    scores = pd.concat(frames, ignore_index=True)[["seed", "model", "left_out", "ability", "item", "score", "p_correct"]]
    return scores, pd.DataFrame(runs)


def f_all_weights(cache: Path, runs: pd.DataFrame, seed: int) -> dict[str, Any]:
    """The trained weights of ``f_all`` for ``seed`` (from :func:`leave_out_scores`' cache)."""
    from safetensors.torch import load_file

    row = runs[(runs["model"] == "all") & (runs["seed"] == int(seed))]
    require(len(row) == 1, f"no f_all fine-tune for seed {seed} among {sorted(runs['seed'].unique())}")
    return load_file(str(Path(cache) / row["key"].iloc[0] / "trained.safetensors"))


def score_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean score per model × ability (over items and seeds), wide: one column per ability."""
    return scores.groupby(["model", "ability"])["score"].mean().unstack("ability")


def phi_star(scores: pd.DataFrame, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """The measured influence ``Φ*_{p,a}`` with its bootstrap interval; one row per cluster × ability.

    ``Φ*_{p,a} = (M(f_all, a) − M(f_{−p}, a)) / M(f_all, a)``, ``M`` the mean item score over
    seeds and items. The interval resamples seeds and, within each ability, items, jointly
    for all models (a paired bootstrap). Columns: ``cluster`` (the skill ``p``), ``ability``,
    ``m_all``, ``m_minus``, ``phi_star``, ``phi_star_low``, ``phi_star_high``, ``null``
    (the interval covers 0), ``n_items``, ``n_seeds``.
    """
    require({"seed", "model", "left_out", "ability", "item", "score"} <= set(scores.columns),
            "phi_star expects the scores of leave_out_scores")
    require((scores["model"] == "all").any(), "phi_star needs the scores of f_all (model 'all')")
    rng = np.random.default_rng(seed)
    seeds = np.sort(scores["seed"].unique())
    rows = []
    for ability, sub in scores.groupby("ability", sort=True):
        cube = sub.pivot_table(index=["seed", "item"], columns="model", values="score")
        items = np.sort(sub["item"].unique())
        # array [seed, item, model]
        models = list(cube.columns)
        arr = np.stack([
            cube.loc[s].reindex(items)[models].to_numpy(dtype=float) for s in seeds
        ])
        require(not np.isnan(arr).any(), f"{ability}: some model lacks scores for some seed or item")
        s_idx = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
        i_idx = rng.integers(0, len(items), size=(n_boot, len(items)))
        # mean over resampled seeds and items: [n_boot, model]
        boot = arr[s_idx[:, :, None], i_idx[:, None, :], :].mean(axis=(1, 2))
        point = arr.mean(axis=(0, 1))
        a_all = models.index("all")
        for j, name in enumerate(models):
            if name == "all":
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                est = (point[a_all] - point[j]) / point[a_all] if point[a_all] > 0 else math.nan
                reps = (boot[:, a_all] - boot[:, j]) / boot[:, a_all]
            reps = reps[np.isfinite(reps)]
            low, high = (np.quantile(reps, [alpha / 2, 1 - alpha / 2]) if len(reps) else (math.nan, math.nan))
            rows.append({
                "cluster": name[1:], "ability": ability, "m_all": point[a_all], "m_minus": point[j],
                "phi_star": est, "phi_star_low": float(low), "phi_star_high": float(high),
                "null": bool(not (low > 0 or high < 0)), "n_items": len(items), "n_seeds": len(seeds),
            })
    return pd.DataFrame(rows).sort_values(["cluster", "ability"]).reset_index(drop=True)


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

    params = {**dict(parameters), "seed": int(seed), "model_name": str(model_dir),
              "corpus": str(corpus_path), "abilities": list(abilities)}
    if items_per_task is not None:
        params["items_per_task"] = int(items_per_task)
    grid = {k: list(v) for k, v in (grid or {}).items()}
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


SETTING_KEYS = ("perturbation", "intervention_layer", "magnitude", "method", "standardize", "token_level", "component")


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
        from ..runner import point_name

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
            frames.append(_with_setting(pd.read_parquet(path), {**s.parameters, **point}, point_name(point)))
    else:
        path = chain_dir / "influence.parquet"
        require(path.exists(), f"{path} is missing: the chain did not finish (see {chain_dir / 'status.json'})")
        frames.append(_with_setting(pd.read_parquet(path), specs[0].parameters, "run"))
    require(frames, f"no chain point finished under {chain_dir}; see the status.json files there")
    return pd.concat(frames, ignore_index=True)


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


def _with_setting(table: pd.DataFrame, params: Mapping[str, Any], point: str) -> pd.DataFrame:
    def text(value: Any) -> str:
        return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    table = table.copy()
    for key in SETTING_KEYS:
        if key in params:
            table[key] = text(params[key])
    table["scoring"] = scoring_name(params)
    parts = [f"{key}={text(params[key])}" for key in ("perturbation", "intervention_layer", "magnitude") if key in params]
    table["setting"] = ", ".join([*parts, f"scoring={scoring_name(params)}"]) if parts else point
    table["point"] = point
    return table


# -- discovered clusters → planted clusters ------------------------------------------------------------
def map_clusters(documents: pd.DataFrame, skills: Sequence[str]) -> pd.DataFrame:
    """For each planted skill, the discovered cluster that holds most of its texts.

    Columns: ``skill``, ``cluster``, ``recall`` (share of the skill's texts in that cluster),
    ``purity`` (share of the cluster's texts that are the skill's) and ``mapped`` (purity ≥ 1/2,
    so the cluster stands for the skill). Texts are recognised by ``domain`` =
    ``planted_<skill>`` (the corpus metadata the chain carries, never used to cluster).
    """
    require({"cluster", "domain"} <= set(documents.columns), "documents need `cluster` and `domain` columns (stage 01)")
    rows = []
    for skill in skills:
        mine = documents["domain"] == planted_ability(skill)
        require(mine.any(), f"no document of the planted cluster {skill!r} in the chain's corpus")
        counts = documents.loc[mine, "cluster"].value_counts()
        k = int(counts.index[0])
        in_k = documents["cluster"] == k
        purity = float((mine & in_k).sum() / in_k.sum())
        rows.append({"skill": skill, "cluster": k, "recall": float(counts.iloc[0] / mine.sum()),
                     "purity": purity, "mapped": purity >= 0.5})
    return pd.DataFrame(rows)


# -- agreement ----------------------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share the mean of their ranks), like scipy's rankdata."""
    order = np.argsort(x, axis=-1, kind="mergesort")
    sorted_x = np.take_along_axis(x, order, axis=-1)
    n = x.shape[-1]
    ranks = np.empty_like(x, dtype=float)
    flat_sorted = sorted_x.reshape(-1, n)
    flat_order = order.reshape(-1, n)
    flat_ranks = ranks.reshape(-1, n)
    for r in range(flat_sorted.shape[0]):
        s = flat_sorted[r]
        starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
        ends = np.r_[starts[1:], n]
        avg = np.repeat((starts + ends - 1) / 2.0 + 1.0, ends - starts)
        flat_ranks[r, flat_order[r]] = avg
    return flat_ranks.reshape(x.shape)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks; NaN if either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    require(x.shape == y.shape and x.ndim == 1, "spearman: x and y must be 1-d of equal length")
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


def spearman_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's ρ, resampling the cells (pairs) with replacement.

    Resamples where either side is constant (ρ undefined) are dropped.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    rx, ry = _ranks(x[idx]), _ranks(y[idx])
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx ** 2).sum(axis=1) * (ry ** 2).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (rx * ry).sum(axis=1) / denom
    rho = rho[np.isfinite(rho)]
    if len(rho) == 0:
        return (math.nan, math.nan)
    low, high = np.quantile(rho, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def _column(table: pd.DataFrame, preferred: str, fallback: str) -> str:
    if preferred in table.columns:
        return preferred
    require(fallback in table.columns, f"influence table has neither {preferred!r} nor {fallback!r}")
    return fallback


SCORES = {"phi": "Φ", "phi_minus_control": "Φ − Φ_control"}


def agreement_cells(influence: pd.DataFrame, stars: pd.DataFrame, mapping: pd.DataFrame) -> pd.DataFrame:
    """One row per setting × planted cluster × ability with Φ (chain) beside Φ* (fine-tunes).

    ``exceeds`` is stage 06's ``exceeds_controls`` (else ``exceeds_control``), ``beyond``
    ``phi_minus_control_low > 0`` (else ``exceeds``), ``flagged`` its ``finding`` (else
    ``significant``); ``diagonal`` marks the skill's own ability. Planted clusters the
    clustering did not find (``mapped`` false) have no Φ and are left out here (they count
    as not recovered).
    """
    exceeds = _column(influence, "exceeds_controls", "exceeds_control")
    flagged = _column(influence, "finding", "significant")
    found = mapping[mapping["mapped"]]
    rows = stars.merge(found[["skill", "cluster"]].rename(columns={"skill": "planted", "cluster": "chain_cluster"}),
                       left_on="cluster", right_on="planted")
    influence = influence.copy()
    if "phi_minus_control" not in influence.columns:
        influence["phi_minus_control"] = influence["phi"] - influence["phi_control"]
    if "phi_minus_control_low" in influence.columns:
        influence["beyond"] = influence["phi_minus_control_low"] > 0
    else:
        influence["beyond"] = influence[exceeds]
    if "min_p_vs_controls" not in influence.columns:
        influence["min_p_vs_controls"] = math.nan
    keep = ["setting", "cluster", "ability", "phi", "phi_control", "phi_minus_control", "beyond", exceeds, flagged,
            "min_p_vs_controls"]
    extra = [c for c in (*SETTING_KEYS, "scoring") if c in influence.columns]
    chain = influence[keep + extra].rename(columns={"cluster": "chain_cluster", exceeds: "exceeds", flagged: "flagged"})
    cells = rows.drop(columns="cluster").merge(chain, on=["chain_cluster", "ability"], how="inner")
    cells["diagonal"] = cells["ability"] == cells["planted"].map(planted_ability)
    for column in ("beyond", "exceeds", "flagged"):
        cells[column] = cells[column].astype(object).fillna(False).astype(bool)
    order = ["setting", *extra, "planted", "chain_cluster", "ability", "diagonal", "phi", "phi_control",
             "phi_minus_control", "beyond", "exceeds", "flagged", "min_p_vs_controls", "phi_star", "phi_star_low",
             "phi_star_high", "null", "m_all", "m_minus"]
    return cells[order].sort_values(["setting", "planted", "ability"]).reset_index(drop=True)


def diagonal_recovery(cells: pd.DataFrame, skills: Sequence[str], beyond: str = "beyond",
                      score: str = "phi") -> tuple[float, dict[str, bool]]:
    """Share of planted skills whose own cell lies beyond its controls and has the largest ``score`` among the row's cells that do.

    ``cells`` of one setting; ``beyond`` names the boolean column that says a cell lies beyond
    its controls (``beyond``, or stage 06's ``exceeds``); a skill without a row (cluster not
    found) is not recovered.
    """
    if beyond not in cells.columns:
        beyond = "exceeds"  # cells made before `beyond` existed
    recovered = {}
    for skill in skills:
        row = cells[(cells["planted"] == skill) & cells[beyond].astype(bool)]
        own = row[row["diagonal"]]
        recovered[skill] = bool(len(own) == 1 and float(own[score].iloc[0]) >= float(row[score].max()))
    return (float(np.mean(list(recovered.values()))) if recovered else math.nan), recovered


def diagonal_argmax(cells: pd.DataFrame, skills: Sequence[str], score: str = "phi") -> float:
    """Share of planted skills whose own cell has a positive ``score`` above every other cell of its row.

    Recovery by ranking alone, no test against the controls: it separates a method that
    points at the wrong skill from one that points at the right one too weakly to be sure.
    """
    hits = []
    for skill in skills:
        row = cells[cells["planted"] == skill]
        own, other = row.loc[row["diagonal"], score], row.loc[~row["diagonal"], score]
        hits.append(bool(len(own) == 1 and own.iloc[0] > 0 and (len(other) == 0 or own.iloc[0] > other.max())))
    return float(np.mean(hits)) if hits else math.nan


def setting_agreement(cells: pd.DataFrame, skills: Sequence[str], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                      scores: Sequence[str] = tuple(SCORES)) -> pd.DataFrame:
    """Per setting and score (``phi``, ``phi_minus_control``): ρ(score, Φ*) with its bootstrap CI,
    diagonal recovery (feasible and strict criterion) and off-diagonal false positives.

    The rows' ``setting`` is the chain point's label plus ``score=<score>``; best first (ρ,
    then diagonal recovery, then fewer false positives).
    """
    rows = []
    for point, sub in cells.groupby("setting", sort=True):
        if "beyond" not in sub.columns:
            sub = sub.assign(beyond=sub["exceeds"])
        if "phi_minus_control" not in sub.columns:
            sub = sub.assign(phi_minus_control=sub["phi"] - sub["phi_control"])
        null_off = sub[~sub["diagonal"] & sub["null"]]
        false_pos = int(null_off["flagged"].sum())
        min_p = float(sub["min_p_vs_controls"].max()) if "min_p_vs_controls" in sub.columns else math.nan
        for score in scores:
            ok = sub[np.isfinite(sub[score]) & np.isfinite(sub["phi_star"])]
            rho = spearman(ok[score], ok["phi_star"])
            low, high = spearman_ci(ok[score], ok["phi_star"], n_boot, alpha, seed)
            share, per_skill = diagonal_recovery(sub, skills, "beyond", score)
            strict, per_skill_strict = diagonal_recovery(sub, skills, "exceeds", score)
            argmax = diagonal_argmax(sub, skills, score)
            rows.append({
                "setting": f"{point}, score={score}", "point": point, "score": score,
                **{c: sub[c].iloc[0] for c in ("perturbation", "intervention_layer", "scoring") if c in sub.columns},
                "n_cells": len(ok),
                "spearman_rho": rho, "spearman_low": low, "spearman_high": high,
                "diagonal_recovery": share, "recovered": ",".join(s for s, v in per_skill.items() if v),
                "diagonal_recovery_strict": strict,
                "recovered_strict": ",".join(s for s, v in per_skill_strict.items() if v),
                "diagonal_argmax": argmax,
                "min_p_vs_controls": min_p,
                "off_diagonal_false_positives": false_pos, "null_off_diagonal_cells": len(null_off),
                "false_positive_rate": false_pos / len(null_off) if len(null_off) else math.nan,
                "flagged_diagonal": int(sub.loc[sub["diagonal"], "flagged"].sum()),
                "beyond_diagonal": int(sub.loc[sub["diagonal"], "beyond"].sum()),
                "beyond_off_diagonal": int(sub.loc[~sub["diagonal"], "beyond"].sum()),
            })
    table = pd.DataFrame(rows)
    key = table["spearman_rho"].fillna(-2.0) + 1e-3 * table["diagonal_recovery"].fillna(0) - 1e-6 * table["off_diagonal_false_positives"]
    return table.assign(_key=key).sort_values("_key", ascending=False, kind="mergesort").drop(columns="_key").reset_index(drop=True)


def best_by(per_setting: pd.DataFrame, column: str = "scoring") -> pd.DataFrame:
    """The best row of :func:`setting_agreement` for each value of ``column`` (its order: best first).

    ``column="scoring"`` answers which way of choosing what to perturb (raw S, Cohen's d,
    token-level, probe, SVD, LEACE) agrees best with the fine-tunes, each at its best kind,
    layer and score.
    """
    require(column in per_setting.columns, f"the agreement table has no {column!r} column (chain points before it existed)")
    keep = [column, "setting", "spearman_rho", "spearman_low", "spearman_high", "diagonal_recovery",
            "diagonal_argmax", "off_diagonal_false_positives", "null_off_diagonal_cells"]
    return per_setting.drop_duplicates(column, keep="first")[[c for c in keep if c in per_setting.columns]].reset_index(drop=True)


def agreement_summary(per_setting: pd.DataFrame, mapping: pd.DataFrame, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``agreement.json``: the best setting's figures at top level, every setting below."""
    require(len(per_setting) > 0, "no setting to summarise")
    best = per_setting.iloc[0]

    def clean(v: Any) -> Any:
        if isinstance(v, (float, np.floating)):
            return None if not math.isfinite(float(v)) else float(v)
        if isinstance(v, (np.integer,)):
            return int(v)
        if isinstance(v, np.bool_):
            return bool(v)
        return v

    return {
        "spearman_rho": clean(best["spearman_rho"]),
        "spearman_ci": [clean(best["spearman_low"]), clean(best["spearman_high"])],
        "diagonal_recovery": clean(best["diagonal_recovery"]),
        "diagonal_recovery_strict": clean(best.get("diagonal_recovery_strict", math.nan)),
        "diagonal_argmax": clean(best.get("diagonal_argmax", math.nan)),
        "off_diagonal_false_positives": clean(best["off_diagonal_false_positives"]),
        "null_off_diagonal_cells": clean(best.get("null_off_diagonal_cells", math.nan)),
        "best_setting": str(best["setting"]),
        **({"best_by_scoring": [{k: clean(v) for k, v in row.items()} for row in best_by(per_setting).to_dict("records")]}
           if "scoring" in per_setting.columns else {}),
        "settings": [{k: clean(v) for k, v in row.items()} for row in per_setting.to_dict("records")],
        "cluster_mapping": [{k: clean(v) for k, v in row.items()} for row in mapping.to_dict("records")],
        **({k: v for k, v in extra.items()} if extra else {}),
    }


def headline(per_setting: pd.DataFrame, target_rho: float = 0.7) -> str:
    """One paragraph: the best setting's agreement, against the method's target (ρ ≥ 0.7, full recovery)."""
    best = per_setting.iloc[0]
    rho = best["spearman_rho"]
    meets = (math.isfinite(rho) and rho >= target_rho and best["diagonal_recovery"] == 1.0)
    return (
        f"Best setting: {best['setting']}. Spearman ρ(Φ, Φ*) = {rho:+.2f} "
        f"[{best['spearman_low']:+.2f}, {best['spearman_high']:+.2f}] over {best['n_cells']} cells; "
        f"diagonal recovery {best['diagonal_recovery']:.0%} ({best['recovered'] or 'none'}; own cell beyond its "
        f"controls and largest there; own cell largest in {best.get('diagonal_argmax', math.nan):.0%} of rows by Φ alone); "
        f"{best['off_diagonal_false_positives']} of {best['null_off_diagonal_cells']} null off-diagonal cells flagged. "
        f"{'Meets' if meets else 'Falls short of'} the target (ρ ≥ {target_rho}, full diagonal recovery) "
        f"across {len(per_setting)} setting(s)."
    )


def check_abilities(abilities: Sequence[str]) -> list[str]:
    """``abilities`` as a list, if every name is an ability of the suite; else a clear error."""
    unknown = [a for a in abilities if a not in ABILITIES]
    require(not unknown, f"unknown abilities {unknown}; the suite has {', '.join(ABILITIES)}")
    return list(abilities)

