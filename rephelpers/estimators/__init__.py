"""Estimators of the Data Influence Matrix Φ(C, a) beside perturbation (issue 26).

Between stage 05 (``abilities/``) and stage 06 (``influence/``) in the import order: this
package may import ``corpus``, ``representations`` and ``abilities``; ``influence``,
``testbed`` and ``views`` may import it.

Every estimator but perturbation scores each (document, ability item) pair — a
*document-level score*, positive when the document helps the item — kept in the run
directory (``estimators/<name>_documents.parquet``), and turns it into one Φ per cluster
and ability with :func:`rephelpers.estimators.aggregate.cluster_phi`
(``Φ(C, a) = n_C · (mean_C − mean_rest)``), so any partition of the documents (stage 01's
clusters, the testbed's planted sets, merged clusters) is re-aggregated without
recomputing.

What each estimator's numbers support:

- ``perturbation`` (stage 04-06): item-level counterfactuals, matched random controls,
  paired tests and intervals (``influence.parquet``); its Φ is AIS averaged over Θ.
- ``repsim`` (cosine between an item's and a document's pooled hidden states) and ``bm25``
  (a text-only floor): rank evidence only. Their Φ has no causal scale; read it through
  its rank agreement with the other estimators and the permutation test over documents
  (:func:`rephelpers.estimators.aggregate.permutation_pvalues`).
- ``influence_functions`` (kronfluence, EK-FAC; :mod:`.influence_functions`): first-order estimates of
  the change in the gold answer's loss, additive over documents; rank agreement and the
  permutation test as well.

Modules: :mod:`.items` (the ability items as the model saw them), :mod:`.aggregate`
(cluster Φ, permutation test, rank agreement), :mod:`.bm25`, :mod:`.repsim`, :mod:`.influence_functions`, :mod:`.run`
(the registry and the stage-06 driver), :mod:`.calibration` (the permutation test on
simulated nulls and planted effects).
"""

ESTIMATORS = ("perturbation", "repsim", "bm25", "influence_functions")
"""Every estimator name a user may ask for (``estimators`` parameter of notebook 06)."""
