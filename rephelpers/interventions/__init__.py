"""Edits of the hidden state and how they are placed in the forward pass: what stages 03-05 share.

- :mod:`.edits`: one small frozen, serialisable class per perturbation method (ablate,
  noise, shift, project, LEACE, gradient), ``apply(h)`` with its formula;
- :mod:`.intervene`: :class:`~.intervene.Intervention` (an edit at a layer, component and
  token positions) placed in the forward pass through nnsight, and the readouts stages 03,
  04 and 05 take from it (NLL, a masked LM's pseudo-NLL, pooled states);
- :mod:`.tokenkeys`: per-token noise keys, so a noise edit is the same on the same text
  whatever the batch.

It sits below the stages: stage 03 fits an eraser and ablates dimensions for causal
mediation, stage 04 checks specificity, stage 05 measures abilities, all with these.
"""
