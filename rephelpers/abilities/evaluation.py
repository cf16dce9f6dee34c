"""Abilities of perturbed models, measured with lm-eval (stage 05).

:func:`evaluate_abilities` evaluates one model under many perturbation configs and
returns one row per config × task × item. It builds the lm-eval task dict once
(:mod:`rephelpers.abilities.lm_tasks`), runs ``lm_eval.evaluator.evaluate`` per config through
:class:`~rephelpers.abilities.lm_eval_model.PerturbedLM` with requests built fresh each time, and
never uses lm-eval's response cache (which is keyed by request, not by model, and would
serve the unperturbed answers to a perturbed run).

``fast=True`` shares the layers below the lowest intervention layer ``L`` among configs
(:class:`~rephelpers.abilities.lm_eval_model.SweepLM`): log-likelihood requests through
:func:`rephelpers.abilities.forward.sweep_loglikelihood`, generation through
:func:`rephelpers.abilities.forward.sweep_generate` (every config of a batch decoded together,
the prompt's lower layers and their KV cache computed once).

A masked LM (``model.masked``) is evaluated through
:class:`~rephelpers.abilities.masked_lm.MaskedPerturbedLM`: multiple-choice and log-likelihood
tasks scored by pseudo-log-likelihood, per config (``fast`` does not apply to it), and a
generation task is refused before any evaluation starts.

:func:`cluster_configs` makes the configs of a run (every cluster's perturbation, its
control draws, the baseline; :class:`~rephelpers.setting.Setting` ids);
:func:`evaluate_in_rounds` evaluates the control draws in rounds, after the first only on the
abilities whose cells are still in the tail, and stops a cluster once none is (:mod:`rephelpers.sequential`);
:func:`evaluation_cost` counts what that costs; the rest of the module
summarises and charts the scores.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..artifacts import RunDir
from ..dimensions.components import ClusterComponents, as_components
from ..errors import RephelpersError, is_positive_integer, require
from ..interventions.intervene import Intervention, interventions_to_json, validate
from ..perturbations.controls import Spectrum
from ..perturbations.kinds import build, matched_controls
from ..perturbations.rounds import settled_settings
from ..perturbations.specificity import SPECIFICITY, intervention_sites
from ..phi import config_mean, relative_loss
from ..progress import progress_bar
from ..representations.models import Model
from ..sequential import distinct_draws, in_tail
from ..setting import BASELINE_CLUSTER, Setting
from .lm_eval_model import PerturbedLM, SweepLM
from .masked_lm import MaskedPerturbedLM, check_masked_tasks
from .lm_tasks import PreparedTasks, _quiet_lm_eval, prepare_tasks
from .suite import TaskInfo

ROW_COLUMNS = (
    "config_id", "task", "ability", "family", "item", "metric", "higher_is_better", "chance",
    "score", "margin", "p_correct", "confidence", "prompt", "target", "response", "prompt_hash",
)


# -- one row per config × task × item ---------------------------------------------------------
def _gold_indices(target: Any, choices: Sequence[str]) -> list[int]:
    targets = target if isinstance(target, (list, tuple)) else [target]
    out = []
    for t in targets:
        if isinstance(t, str) and not t.strip().isdigit():
            require(t in choices, f"gold answer {t!r} is not among the choices {list(choices)[:4]}")
            out.append(list(choices).index(t))
        else:
            out.append(int(t))
    return out


def _choice_statistics(logliks: Sequence[float], gold: Sequence[int]) -> tuple[float, float, float]:
    """``(margin, p_correct, confidence)`` of a multiple-choice item.

    ``margin = max_{g∈gold} ℓ_g − max_{j∉gold} ℓ_j``; ``p = softmax(ℓ)`` over the choices,
    ``p_correct = Σ_{g∈gold} p_g`` and ``confidence = max_j p_j``.
    """
    ll = np.asarray(logliks, dtype=np.float64)
    is_gold = np.zeros(len(ll), dtype=bool)
    is_gold[list(gold)] = True
    margin = float(ll[is_gold].max() - ll[~is_gold].max()) if (~is_gold).any() else math.nan
    p = np.exp(ll - ll.max())
    p /= p.sum()
    return margin, float(p[is_gold].sum()), float(p.max())


def _primary_metric(sample: dict[str, Any], preferred: str | None) -> str:
    if preferred is not None:
        return preferred
    for name in sample["metrics"]:
        if isinstance(sample.get(name), (int, float, np.number, bool)):
            return name
    raise RephelpersError(
        f"no per-item numeric metric among {sample['metrics']}: the task only has corpus-level "
        "metrics (e.g. f1, bleu), which give no per-item score; choose another task."
    )


def samples_to_rows(
    samples: Mapping[str, list[dict[str, Any]]],
    prepared: PreparedTasks,
    task_objects: Mapping[str, Any],
    config_id: str,
) -> list[dict[str, Any]]:
    """Rows of :data:`ROW_COLUMNS` from lm-eval's logged samples (the first filter of each task)."""
    rows = []
    for task_name, task_samples in samples.items():
        if not task_samples:
            continue
        task = task_objects[task_name]
        primary_filter = task_samples[0]["filter"]
        multiple_choice = task.OUTPUT_TYPE == "multiple_choice"
        # The direction of each metric, as the task declares it (lm-eval's `higher_is_better`):
        # stage 06 flips lower-is-better metrics so that a positive AIS always means "worse".
        directions = task.higher_is_better() or {}
        for s in task_samples:
            if s["filter"] != primary_filter:
                continue
            metric = _primary_metric(s, prepared.metric.get(task_name))
            doc = s["doc"]
            margin = p_correct = confidence = math.nan
            response = ""
            if multiple_choice:
                choices = task.doc_to_choice(doc)
                gold = _gold_indices(s["target"], choices)
                margin, p_correct, confidence = _choice_statistics([r[0] for r in s["filtered_resps"]], gold)
                target = " | ".join(str(choices[g]) for g in gold)
            else:
                response = str(s["resps"][0][0])
                target = str(s["target"])
            rows.append({
                "config_id": config_id,
                "task": task_name,
                "ability": prepared.ability[task_name],
                "family": prepared.family[task_name],
                "item": str(doc.get("id", s["doc_id"])),
                "metric": metric,
                "higher_is_better": bool(directions.get(metric, True)),
                "chance": float(prepared.chance.get(task_name, 0.0)),
                "score": float(s[metric]),
                "margin": margin,
                "p_correct": p_correct,
                "confidence": confidence,
                "prompt": str(s["arguments"][0][0]),
                "target": target,
                "response": response,
                "prompt_hash": s["prompt_hash"],
            })
    return rows


