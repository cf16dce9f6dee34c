"""The README's main job, timed per stage: this checkout against a baseline revision, same run.

Runs a parameter file's chain (default ``papermill_params/demo.yaml``, notebooks 01-06) with a
cold cache (activations, embeddings; only the converted model is shared, which is setup, not the
chain), first at ``--baseline`` (a git revision, checked out into a temporary worktree) and then
at this checkout, each in its own process. Prints, per notebook, the wall time of each and their
ratio, the kernels' peak resident memory (from ``status.json``; the baseline's runner may not
record it), the whole chain's wall time and peak RSS, and whether the two influence tables agree
(Φ and every verdict, numeric columns to 1e-9). Run it alone on a quiet machine: each chain takes
tens of minutes on 2 cores.

    python benchmarks/bench_demo.py --baseline 3071de0                 # the demo, before vs now
    python benchmarks/bench_demo.py --spec papermill_params/ci.yaml    # this checkout only, CI size

Each chain reads the parameter file at ``--spec`` inside its own source tree: the baseline runs its
own demo (its revision's ``demo.yaml``), this checkout runs today's. ``--only baseline --json F``
times the baseline alone and saves it; ``--baseline-from F`` then times this checkout against that
saved baseline (the printout says it was measured in an earlier invocation; same machine, quiet).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
DONE = re.compile(r"\] [^:]+: (\d\d_\w+) done in (\d+)s")
# Runs a command and writes the peak resident memory (KiB) of its largest process, the
# notebooks' kernels included (each is waited for by its parent, so its usage counts here).
MEASURED = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(code)")


def user_cache() -> Path:
    override = os.environ.get("REPHELPERS_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rephelpers"


def run_chain(source: Path, spec: Path, out: Path, label: str) -> dict:
    """Run ``spec`` with the code in ``source`` into ``out/label``; wall time, stages, peak RSS."""
    cache = out / f"cache_{label}"
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(user_cache() / "models")  # the converted model is setup, shared
    env = {**os.environ, "REPHELPERS_CACHE": str(cache), "PYTHONPATH": str(source),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    runs = out / f"runs_{label}"
    log = out / f"{label}.log"
    peak_file = out / f"{label}.peak_kib"
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", MEASURED, str(peak_file), sys.executable, "-m", "rephelpers", "run",
                               str(spec), "--runs-root", str(runs)],
                              cwd=source, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - started
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{label}: the chain failed (exit {proc.returncode}); see {log}")
    name = yaml.safe_load(spec.read_text())["name"]
    status = json.loads((runs / name / "status.json").read_text())
    stages = {m.group(1): {"seconds": float(m.group(2))} for m in DONE.finditer(text)}
    for stage, record in (status.get("stages") or {}).items():
        stages[stage] = record
    return {"wall": wall, "stages": stages, "run": runs / name, "peak_mb": round(int(peak_file.read_text()) / 1024)}


def compare_influence(a: Path, b: Path) -> str:
    x, y = (pd.read_parquet(p / "influence.parquet") for p in (a, b))
    if x.shape != y.shape or list(x.columns) != list(y.columns):
        return f"different shapes/columns: {x.shape} vs {y.shape}"
    numeric = [c for c in x.columns if pd.api.types.is_numeric_dtype(x[c]) and not pd.api.types.is_bool_dtype(x[c])]
    diff = max((np.nanmax(np.abs(x[c].to_numpy(float) - y[c].to_numpy(float))) for c in numeric
                if x[c].notna().any()), default=0.0)
    nan_same = all((x[c].isna() == y[c].isna()).all() for c in numeric)
    other = [c for c in x.columns if c not in numeric]
    same_text = all((x[c].astype(str) == y[c].astype(str)).all() for c in other)
    return (f"numeric columns: largest |difference| {diff:.2e}, same missing cells {nan_same}; "
            f"text/flag columns (verdicts among them) identical {same_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="papermill_params/demo.yaml")
    parser.add_argument("--baseline", help="git revision to time first (omit: this checkout only)")
    parser.add_argument("--out", default="/tmp/bench_demo")
    parser.add_argument("--only", choices=["baseline"], help="time the baseline only (save it with --json)")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--baseline-from", help="a --json file of an earlier --only baseline invocation")
    args = parser.parse_args()
    if args.only and not args.baseline:
        raise SystemExit("--only baseline needs --baseline REVISION")
    if args.baseline and args.baseline_from:
        raise SystemExit("give --baseline (time it now) or --baseline-from (reuse a saved one), not both")

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    results = {}
    if args.baseline_from:
        saved = json.loads(Path(args.baseline_from).read_text())["baseline"]
        results["baseline"] = {**saved, "run": Path(saved["run"])}
        args.baseline = saved.get("revision", "saved")
        print(f"baseline: {args.baseline}, measured by an earlier invocation ({args.baseline_from})")
    elif args.baseline:
        source = out / "baseline_src"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(source), args.baseline], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            results["baseline"] = run_chain(source, (source / args.spec).resolve(), out, "baseline")
            results["baseline"]["revision"] = args.baseline
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(source)], check=False)
    if args.only != "baseline":
        results["now"] = run_chain(ROOT, (ROOT / args.spec).resolve(), out, "now")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.only == "baseline":
        print(json.dumps({k: v for k, v in results["baseline"].items() if k != "run"}, indent=2, default=str))
        return

    names = list(results)
    stages = sorted({s for r in results.values() for s in r["stages"]})
    print(f"\n{args.spec}, cold cache, {os.cpu_count()} cores" + (f"; baseline {args.baseline}" if args.baseline else ""))
    header = "stage".ljust(24) + "".join(f"{n + ' s':>14}{n + ' peak GB':>18}" for n in names)
    print(header + ("   ratio now/baseline" if args.baseline else ""))
    for stage in stages:
        line = stage.ljust(24)
        for n in names:
            rec = results[n]["stages"].get(stage, {})
            peak = rec.get("peak_rss_mb")
            line += f"{rec.get('seconds', float('nan')):14.0f}{(peak / 1024 if peak else float('nan')):18.2f}"
        if args.baseline:
            b = results["baseline"]["stages"].get(stage, {}).get("seconds")
            line += f"   {results['now']['stages'][stage]['seconds'] / b:.2f}" if b else ""
        print(line)
    line = "whole chain (wall)".ljust(24)
    for n in names:
        peak = results[n]["peak_mb"]
        line += f"{results[n]['wall']:14.0f}{(peak / 1024 if peak else float('nan')):18.2f}"
    if args.baseline:
        line += f"   {results['now']['wall'] / results['baseline']['wall']:.2f}"
    print(line)
    if args.baseline:
        print("influence.parquet, now vs baseline:", compare_influence(results["baseline"]["run"], results["now"]["run"]))


if __name__ == "__main__":
    main()
