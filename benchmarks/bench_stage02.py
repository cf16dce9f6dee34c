"""Stage 02 against the raw decoder forward over the same texts (issue 12's ≥ 0.9× target).

Both paths read the same texts (the demo's chunks: the builtin corpus, 60 documents per
domain, chunked to 128 tokens; ``--n`` of them), in batches of ``--batch`` sorted longest
first, at most 128 tokens each:

- **raw**: ``model.hf.model(**batch)`` (the decoder stack, every layer, no output head),
  nothing kept: the floor the issue names;
- **stage 02**: ``extract_activations`` as notebook 02 calls it (the demo's layers, mean
  pooling without the first token, token statistics), the activation cache off.

Prints tokens/s of each and the ratio stage 02 / raw (1.0 = as fast as the bare forward),
best of ``--repeats``, with the peak RSS. Run alone on a quiet machine:

    python benchmarks/bench_stage02.py [--n 200] [--batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rephelpers.representations.activations import extract_activations  # noqa: E402
from rephelpers.corpus.loaders import chunk_documents, load_corpus  # noqa: E402
from rephelpers.representations.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200, help="texts (the demo has 675)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15, 21, 27])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = load_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chunks = chunk_documents(load_corpus("builtin", docs_per_domain=60, seed=0), model.tokenizer, args.tokens)
    texts = chunks["text"].tolist()[: args.n]
    lengths = [len(model.tokenizer(t)["input_ids"][: args.tokens]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    n_tokens = sum(lengths)

    def raw() -> None:
        with torch.inference_mode():
            for start in range(0, len(order), args.batch):
                batch = model.encode([texts[i] for i in order[start:start + args.batch]], max_length=args.tokens)
                model.hf.model(**batch)

    def stage02() -> None:
        extract_activations(model, texts, args.layers, batch_size=args.batch, max_length=args.tokens,
                            progress=False, use_cache=False, skip_first=1, return_stats=True)

    raw()  # warm-up: first-call allocations, thread pools
    best = {}
    for name, fn in (("raw decoder forward", raw), ("stage 02 (extract_activations)", stage02)):
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        best[name] = min(times)
        print(f"{name:32s} {min(times):7.1f} s  {n_tokens / min(times):7.0f} tokens/s  (runs: {', '.join(f'{t:.1f}' for t in times)})")
    raw_rate = n_tokens / best["raw decoder forward"]
    ours = n_tokens / best["stage 02 (extract_activations)"]
    print(f"{len(texts)} texts, {n_tokens:,} tokens, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"stage 02 / raw throughput: {ours / raw_rate:.2f}x (target >= 0.9)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB")


if __name__ == "__main__":
    main()
