"""A CI-size sweep on a local dask cluster gives what the local runner gives, and a re-run skips it.

The shared stages 01-05 are the ones nbmake ran (``runs/ci_nbmake``, see scripts/test.sh),
seeded as the runner's ``_shared`` directory with the status it would have written; only
notebook 06 runs per point, on the real CI-size artifacts. The runner's own rule for shared
stages (run once, then skipped) is tested on toy notebooks in test_runner.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rephelpers.artifacts import stable_hash
from rephelpers.runner import SHARED, STATUS, RunSpec, notebook_parameters, run_spec, split_shared
from rephelpers.runner.sweep import link_artifacts

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = Path(os.environ.get("REPHELPERS_CI_RUN", ROOT / "runs" / "ci_nbmake"))
CHAIN = ["01_corpus_clusters", "02_representations", "03_cluster_dimensions", "04_perturbations",
         "05_capability_impact", "06_influence_matrix"]


def _seed_shared(spec: RunSpec, root: Path) -> None:
    shared, _ = split_shared(spec)
    base = root / spec.name / SHARED
    link_artifacts(CI_RUN, base)
    (base / STATUS).write_text(json.dumps({"state": "done", "fingerprint": stable_hash(spec.parameters, shared)}))


@pytest.mark.after_notebooks
def test_a_ci_size_sweep_on_dask_equals_the_local_runner(tmp_path):
    if not (CI_RUN / "scores.parquet").exists():
        pytest.skip(f"no {CI_RUN / 'scores.parquet'}: the CI-size notebooks (scripts/test.sh runs them first) must "
                    "have run, or point REPHELPERS_CI_RUN at a run that has stages 01-05")
    ci = yaml.safe_load((ROOT / "papermill_params" / "ci.yaml").read_text())
    path = tmp_path / "engines.yaml"
    # ci.yaml also holds notebook 07's parameters; the runner rejects a name no notebook of the chain reads.
    chain_names = set().union(*(notebook_parameters(n) for n in CHAIN))
    parameters = {k: v for k, v in ci["parameters"].items() if k in chain_names}
    path.write_text(yaml.safe_dump({"name": "engines", "parameters": parameters, "notebooks": CHAIN,
                                    "grid": {"n_boot": [40, 60]}}))
    spec = RunSpec.from_yaml(path)
    assert split_shared(spec) == (CHAIN[:5], CHAIN[5:])
    for engine in ("local", "dask"):
        _seed_shared(spec, tmp_path / engine)

    started = time.time()
    local = run_spec(spec, runs_root=tmp_path / "local")
    on_dask = run_spec(spec, runs_root=tmp_path / "dask", engine="dask", jobs=2)
    assert time.time() - started < 600

    key = ["point", "cluster", "ability"]
    theirs = pd.read_parquet(local / "results.parquet").sort_values(key).reset_index(drop=True)
    mine = pd.read_parquet(on_dask / "results.parquet").sort_values(key).reset_index(drop=True)
    assert sorted(mine.point.unique()) == ["n_boot=40", "n_boot=60"] and len(mine) > 0
    pd.testing.assert_frame_equal(mine, theirs)
    # the two points differ where they should (the bootstrap's size), so the comparison is not vacuous
    assert set(mine.n_boot) == {40, 60}
    bounds = ["phi_low", "phi_high"]
    assert not mine[mine.n_boot == 40][bounds].reset_index(drop=True).equals(
        mine[mine.n_boot == 60][bounds].reset_index(drop=True))

    # a re-run skips both points: nothing of theirs is written again
    points = [on_dask / p for p in ("n_boot=40", "n_boot=60")]
    written = {p: ((p / "influence.parquet").stat().st_mtime_ns, (p / STATUS).read_text()) for p in points}
    run_spec(spec, runs_root=tmp_path / "dask", engine="dask", jobs=2)
    assert {p: ((p / "influence.parquet").stat().st_mtime_ns, (p / STATUS).read_text()) for p in points} == written
