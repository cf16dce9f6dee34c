"""Φ* from leave-cluster-out fine-tunes, and its dose curve.

``Φ*_{p,a} = (M(f_all, a) − M(f_{−p}, a)) / M(f_all, a)``, ``M`` the mean item score over the
ability's held-out items and over seeds, with a percentile bootstrap interval that resamples
items (paired: the same items for every model) and seeds; a cell is *null* when that interval
covers 0. Part of :mod:`rephelpers.testbed.groundtruth` (which re-exports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..abilities.suite import TaskInfo
from ..artifacts import stable_hash
from ..errors import require
from ..influence.impact import relative_loss
from ..influence.stats import bootstrap_weights, percentile_interval
from .planted import planted_ability


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
