"""Is the CI-size Φ table the same as at a baseline revision? (issue 29: a refactor changes no number)

Runs ``papermill_params/ci.yaml``'s chain, notebooks 01-06 only, twice: at ``--baseline`` (a git
revision checked out into a temporary ``git worktree``) and at this checkout. Each side uses its
own revision's ``ci.yaml`` (parameters another issue added since the baseline are not known to the
baseline's notebooks), keeps only the parameters that notebooks 01-06 of that revision declare
(the runner refuses a parameter no notebook of the chain reads), and runs in its own process with
its own cold cache under ``--out`` (only the converted model is shared: ``models`` is a symlink to
the user cache's, as in ``benchmarks/bench_demo.py``) and ``PYTHONPATH`` set to that side's tree.

Then compares the two ``influence.parquet`` with :func:`pandas.testing.assert_frame_equal`
(every column present on both sides; exact by default, ``--rtol`` to loosen), after naming the
columns that exist on one side only. Rows an estimator column adds on one side only (issue 26's
``estimator``) are compared on the estimator both sides have (``perturbation``).

    python benchmarks/check_numbers_unchanged.py --baseline e543f11            # both sides
    python benchmarks/check_numbers_unchanged.py --baseline e543f11 --reuse    # keep a finished baseline

Exit status 0 when the tables agree, 1 when they differ, 2 when a chain failed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rephelpers.paths import cache_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ("01_corpus_clusters", "02_representations", "03_cluster_dimensions", "04_perturbations",
         "05_capability_impact", "06_influence_matrix")


def declared_parameters(source: Path) -> set[str]:
    """The names assigned in the ``parameters`` cells of notebooks 01-06 in ``source``."""
    names: set[str] = set()
    for name in CHAIN:
        nb = nbformat.read(source / "notebooks" / f"{name}.ipynb", as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
                for node in ast.parse(cell.source).body:
                    targets = node.targets if isinstance(node, ast.Assign) else (
                        [node.target] if isinstance(node, ast.AnnAssign) else [])
                    names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def chain_spec(source: Path, out: Path, label: str) -> Path:
    """``source``'s ci.yaml restricted to notebooks 01-06 and the parameters they declare."""
    spec = yaml.safe_load((source / "papermill_params" / "ci.yaml").read_text())
    declared = declared_parameters(source)
    dropped = sorted(set(spec["parameters"]) - declared)
    spec["parameters"] = {k: v for k, v in spec["parameters"].items() if k in declared}
    spec["notebooks"] = list(CHAIN)
    spec["name"] = f"numbers_{label}"
    print(f"{label}: parameters not read by notebooks 01-06, left out: {dropped}", flush=True)
    path = out / f"{label}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_chain(source: Path, out: Path, label: str) -> Path:
    """Run the chain with the code in ``source``; the run directory."""
    cache = out / f"cache_{label}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(cache_dir() / "models")  # the converted model is setup, shared
    env = {**os.environ, "REPHELPERS_CACHE": str(cache), "PYTHONPATH": str(source),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    spec = chain_spec(source, out, label)
    runs = out / f"runs_{label}"
    shutil.rmtree(runs, ignore_errors=True)
    log = out / f"{label}.log"
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "rephelpers", "run", str(spec), "--runs-root", str(runs)],
                              cwd=source, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        print(f"{label}: the chain failed (exit {done.returncode}); see {log}", file=sys.stderr)
        sys.exit(2)
    return runs / f"numbers_{label}"


def compare(baseline: pd.DataFrame, now: pd.DataFrame, rtol: float) -> list[str]:
    """What differs between two influence tables (empty: the same); raises nothing."""
    notes = []
    only_base = [c for c in baseline.columns if c not in now.columns]
    only_now = [c for c in now.columns if c not in baseline.columns]
    if only_base:
        notes.append(f"columns only at the baseline: {only_base}")
    if only_now:
        notes.append(f"columns only now: {only_now}")
    for side, frame in (("now", now), ("baseline", baseline)):
        if "estimator" in frame.columns and "estimator" in (only_now if side == "now" else only_base):
            kept = frame["estimator"] == "perturbation"
            notes.append(f"{side}: compared on its {int(kept.sum())} 'perturbation' rows of {len(frame)}")
            frame.drop(frame.index[~kept], inplace=True)
    common = [c for c in baseline.columns if c in now.columns]
    left, right = baseline[common].reset_index(drop=True), now[common].reset_index(drop=True)
    if left.shape != right.shape:
        return notes + [f"DIFFERENT: {left.shape[0]} rows at the baseline, {right.shape[0]} now"]
    try:
        pd.testing.assert_frame_equal(left, right, check_exact=rtol == 0, rtol=rtol or 1e-5, atol=0)
        return notes + [f"the {len(common)} common columns are identical"]
    except AssertionError:
        pass
    # name every column that differs, not only the first assert_frame_equal meets
    for column in common:
        try:
            pd.testing.assert_series_equal(left[column], right[column], check_exact=rtol == 0, rtol=rtol or 1e-5, atol=0)
        except AssertionError as err:
            first = str(err).strip().splitlines()[-1]
            notes.append(f"DIFFERENT: column {column!r} ({left[column].dtype}): {first}")
    same = [c for c in common if not any(n.startswith(f"DIFFERENT: column {c!r}") for n in notes)]
    notes.append(f"identical: {len(same)} of {len(common)} common columns")
    return notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="e543f11", help="git revision before the change")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "check_numbers_unchanged"))
    parser.add_argument("--reuse", action="store_true", help="keep a finished baseline run of the same revision")
    parser.add_argument("--baseline-only", action="store_true", help="run the baseline side only (then --reuse)")
    parser.add_argument("--compare-only", action="store_true", help="compare the finished runs under --out again")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (0: exact)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.baseline], check=True,
                              capture_output=True, text=True).stdout.strip()
    marker = out / "baseline.json"
    base_run = out / "runs_baseline" / "numbers_baseline"
    if args.compare_only:
        return report(base_run, out / "runs_now" / "numbers_now", revision, args.rtol)
    if not (args.reuse and marker.exists() and json.loads(marker.read_text()).get("revision") == revision
            and (base_run / "influence.parquet").exists()):
        source = out / "baseline_src"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(source)],
                       check=False, capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(source), revision], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            base_run = run_chain(source, out, "baseline")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(source)], check=False)
        marker.write_text(json.dumps({"revision": revision}))
    if args.baseline_only:
        print(f"baseline {revision[:7]} done: {base_run}")
        return 0
    now_run = run_chain(ROOT, out, "now")
    return report(base_run, now_run, revision, args.rtol)


def report(base_run: Path, now_run: Path, revision: str, rtol: float) -> int:
    """Print the comparison of the two runs' influence tables; 1 when they differ."""
    notes = compare(pd.read_parquet(base_run / "influence.parquet"), pd.read_parquet(now_run / "influence.parquet"), rtol)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"influence.parquet at {revision[:7]} vs this checkout ({head.stdout.strip()}"
          f"{', uncommitted changes' if _dirty() else ''}):")
    for line in notes:
        print("  " + line)
    return 1 if any(n.startswith("DIFFERENT") for n in notes) else 0


def _dirty() -> bool:
    return bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
