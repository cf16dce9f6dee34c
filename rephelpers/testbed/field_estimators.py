"""The field's estimators on the testbed: document scores once per model, Φ per cluster source.

RepSim, BM25 and influence functions score documents (the corpus chunks of stage 01) against
the ability items, and none of that depends on how the chunks are clustered. So the testbed
scores the chunks once per fine-tuned model, on the first chain's stage 01–02 outputs (cached
there, keyed like stage 06's ``estimators/<name>_documents.parquet``), and aggregates the same
scores over every partition it studies (discovered clusters, oracle clusters):

    Φ(C, a) = n_C · (mean_{d∈C} s_a(d) − mean_{d∉C} s_a(d)),

with the permutation test over documents (:func:`rephelpers.estimators.aggregate.cluster_phi`,
:func:`~rephelpers.estimators.aggregate.permutation_pvalues`). Influence functions, whose cost is
tens of minutes at testbed size, then run once per model rather than once per chain point and
cluster source, which is also what the issue asks of document-level scores: any partition is
re-aggregated without recomputing.

Part of :mod:`rephelpers.testbed.groundtruth` (which re-exports it).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..artifacts import RunDir
from ..errors import require
from ..estimators.aggregate import cluster_phi, permutation_pvalues
from ..estimators.bm25 import bm25_scores
from ..estimators.influence_functions import influence_scores
from ..estimators.items import ability_items
from ..estimators.repsim import repsim_scores
from ..estimators.run import EstimatorInputs, check_estimators, document_scores, documents_artifact
from ..representations.models import load_model
from ..runner.results import SHARED
from .chain import chain_documents

PHI_COLUMNS = ("cluster", "ability", "phi", "estimator", "setting", "flagged", "p_value", "p_adjusted")
COST_COLUMNS = ("setting", "seconds", "peak_rss_mb")
# The scorer behind each estimator (estimators.run's wrappers call them): its keyword-only parameters are the
# options a user may set, less those the wrapper passes itself.
_SCORERS = {"repsim": repsim_scores, "bm25": bm25_scores, "influence_functions": influence_scores}
_SET_BY_WRAPPER = {"influence_functions": {"labels", "seed"}}


def estimator_option_names(name: str) -> set[str]:
    """The options ``estimator_options[name]`` may hold: the keyword-only parameters of its scorer."""
    params = inspect.signature(_SCORERS[name]).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - _SET_BY_WRAPPER.get(name, set())


def chain_stage_dir(chain_dir: str | Path) -> RunDir:
    """The run directory stages 01–02 of a chain wrote into: ``_shared/`` for a sweep, else the chain's own."""
    shared = Path(chain_dir) / SHARED
    return RunDir(shared if (shared / "documents.parquet").exists() else chain_dir)


def check_field_estimators(
    names: Sequence[str],
    dose_names: Sequence[str] | None,
    options: Mapping[str, Any] | None,
    chain_parameters: Mapping[str, Any],
) -> list[str]:
    """Notebook 07's estimator parameters, checked before any fine-tune: known and installed names,
    the dose estimators among them, options only for estimators that run and only names their
    scorer takes (a misspelt option fails here, not after the fine-tunes), and a chain whose
    stage 06 runs perturbation alone (the others are scored here once per model; the chain
    would compute them again per point). Returns ``names`` without ``perturbation``."""
    names = [n for n in check_estimators(names) if n != "perturbation"] if len(names) else []
    extra = sorted(set(dose_names or []) - set(names))
    require(not extra, f"dose_estimators {extra} are not among estimators {names}: add them there or drop them")
    unknown = sorted(set(options or {}) - set(names))
    require(not unknown, f"estimator_options for {unknown}, which are not among estimators {names}: remove them "
                         "or add the estimator")
    for name, given in (options or {}).items():
        allowed = estimator_option_names(name)
        wrong = sorted(set(given or {}) - allowed)
        require(not wrong, f"estimator_options[{name!r}] has {wrong}, which {name} does not take; its options are "
                           f"{sorted(allowed)}")
    chain_names = chain_parameters.get("estimators")
    require(chain_names is not None and list(chain_names) == ["perturbation"],
            f"chain_parameters['estimators'] is {chain_names!r}: set it to ['perturbation'], so that the chain's stage 06 "
            "runs perturbation alone; the testbed scores the other estimators once per model (notebook 07's "
            "estimators parameter) instead of once per chain point")
    return names


