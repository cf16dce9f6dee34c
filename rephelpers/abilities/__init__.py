"""Stage 05 (notebook ``05_capability_impact``): abilities measured under each perturbation.

- :mod:`.suite`: the built-in ability suite (lm-eval tasks built from installed material);
- :mod:`.holdout`: what the suite keeps out of the corpus;
- :mod:`.tasks`: the suite's YAML tables;
- :mod:`.lm_tasks`: lm-eval task plumbing (built-in, registered and user task folders);
- :mod:`.forward`: the forward-pass engine (log-likelihoods, greedy decoding, the
  shared-prefix sweep);
- :mod:`.lm_eval_model`: the lm-eval model adapter (one config or a sweep of them);
- :mod:`.evaluation`: evaluating a set of configs, item by item.
"""
