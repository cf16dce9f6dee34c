"""Notebook ``07_ground_truth``: the known-answer testbed.

- :mod:`.planted`: planted skills (documents and ability items);
- :mod:`.finetune`: leave-cluster-out fine-tuning;
- :mod:`.groundtruth`: Φ* from the fine-tunes, held against the chain's Φ.
"""
