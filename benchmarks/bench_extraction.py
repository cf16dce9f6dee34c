"""Extraction throughput: nnsight trace vs a raw HF forward on the same batch.

Both paths read the same layers' residual stream for the same 16 × 128-token batch:
nnsight saves the decoder-layer outputs inside one trace; the baseline runs
``model.hf(**batch, output_hidden_states=True)``. Reports tokens/s for each and the
ratio nnsight / raw (1.0 = no overhead). Run by hand:

    python benchmarks/bench_extraction.py [--batch 16] [--tokens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rephelpers.corpus.demo import build_builtin_corpus  # noqa: E402
from rephelpers.representations.models import load_model, output_tensor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15, 21, 27])
    args = parser.parse_args()

    model = load_model()
    docs = build_builtin_corpus(docs_per_domain=20, seed=0)
    texts = docs.text.tolist()[: args.batch]
    batch = model.encode(texts, max_length=args.tokens)
    n_tokens = int(batch["attention_mask"].sum())

    def nnsight_pass() -> None:
        saved = {}
        with torch.inference_mode():
            with model.nn.trace(dict(batch)):
                for l in args.layers:
                    saved[l] = output_tensor(model.envoy(l).output).save()

    def raw_pass() -> None:
        with torch.inference_mode():
            out = model.hf(**batch, output_hidden_states=True)
            _ = [out.hidden_states[l + 1] for l in args.layers]

    timings: dict[str, list[float]] = {"nnsight": [], "raw_hf": []}
    nnsight_pass(), raw_pass()  # warm-up
    for _ in range(args.repeats):  # interleaved so both see the same machine state
        for name, fn in (("nnsight", nnsight_pass), ("raw_hf", raw_pass)):
            started = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - started)
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(f"batch {len(texts)} docs, {n_tokens} real tokens (padded to {batch['input_ids'].shape[1]}), "
          f"{len(args.layers)} layers, torch threads {torch.get_num_threads()}")
    for name, seconds in med.items():
        print(f"{name:8s} median {seconds * 1000:8.1f} ms  {n_tokens / seconds:8.0f} tokens/s")
    print(f"ratio nnsight/raw throughput: {med['raw_hf'] / med['nnsight']:.3f}")


if __name__ == "__main__":
    main()