def field_estimator_phi(
    chains: Mapping[str, tuple[Any, str | Path]],
    names: Sequence[str],
    tasks: Mapping[str, Any],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    n_permutations: int = 999,
    correction: str = "bh",
    alpha: float = 0.05,
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Φ of every document-scored estimator in ``names``, per cluster source of ``chains``.

    ``chains`` maps a cluster source (``discovered``, ``oracle``) to ``(specs, chain_dir)`` as
    :func:`~rephelpers.testbed.chain.run_chain` returns them, all on the same model and corpus
    (the first chain's model is the one scored). ``tasks`` are the testbed's ability tasks
    (:func:`rephelpers.abilities.suite.build_tasks`), ``options`` each estimator's keyword options
    (``{"influence_functions": {"strategy": "kfac"}}``). Returns ``{source: (phi, cost)}``: ``phi``
    with :data:`PHI_COLUMNS` (``setting`` = the estimator's name; ``flagged`` = ``p_adjusted <
    alpha``, the estimator claims the cell), ``cost`` with :data:`COST_COLUMNS` (the scoring run's
    wall time and peak memory, model load included; the same for every source, since the scores
    are computed once). ``perturbation`` in ``names`` is skipped: its Φ comes per chain point.
    """
    names = [n for n in check_estimators(names) if n != "perturbation"]
    empty = (pd.DataFrame(columns=list(PHI_COLUMNS)), pd.DataFrame(columns=list(COST_COLUMNS)))
    require(len(chains) > 0, "field_estimator_phi: no chain given")
    if not names:
        return {source: empty for source in chains}
    specs, first_dir = next(iter(chains.values()))
    spec = specs[0] if isinstance(specs, (list, tuple)) else specs
    run = chain_stage_dir(first_dir)
    documents = run.load_parquet("documents.parquet", stage="notebook 01_corpus_clusters of the chain")
    model_name = str(spec.parameters["model_name"])
    labels = documents.set_index(documents["id"].astype(str))["cluster"]
    inputs = EstimatorInputs(run, documents, pd.DataFrame(), labels, lambda: load_model(model_name),
                             params={k: dict(v or {}) for k, v in (options or {}).items()}, seed=seed)
    # a chat ability's items carry the model's chat template, as stage 05 scored them
    inputs.items = ability_items(tasks, tokenizer=inputs.model().tokenizer if any(t.chat for t in tasks.values()) else None)
    unknown = sorted(set(inputs.params) - set(names))
    require(not unknown, f"estimator options for {unknown}, which are not among the estimators run ({names}); "
                         "remove them or add the estimator")
    scores = {n: document_scores(n, inputs) for n in names}
    metas = {n: run.meta_of(documents_artifact(n)) for n in names}  # one manifest read per estimator
    cost = pd.DataFrame([{"setting": n, **{k: metas[n].get(k) for k in COST_COLUMNS[1:]}} for n in names],
                        columns=list(COST_COLUMNS))
    ids = set(labels.index)
    out = {}
    for source, (source_specs, chain_dir) in chains.items():
        docs = chain_documents(chain_dir, source_specs)
        source_labels = docs.set_index(docs["id"].astype(str))["cluster"]
        require(set(source_labels.index) == ids,
                f"the {source} chain chunked the corpus into other documents than the first chain "
                f"({len(set(source_labels.index) ^ ids)} ids differ): their document scores cannot be shared; "
                "give every chain the same max_tokens and corpus")
        frames = []
        for name in names:
            part = cluster_phi(scores[name], source_labels, name)
            tests = permutation_pvalues(scores[name], source_labels, n_permutations=n_permutations, seed=seed,
                                        correction=correction)
            frames.append(part.merge(tests[["cluster", "ability", "p_value", "p_adjusted"]], on=["cluster", "ability"],
                                     how="left"))
        phi = pd.concat(frames, ignore_index=True)
        phi["setting"] = phi["estimator"]
        phi["flagged"] = phi["p_adjusted"].astype(float) < alpha
        out[source] = (phi[list(PHI_COLUMNS)].reset_index(drop=True), cost.copy())
    return out
