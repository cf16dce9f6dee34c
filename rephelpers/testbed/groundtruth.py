"""Known answers: score the workbench's Φ against leave-cluster-out fine-tuning (notebook 07).

This module gathers the testbed's parts under one name (``gt.<name>`` in notebook 07 and the
tests), each in a module of one job: :mod:`.corpus` (the corpus and fine-tuning inputs),
:mod:`.phistar` (Φ* and the dose curve), :mod:`.chain` (the chain on ``f_all`` and its Φ per
setting), :mod:`.agreement` (discovered → planted clusters, ρ, diagonal recovery, the one
agreement table, the summary), :mod:`.field_estimators` (RepSim, BM25 and influence functions
scored once per model, Φ per cluster source) and :mod:`.power` (the design's power).

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

from .corpus import (
    REST, testbed_corpus, write_corpus, save_corpus, CORPUS_FILE, item_overlaps, training_blocks, check_abilities,
)
from .phistar import (
    variant_name, DROP, drop_share, leave_out_scores, f_all_weights, weight_change, score_table,
    phi_star, dose_curve,
)
from .chain import (
    CHAIN_NOTEBOOKS, chain_spec, chain_grids, run_chain, chain_documents, SETTING_KEYS,
    chain_influence, intervention_layers, scoring_name, with_setting,
)
from .agreement import (
    SPLIT_RECALL, map_clusters, clustering_misses, spearman, spearman_ci, SCORES, agreement_cells,
    diagonal_recovery, diagonal_argmax, setting_agreement, AGREEMENT_COLUMNS, CLUSTER_SOURCES,
    chain_phi_long, chain_cost, chain_estimator_phi, estimator_agreement, dose_phi,
    combine_agreement, best_by, agreement_summary, headline, agreement_headline, AGREEMENT_ARTIFACTS,
    save_agreement,
)
from .field_estimators import (
    chain_stage_dir, check_field_estimators, field_estimator_phi,
)
from .power import (
    rho_interval_width, detectable_phi,
)

__all__ = [
    "REST", "testbed_corpus", "write_corpus", "save_corpus", "CORPUS_FILE", "item_overlaps", "training_blocks", "check_abilities",
    "variant_name", "DROP", "drop_share", "leave_out_scores", "f_all_weights", "weight_change",
    "score_table", "phi_star", "dose_curve", "CHAIN_NOTEBOOKS", "chain_spec", "chain_grids",
    "run_chain", "chain_documents", "SETTING_KEYS", "chain_influence", "intervention_layers",
    "scoring_name", "with_setting", "SPLIT_RECALL", "map_clusters", "clustering_misses", "spearman",
    "spearman_ci", "SCORES", "agreement_cells", "diagonal_recovery", "diagonal_argmax",
    "setting_agreement", "AGREEMENT_COLUMNS", "CLUSTER_SOURCES", "chain_phi_long", "chain_cost",
    "chain_estimator_phi", "estimator_agreement", "dose_phi", "combine_agreement", "best_by",
    "agreement_summary", "headline", "agreement_headline", "rho_interval_width", "detectable_phi",
    "AGREEMENT_ARTIFACTS", "save_agreement", "chain_stage_dir", "check_field_estimators",
    "field_estimator_phi",
]
