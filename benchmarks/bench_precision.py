"""fp32 against bfloat16 on this machine's CPU: a fine-tune step and a stage-05 forward.

Prints the CPU's capability as torch dispatches it, whether it does bfloat16 natively, what
``precision="auto"`` resolves to, and, for both precisions (same process, same inputs):

- **fine-tune step**: one step of the testbed's fine-tune as :func:`testbed.finetune.finetune`
  runs it (the top ``--train-layers`` layers of SmolLM2-135M from cached prefix states, the
  tied head, next-token loss, backward, AdamW), ``--batch`` blocks of ``--block`` tokens;
- **stage-05 forward**: the upper 15 of 30 layers and the head over ``--batch`` rows of
  ``--block`` tokens under ``inference_mode``, which is what one config of stage 05's sweep
  runs per batch (bf16 here as autocast; the demo itself keeps fp32 weights).

Each figure is the median of ``--repeats`` timed runs after a warm-up. ``--emulate-avx2`` runs
the same measurement again in a child process whose torch, oneDNN and MKL kernels are turned
down to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, ``DNNL_MAX_CPU_ISA=AVX2``,
``MKL_ENABLE_INSTRUCTIONS=AVX2``): what an AVX2-only CPU of the same speed would do.

    python benchmarks/bench_precision.py [--emulate-avx2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from rephelpers.representations.models import load_model
from rephelpers.testbed import finetune as ft

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def measure(args: argparse.Namespace) -> dict:
    model = load_model("smollm2-135m")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.hf.config.vocab_size, (args.batch, args.block), generator=gen)
    start = ft.first_trained_layer(model, args.train_layers)
    blocks = ft.Blocks(ids, np.array(["x"] * args.batch))
    states = ft.prefix_states(model, blocks, start)
    params = ft.trained_parameters(model, args.train_layers)
    for p in model.hf.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-6)

    def finetune_step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = ft._top_logits(model, states, start)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    half = model.n_layers // 2
    upper = ft.prefix_states(model, blocks, half)

    def stage05_forward(bf16: bool) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ft._top_logits(model, upper, half)

    out = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": ft.native_cpu_bf16(),
        "threads": torch.get_num_threads(),
        "auto_resolves_to": ft.resolve_precision("auto", "cpu"),
        "probe_bf16_speedup": round(ft.probe_bf16_speedup("cpu", torch.get_num_threads()), 3),
        "shape": {"batch": args.batch, "block": args.block, "train_layers": args.train_layers},
    }
    for name, fn in (("finetune_step", finetune_step), ("stage05_forward", stage05_forward)):
        fp32 = _median_seconds(lambda: fn(False), args.repeats)
        bf16 = _median_seconds(lambda: fn(True), args.repeats)
        out[name] = {"fp32_s": round(fp32, 4), "bf16_s": round(bf16, 4), "bf16_over_fp32": round(bf16 / fp32, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--train-layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--emulate-avx2", action="store_true", help="also measure with kernels turned down to AVX2")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = {"native": measure(args)}
    if args.emulate_avx2:
        argv = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--block", str(args.block),
                "--train-layers", str(args.train_layers), "--repeats", str(args.repeats)]
        child = subprocess.run(argv, env={**os.environ, **AVX2_ENV}, capture_output=True, text=True, check=True)
        results["avx2_emulated"] = json.loads(child.stdout.strip().splitlines()[-1])
    for where, r in results.items():
        print(f"{where}: capability {r['cpu_capability']}, native bf16 {r['native_bf16']}, "
              f"auto -> {r['auto_resolves_to']} (probe bf16 speed-up {r['probe_bf16_speedup']}×), {r['threads']} threads")
        for name in ("finetune_step", "stage05_forward"):
            m = r[name]
            print(f"  {name:16s} fp32 {m['fp32_s']:.3f} s   bf16 {m['bf16_s']:.3f} s   bf16/fp32 {m['bf16_over_fp32']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
