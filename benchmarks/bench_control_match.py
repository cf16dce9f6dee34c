"""Edit size of matched controls vs their perturbation on the demo model (issue 9).

R_k and V_k come from the package's stage-03 code (raw S(i,k), top-32, rank 4) on a tiny
labelled set of two kinds of text (arithmetic sentences vs prose); the edit
``‖ĥ_t − h_t‖`` is measured independently of the package's edit-norm code: a plain torch
forward hook on the decoder layer reads ``h``, and the perturbation's ``apply`` gives
``ĥ``. Printed: per kind, the target's mean edit, each control draw's, and the ratio
control / target (1 = matched), for controls drawn without and with the layer's
token-level spectrum.

    python benchmarks/bench_control_match.py                 # layer 15, 8 draws
    python benchmarks/bench_control_match.py --layer 8 --draws 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rephelpers.perturbations import kinds as P
from rephelpers.dimensions.association import cluster_subspace, mean_difference_scores, select_dimensions
from rephelpers.representations.models import load_model

KINDS = ("ablate", "mean_ablate", "noise", "project")
ARITH = [f"{a} plus {b} equals {a + b}, and {a} times {b} is {a * b}." for a, b in
         [(2, 3), (7, 5), (11, 4), (6, 9), (8, 8), (3, 12), (10, 1), (4, 7), (9, 2), (5, 5)]]
PROSE = [
    "The river ran quietly past the old mill at the edge of the village.",
    "She opened the window and the cold air of the morning came in.",
    "Birds gathered on the wire before the storm rolled over the hills.",
    "He read the letter twice and then put it away in the drawer.",
    "The market was busy with farmers and traders selling their goods.",
    "Snow covered the hills for most of the winter that year.",
    "They walked home slowly along the dark road under the stars.",
    "The old dog slept by the fire while the rain fell outside.",
    "A small boat drifted across the lake in the evening light.",
    "The children laughed as they ran through the tall summer grass.",
]


def hidden_states(model, texts, layer, max_length=32):
    """Token states at the output of decoder ``layer`` and the real-token mask, via a torch hook."""
    batch = model.encode(texts, max_length=max_length)
    seen = {}

    def hook(_module, _inputs, output):
        seen["h"] = (output[0] if isinstance(output, tuple) else output).detach().float()

    handle = model.module(layer).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model.hf(**batch)
    finally:
        handle.remove()
    return seen["h"], batch["attention_mask"].bool()


def edit(perturbation, h, mask):
    return float((perturbation.apply(h) - h).norm(dim=-1)[mask].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--skip-first", action="store_true", help="mean-pool without the first token")
    parser.add_argument("--keep-massive", action="store_true", help="let massive dimensions into R_k")
    args = parser.parse_args()

    model = load_model()
    texts = ARITH + PROSE
    labels = np.array([0] * len(ARITH) + [1] * len(PROSE))
    split = np.array(["train"] * len(texts))
    h, mask = hidden_states(model, texts, args.layer)
    kept = mask.clone()
    if args.skip_first:  # pool without each text's first token (the attention sink), as stage 02's token stats do
        kept[torch.arange(len(texts)), mask.float().argmax(1)] = False
    pooled = ((h * kept[..., None]).sum(1) / kept.sum(1, keepdim=True)).numpy()
    states = h[mask].double().numpy()
    has_spectrum = hasattr(P, "second_moment_spectrum")
    spectrum = P.second_moment_spectrum(states) if has_spectrum else None
    # massive dimensions (max_t |h_ti| / median_j |h_tj| > 100) stay out of R_k, as stage 03 does by default
    ratio = (np.abs(states) / np.median(np.abs(states), axis=1, keepdims=True)).max(0)
    massive = np.flatnonzero(ratio > 100) if not args.keep_massive else np.zeros(0, dtype=int)
    candidates = np.setdiff1d(np.arange(model.d_model), massive)
    scores = mean_difference_scores(pooled, labels)
    subspaces = [{
        "layer": args.layer, "cluster": k, "massive_dims": massive.tolist(), "std": pooled.std(0).tolist(),
        "dims": candidates[select_dimensions(scores[k][candidates], top_k=args.top_k)].tolist(),
        **cluster_subspace(pooled, labels, k, 4),
    } for k in (0, 1)]
    print(f"massive dims {np.flatnonzero(ratio > 100).tolist()} ({'kept in' if args.keep_massive else 'left out of'} R_k)")
    variants = [("no spectrum", {})] + ([("with spectrum", {"spectrum": spectrum})] if has_spectrum else [])
    t0 = time.perf_counter()
    print(f"layer {args.layer}, {len(texts)} texts, {int(mask.sum())} tokens, top_k={args.top_k}, {args.draws} draws")
    for subspace in subspaces:
        for kind in KINDS:
            target = P.build(kind, subspace)
            e_t = edit(target, h, mask)
            for name, extra in variants:
                ratios = [edit(c, h, mask) / e_t for c in
                          P.matched_controls(kind, subspace, model.d_model, n_controls=args.draws, **extra)]
                print(f"cluster {subspace['cluster']} {kind:11s} {name:13s} target {e_t:8.3f}  "
                      f"control/target median {np.median(ratios):6.3f}  range [{min(ratios):.3f}, {max(ratios):.3f}]")
    print(f"{time.perf_counter() - t0:.2f} s for the controls and edits")


if __name__ == "__main__":
    main()
