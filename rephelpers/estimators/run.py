"""The estimator registry and stage 06's driver: document scores per estimator, then Φ side by side.

Every estimator other than perturbation is a callable ``scorer(inputs: EstimatorInputs) ->
pd.DataFrame`` returning document-level scores (:data:`aggregate.DOC_SCORE_COLUMNS`), listed
in :data:`DOCUMENT_SCORERS`. Perturbation's Φ comes from stage 06's ``influence.parquet``
(:func:`perturbation_phi`), with its own statistics. :func:`estimator_phi` computes what is
asked, keyed in the run directory:

- ``estimators/<name>_documents.parquet``: the document-level scores, with the wall time
  (``seconds``) and the process's peak resident memory while it ran (``peak_rss_mb``) in
  the manifest entry;
- ``estimators/phi.parquet``: Φ long form (``cluster, ability, phi, estimator``) for every
  estimator, with the permutation test's ``p_value``/``p_adjusted`` for the
  document-scored ones (NaN for perturbation, whose tests are in ``influence.parquet``)
  and each estimator's ``seconds``/``peak_rss_mb``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import psutil

from ..artifacts import RunDir, stable_hash
from ..errors import require
from ..representations.activations import ACTIVATIONS_DIR, load_activations
from ..representations.models import Model
from . import ESTIMATORS
from .aggregate import PHI_COLUMNS, cluster_phi, permutation_pvalues, validate_doc_scores
from .bm25 import bm25_scores
from .influence_functions import influence_scores
from .items import ITEM_COLUMNS, ability_items, run_tasks
from .repsim import repsim_scores

ESTIMATOR_VERSION = "1"
"""Part of every estimator artifact's key: bump when a scorer's computation changes."""
PHI_ARTIFACT = "estimators/phi.parquet"
PHI_TABLE_COLUMNS = (*PHI_COLUMNS, "p_value", "p_adjusted", "n_permutations", "seconds", "peak_rss_mb")
"""The columns of :data:`PHI_ARTIFACT`, whichever estimators ran (NaN where one does not apply)."""


@dataclass
class EstimatorInputs:
    """Everything an estimator may read, handed to every scorer alike.

    ``run_dir``: the run; ``documents``: ``documents.parquet`` (``id``, ``text``,
    ``cluster``, ...); ``items``: :func:`rephelpers.estimators.items.ability_items`;
    ``labels``: ``id`` → cluster (stage 01's, unless another partition is studied);
    ``model_loader``: loads the model, called at most once and only by a scorer that
    needs it (:meth:`model`); ``params``: ``{estimator name: {option: value}}``, each
    scorer's keyword options (they enter its artifact's key); ``seed``: for sampling.
    """

    run_dir: RunDir
    documents: pd.DataFrame
    items: pd.DataFrame
    labels: pd.Series
    model_loader: Callable[[], Any]
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seed: int = 0
    _model: Any = field(default=None, init=False, repr=False)

    def model(self) -> Any:
        """The model, loaded on first use."""
        if self._model is None:
            self._model = self.model_loader()
        return self._model

    def options(self, name: str) -> dict[str, Any]:
        """``params[name]`` as a dict (empty when not given)."""
        return dict(self.params.get(name) or {})


def _repsim(inputs: EstimatorInputs) -> pd.DataFrame:
    options = inputs.options("repsim")
    model: Model = inputs.model()
    activations = load_activations(inputs.run_dir, options.get("layers"))
    return repsim_scores(model, inputs.documents, inputs.items, activations, **options)


def _bm25(inputs: EstimatorInputs) -> pd.DataFrame:
    return bm25_scores(inputs.documents, inputs.items, **inputs.options("bm25"))


def _influence_functions(inputs: EstimatorInputs) -> pd.DataFrame:
    return influence_scores(inputs.model(), inputs.documents, inputs.items, labels=inputs.labels.to_dict(),
                            seed=inputs.seed, **inputs.options("influence_functions"))


DOCUMENT_SCORERS: dict[str, Callable[[EstimatorInputs], pd.DataFrame]] = {
    "repsim": _repsim,
    "bm25": _bm25,
    "influence_functions": _influence_functions,
}
"""Estimator name → the function computing its document-level scores (perturbation has none)."""

# Estimators allowed to score a sample of each cluster (cluster_phi then takes n_C from the partition).
SAMPLING_ESTIMATORS = frozenset({"influence_functions"})
# What each scorer reads from the run directory besides documents.parquet (enters its key).
_UPSTREAM = {"repsim": [ACTIVATIONS_DIR]}


def check_estimators(names: Sequence[str] | str) -> list[str]:
    """The requested names, checked before any compute: known, and installed in this build."""
    names = [names] if isinstance(names, str) else list(names)
    require(len(names) > 0, f"estimators is empty: choose some of {list(ESTIMATORS)}.")
    unknown = [n for n in names if n not in ESTIMATORS]
    require(not unknown, f"unknown estimators {unknown}: the known ones are {list(ESTIMATORS)}.")
    absent = [n for n in names if n != "perturbation" and n not in DOCUMENT_SCORERS]
    require(not absent, f"{', '.join(absent)} is not installed in this build; choose from "
                        f"{['perturbation', *DOCUMENT_SCORERS]}.")
    return list(dict.fromkeys(names))


def documents_artifact(name: str) -> str:
    return f"estimators/{name}_documents.parquet"


def measured(fn: Callable[[], Any], interval: float = 0.05) -> tuple[Any, dict[str, float]]:
    """``(fn(), {"seconds", "peak_rss_mb"})``: wall time, and the largest resident memory of this
    process sampled every ``interval`` s while ``fn`` ran (the whole process's, model included)."""
    process = psutil.Process()
    peak = [process.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            peak[0] = max(peak[0], process.memory_info().rss)

    watcher = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    watcher.start()
    try:
        value = fn()
    finally:
        done.set()
        watcher.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return value, {"seconds": round(time.perf_counter() - started, 3), "peak_rss_mb": round(peak[0] / 2**20, 1)}


def document_scores(name: str, inputs: EstimatorInputs) -> pd.DataFrame:
    """Estimator ``name``'s document-level scores, read back if fresh, else computed and saved (keyed)."""
    check_estimators([name])
    require(name in DOCUMENT_SCORERS, f"{name} has no document-level scores (its Φ comes from influence.parquet).")
    run = inputs.run_dir
    artifact = documents_artifact(name)
    cost: dict[str, float] = {}

    def compute() -> pd.DataFrame:
        value, spent = measured(lambda: DOCUMENT_SCORERS[name](inputs))
        cost.update(spent)
        value = validate_doc_scores(value, f"{name}'s document scores")
        unscored = set(inputs.documents["id"].astype(str)) - set(value["id"])
        require(not unscored or name in SAMPLING_ESTIMATORS,
                f"{name} left {len(unscored)} documents unscored; every corpus chunk needs a score.")
        print(f"{name}: {len(value):,} document scores in {spent['seconds']:.1f} s, peak {spent['peak_rss_mb']:.0f} MB")
        return value

    return run.cached(
        artifact, compute,
        params=dict(estimator=name, options=inputs.options(name), items=stable_hash(inputs.items), seed=inputs.seed,
                    version=ESTIMATOR_VERSION),
        upstream=["documents.parquet", *_UPSTREAM.get(name, [])],
        save=lambda value, key: run.save_parquet(artifact, value, key, **cost),
        load=lambda: run.load_parquet(artifact),
    )


def perturbation_phi(influence: pd.DataFrame) -> pd.DataFrame:
    """Perturbation's Φ (``influence.parquet``'s AIS averaged over Θ, positive = the cluster helps) in long form.

    Where stage 06 split a cluster into one row per setting (stage 04 judged its settings
    differently), the cluster's Φ here is the mean of those rows: one number per cluster and
    ability, as every other estimator gives.
    """
    missing = [c for c in ("cluster", "ability", "phi") if c not in influence.columns]
    require(not missing, f"influence.parquet lacks {missing}; re-run notebook 06's influence table.")
    phi = influence.groupby(["cluster", "ability"], as_index=False, sort=True)["phi"].mean()
    return phi.assign(estimator="perturbation")[list(PHI_COLUMNS)]


def estimator_phi(
    names: Sequence[str],
    inputs: EstimatorInputs,
    influence: pd.DataFrame | None = None,
    *,
    n_permutations: int = 999,
    correction: str = "bh",
) -> pd.DataFrame:
    """Φ of every estimator in ``names`` (long form), saved keyed as :data:`PHI_ARTIFACT`.

    Columns ``cluster, ability, phi, estimator, p_value, p_adjusted, n_permutations, seconds,
    peak_rss_mb``: document-scored estimators get :func:`cluster_phi` over ``inputs.labels``
    and :func:`permutation_pvalues` (``correction`` across each estimator's cells);
    ``perturbation`` (which needs ``influence``) its stage-06 Φ, its tests being in
    ``influence.parquet``. Only abilities of ``inputs.items`` are kept for every estimator.
    """
    names = check_estimators(names)
    require("perturbation" not in names or influence is not None,
            "estimator_phi: perturbation's Φ needs the influence table (influence.parquet).")
    run = inputs.run_dir
    scored = [n for n in names if n != "perturbation"]
    frames = {n: document_scores(n, inputs) for n in scored}
    labels = inputs.labels.copy()
    labels.index = labels.index.astype(str)

    def compute() -> pd.DataFrame:
        parts = []
        for name in names:
            if name == "perturbation":
                part = perturbation_phi(influence)
                if len(inputs.items):
                    part = part[part["ability"].isin(set(inputs.items["ability"]))]
            else:
                part = cluster_phi(frames[name], labels, name)
                tests = permutation_pvalues(frames[name], labels, n_permutations=n_permutations, seed=inputs.seed,
                                            correction=correction)
                part = part.merge(tests[["cluster", "ability", "p_value", "p_adjusted", "n_permutations"]],
                                  on=["cluster", "ability"], how="left")
                cost = run.meta_of(documents_artifact(name))
                part = part.assign(seconds=cost.get("seconds"), peak_rss_mb=cost.get("peak_rss_mb"))
            parts.append(part)
        return pd.concat(parts, ignore_index=True).reindex(columns=list(PHI_TABLE_COLUMNS))

    upstream = [documents_artifact(n) for n in scored] + (["influence.parquet"] if "perturbation" in names else [])
    return run.cached(
        PHI_ARTIFACT, compute,
        params=dict(estimators=names, labels=labels.astype(str).to_dict(), n_permutations=n_permutations,
                    correction=correction, seed=inputs.seed, abilities=sorted(set(inputs.items["ability"])),
                    version=ESTIMATOR_VERSION),
        upstream=upstream,
    )


def stage_inputs(
    run: RunDir,
    names: Sequence[str],
    abilities: Sequence[str],
    model_loader: Callable[[], Any],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    item_ids: Mapping[str, Sequence[str]] | None = None,
) -> EstimatorInputs:
    """Notebook 06's :class:`EstimatorInputs`: stage 01's documents and clusters, stage 05's items.

    ``abilities`` are the ones stage 05 scored (``item_ids`` their scored items); abilities
    that are not suite tasks have no item text here and are left out, with a note. The
    model is loaded only for a chat ability's template or by a scorer that needs it.
    """
    names = check_estimators(names)
    documents = run.load_parquet("documents.parquet", stage="notebook 01_corpus_clusters")
    tasks, skipped = run_tasks(run, abilities)
    if skipped:
        print(f"estimators: {skipped} are not suite tasks; only perturbation measures them")
    scored = [n for n in names if n != "perturbation"]
    require(tasks or not scored, f"{scored} score the ability items, and stage 05 evaluated no suite task "
                                 f"({list(abilities)}); keep estimators = ['perturbation'].")
    labels = documents.set_index(documents["id"].astype(str))["cluster"]
    inputs = EstimatorInputs(run, documents, pd.DataFrame(columns=list(ITEM_COLUMNS)), labels, model_loader,
                             params=dict(params or {}), seed=seed)
    if tasks:
        tokenizer = inputs.model().tokenizer if any(t.chat for t in tasks.values()) else None
        inputs.items = ability_items(tasks, tokenizer=tokenizer, item_ids=item_ids)
    return inputs
