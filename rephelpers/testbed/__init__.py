"""Notebook ``07_ground_truth``: the known-answer testbed.

- :mod:`.planted`: planted skills (documents and ability items);
- :mod:`.finetune`: leave-cluster-out fine-tuning;
- :mod:`.groundtruth`: Φ* from the fine-tunes, held against the chain's Φ; it re-exports
  :mod:`.corpus` (the testbed corpus, fine-tuning inputs), :mod:`.phistar` (Φ*, the dose curve),
  :mod:`.chain` (the chain on ``f_all``), :mod:`.agreement` (Φ against Φ*) and :mod:`.power`.
"""