def _check_configs(
    model: Model,
    configs: Mapping[str, Sequence[Intervention]],
    config_meta: Mapping[str, Setting] | None,
) -> dict[str, list[Intervention]]:
    require(isinstance(configs, Mapping) and len(configs) > 0, "configs must be a non-empty dict {config_id: [Intervention, …]}")
    checked = {}
    for cid, ivs in configs.items():
        require(isinstance(cid, str) and cid, f"config ids must be non-empty strings, got {cid!r}")
        ivs = list(ivs)
        require(
            all(isinstance(iv, Intervention) for iv in ivs),
            f"config {cid!r} must be a list of Intervention (an empty list is the unperturbed model)",
        )
        checked[cid] = validate(model, ivs)
    if config_meta is not None:
        check_settings(config_meta)
        extra = sorted(set(config_meta) - set(configs))
        require(not extra, f"config_meta describes configs that are not evaluated: {extra[:5]}")
    return checked


def check_settings(config_meta: Mapping[str, Setting]) -> None:
    """Every value of ``config_meta`` is a :class:`~rephelpers.setting.Setting`, or a clear error."""
    require(isinstance(config_meta, Mapping), f"config_meta must be a dict {{config_id: Setting}}, got {type(config_meta).__name__}")
    wrong = {cid: type(value).__name__ for cid, value in config_meta.items() if not isinstance(value, Setting)}
    require(not wrong, f"config_meta values must be rephelpers.setting.Setting (cluster_configs' second return value; "
                       f"a dict of its fields becomes one with Setting(**fields)); got {dict(list(wrong.items())[:3])}")


def settings_key(config_meta: Mapping[str, Setting]) -> dict[str, dict[str, Any]]:
    """``{config_id: Setting.meta()}``: the settings as a cache key reads them (the same key as
    before settings were typed, so cached scores stay valid)."""
    return {cid: setting.meta() for cid, setting in config_meta.items()}


def select_abilities(tasks: Mapping[str, TaskInfo] | Sequence[str | TaskInfo] | str,
                     abilities: Sequence[str] | None) -> list[str | TaskInfo]:
    """The entries of ``tasks`` (as :func:`evaluate_abilities` takes them) whose ability is in ``abilities``.

    A :class:`TaskInfo` measures ``info.ability``; a name (a suite ability, a registered lm-eval task
    or group) is its own ability, as the score rows' ``ability`` column names it
    (:func:`~rephelpers.abilities.lm_tasks.prepare_tasks`). None keeps every entry.
    """
    entries = list(tasks.values()) if isinstance(tasks, Mapping) else [tasks] if isinstance(tasks, str) else list(tasks)
    if abilities is None:
        return entries
    require(not isinstance(abilities, str) and len(abilities) > 0,
            f"abilities must be a non-empty list of ability names (or None for all), got {abilities!r}")

    def ability_of(entry: str | TaskInfo) -> str:
        return entry.ability if isinstance(entry, TaskInfo) else str(entry)

    have = [ability_of(e) for e in entries]
    missing = sorted(set(abilities) - set(have))
    require(not missing, f"abilities {missing} are not measured by any of the tasks given ({sorted(set(have))}): "
                         "name abilities from the score rows' `ability` column, or pass None for all.")
    return [e for e, a in zip(entries, have) if a in set(abilities)]


def setting_columns(config_meta: Mapping[str, Setting]) -> pd.DataFrame:
    """One row per config id, the columns a score row carries: :data:`DRAW_KEYS`, from :meth:`Setting.meta`."""
    return pd.DataFrame.from_dict({cid: setting.meta() for cid, setting in config_meta.items()}, orient="index")


