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
from ..estimators.run import PHI_ARTIFACT
from ..influence.impact import relative_loss
from ..influence.stats import bootstrap_weights, minimum_detectable_ais, percentile_interval
from ..perturbations.kinds import KINDS
from ..runner import point_name
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
def variant_name(left_out: str | None, dropped: float = 1.0) -> str:
    """``"all"`` for ``f_all``, ``"-<skill>"`` for ``f_{−skill}``, ``"-<skill>~0.33"`` when only that share of ``D_p`` is left out."""
    if not left_out:
        return "all"
    return f"-{left_out}" if float(dropped) >= 1.0 else f"-{left_out}~{float(dropped):.2f}"


DROP = "~drop"


def drop_share(blocks: Any, group: str, share: float) -> tuple[Any, str]:
    """``blocks`` with ``round(share · n)`` of ``group``'s ``n`` blocks relabelled ``<group>~drop``, and that label.

    Leaving the relabelled group out trains on ``1 − share`` of ``D_p`` under the same token
    budget (the rest takes its place). The dropped blocks are the first ones of a fixed
    permutation, so the blocks 1/3 drops are among those 2/3 drops (nested doses).
    """
    from .finetune import Blocks

    require(0 < share <= 1, f"share must lie in (0, 1], got {share!r}")
    members = np.flatnonzero(blocks.group == group)
    require(len(members), f"no blocks of group {group!r}; groups: {sorted(set(blocks.group.tolist()))}")
    order = members[np.random.default_rng(0).permutation(len(members))]
    labels = blocks.group.astype(object).copy()
    labels[order[: int(round(share * len(members)))]] = group + DROP
    return Blocks(ids=blocks.ids, group=labels.astype(str)), group + DROP


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
    dose_skill: str | None = None,
    dose_shares: Sequence[float] = (),
    dose_seeds: Sequence[int] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fine-tune ``f_all`` and every ``f_{−p}`` for each seed (cached), and score each on ``tasks``.

    ``dose_skill`` with ``dose_shares`` (shares of ``D_p`` in (0, 1) to leave out, e.g. 1/3
    and 2/3) adds the fine-tunes of the data-dose axis (:func:`drop_share`), same budget, for
    the seeds in ``dose_seeds`` (default: all).
    Returns ``(scores, runs)``: one row per seed × model × item (``seed``, ``model``,
    ``left_out``, ``dropped``, ``ability``, ``item``, ``score``, ``p_correct``), and one row per
    fine-tune (``seed``, ``model``, ``left_out``, ``dropped``, ``key``, ``seconds``, ``tokens``,
    ``first_loss``, ``last_loss``, ``cached``). An interrupted run resumes: finished
    fine-tunes and their scores are read back from ``cache``.
    """
    shares = sorted({float(x) for x in dose_shares} - {1.0})
    require(all(0 < x < 1 for x in shares), f"dose_shares must lie in (0, 1) (1 is f_-p itself), got {list(dose_shares)}")
    require(not shares or dose_skill in skills,
            f"dose_skill must be one of the planted skills {list(skills)} when dose_shares are given, got {dose_skill!r}")
    from dataclasses import replace

    from ..artifacts import file_hash
    from ..abilities.evaluation import evaluate_abilities
    from .finetune import cached_finetune, finetune_key, using_weights

    task_key = stable_hash({name: file_hash(info.data_path) for name, info in tasks.items()})
    frames, runs = [], []
    for seed in seeds:
        cfg = replace(config, seed=int(seed))
        doses = shares if dose_seeds is None or int(seed) in {int(x) for x in dose_seeds} else []
        variants = [(None, 1.0), *((s, 1.0) for s in skills), *((dose_skill, x) for x in doses)]
        for left_out, dropped in variants:
            use = blocks
            exclude = [left_out] if left_out else []
            if left_out and dropped < 1.0:
                use, label = drop_share(blocks, left_out, dropped)
                exclude = [label]
            name = variant_name(left_out, dropped)
            key = finetune_key(model, use, cfg, exclude)
            cached = (Path(cache) / key / ".complete").exists()
            if progress:
                print(f"[groundtruth] seed {seed}, f_{name}: {'cached' if cached else 'fine-tuning'} ...", flush=True)
            trained, meta = cached_finetune(model, use, states, cfg, exclude, cache, progress=progress)
            score_file = Path(cache) / key / f"scores-{task_key}.parquet"
            if score_file.exists():
                scores = pd.read_parquet(score_file)
            else:
                with using_weights(model, trained):
                    raw = evaluate_abilities(model, tasks, {name: []}, batch_size=batch_size, progress=False)
                scores = raw[["ability", "item", "score", "p_correct"]].copy()
                scores.to_parquet(score_file, index=False)
            frames.append(scores.assign(seed=int(seed), model=name, left_out=left_out or "",
                                        dropped=float(dropped) if left_out else 0.0))
            runs.append({"seed": int(seed), "model": name, "left_out": left_out or "",
                         "dropped": float(dropped) if left_out else 0.0, "key": key,
                         "seconds": meta["seconds"], "tokens": meta["tokens"], "first_loss": meta["first_loss"],
                         "last_loss": meta["last_loss"], "cached": cached})
    scores = pd.concat(frames, ignore_index=True)[["seed", "model", "left_out", "dropped", "ability", "item", "score",
                                                   "p_correct"]]
    return scores, pd.DataFrame(runs)


def f_all_weights(cache: Path, runs: pd.DataFrame, seed: int, model: str = "all") -> dict[str, Any]:
    """The trained weights of ``f_all`` (or of the variant ``model``, e.g. ``-glyph~0.33``) for ``seed``."""
    from safetensors.torch import load_file

    row = runs[(runs["model"] == model) & (runs["seed"] == int(seed))]
    require(len(row) == 1, f"no fine-tune {model!r} for seed {seed} among {sorted(set(zip(runs['model'], runs['seed'])))}")
    return load_file(str(Path(cache) / row["key"].iloc[0] / "trained.safetensors"))


def weight_change(base: Mapping[str, Any], trained: Mapping[str, Any], layers_path: str, n_layers: int) -> pd.DataFrame:
    """Where a fine-tune changed the model: ``‖ΔW_l‖_F / ‖W_l‖_F`` per decoder layer ``l``.

    ``W_l`` stacks every parameter of layer ``l`` (attention, MLP, norms), ``ΔW_l`` its change;
    a layer the fine-tune did not train reads 0. ``base`` holds the untrained parameters
    (``model.hf.named_parameters()``), ``trained`` what the fine-tune returned.
    """
    prefix = layers_path + "."
    sq_delta, sq_base = np.zeros(n_layers), np.zeros(n_layers)
    for name, value in trained.items():
        require(name in base, f"trained parameter {name} is not a parameter of the base model")
        require(name.startswith(prefix), f"trained parameter {name} is not under {layers_path}")
        layer = int(name[len(prefix):].split(".")[0])
        w0 = base[name].detach().float().cpu()
        sq_delta[layer] += float(((value.float() - w0) ** 2).sum())
        sq_base[layer] += float((w0 ** 2).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(sq_base > 0, np.sqrt(sq_delta) / np.sqrt(np.where(sq_base > 0, sq_base, 1.0)), 0.0)
    return pd.DataFrame({"layer": np.arange(n_layers), "relative_change": rel, "trained": sq_base > 0})


def score_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean score per model × ability (over items and seeds), wide: one column per ability."""
    return scores.groupby(["model", "ability"])["score"].mean().unstack("ability")


