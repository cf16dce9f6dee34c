"""Stage 04 (notebook ``04_perturbations``): perturbing a cluster's components in the forward pass.

- :mod:`.kinds`: one class per perturbation kind and the ``KINDS`` registry (how each is
  built from a cluster's components and how its size-matched control is drawn);
- :mod:`.intervene`: applying perturbations inside the model (nnsight / torch hooks);
- :mod:`.tokenkeys`: per-token random draws that do not depend on the batch;
- :mod:`.specificity`: perplexity on the cluster vs the rest, against controls;
- :mod:`.similarity`: CKA and attention divergence between original and perturbed passes.
"""
