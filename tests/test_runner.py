"""The papermill runner on toy notebooks: a chain, a sweep with shared stages, resume, failures."""

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from rephelpers.errors import RephelpersError
from rephelpers.runner import RunSpec, collect, parameterize_chain, run_spec, split_shared


def _notebook(path: Path, params: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A throwaway project: stage 01 counts its executions; stage 02 fails when x == 2."""
    (tmp_path / "pyproject.toml").write_text("")
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(
        nbs / "01_base.ipynb",
        'run_dir = "runs/x"\nbase = 1',
        "from pathlib import Path\n"
        "p = Path(run_dir); p.mkdir(parents=True, exist_ok=True)\n"
        "(p / 'base.txt').write_text(str(base))\n"
        "log = Path(run_dir).parent / 'base_runs.log'\n"
        "log.write_text(log.read_text() + 'x' if log.exists() else 'x')",
    )
    _notebook(
        nbs / "02_point.ipynb",
        'run_dir = "runs/x"\nx = 0',
        "import pandas as pd\nfrom pathlib import Path\n"
        "assert x != 2, 'planted failure'\n"
        "base = int((Path(run_dir) / 'base.txt').read_text())\n"
        "pd.DataFrame({'value': [base * 10 + x]}).to_parquet(Path(run_dir) / 'influence.parquet')",
    )
    monkeypatch.setenv("REPHELPERS_PROJECT_ROOT", str(tmp_path))
    return tmp_path


def _spec(project, grid):
    path = project / "sweep.yaml"
    path.write_text(json.dumps({"name": "s", "parameters": {"base": 3}, "grid": grid}))
    return RunSpec.from_yaml(path)


def test_sweep_shares_unvarying_stages_resumes_and_records_failures(project):
    spec = _spec(project, {"x": [1, 2, 3]})
    assert split_shared(spec) == (["01_base"], ["02_point"])
    top = run_spec(spec, runs_root=project / "runs")
    assert (top / "base_runs.log").read_text() == "x"  # stage 01 ran once, into _shared/
    table = pd.read_parquet(top / "results.parquet").sort_values("x")
    assert table.value.tolist() == [31, 33]
    failed = json.loads((top / "x=2" / "status.json").read_text())
    assert failed["state"] == "failed" and "planted failure" in failed["error"] + failed["traceback"]

    # Resume: finished points are skipped (their outputs untouched), only the failed one re-runs.
    done = (top / "x=1" / "influence.parquet").stat().st_mtime_ns
    run_spec(spec, runs_root=project / "runs")
    assert (top / "x=1" / "influence.parquet").stat().st_mtime_ns == done
    assert json.loads((top / "x=2" / "status.json").read_text())["state"] == "failed"
    assert len(collect(top)) == 2
    assert pd.read_csv(top / "failures.csv").point.tolist() == ["x=2"]


def test_single_run_failure_raises(project):
    path = project / "one.yaml"
    path.write_text(json.dumps({"name": "one", "parameters": {"x": 2}}))
    with pytest.raises(RephelpersError, match="run one failed"):
        run_spec(RunSpec.from_yaml(path), runs_root=project / "runs")


def test_bad_parameter_files(project):
    bad = project / "bad.yaml"
    bad.write_text(json.dumps({"name": "b", "notebooks": ["09_nope"]}))
    with pytest.raises(RephelpersError, match="unknown notebooks"):
        RunSpec.from_yaml(bad)
    bad.write_text(json.dumps({"name": "b", "grid": {"x": []}}))
    with pytest.raises(RephelpersError, match="non-empty list"):
        RunSpec.from_yaml(bad)


def test_parameterize_injects_only_declared_parameters(project):
    path = project / "p.yaml"
    path.write_text(json.dumps({"name": "p", "parameters": {"base": 7, "unused": 1}}))
    written = parameterize_chain(RunSpec.from_yaml(path), "out", "runs/p")
    nb = nbformat.read(written[0], as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "base = 7" in injected[0].source and "unused" not in injected[0].source


def test_a_point_killed_mid_run_is_redone_and_finished_points_are_not(project):
    spec = _spec(project, {"x": [1, 3]})
    top = run_spec(spec, runs_root=project / "runs")
    finished = (top / "x=1" / "influence.parquet").stat().st_mtime_ns
    # Simulate a kill during x=3: its status still says "running" and its output is gone.
    status = json.loads((top / "x=3" / "status.json").read_text())
    (top / "x=3" / "status.json").write_text(json.dumps({**status, "state": "running"}))
    (top / "x=3" / "influence.parquet").unlink()
    run_spec(spec, runs_root=project / "runs")
    assert (top / "x=1" / "influence.parquet").stat().st_mtime_ns == finished
    assert json.loads((top / "x=3" / "status.json").read_text())["state"] == "done"
    assert sorted(pd.read_parquet(top / "results.parquet").value) == [31, 33]