def evaluate_abilities(
    model: Model,
    tasks: Mapping[str, TaskInfo] | Sequence[str | TaskInfo],
    configs: Mapping[str, Sequence[Intervention]],
    limit: int | None = None,
    batch_size: int = 8,
    task_dir: str | Path | None = None,
    config_meta: Mapping[str, Setting] | None = None,
    progress: bool = True,
    fast: bool = False,
    allow_download: bool = False,
    pack_choices: bool = True,
    task_paths: Sequence[str | Path] = (),
    abilities: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Evaluate ``model`` on ``tasks`` under every config; one row per config × task × item.

    Columns: :data:`ROW_COLUMNS` (``score`` is the item's primary metric: acc,
    exact_match, compliance or pct_stereotype; ``margin`` the log-likelihood margin of the
    gold choice over the best wrong one, ``p_correct``/``confidence`` the softmax over
    the choices' log-likelihoods, all NaN for generation), plus ``interventions`` (JSON)
    and, with ``config_meta`` (``{config_id: Setting}``, :func:`cluster_configs`' second value),
    each config's setting as the columns :data:`DRAW_KEYS` (:meth:`Setting.meta`). ``limit``
    caps items per task.

    ``fast=True`` computes the layers below the lowest intervention layer once per batch
    for all configs, and decodes generation tasks for all configs together
    (:class:`SweepLM`); scores equal the per-config path for every perturbation, ``Noise``
    included (its draws are keyed by token, not by batch), up to the float rounding of a
    larger batch. With
    ``pack_choices`` (fast path only) a multiple-choice item's context runs once for all
    its choices (:func:`sweep_loglikelihood`). ``task_paths``: folders of your own lm-eval
    task YAMLs, whose tasks ``tasks`` names (:func:`~rephelpers.abilities.lm_tasks.prepare_tasks`).
    ``abilities``: evaluate only the tasks of these abilities (:func:`select_abilities`; None: all),
    as :func:`evaluate_in_rounds` asks in late rounds for the abilities still in the tail.

    A masked LM is scored by pseudo-log-likelihood (:class:`MaskedPerturbedLM`:
    ``log p(cont | ctx) = Σ_j log p(c_j | ctx, c_{\\j})``, each continuation token masked in
    turn), always per config: ``fast=True`` falls back to that path, since the shared-prefix
    sweep is built for causal attention. Its rows get ``likelihood = "pseudo-log-likelihood"``
    (``margin``, ``p_correct`` and ``confidence`` are then in pseudo-log-likelihood units).
    Generation tasks (``reasoning``, ``instruction``, any ``generate_until`` task) raise a
    :class:`RephelpersError` naming them before any evaluation starts.

    A model run remotely (``model.remote``: NDIF, or nnsight's local simulation of it) is
    evaluated per config, one remote request per lm-eval batch; its generation tasks are
    refused before any evaluation, like a masked LM's.
    """
    checked = _check_configs(model, configs, config_meta)
    require(limit is None or (isinstance(limit, int) and limit >= 1), f"limit must be None or a positive int, got {limit!r}")
    prepared = prepare_tasks(select_abilities(tasks, abilities), task_dir, allow_download, task_paths)
    task_types = {name: task.OUTPUT_TYPE for task_dict, _ in prepared.dicts() for name, task in task_dict["tasks"].items()}
    if model.masked:
        check_masked_tasks(model, task_types)
    if model.remote:
        generation = sorted(name for name, kind in task_types.items() if kind == "generate_until")
        require(not generation,
                f"{model.name} runs remotely, where greedy decoding with a KV cache is not supported: "
                f"{', '.join(generation)} cannot be evaluated on it. Drop them, or run the model locally (remote=False).")
    # The shared-prefix sweep keeps states between forward passes; a remote request holds none.
    sweep = fast and not model.masked and not model.remote
    lm = (MaskedPerturbedLM(model, batch_size=batch_size) if model.masked
          else SweepLM(model, checked, batch_size=batch_size, pack_choices=pack_choices,
                       sweep_progress=progress) if sweep
          else PerturbedLM(model, batch_size=batch_size))

    from lm_eval.evaluator import evaluate

    rows: list[dict[str, Any]] = []
    for cid in progress_bar(list(checked), desc="configs", disable=not progress):
        if sweep:
            lm.select(cid)
        else:
            lm.use(checked[cid])
        for task_dict, chat in prepared.dicts():
            # Few-shot examples are drawn from the task's RNG: reseed so every config sees the same prompts.
            for task in task_dict["tasks"].values():
                task.set_fewshot_seed(seed=1234)
            with _quiet_lm_eval():
                results = evaluate(
                    lm, task_dict, limit=limit, log_samples=True, bootstrap_iters=0,
                    apply_chat_template=chat,
                )
            rows += samples_to_rows(results["samples"], prepared, task_dict["tasks"], cid)
    df = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    prompts_per_item = df.groupby(["task", "item"])["prompt_hash"].nunique()
    require(
        bool((prompts_per_item <= 1).all()),
        "the prompts of some items differ between configs "
        f"({prompts_per_item[prompts_per_item > 1].index[:3].tolist()}); scores would not pair. "
        "Report this bug with the task names.",
    )
    df["interventions"] = df["config_id"].map({cid: interventions_to_json(ivs) for cid, ivs in checked.items()})
    if model.masked:
        df["likelihood"] = "pseudo-log-likelihood"
    if config_meta:
        df = df.join(setting_columns(config_meta), on="config_id")
    return df


# -- configs of a run: baseline, each cluster's perturbation and its matched control ---------------


def cluster_configs(
    components: Sequence[ClusterComponents],
    layer: int,
    d_model: int,
    kinds: str | Sequence[str] = "ablate",
    magnitudes: float | Sequence[float] = 1.0,
    component: str = "resid",
    positions: str = "all",
    seed: int = 0,
    n_controls: int = 1,
    spectrum: Spectrum | None = None,
    leace_layers: Sequence[int] | None = None,
    spectra: Mapping[int, Spectrum | None] | None = None,
) -> tuple[dict[str, list[Intervention]], dict[str, Setting]]:
    """The configs stage 05 evaluates, and the setting of each (its score rows' descriptors).

    For stage 03's components of every cluster k at ``layer``
    (:class:`~rephelpers.dimensions.components.ClusterComponents`), every kind and magnitude:
    ``P_{k,θ}`` from :func:`rephelpers.perturbations.kinds.build` and ``n_controls`` independent
    matched random controls from :func:`~rephelpers.perturbations.kinds.matched_controls` (draw j
    uses seed ``seed + j``), applied at ``(layer, component)``; plus the unperturbed
    baseline (``cluster = -1``, ``kind = "none"``, ``magnitude = 0``). Stage 06 averages
    the draws: ``Φ_control = mean over θ and draws``.

    One draw is the proposals' design, but a single draw is a lottery when a model has a
    few dimensions every input relies on (SmolLM2's "massive activations"): 32 random
    dimensions out of 576 include a given one with probability 32/576 ≈ 5.6%, and that one
    draw then looks as destructive as the cluster's own R_k. More draws make
    Φ_control an estimate of what a random edit of that size does rather than one sample.
    Draw j is the same random set (same seed) at every magnitude, so a draw's Φ over Θ_k
    is one sample of the control distribution that stage 06 compares Φ with.
    ``spectrum`` is the layer's token spectrum the controls are matched with
    (:func:`rephelpers.perturbations.specificity.control_spectrum`, as stage 04 computes it; None: dimension
    controls from the components' statistics, uniform project controls).
    ``leace_layers`` (e.g. ``[15, 24, 27]``, ``layer`` among them; None: one layer) makes the
    ``leace`` kind erase cluster k's concept at all those layers at once, in one forward pass,
    with the eraser stage 03 fitted at each layer ℓ (multi-layer LEACE,
    ``x_ℓ ← x_ℓ − P_ℓ (x_ℓ − μ_ℓ)`` at every ℓ, as stage 04's ``leace_layers``): its setting is
    kind ``multi_leace`` at ``layer`` (so stage 04's verdict on it gates it), and control draw
    j is, at every ℓ, the matched control of ℓ's eraser drawn with draw j's seed and ℓ's
    token spectrum ``spectra[ℓ]`` (None: uniform), the controls stage 04 draws.
    Returns ``(configs, config_meta)`` for :func:`evaluate_abilities`; the config ids are
    the :class:`~rephelpers.setting.Setting` ids (``k{k}:{kind}:m{m}``, ``…:control``,
    ``…:control1``, … per draw, ``baseline``) and ``config_meta`` maps each to its
    :class:`~rephelpers.setting.Setting` (``draw`` 0 for the perturbation itself).
    """
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    magnitudes = [magnitudes] if isinstance(magnitudes, (int, float)) else list(magnitudes)
    components = [as_components(c) for c in components]
    here = [c for c in components if c.layer == layer and c.component in (None, component)]
    require(
        len(here) > 0,
        f"no stage-03 cluster components at layer {layer} ({component}); it covered layers "
        f"{sorted({c.layer for c in components})}. Pick one of those as intervention_layer "
        "or add the layer to notebooks 02/03.",
    )
    sites = leace_sites(components, layer, component, kinds, leace_layers)
    spectra = {**dict(spectra or {}), layer: spectrum}
    by_site = {l: {c.cluster: c for c in components if c.layer == l and c.component in (None, component)} for l in sites}
    baseline = Setting.baseline(layer, component, positions)
    configs: dict[str, list[Intervention]] = {baseline.id: []}
    meta: dict[str, Setting] = {baseline.id: baseline}
    for cluster_components in sorted(here, key=lambda c: c.cluster):
        k = cluster_components.cluster
        for kind in kinds:
            # every layer the kind acts at: all of leace_layers for leace when given, else this one
            at = {l: by_site[l][k] for l in sites} if kind == "leace" and len(sites) > 1 else {layer: cluster_components}
            name = f"multi_{kind}" if len(at) > 1 else kind
            for m in magnitudes:
                setting = Setting(k, name, m, layer, component, positions)
                arms: dict[Setting, list[Intervention]] = {setting: []}
                for l, c in at.items():
                    arms[setting].append(Intervention(build(kind, c, m, seed), l, component, positions))
                    controls = matched_controls(kind, c, d_model, m, seed, n_controls, spectra.get(l))
                    for draw, control in enumerate(controls):
                        arms.setdefault(setting.control_draw(draw), []).append(Intervention(control, l, component, positions))
                for arm, interventions in arms.items():
                    configs[arm.id] = interventions
                    meta[arm.id] = arm
    return configs, meta


def leace_sites(components: Sequence[ClusterComponents], layer: int, component: str, kinds: str | Sequence[str],
                leace_layers: Sequence[int] | None) -> list[int]:
    """The layers :func:`cluster_configs`' ``leace`` kind erases at (sorted), checked before anything is built
    (stage 05 calls it before it computes each layer's spectrum) by stage 04's own check of its ``layers``
    (:func:`~rephelpers.perturbations.specificity.intervention_sites`), once ``leace`` is among the kinds."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    components = [as_components(c) for c in components]
    require(leace_layers is None or "leace" in kinds,
            f"leace_layers={leace_layers!r} makes the leace kind erase at several layers, but the kinds are "
            f"{kinds}: add 'leace' to perturbation, or set leace_layers to None")
    clusters = sorted({c.cluster for c in components if c.layer == layer and c.component in (None, component)})
    return intervention_sites(components, layer, leace_layers, clusters, component=component,
                              names=("intervention_layer", "leace_layers"),
                              why="the setting is named by it (and stage 04's verdict on it is read there)")


# -- control draws in rounds (sequential Monte Carlo, issue 27) ---------------------------------
SCORE_ROUND = "scores_rounds/round{round}.parquet"
"""Where :func:`round_cache` keeps a round's scores on every ability in the run directory."""

SCORE_ROUND_ABILITIES = "scores_rounds/round{round}-{abilities}.parquet"
"""Where :func:`round_cache` keeps a late round's scores on a subset of the abilities (their names, ``+``-joined)."""

DRAW_KEYS = ("cluster", "control", "kind", "magnitude", "layer", "draw")

Settled = set[tuple[int, str, float, int]]
"""Settings stage 04 judged not specific, ``(cluster, kind, round(magnitude, 9), layer)``
(:func:`rephelpers.perturbations.rounds.settled_settings`): stage 06 calls their cells "non-specific damage"
whatever the controls show, so :func:`evaluate_in_rounds` draws no more for them after round 0."""

Evaluate = Callable[[Mapping[str, Sequence[Intervention]], Mapping[str, Setting], Sequence[str] | None], pd.DataFrame]
"""``evaluate(configs, config_meta, abilities) -> scores`` (:func:`evaluate_abilities` with the run's other
arguments bound; ``abilities`` None: every ability)."""

RoundEvaluate = Callable[[int, Mapping[str, Sequence[Intervention]], Mapping[str, Setting], Sequence[str] | None],
                         pd.DataFrame]
"""``evaluate(round, configs, config_meta, abilities) -> scores``: one round's configs on ``abilities``
(None: every ability; a late round of :func:`evaluate_in_rounds` asks for the abilities still in the tail)."""


def check_rounds(control_rounds: int | None, stop_after_exceedances: int | None, n_controls: int,
                 stop_non_specific: bool = False) -> None:
    """Refuse a bad round design before any evaluation: ``control_rounds`` draws per round (None:
    all ``n_controls`` at once), ``stop_after_exceedances`` h (None: no stop), which needs rounds, and
    ``stop_non_specific`` (a bool: stop drawing after round 0 for settings stage 04 judged not specific)."""
    require(is_positive_integer(n_controls), f"n_controls (the cap on control draws) must be a positive integer, got {n_controls!r}")
    require(control_rounds is None or is_positive_integer(control_rounds),
            f"control_rounds (control draws per round) must be None or a positive integer, got {control_rounds!r}")
    require(stop_after_exceedances is None or is_positive_integer(stop_after_exceedances),
            f"stop_after_exceedances (h) must be None or a positive integer, got {stop_after_exceedances!r}")
    require(stop_after_exceedances is None or control_rounds is not None,
            f"stop_after_exceedances = {stop_after_exceedances} stops drawing between rounds, but control_rounds is "
            "None (all draws at once): set control_rounds (e.g. 5), or stop_after_exceedances = None.")
    require(isinstance(stop_non_specific, (bool, np.bool_)),
            f"stop_non_specific must be True or False (stop drawing controls after the first round for settings "
            f"stage 04 judged not specific), got {stop_non_specific!r}")


def non_specific_gate(run: RunDir, stop_non_specific: bool, control_rounds: int | None) -> Settled | None:
    """The :data:`Settled` settings of ``run``'s stage-04 verdicts (``specificity.parquet``,
    :func:`rephelpers.perturbations.rounds.settled_settings`) for :func:`evaluate_in_rounds`, or None where
    nothing is gated: ``stop_non_specific`` False, no rounds (``control_rounds`` None: every draw at once),
    or no stage 04 in the run (e.g. the testbed chain), which one printed line says."""
    check_rounds(control_rounds, None, 1, stop_non_specific)
    if not stop_non_specific or control_rounds is None:
        return None
    if not run.exists(SPECIFICITY):
        print(f"stop_non_specific: no {SPECIFICITY} in {run.root} (notebook 04 did not run), so every setting "
              "draws controls as without it")
        return None
    settled = settled_settings(run.load_parquet(SPECIFICITY, stage="notebook 04_perturbations"))
    print(f"stop_non_specific: {len(settled)} setting(s) stage 04 judged not specific draw controls in the first "
          "round only")
    return settled


def control_cap_draws(n_controls: int, control_cap: int | None, control_rounds: int | None) -> int:
    """The control draws stage 05 prepares per perturbation: ``control_cap`` where given, else ``n_controls``.

    ``n_controls`` is also stage 04's, whose verdict "specific" means "beats every one of its
    draws", so raising it to buy power would make that verdict stricter; ``control_cap`` raises
    stage 05's cap alone. A cap only pays in rounds (cells out of the tail stop early); all at
    once it would evaluate every draw, so it needs ``control_rounds``.
    """
    if control_cap is None:
        return n_controls
    require(is_positive_integer(control_cap),
            f"control_cap must be None or a positive integer (the most control draws a cell may take), got {control_cap!r}")
    require(control_rounds is not None,
            f"control_cap = {control_cap} is a cap for control draws in rounds, but control_rounds is None (every draw "
            "at once): set control_rounds (e.g. 5) and stop_after_exceedances (e.g. 3), or leave control_cap None.")
    return int(control_cap)


def _labelled_cells(scores: pd.DataFrame, settled: Settled | None = None
                    ) -> dict[int, list[tuple[str, float, np.ndarray, bool]]]:
    """:func:`draw_cells` with each cell's ability and whether its unit is settled: ``{cluster: [(ability, Φ,
    Φ^{(j)} in draw order, settled), …]}``; a unit is settled when every setting it averages is in ``settled``."""
    missing = [c for c in (*DRAW_KEYS, "config_id", "ability", "score", "higher_is_better") if c not in scores.columns]
    require(not missing, f"draw_cells needs the score columns {missing} (evaluate_abilities with cluster_configs' config_meta)")
    # A draw evaluated on some abilities only (a late round) has NaN means on the others: its Φ^{(j)} is NaN
    # there, which the stop rule and the sequential p skip, as stage 06 never sees those rows.
    means = scores.groupby(["config_id", "ability"], sort=False)["score"].mean().unstack("ability")
    configs = scores.drop_duplicates("config_id").set_index("config_id")[list(DRAW_KEYS)]
    configs = configs.loc[means.index]
    base = configs.index[configs["cluster"] == BASELINE_CLUSTER]
    require(len(base) == 1, f"the scores hold {len(base)} baseline configs (cluster {BASELINE_CLUSTER}); need exactly one")
    sign = np.where(scores.groupby("ability")["higher_is_better"].first().reindex(means.columns).astype(bool), 1.0, -1.0)
    ais = relative_loss(means.loc[base].to_numpy(float), means.to_numpy(float), sign)  # [configs, abilities]
    control = configs["control"].astype(bool).to_numpy()
    keep = distinct_draws(scores[scores["control"].astype(bool)])
    settings = list(zip(configs["kind"].astype(str), configs["magnitude"].astype(float).round(9), configs["layer"].astype(int)))
    out: dict[int, list[tuple[str, float, np.ndarray]]] = {}
    for cluster in sorted(int(c) for c in configs["cluster"].unique() if c != BASELINE_CLUSTER):
        mine = (configs["cluster"] == cluster).to_numpy()
        own = sorted({settings[i] for i in np.flatnonzero(mine & ~control)})
        units = [set(own)] + ([{s} for s in own] if len(own) > 1 else [])
        draws = sorted({int(d) for d in configs.loc[mine & control, "draw"]
                        if keep is None or (cluster, int(d)) in keep})
        cells = []
        for unit in units:
            gated = settled is not None and all((cluster, *s) in settled for s in unit)
            in_unit = np.array([s in unit for s in settings])
            target = config_mean(ais[mine & ~control & in_unit].T)  # one Φ per ability
            per_draw = np.stack([config_mean(ais[mine & control & in_unit & (configs["draw"].to_numpy() == d)].T)
                                 for d in draws], axis=1) if draws else np.empty((len(target), 0))
            cells += [(str(a), float(t), row, gated) for a, t, row in zip(means.columns, target, per_draw)]
        out[cluster] = cells
    return out


def draw_cells(scores: pd.DataFrame) -> dict[int, list[tuple[float, np.ndarray]]]:
    """Per cluster, its cells ``(Φ, the Φ^{(j)} of its distinct control draws in draw order)``,
    computed as stage 06 computes them, from the scores evaluated so far.

    ``M(f, a)`` is the mean item score of config f on ability a, ``AIS = s_a (M_base − M) / M_base``
    (:func:`rephelpers.phi.relative_loss`) and Φ, Φ^{(j)} its mean over the cluster's configs,
    resp. over draw j's (:func:`rephelpers.phi.config_mean`). A cell is (cluster, ability) over
    all of Θ_k and, where Θ_k holds several settings, also (setting, ability) per setting: stage 06
    reads one Φ per setting when stage 04 judged the settings differently, and the stop must hold
    for whichever it reads. Draws repeating an earlier draw's interventions are left out, as
    stage 06 leaves them out (:func:`rephelpers.sequential.distinct_draws`). The ability floor is
    stage 06's parameter, so cells below it still count here: they can only keep a cluster drawing.
    A draw not evaluated on an ability (per-ability late rounds) has NaN Φ^{(j)} in that ability's cells.
    """
    return {k: [(t, row) for _, t, row, _ in cells] for k, cells in _labelled_cells(scores).items()}


def open_abilities(scores: pd.DataFrame, h: int, settled: Settled | None = None) -> dict[int, set[str]]:
    """Per cluster, the abilities still in the tail: ``a`` is open while any cell ``(unit, a)`` of the
    cluster (:func:`draw_cells`: all of Θ_k and each setting) has fewer than ``h`` draws with
    ``Φ^{(j)} ≥ Φ`` (:func:`rephelpers.sequential.in_tail`). A closed ability's cells all met their
    h-th exceedance, so their Besag–Clifford p is fixed whatever later draws show: they need no more.

    A cell whose unit holds only ``settled`` settings (:data:`Settled`) is closed too, as if it had its h
    exceedances: stage 06 calls it "non-specific damage" whatever its p. So the whole-Θ_k unit is closed
    only when every setting of Θ_k is settled; with one unsettled setting it stays open while in the tail."""
    return {cluster: {a for a, target, draws, gated in cells if not gated and in_tail(target, draws, h)}
            for cluster, cells in _labelled_cells(scores, settled).items()}


def evaluation_cost(scores: pd.DataFrame, shares: Mapping[str, float] | None = None) -> float:
    """Stage 05's cost of ``scores`` in config-equivalents: ``Σ_f Σ_{a ∈ A_f} w_a`` over the configs f
    evaluated, ``A_f`` the abilities f was evaluated on and ``w_a`` ability a's share of the tokens one
    config reads (normalised over the scores' abilities, so a config on every ability costs 1; None:
    equal shares). A config's forward passes cost about its tokens, so this is the number of configs
    a run of every ability at once would cost as much as."""
    pairs = scores[["config_id", "ability"]].drop_duplicates()
    abilities = sorted(pairs["ability"].astype(str).unique())
    weights = {a: 1.0 for a in abilities} if shares is None else dict(shares)
    missing = [a for a in abilities if a not in weights]
    require(not missing, f"shares has no token share for the abilities {missing}; give one per ability "
                         f"({abilities}), e.g. each ability's context + choice tokens in stage 05.")
    bad = {a: weights[a] for a in abilities if not (np.isfinite(weights[a]) and weights[a] > 0)}
    require(not bad, f"token shares must be positive numbers, got {bad}")
    total = sum(float(weights[a]) for a in abilities)
    return float(sum(float(weights[a]) / total for a in pairs["ability"].astype(str)))


def _round_calls(r: int, chosen: Sequence[str], config_meta: Mapping[str, Setting], opened: dict[int, set[str]] | None,
                 abilities: Sequence[str]) -> list[tuple[tuple[str, ...] | None, list[str]]]:
    """The evaluations of round r: ``[(abilities or None for all, config ids), …]``.

    Round 0, a run without a stop and a round where every drawing cluster has every ability open are
    one call on every ability; otherwise one call per open ability on the draws of the clusters it
    is open for. Tasks of different abilities share no request, so splitting by ability loses none
    of the fast path's sharing between configs (:class:`SweepLM` shares within a request)."""
    if r == 0 or opened is None or all(opened[config_meta[cid].cluster] >= set(abilities) for cid in chosen):
        return [(None, list(chosen))]
    calls = []
    for ability in abilities:
        mine = [cid for cid in chosen if ability in opened[config_meta[cid].cluster]]
        if mine:
            calls.append(((ability,), mine))
    return calls


def evaluate_in_rounds(
    evaluate: RoundEvaluate,
    configs: Mapping[str, Sequence[Intervention]],
    config_meta: Mapping[str, Mapping[str, Any]],
    control_rounds: int,
    stop_after_exceedances: int | None = None,
    progress: bool = True,
    per_ability: bool = True,
    settled: Settled | None = None,
) -> pd.DataFrame:
    """Evaluate :func:`cluster_configs`' configs with the control draws in rounds, stopping clusters
    out of the tail; the scores of every config evaluated, as :func:`evaluate_abilities` gives them.

    Round 0 is the baseline, every cluster's perturbation and control draws ``0 … R−1``
    (``R = control_rounds``) on every ability; round r the draws ``rR … (r+1)R − 1`` of the clusters
    still drawing, up to the draws in ``configs`` (``n_controls``, the cap). With
    ``stop_after_exceedances = h`` an ability a of cluster k is open while a cell (k, a) (:func:`draw_cells`)
    has fewer than h draws with ``Φ^{(j)} ≥ Φ`` (:func:`open_abilities`); round r evaluates k's draws
    only on its open abilities (``per_ability``), and k stops once none is open. A closed cell's
    Besag–Clifford p (:func:`rephelpers.sequential.sequential_p`) is fixed at its h-th exceedance, so stage 06
    reads the same p for every cell as from a run of all the draws on every ability, over the draws that
    cell has (its Φ_control too: the mean over them). ``per_ability=False`` evaluates every round's draws on
    every ability while any is open (whole-cluster rounds, the same p at a higher cost; kept for
    ``benchmarks/bench_control_rounds.py``). A cluster also stops when a round
    adds no draw distinct from its earlier ones (matched controls with no freedom repeat one set,
    which stage 06 counts once); that depends on the draws' dimensions, not on scores, so it is a
    smaller cap and keeps the p exact. h None draws every round for every cluster on every ability (all draws,
    evaluated and cached round by round). Draw j is always the same config (``seed + j``), so
    its scores are those of a run that evaluated every draw at once.

    ``settled`` (:data:`Settled`, from stage 04's verdicts) closes, after round 0, every cell whose unit holds
    only settled settings (:func:`open_abilities`), so a cluster all of whose settings are settled stops after
    round 0 (which keeps its Φ_control estimate), with or without h. Its cells' p is then the sequential (or
    rank) p over the draws they have: valid, less powerful, and never decisive, since stage 06's verdict for
    them is "non-specific damage" whatever it is. Unsettled settings draw exactly as without ``settled``.
    """
    require(isinstance(config_meta, Mapping) and set(config_meta) == set(configs),
            "evaluate_in_rounds needs config_meta for every config (cluster_configs' second return value)")
    check_settings(config_meta)
    n_draws = max([m.draw + 1 for m in config_meta.values() if m.control], default=0)
    check_rounds(control_rounds, stop_after_exceedances, max(n_draws, 1))
    rounds = max(1, math.ceil(n_draws / control_rounds))
    drawing = {m.cluster for m in config_meta.values() if not m.is_baseline}
    require(settled is None or (isinstance(settled, (set, frozenset)) and all(
        isinstance(s, tuple) and len(s) == 4 for s in settled)),
        "settled must be None or a set of (cluster, kind, magnitude, layer) tuples "
        f"(rephelpers.perturbations.rounds.settled_settings of stage 04's report), got {settled!r}")
    own = {(m.cluster, m.kind, round(float(m.magnitude), 9), int(m.layer)) for m in config_meta.values()
           if not m.is_baseline and not m.control}
    # A cluster whose every setting is settled needs no draws after round 0 (stage 06 gates all its cells).
    all_settled = {k for k in drawing if settled is not None and all(s in settled for s in own if s[0] == k)}
    frames: list[pd.DataFrame] = []
    distinct_before: dict[int, int] = {}
    opened: dict[int, set[str]] | None = None
    abilities: list[str] = []
    for r in range(rounds):
        low, high = r * control_rounds, (r + 1) * control_rounds
        chosen = [cid for cid, m in config_meta.items()
                  if (r == 0 and not m.control) or (m.control and m.cluster in drawing and low <= m.draw < high)]
        if not chosen:
            break
        calls = _round_calls(r, chosen, config_meta, opened if per_ability else None, abilities)
        for subset, cids in calls:
            if progress:
                print(f"control round {r + 1}/{rounds}: draws {low}-{min(high, n_draws) - 1} for clusters "
                      f"{sorted({config_meta[c].cluster for c in cids} & drawing)} ({len(cids)} configs) on "
                      + ("every ability" if subset is None else ", ".join(subset)))
            frames.append(evaluate(r, {cid: configs[cid] for cid in cids}, {cid: config_meta[cid] for cid in cids},
                                   subset))
        if r == 0 and all_settled:
            drawing -= all_settled
            if progress:
                print(f"clusters {sorted(all_settled)}: every setting judged not specific by stage 04, "
                      "so no control draws after round 1 (stage 06 calls their cells non-specific damage)")
        if stop_after_exceedances is None:
            if not drawing:
                break
            continue
        scores = pd.concat(frames, ignore_index=True)
        if r == 0:
            abilities = sorted(scores["ability"].astype(str).unique())
        opened = open_abilities(scores, stop_after_exceedances, settled)
        keep = distinct_draws(scores[scores["control"].astype(bool)])
        for cluster in sorted(drawing):
            distinct = (len({d for c, d in keep if c == cluster}) if keep is not None
                        else scores.loc[(scores["cluster"] == cluster) & scores["control"].astype(bool), "draw"].nunique())
            repeated = r > 0 and distinct == distinct_before.get(cluster)
            distinct_before[cluster] = distinct
            if repeated or not opened[cluster]:
                drawing.discard(cluster)
        if not drawing:
            break
    return pd.concat(frames, ignore_index=True)


def round_cache(run: RunDir, evaluate: Evaluate, params: Mapping[str, Any], upstream: Sequence[str] = (),
                **meta: Any) -> RoundEvaluate:
    """``evaluate`` with each round's scores cached in ``run``, keyed by ``params`` (everything else the
    scores depend on), the round's configs and, for a late round on some abilities only, those
    abilities: :data:`SCORE_ROUND` on every ability (the same key as before rounds could be split by
    ability, so earlier caches stay valid), :data:`SCORE_ROUND_ABILITIES` on a subset. A re-run, or one
    with a larger cap, reuses the rounds it already evaluated (:meth:`RunDir.cached`)."""
    def evaluate_round(r: int, configs: Mapping[str, Sequence[Intervention]], config_meta: Mapping[str, Setting],
                       abilities: Sequence[str] | None = None) -> pd.DataFrame:
        key = dict(params, configs={cid: [iv.to_dict() for iv in ivs] for cid, ivs in configs.items()},
                   config_meta=settings_key(config_meta))
        if abilities is None:
            name = SCORE_ROUND.format(round=r)
        else:
            key["abilities"] = sorted(abilities)
            # The file name is only for a reader; the key holds the exact names.
            name = SCORE_ROUND_ABILITIES.format(round=r, abilities="+".join(
                re.sub(r"[^A-Za-z0-9_.-]", "_", a) for a in sorted(abilities)))
        return run.cached(name, lambda: evaluate(configs, config_meta, abilities), upstream=upstream, params=key, **meta)
    return evaluate_round


# -- summaries and charts ---------------------------------------------------------------------
def ability_summary(scores: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean item score per group of ``by`` (default: per config and ability), with its
    standard error ``s / √n`` over items. Per config and ability the mean is ``M(f, a)`` of
    :func:`rephelpers.influence.impact.ability_scores` (where the formula lives), tested equal.

    Rows of one item within a group (several control draws of one θ, say) are averaged
    first, so ``n`` counts items, not item × config.
    """
    if by is None:
        keys = [c for c in ("config_id", "cluster", "control", "kind", "magnitude", "ability", "metric") if c in scores.columns]
    else:
        keys = list(by)
        missing = [c for c in [*keys, "score"] if c not in scores.columns]
        require(not missing, f"ability_summary needs the columns {missing} (evaluate_abilities with config_meta=)")
    items = [c for c in ("task", "item") if c in scores.columns]
    per_item = scores.groupby(keys + items, dropna=False)["score"].mean().reset_index() if items else scores
    out = per_item.groupby(keys, dropna=False)["score"].agg(["mean", "std", "count"]).reset_index()
    out["sem"] = out["std"].fillna(0.0) / np.sqrt(out["count"])
    return out.drop(columns="std").rename(columns={"count": "n"})


# -- calibration --------------------------------------------------------------------------------
def expected_calibration_error(
    scores: pd.DataFrame,
    n_bins: int = 10,
    by: Sequence[str] = ("config_id", "task"),
) -> pd.DataFrame:
    """ECE of multiple-choice items, per group of ``by``.

    ``ECE = Σ_b (n_b / n) · |acc_b − conf_b|`` over ``n_bins`` equal-width bins of the
    confidence (the softmax probability of the chosen answer), where ``acc_b`` is the
    mean score and ``conf_b`` the mean confidence of the items in bin ``b``. Only
    multiple-choice rows scored by accuracy count (not generation, not ``bias``).
    """
    require(n_bins >= 1, f"n_bins must be ≥ 1, got {n_bins}")
    missing = [c for c in (*by, "confidence", "score") if c not in scores.columns]
    require(not missing, f"expected_calibration_error needs columns {missing}: pass evaluate_abilities output")
    # Calibration is about accuracy; a pct_stereotype "score" is no correctness.
    mc = scores.dropna(subset=["confidence"])
    if "metric" in mc.columns:
        mc = mc[mc["metric"] == "acc"]
    out = []
    for key, g in mc.groupby(list(by), sort=True):
        conf = g["confidence"].to_numpy(dtype=float)
        acc = g["score"].to_numpy(dtype=float)
        bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        ece = sum(
            (bins == b).sum() / len(conf) * abs(acc[bins == b].mean() - conf[bins == b].mean())
            for b in np.unique(bins)
        )
        key = key if isinstance(key, tuple) else (key,)
        out.append({**dict(zip(by, key)), "ece": float(ece), "n": len(conf),
                    "accuracy": float(acc.mean()), "mean_confidence": float(conf.mean())})
    return pd.DataFrame(out, columns=[*by, "ece", "n", "accuracy", "mean_confidence"])