def phi_star(scores: pd.DataFrame, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """The measured influence ``Φ*_{p,a}`` with its bootstrap interval; one row per left-out variant × ability.

    ``Φ*_{p,a} = (M(f_all, a) − M(f_{−p}, a)) / M(f_all, a)``
    (:func:`rephelpers.influence.impact.relative_loss`, the AIS formula), ``M`` the mean item
    score over seeds and items. The interval resamples seeds and, within each ability, items
    (:func:`rephelpers.influence.stats.bootstrap_weights`), jointly for all models (a paired
    bootstrap), and takes the percentiles of the resampled Φ*
    (:func:`~rephelpers.influence.stats.percentile_interval`). Columns: ``cluster`` (the skill
    ``p``), ``dropped`` (share of ``D_p`` left out: 1 for ``f_{−p}``, less on the dose axis),
    ``ability``, ``m_all``, ``m_minus``, ``phi_star``, ``phi_star_low``, ``phi_star_high``,
    ``null`` (the interval covers 0), ``n_items``, ``n_seeds``.
    """
    require({"seed", "model", "left_out", "ability", "item", "score"} <= set(scores.columns),
            "phi_star expects the scores of leave_out_scores")
    require((scores["model"] == "all").any(), "phi_star needs the scores of f_all (model 'all')")
    if "dropped" not in scores.columns:
        scores = scores.assign(dropped=np.where(scores["left_out"].astype(str) != "", 1.0, 0.0))
    dropped_of = scores.drop_duplicates("model").set_index("model")["dropped"].to_dict()
    left_of = scores.drop_duplicates("model").set_index("model")["left_out"].to_dict()
    rng = np.random.default_rng(seed)
    seeds = np.sort(scores["seed"].unique())
    rows = []
    for offset, (ability, sub) in enumerate(scores.groupby("ability", sort=True)):
        cube = sub.pivot_table(index=["seed", "item"], columns="model", values="score")
        items = np.sort(sub["item"].unique())
        models = list(cube.columns)
        arr = np.stack([cube.loc[s].reindex(items)[models].to_numpy(dtype=float) for s in seeds])  # [seed, item, model]
        require(not np.isnan(arr).any(), f"{ability}: some model lacks scores for some seed or item")
        weights = bootstrap_weights(np.zeros(len(items)), n_boot, seed + offset)  # [n_boot, item]
        per_seed = np.einsum("bi,sim->bsm", weights, arr) / len(items)  # resampled items, per seed
        s_idx = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
        boot = np.take_along_axis(per_seed, s_idx[:, :, None], axis=1).mean(axis=1)  # [n_boot, model]
        point = arr.mean(axis=(0, 1))
        a_all = models.index("all")
        for j, name in enumerate(models):
            if name == "all":
                continue
            est = float(relative_loss(point[a_all], point[j]))
            low, high = percentile_interval(relative_loss(boot[:, a_all], boot[:, j]), alpha)
            low, high = float(low), float(high)
            rows.append({
                "cluster": str(left_of[name]), "dropped": float(dropped_of[name]), "ability": ability,
                "m_all": point[a_all], "m_minus": point[j], "phi_star": est,
                "phi_star_low": low, "phi_star_high": high,
                "null": bool(not (low > 0 or high < 0)), "n_items": len(items), "n_seeds": len(seeds),
            })
    return pd.DataFrame(rows).sort_values(["cluster", "dropped", "ability"]).reset_index(drop=True)


def dose_curve(scores: pd.DataFrame, skill: str, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Φ* of the kept part of ``D_p`` along the dose axis, on the skill's own ability.

    ``dose`` is the share of ``D_p`` a fine-tune kept (1 − dropped); ``f_d`` that fine-tune
    (``f_1 = f_all``, ``f_0 = f_{−p}``). ``Φ*(d) = (M(f_d, a_p) − M(f_0, a_p)) / M(f_d, a_p)``: what
    the kept share gave the model, the quantity a chain run on ``f_d`` estimates for cluster
    ``p``; it is :func:`phi_star` with ``f_d`` in the place of ``f_all`` and ``f_0`` in that of
    ``f_{−p}``. Also ``phi_star_removed`` = ``Φ*`` of the removed share against ``f_all``.
    """
    ability = planted_ability(skill)
    sub = scores[(scores["ability"] == ability)]
    if "dropped" not in sub.columns:
        sub = sub.assign(dropped=np.where(sub["left_out"].astype(str) != "", 1.0, 0.0))
    mine = sub[(sub["model"] == "all") | (sub["left_out"] == skill)]
    none = mine[mine["dropped"] >= 1.0]
    require(len(none), f"no f_-{skill} scores: the dose curve needs the fine-tune without all of D_{skill}")
    removed = phi_star(mine, n_boot, alpha, seed).set_index("dropped")
    rows = [{"dose": 0.0, "model": variant_name(skill), "phi_star": 0.0, "phi_star_low": 0.0, "phi_star_high": 0.0,
             "phi_star_removed": float(removed.loc[1.0, "phi_star"])}]
    for model, dropped in mine.drop_duplicates("model")[["model", "dropped"]].itertuples(index=False):
        if dropped >= 1.0:
            continue
        # f_d as the reference ("all") and f_0 as the left-out model: phi_star's own formula and bootstrap.
        pair = pd.concat([mine[mine["model"] == model].assign(model="all", left_out="", dropped=0.0),
                          none.assign(model=variant_name(skill), dropped=1.0)])
        star = phi_star(pair, n_boot, alpha, seed).iloc[0]
        rows.append({"dose": 1.0 - float(dropped), "model": model, "phi_star": float(star["phi_star"]),
                     "phi_star_low": float(star["phi_star_low"]), "phi_star_high": float(star["phi_star_high"]),
                     "phi_star_removed": float(removed.loc[dropped, "phi_star"]) if dropped > 0 else 0.0})
    return pd.DataFrame(rows).sort_values("dose").reset_index(drop=True)


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


def intervention_layers(grid: Any, parameters: Mapping[str, Any]) -> list[int]:
    """Every layer a chain point of ``grid`` (see :func:`chain_grids`) intervenes at."""
    layers = set()
    for g in chain_grids(grid, parameters):
        for layer in g.get("intervention_layer", [parameters.get("intervention_layer")]):
            if layer is not None:
                layers.add(int(layer))
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
SPLIT_RECALL = 0.8
"""A planted set is *found* when one cluster it dominates holds at least this share of its texts."""


def map_clusters(documents: pd.DataFrame, skills: Sequence[str], split_recall: float = SPLIT_RECALL) -> pd.DataFrame:
    """For each planted skill, the clusters it dominates and the one that stands for it.

    Columns: ``skill``, ``cluster`` (the cluster holding most of its texts), ``recall`` (share
    of the skill's texts in that cluster), ``purity`` (share of that cluster's texts that are
    the skill's), ``mapped`` (purity ≥ 1/2, so the cluster stands for the skill),
    ``dominated`` (every cluster whose texts are at least half the skill's, comma-separated),
    ``recall_dominated`` (share of the skill's texts in them) and ``status``: ``found`` (mapped
    and ``recall ≥ split_recall``), ``split`` (its texts spread over several clusters, as
    k-means split glyph's "Tablet n" headers from its bare equations) or ``merged`` (no
    cluster it dominates). A ``split`` or ``merged`` set is a clustering miss, not a null of
    the attribution. Texts are recognised by ``domain`` = ``planted_<skill>`` (corpus
    metadata the chain carries, never used to cluster, unless ``cluster_method: domain``).
    """
    require({"cluster", "domain"} <= set(documents.columns), "documents need `cluster` and `domain` columns (stage 01)")
    sizes = documents["cluster"].value_counts()
    rows = []
    for skill in skills:
        mine = documents["domain"] == planted_ability(skill)
        require(mine.any(), f"no document of the planted cluster {skill!r} in the chain's corpus")
        counts = documents.loc[mine, "cluster"].value_counts()
        k = int(counts.index[0])
        purity = float(counts.iloc[0] / sizes[k])
        recall = float(counts.iloc[0] / mine.sum())
        dominated = [int(c) for c, n in counts.items() if n / sizes[c] >= 0.5]
        status = "merged" if purity < 0.5 else ("found" if recall >= split_recall else "split")
        rows.append({"skill": skill, "cluster": k, "recall": recall, "purity": purity, "mapped": purity >= 0.5,
                     "dominated": ",".join(map(str, dominated)),
                     "recall_dominated": float(counts[dominated].sum() / mine.sum()) if dominated else 0.0,
                     "status": status})
    return pd.DataFrame(rows)


def clustering_misses(mapping: pd.DataFrame) -> str:
    """The planted sets the clustering did not find, in words (``""`` when it found all)."""
    if "status" not in mapping.columns:
        miss = mapping[~mapping["mapped"].astype(bool)]
        return "; ".join(f"{r.skill}: merged (purity {r.purity:.2f})" for r in miss.itertuples())
    parts = []
    for r in mapping[mapping["status"] != "found"].itertuples():
        where = f"over clusters {r.dominated}" if r.status == "split" else f"into cluster {r.cluster}"
        parts.append(f"{r.skill}: {r.status} {where} (best recall {r.recall:.2f}, purity {r.purity:.2f})")
    return "; ".join(parts)


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


# -- one agreement table for every estimator of Φ ----------------------------------------------------------
AGREEMENT_COLUMNS = ("setting", "estimator", "cluster_source", "spearman_rho", "spearman_low", "spearman_high",
                     "diagonal_recovery", "off_diagonal_false_positives", "dose_rho", "seconds", "peak_rss_mb")
CLUSTER_SOURCES = ("oracle", "discovered")


def chain_phi_long(influence: pd.DataFrame, scores: Sequence[str] = tuple(SCORES),
                   estimator: str = "perturbation") -> pd.DataFrame:
    """The chain's Φ (``influence.parquet`` rows of :func:`chain_influence`) in the long form every estimator shares.

    One row per chain point × score (``phi``, ``phi_minus_control``) × cluster × ability:
    ``cluster``, ``ability``, ``phi`` (the score's value), ``estimator``, ``setting`` (the
    point's label plus ``score=<score>``), ``phi_low``/``phi_high`` (stage 06's bootstrap interval
    over items and control draws), and the test columns :func:`estimator_agreement`
    reads when present: ``beyond`` (``phi_minus_control_low > 0``, else stage 06's
    ``exceeds_control(s)``) and ``flagged`` (``finding``, else ``significant``).
    """
    exceeds = _column(influence, "exceeds_controls", "exceeds_control")
    flagged = _column(influence, "finding", "significant")
    table = influence.copy()
    if "phi_minus_control" not in table.columns:
        table["phi_minus_control"] = table["phi"] - table["phi_control"]
    beyond = table["phi_minus_control_low"] > 0 if "phi_minus_control_low" in table.columns else table[exceeds]
    frames = []
    for score in scores:
        frames.append(pd.DataFrame({
            "cluster": table["cluster"].to_numpy(), "ability": table["ability"].to_numpy(),
            "phi": table[score].to_numpy(dtype=float), "estimator": estimator,
            "setting": table["setting"].astype(str) + f", score={score}",
            "beyond": beyond.astype(object).fillna(False).astype(bool).to_numpy(),
            "flagged": table[flagged].astype(object).fillna(False).astype(bool).to_numpy(),
            # stage 06's interval over items and control draws, where it has one
            "phi_low": table[f"{score}_low"].to_numpy(dtype=float) if f"{score}_low" in table.columns else np.nan,
            "phi_high": table[f"{score}_high"].to_numpy(dtype=float) if f"{score}_high" in table.columns else np.nan,
        }))
    return pd.concat(frames, ignore_index=True)


def chain_cost(chain_dir: str | Path, spec: Any, scores: Sequence[str] = tuple(SCORES)) -> pd.DataFrame:
    """Wall time and peak kernel memory of every chain point, from the runner's ``status.json`` files.

    ``seconds`` = the point's own notebooks plus the shared stages 01–02 (``_shared/``, which
    every point of the sweep needs); ``peak_rss_mb`` the largest kernel peak among them.
    Columns: ``setting`` (as :func:`chain_phi_long` labels it, one row per score), ``seconds``, ``peak_rss_mb``.
    """
    chain_dir = Path(chain_dir)
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]

    def stages(folder: Path) -> list[dict[str, Any]]:
        path = folder / "status.json"
        return list(json.loads(path.read_text()).get("stages", {}).values()) if path.exists() else []

    shared = stages(chain_dir / "_shared")
    rows = []
    if any(s.grid for s in specs):
        for s, point in ((s, p) for s in specs for p in s.points()):
            records = stages(chain_dir / point_name(point)) + shared
            label = _with_setting(pd.DataFrame({"x": [0]}), {**s.parameters, **point}, point_name(point))["setting"].iloc[0]
            rows.append({"setting": label, "records": records})
    else:
        label = _with_setting(pd.DataFrame({"x": [0]}), specs[0].parameters, "run")["setting"].iloc[0]
        rows.append({"setting": label, "records": stages(chain_dir)})
    out = []
    for row in rows:
        rss = [r.get("peak_rss_mb") for r in row["records"] if r.get("peak_rss_mb")]
        for score in scores:  # one row per label chain_phi_long gives the point
            out.append({"setting": f"{row['setting']}, score={score}",
                        "seconds": float(sum(r.get("seconds") or 0.0 for r in row["records"])) if row["records"] else math.nan,
                        "peak_rss_mb": float(max(rss)) if rss else math.nan})
    return pd.DataFrame(out).drop_duplicates("setting")


def chain_estimator_phi(chain_dir: str | Path, spec: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The other estimators' Φ of a chain (RepSim, BM25, influence functions: stage 06's
    ``estimators/phi.parquet``) in long form, and what each cost.

    Their Φ reads stages 01-02 and the ability items only, which every point of a sweep shares,
    so the first finished point's table stands for the chain; perturbation's own rows are left
    out (:func:`chain_phi_long` gives them per setting). Returns ``(phi, cost)``: ``phi`` with
    ``cluster, ability, phi, estimator, setting`` (setting = the estimator's name) and the
    permutation test's ``p_adjusted`` as ``flagged`` (p < 0.05: the estimator claims the cell);
    ``cost`` with ``setting, seconds, peak_rss_mb`` (the estimator's own run, model load included).
    Both empty when notebook 06 ran no other estimator.
    """
    chain_dir = Path(chain_dir)
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    folders = ([chain_dir / point_name(p) for s in specs for p in s.points()] if any(s.grid for s in specs)
               else [chain_dir])
    tables = [f / PHI_ARTIFACT for f in folders if (f / PHI_ARTIFACT).exists()]
    empty = (pd.DataFrame(columns=["cluster", "ability", "phi", "estimator", "setting", "flagged"]),
             pd.DataFrame(columns=["setting", "seconds", "peak_rss_mb"]))
    if not tables:
        return empty
    phi = pd.read_parquet(tables[0])
    phi = phi[phi["estimator"] != "perturbation"].copy()
    if phi.empty:
        return empty
    phi["setting"] = phi["estimator"]
    phi["flagged"] = phi["p_adjusted"].astype(float) < 0.05
    cost = phi.groupby("setting", as_index=False)[["seconds", "peak_rss_mb"]].first()
    return phi[["cluster", "ability", "phi", "estimator", "setting", "flagged"]].reset_index(drop=True), cost


def _setting_of(frame: pd.DataFrame) -> pd.Series:
    return frame["setting"].astype(str) if "setting" in frame.columns else frame["estimator"].astype(str)


def estimator_agreement(
    phi: pd.DataFrame,
    stars: pd.DataFrame,
    mapping: pd.DataFrame,
    cluster_source: str,
    dose: pd.DataFrame | None = None,
    cost: pd.DataFrame | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Rows of the agreement table (``agreement.json`` → ``settings``) for any estimator of Φ.

    ``phi``: the estimator's Φ in long form, ``cluster``, ``ability``, ``phi``, ``estimator``,
    optional ``setting`` (default: the estimator's name), optional ``beyond`` (the cell lies
    beyond its random controls) and ``flagged`` (the estimator claims the cell). ``stars``:
    :func:`phi_star` (its rows with ``dropped`` = 1 are used). ``mapping``: :func:`map_clusters`
    on the clusters ``phi`` is about (``cluster_source`` says which: ``oracle`` = the planted
    sets themselves, ``discovered`` = a clustering). Per setting, over the cells (planted set
    ``p`` × ability ``a``) whose set has a cluster (``mapped``):

    - ``spearman_rho`` = corr(rank Φ, rank Φ*) with a percentile bootstrap interval over cells
      (``spearman_low``, ``spearman_high``);
    - ``diagonal_recovery``: among the sets the clustering *found*, the share whose own cell
      is the largest Φ of its row, positive, and (where ``beyond`` is given) beyond its
      controls among the row's cells that are; a set the clustering split or merged is no
      recovery failure but a ``clustering_misses`` entry, with its purity and recall;
    - ``off_diagonal_false_positives``: off-diagonal cells ``flagged`` where Φ* is null (None
      for an estimator that makes no claims, i.e. has no ``flagged``);
    - ``dose_rho``: Spearman of Φ against the dose (share of ``D_p`` kept) over ``dose``'s rows
      for this setting (``dose``: ``setting`` or ``estimator``, ``dose``, ``phi``; the dose
      skill's own cell), None without them;
    - ``seconds`` and ``peak_rss_mb`` from ``cost`` (``setting`` or ``estimator``, ``seconds``,
      ``peak_rss_mb``), None where it has none.

    Best first (ρ, then diagonal recovery, then fewer false positives).
    """
    require(cluster_source in CLUSTER_SOURCES, f"cluster_source must be one of {CLUSTER_SOURCES}, got {cluster_source!r}")
    missing = {"cluster", "ability", "phi", "estimator"} - set(phi.columns)
    require(not missing, f"phi (long form) lacks the columns {sorted(missing)}; it needs cluster, ability, phi, "
                         "estimator and optionally setting (e.g. rephelpers.estimators' cluster_phi output)")
    require({"skill", "cluster", "mapped"} <= set(mapping.columns), "mapping must be map_clusters' table")
    stars = stars[stars["dropped"] >= 1.0] if "dropped" in stars.columns else stars
    phi = phi.assign(setting=_setting_of(phi), cluster=phi["cluster"].astype(str))
    found_skills = (mapping.loc[mapping["status"] == "found", "skill"] if "status" in mapping.columns
                    else mapping.loc[mapping["mapped"].astype(bool), "skill"]).tolist()
    mapped = mapping[mapping["mapped"].astype(bool)][["skill", "cluster"]].assign(cluster=lambda m: m["cluster"].astype(str))
    truth = stars.merge(mapped.rename(columns={"skill": "planted", "cluster": "phi_cluster"}),
                        left_on="cluster", right_on="planted").drop(columns="cluster")
    misses = clustering_misses(mapping)
    dose_rho = {}
    if dose is not None and len(dose):
        dose = dose.assign(setting=_setting_of(dose))
        for label, sub in dose.groupby("setting"):
            ok = sub[np.isfinite(sub["phi"].astype(float))]
            dose_rho[label] = spearman(ok["phi"], ok["dose"]) if ok["dose"].nunique() >= 2 else math.nan
    costs = {}
    if cost is not None and len(cost):
        cost = cost.assign(setting=_setting_of(cost))
        costs = {r["setting"]: r for r in cost.to_dict("records")}
    rows = []
    for (estimator, label), sub in phi.groupby(["estimator", "setting"], sort=True):
        # an estimator without tests (no values in beyond/flagged) is judged by Φ alone and makes no claims
        sub = sub[[c for c in sub.columns if c not in ("beyond", "flagged") or sub[c].notna().any()]]
        for column in ("beyond", "flagged"):
            if column in sub.columns:
                sub = sub.assign(**{column: sub[column].astype(object).fillna(False).astype(bool)})
        cells = truth.merge(sub.drop(columns=["estimator", "setting"]).rename(columns={"cluster": "phi_cluster"}),
                            on=["phi_cluster", "ability"], how="inner")
        cells["diagonal"] = cells["ability"] == cells["planted"].map(planted_ability)
        ok = cells[np.isfinite(cells["phi"].astype(float)) & np.isfinite(cells["phi_star"].astype(float))]
        rho = spearman(ok["phi"], ok["phi_star"])
        low, high = spearman_ci(ok["phi"], ok["phi_star"], n_boot, alpha, seed)
        recovered = []
        for skill in found_skills:
            row = cells[cells["planted"] == skill]
            if "beyond" in row.columns:
                row = row[row["beyond"].astype(bool)]
            own = row[row["diagonal"]]
            if len(own) == 1 and own["phi"].iloc[0] > 0 and own["phi"].iloc[0] >= row["phi"].max():
                recovered.append(skill)
        null_off = cells[~cells["diagonal"] & cells["null"]]
        false_pos = int(null_off["flagged"].astype(bool).sum()) if "flagged" in cells.columns else None
        spent = costs.get(label, costs.get(estimator, {}))
        rows.append({
            "setting": label, "estimator": estimator, "cluster_source": cluster_source,
            "spearman_rho": rho, "spearman_low": low, "spearman_high": high,
            "diagonal_recovery": len(recovered) / len(found_skills) if found_skills else math.nan,
            "off_diagonal_false_positives": false_pos,
            "dose_rho": dose_rho.get(label, math.nan),
            "seconds": spent.get("seconds", math.nan), "peak_rss_mb": spent.get("peak_rss_mb", math.nan),
            "n_cells": len(ok), "recovered": ",".join(recovered), "found_sets": len(found_skills),
            "clustering_misses": misses, "null_off_diagonal_cells": len(null_off),
        })
    table = pd.DataFrame(rows, columns=[*AGREEMENT_COLUMNS, "n_cells", "recovered", "found_sets", "clustering_misses",
                                        "null_off_diagonal_cells"])
    key = (table["spearman_rho"].astype(float).fillna(-2.0) + 1e-3 * table["diagonal_recovery"].astype(float).fillna(0)
           - 1e-6 * table["off_diagonal_false_positives"].astype(float).fillna(0))
    return table.assign(_key=key).sort_values("_key", ascending=False, kind="mergesort").drop(columns="_key").reset_index(drop=True)


def dose_phi(chains: Mapping[float, tuple[pd.DataFrame, pd.DataFrame]], skill: str) -> pd.DataFrame:
    """Every setting's Φ of the dose skill's cluster on its own ability, per dose.

    ``chains``: dose (share of ``D_p`` kept) → ``(phi, mapping)``, the long-form Φ
    (:func:`chain_phi_long`) and :func:`map_clusters` of the chain run on that dose's fine-tune.
    Returns ``estimator``, ``setting``, ``dose``, ``phi`` (NaN where the clustering did not
    find the set), the input of :func:`estimator_agreement`'s ``dose``.
    """
    ability = planted_ability(skill)
    frames = []
    for dose, (phi, mapping) in sorted(chains.items()):
        row = mapping[mapping["skill"] == skill]
        require(len(row) == 1, f"the mapping of the dose-{dose} chain has no row for {skill!r}")
        own = phi[phi["ability"] == ability].assign(setting=lambda d: _setting_of(d))
        mine = own[own["cluster"].astype(str) == str(row["cluster"].iloc[0])]
        found = bool(row["mapped"].iloc[0])
        frames.append(mine[["estimator", "setting"]].assign(dose=float(dose),
                                                            phi=mine["phi"].astype(float) if found else math.nan))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["estimator", "setting", "dose", "phi"])


def combine_agreement(*tables: pd.DataFrame) -> pd.DataFrame:
    """The rows of several :func:`estimator_agreement` tables (estimators, cluster sources) as one, best first."""
    table = pd.concat([t for t in tables if len(t)], ignore_index=True)
    require(len(table), "no agreement rows to combine")
    key = (table["spearman_rho"].astype(float).fillna(-2.0) + 1e-3 * table["diagonal_recovery"].astype(float).fillna(0)
           - 1e-6 * table["off_diagonal_false_positives"].astype(float).fillna(0))
    return table.assign(_key=key).sort_values("_key", ascending=False, kind="mergesort").drop(columns="_key").reset_index(drop=True)


# -- the power of the design ----------------------------------------------------------------------------
def rho_interval_width(n_skills: int, n_abilities: int, phi_sd: float, star_sd: float, diagonal: float = 0.8,
                       n_sims: int = 200, n_boot: int = 500, seed: int = 0) -> float:
    """Expected width of the bootstrap 95% interval of ρ(Φ, Φ*) for a design, by simulation.

    Each simulated testbed has ``n_skills × n_abilities`` cells whose true Φ* is ``diagonal``
    on the diagonal and 0 elsewhere; the measured Φ* adds normal noise of sd ``star_sd`` (its
    item and seed noise) and the estimator's Φ a proportional copy plus noise of sd
    ``phi_sd``. The width is the mean of :func:`spearman_ci`'s ``high − low``: the figure the
    testbed reports, with the same bootstrap.
    """
    rng = np.random.default_rng(seed)
    truth = np.zeros((n_skills, n_abilities))
    truth[np.arange(n_skills), np.arange(n_skills)] = diagonal
    truth = truth.ravel()
    widths = []
    for i in range(n_sims):
        star = truth + rng.normal(0, star_sd, truth.shape)
        phi = truth + rng.normal(0, phi_sd, truth.shape)
        low, high = spearman_ci(phi, star, n_boot, 0.05, seed + i)
        if math.isfinite(low):
            widths.append(high - low)
    return float(np.mean(widths)) if widths else math.nan


def detectable_phi(m_all: float, n_items: int, n_seeds: int = 1, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest diagonal Φ* = (M_all − M_−p)/M_all the design detects with ``power``.

    Φ* is the AIS formula with ``f_all`` as the unperturbed model, so this is
    :func:`rephelpers.influence.stats.minimum_detectable_ais` (a pure loss, each item ``f_all``
    gets right lost with probability Φ*, exact signed-rank test) on the ``n_items · n_seeds``
    paired item scores of all seeds pooled. Pooling treats seeds as more items: it leaves out
    the seed-to-seed spread, which the seed resampling of :func:`phi_star` does carry.
    """
    require(0 < m_all <= 1 and n_items >= 1 and n_seeds >= 1, "detectable_phi: 0 < m_all <= 1, n_items, n_seeds >= 1")
    return minimum_detectable_ais(int(n_items) * int(n_seeds), float(m_all), alpha=alpha, power=power)


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


def agreement_headline(table: pd.DataFrame, target_width: float = 0.5) -> str:
    """One paragraph on :func:`combine_agreement`'s best row: ρ with its interval (against the issue's
    target width of 0.5), diagonal recovery, false positives and clustering misses."""
    best = table.iloc[0]
    width = best["spearman_high"] - best["spearman_low"]
    fp = best["off_diagonal_false_positives"]
    return (
        f"Best: {best['setting']} ({best['estimator']}, {best['cluster_source']} clusters). Spearman ρ(Φ, Φ*) = "
        f"{best['spearman_rho']:+.2f} [{best['spearman_low']:+.2f}, {best['spearman_high']:+.2f}] over "
        f"{best['n_cells']} cells (interval {width:.2f} wide; the design's target is at most {target_width}); diagonal "
        f"recovery {best['diagonal_recovery']:.0%} of {best['found_sets']} set(s) the clustering found "
        f"({best['recovered'] or 'none'}); "
        + (f"{int(fp)} of {best['null_off_diagonal_cells']} null off-diagonal cells flagged; " if pd.notna(fp) else "")
        + (f"clustering misses: {best['clustering_misses']}. " if best["clustering_misses"] else "no clustering miss. ")
        + f"{len(table)} row(s) in all."
    )


def check_abilities(abilities: Sequence[str]) -> list[str]:
    """``abilities`` as a list, if every name is an ability of the suite; else a clear error."""
    unknown = [a for a in abilities if a not in ABILITIES]
    require(not unknown, f"unknown abilities {unknown}; the suite has {', '.join(ABILITIES)}")
    return list(abilities)

