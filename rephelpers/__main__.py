"""Command line: ``python -m rephelpers run papermill_params/demo.yaml``.

Subcommands:
  run PARAMS.yaml    execute the notebook chain (or a sweep) with papermill into runs/<name>/
  prepare            build the embedded model's cached copy (done automatically on first use)
  collect RUN_DIR    gather a sweep's per-point results into RUN_DIR/results.parquet
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(prog="rephelpers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the notebook chain or a sweep")
    run.add_argument("params", help="papermill_params/<name>.yaml")
    run.add_argument("--runs-root", default=None, help="where run directories go (default: <project>/runs)")
    run.add_argument("--jobs", type=int, default=1,
                     help="sweep points run in parallel (threads, or the local dask cluster's workers)")
    run.add_argument("--engine", choices=["local", "dask"], default="local",
                     help="where points run: local threads, or dask.distributed tasks (README: sweeps on a cluster)")
    run.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="with --engine dask: an existing scheduler (tcp://host:8786) instead of a local cluster")
    run.add_argument("--force", action="store_true", help="re-run points already done")
    run.add_argument("--log", action="store_true", help="stream notebook output")
    run.add_argument("--cell-timeout", type=float, default=None, metavar="S",
                     help="seconds one cell may keep the kernel busy (default 7200; 0 = no limit)")
    run.add_argument("--start-timeout", type=float, default=None, metavar="S",
                     help="seconds a kernel may take to start (default 120)")
    run.add_argument("--stall-timeout", type=float, default=None, metavar="S",
                     help="seconds the kernel may sit idle while papermill has not moved on before the "
                          "notebook counts as stalled and is retried once (default 60)")
    sub.add_parser("prepare", help="convert the embedded model into the cache")
    col = sub.add_parser("collect", help="collect a sweep's results")
    col.add_argument("run_dir")
    par = sub.add_parser("parameterize", help="write copies of the notebooks with a parameter file injected")
    par.add_argument("params")
    par.add_argument("--out", required=True, help="folder for the parameterised notebooks (emptied first)")
    par.add_argument("--run-dir", required=True, help="run_dir the copies will write into (emptied first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from .errors import RephelpersError

    try:
        if args.command == "prepare":
            from .representations.models import load_model

            model = load_model()
            print(f"[rephelpers] {model.name}: {model.n_layers} layers, d_model={model.d_model}, ready")
        elif args.command == "parameterize":
            from .runner import RunSpec, parameterize_chain

            spec = RunSpec.from_yaml(args.params)
            paths = parameterize_chain(spec, args.out, args.run_dir)
            print(f"[rephelpers] {len(paths)} notebooks with {args.params} -> {args.out}")
        elif args.command == "collect":
            from .runner import collect

            table = collect(args.run_dir)
            print(f"[rephelpers] {len(table)} rows -> {Path(args.run_dir) / 'results.parquet'}")
        else:
            from .runner import RunInterrupted, RunSpec, run_spec

            started = time.time()
            spec = RunSpec.from_yaml(args.params)
            limits = spec.execution.with_overrides(
                "command line", cell_timeout=args.cell_timeout, start_timeout=args.start_timeout,
                stall_timeout=args.stall_timeout,
            )
            try:
                top = run_spec(spec, runs_root=args.runs_root, jobs=args.jobs, log_output=args.log,
                               force=args.force, limits=limits, engine=args.engine, scheduler=args.scheduler)
            except RunInterrupted as err:
                print(f"rephelpers: {err}", file=sys.stderr)
                return 128 + err.signum
            peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
            print(f"[rephelpers] {spec.name}: finished in {time.time() - started:.0f}s "
                  f"(peak kernel memory {peak_gb:.1f} GB)")
            print(f"[rephelpers] results: {top}")
            for name in ("influence.parquet", "report.html", "charts"):
                if (top / name).exists():
                    print(f"[rephelpers]   {top / name}")
    except RephelpersError as err:
        print(f"rephelpers: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
