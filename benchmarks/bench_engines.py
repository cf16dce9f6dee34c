"""The same sweep three ways: local runner ``--jobs 1``, local runner ``--jobs 2``, dask engine ``--jobs 2``.

Issue 12 asks for a 2-point sweep with ``--jobs 1`` against ``--jobs 2`` (parallel jobs share
the cores instead of each taking all of them); issue 13 for the sweep on the dask engine
against the local runner, same points. One sweep file serves both: ``papermill_params/ci.yaml``'s
parameters with a grid over ``intervention_layer`` (default ``3 15``), so stages 01-03 run once
and 04-06 per point. Each variant runs into its own runs root with its own activation cache,
so all three do the same work; the table gives the wall time of the shared stages, of the
points, and of the whole sweep, each against ``--jobs 1`` of the same run, and checks that
the three give identical Φ tables. Run it alone on a quiet machine:

    python benchmarks/bench_engines.py [--grid 3 15] [--out /tmp/bench_engines]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rephelpers.runner import SHARED, STATUS, RunSpec, notebook_parameters, run_spec  # noqa: E402

CHAIN = ["01_corpus_clusters", "02_representations", "03_cluster_dimensions", "04_perturbations",
         "05_capability_impact", "06_influence_matrix"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", type=int, nargs="+", default=[3, 15], help="intervention layers (the points)")
    parser.add_argument("--out", default="/tmp/bench_engines")
    parser.add_argument("--variants", nargs="+", default=["local1", "local2", "dask2"])
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ci = yaml.safe_load((ROOT / "papermill_params" / "ci.yaml").read_text())
    path = out / "bench_engines.yaml"
    # ci.yaml also holds notebook 07's parameters; the runner rejects a name no notebook of the chain reads.
    chain_names = set().union(*(notebook_parameters(n) for n in CHAIN))
    parameters = {k: v for k, v in ci["parameters"].items() if k in chain_names}
    path.write_text(yaml.safe_dump({"name": "bench_engines", "parameters": parameters, "notebooks": CHAIN,
                                    "grid": {"intervention_layer": args.grid}}))
    spec = RunSpec.from_yaml(path)
    variants = {"local1": ("local", 1), "local2": ("local", 2), "dask2": ("dask", 2)}
    rows, tables = [], {}
    for name in args.variants:
        engine, jobs = variants[name]
        os.environ["REPHELPERS_CACHE"] = str(out / f"cache_{name}")  # a cold activation cache for each
        started = time.time()
        top = run_spec(spec, runs_root=out / name, jobs=jobs, engine=engine, log_output=True)
        wall = time.time() - started
        shared = json.loads((top / SHARED / STATUS).read_text())
        points = [json.loads(s.read_text()) for s in top.glob(f"*/{STATUS}") if s.parent.name != SHARED]
        ended = max(p["ended"] for p in points)
        rows.append({"variant": f"{engine} --jobs {jobs}", "shared 01-03 s": shared["seconds"],
                     "points 04-06 s": round(ended - shared["ended"], 1),
                     "each point s": " / ".join(f"{p['seconds']:.0f}" for p in sorted(points, key=lambda p: str(p["point"]))),
                     "sweep s": round(wall, 1)})
        tables[name] = pd.read_parquet(top / "results.parquet").sort_values(["point", "cluster", "ability"]).reset_index(drop=True)
    table = pd.DataFrame(rows)
    first = table.iloc[0]
    table["points vs first"] = (table["points 04-06 s"] / first["points 04-06 s"]).round(2)
    table["sweep vs first"] = (table["sweep s"] / first["sweep s"]).round(2)
    print(table.to_string(index=False))
    reference = tables[args.variants[0]]
    for name, other in tables.items():
        same = other.equals(reference)
        print(f"{name}: Φ table {'identical to' if same else 'DIFFERENT from'} {args.variants[0]}'s "
              f"({len(other)} rows)")


if __name__ == "__main__":
    main()
