"""The papermill runner on toy notebooks: a chain, a sweep with shared stages, resume, failures,
and the watcher: cell timeout, a kernel killed mid-cell, a client stall, an interrupted run.

Every test that executes notebooks bounds its own wall time with an explicit assertion,
so a regression to "hangs silently" fails instead of blocking CI. The bounds leave room
for a loaded 2-core machine, where a kernel alone takes up to ~10 s to start.
"""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from rephelpers.errors import RephelpersError
from rephelpers.runner import (
    FAULT_ENV,
    THREAD_ENV,
    ExecutionLimits,
    RunSpec,
    available_cores,
    collect,
    parameterize_chain,
    run_spec,
    split_shared,
    threads_per_job,
)


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
        "print(f'point x={x}')\n"
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
    # The record says where and what: notebook, cell (source numbering), error, last output.
    assert (failed["notebook"], failed["cell"], failed["kind"]) == ("02_point", 1, "error")
    assert "s/x=2" in failed["error"] and "AssertionError: planted failure" in failed["error"]
    assert "point x=2" in failed["last_output"]
    # Each notebook's received parameters are on record; stage 01 ran in _shared/, without x.
    done = json.loads((top / "x=1" / "status.json").read_text())
    assert done["received"] == {"02_point": {"x": 1, "run_dir": str(top / "x=1")}}
    shared = json.loads((top / "_shared" / "status.json").read_text())
    assert shared["received"] == {"01_base": {"base": 3, "run_dir": str(top / "_shared")}}

    # Resume: finished points are skipped (their outputs untouched), only the failed one re-runs.
    done = (top / "x=1" / "influence.parquet").stat().st_mtime_ns
    run_spec(spec, runs_root=project / "runs")
    assert (top / "x=1" / "influence.parquet").stat().st_mtime_ns == done
    assert json.loads((top / "x=2" / "status.json").read_text())["state"] == "failed"
    assert len(collect(top)) == 2
    assert pd.read_csv(top / "failures.csv").point.tolist() == ["x=2"]


def test_parallel_jobs_share_the_cores_instead_of_each_taking_all(project, monkeypatch):
    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    _add_notebook(project, "02_threads", "import os, torch\nfrom pathlib import Path\n"
                                         "p = Path(run_dir); p.mkdir(parents=True, exist_ok=True)\n"
                                         "(p / 'threads.txt').write_text(f\"{os.environ['OMP_NUM_THREADS']} {torch.get_num_threads()}\")",
                  params='run_dir = "runs/x"\nx = 0')
    path = project / "threads.yaml"
    path.write_text(json.dumps({"name": "t", "notebooks": ["02_threads"], "grid": {"x": [1, 2]}}))
    with _within(120, "two parallel points"):
        top = run_spec(RunSpec.from_yaml(path), runs_root=project / "runs", jobs=2)
    share = threads_per_job(2)
    assert share == max(1, available_cores() // 2)
    for x in (1, 2):
        assert (top / f"x={x}" / "threads.txt").read_text() == f"{share} {share}"
    assert threads_per_job(3, cores=2) == 1 and threads_per_job(1, cores=16) == 16 and threads_per_job(4, cores=16) == 4


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
    bad.write_text(json.dumps({"name": "b", "parameter": {"x": 1}}))
    with pytest.raises(RephelpersError, match="unknown top-level keys \\['parameter'\\]: 'parameter': did you mean 'parameters'"):
        RunSpec.from_yaml(bad)
    bad.write_text(json.dumps({"name": "b", "grid": {"x": []}}))
    with pytest.raises(RephelpersError, match="non-empty list"):
        RunSpec.from_yaml(bad)


def test_parameterize_injects_into_each_notebook_only_the_names_it_declares(project):
    path = project / "p.yaml"
    path.write_text(json.dumps({"name": "p", "parameters": {"base": 7, "x": 1}}))
    written = parameterize_chain(RunSpec.from_yaml(path), "out", "runs/p")
    injected = {}
    for notebook in written:
        nb = nbformat.read(notebook, as_version=4)
        injected[notebook.stem] = "".join(c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "base = 7" in injected["01_base"] and "x = " not in injected["01_base"]
    assert "x = 1" in injected["02_point"] and "base = " not in injected["02_point"]


def _yaml(project: Path, name: str, text: str) -> Path:
    path = project / f"{name}.yaml"
    path.write_text(text)
    return path


def test_a_misspelt_parameter_or_grid_key_fails_before_any_notebook_runs(project):
    # Line 3 holds the misspelt parameter, line 5 the grid key no notebook declares.
    path = _yaml(project, "typo", "name: typo\nparameters:\n  bse: 3\ngrid:\n  xx: [1, 2]\n")
    started = time.time()
    with pytest.raises(RephelpersError) as err:
        run_spec(RunSpec.from_yaml(path), runs_root=project / "runs")
    message = str(err.value)
    assert f"{path}:3: parameter 'bse'" in message and "did you mean 'base'?" in message
    assert f"{path}:5: grid key 'xx'" in message and "did you mean 'x'?" in message
    assert time.time() - started < 10
    assert not (project / "runs").exists()  # no run directory, no kernel: nothing ran

    # A name that only some notebooks of the chain read is fine; run_dir is the runner's.
    path = _yaml(project, "reserved", "name: r\nparameters:\n  run_dir: elsewhere\n")
    with pytest.raises(RephelpersError, match=r"reserved.yaml:3: run_dir is set by the runner"):
        run_spec(RunSpec.from_yaml(path), runs_root=project / "runs")
    with pytest.raises(RephelpersError, match="parameter 'bse'"):
        parameterize_chain(RunSpec.from_yaml(_yaml(project, "p", "name: p\nparameters: {bse: 1}\n")), "out", "runs/p")
    assert not (project / "runs").exists()


def test_a_missing_corpus_or_task_folder_fails_before_any_notebook_runs(project):
    _add_notebook(project, "03_data", "print(corpus)",
                  params='run_dir = "runs/x"\ncorpus = "builtin"\nlm_eval_task_paths = []\nmodel_name = "m"')
    (project / "tasks_ok").mkdir()
    (project / "corpus.jsonl").write_text('{"text": "a"}\n')
    path = _yaml(project, "paths", "name: paths\nparameters:\n  corpus: data/missing.jsonl\n"
                                   "  lm_eval_task_paths: [tasks_ok, tasks_missing]\n  model_name: ./models/none\n"
                                   "grid:\n  corpus: [corpus.jsonl, nope.parquet]\n")
    with pytest.raises(RephelpersError) as err:
        run_spec(RunSpec.from_yaml(path), runs_root=project / "runs")
    message = str(err.value)
    assert f"{path}:3: corpus 'data/missing.jsonl': {project / 'data' / 'missing.jsonl'} does not exist" in message
    assert f"{path}:4: lm_eval_task_paths entry 'tasks_missing'" in message and "tasks_ok" not in message
    assert f"{path}:5: model_name './models/none' names a local model folder" in message
    assert f"{path}:7: corpus 'nope.parquet'" in message and "'corpus.jsonl'" not in message
    assert "4 problem(s)" in message and not (project / "runs").exists()


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


# --- the watcher ------------------------------------------------------------------------


def _add_notebook(project: Path, name: str, body: str, params: str = 'run_dir = "runs/x"') -> None:
    _notebook(project / "notebooks" / f"{name}.ipynb", params, body)


def _single(project: Path, name: str, notebook: str, parameters=None, execution=None) -> RunSpec:
    path = project / f"{name}.yaml"
    data = {"name": name, "parameters": parameters or {}, "notebooks": [notebook]}
    if execution:
        data["execution"] = execution
    path.write_text(json.dumps(data))
    return RunSpec.from_yaml(path)


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


class Hung(BaseException):
    """Not an Exception, so no ``except Exception`` in the runner can swallow it."""


@contextmanager
def _within(seconds: float, what: str):
    """Fail (instead of blocking CI) if the block is still running after ``seconds``.

    The alarm raises inside the runner's watch loop, whose ``finally`` kills the children.
    """

    def expire(signum, frame):
        raise Hung(f"{what} still running after {seconds} s: the runner hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _dies_within(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while _alive(pid):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_each_notebooks_time_and_kernel_memory_are_recorded_and_printed(project, capsys):
    _add_notebook(project, "01_big", "import time\nblock = b'x' * (300 * 2**20)  # 300 MiB, written\ntime.sleep(1)")
    _add_notebook(project, "02_small", "import os\nassert os.environ['REPHELPERS_HEADLESS'] == '1'  # a batch kernel")
    path = project / "two.yaml"
    path.write_text(json.dumps({"name": "two", "parameters": {}, "notebooks": ["01_big", "02_small"]}))
    top = run_spec(RunSpec.from_yaml(path), runs_root=project / "runs")
    stages = _status(top)["stages"]
    assert list(stages) == ["01_big", "02_small"]
    assert stages["01_big"]["seconds"] >= 1 and stages["02_small"]["seconds"] > 0
    assert stages["01_big"]["peak_rss_mb"] >= 300 > stages["02_small"]["peak_rss_mb"]
    out = capsys.readouterr().out
    assert "01_big done in" in out and "kernel peak 0." in out


def test_execution_limits_from_yaml_and_overrides(project):
    spec = _single(project, "lim", "01_base", execution={"cell_timeout": 30, "stall_timeout": 5})
    assert (spec.execution.cell_timeout, spec.execution.start_timeout, spec.execution.stall_timeout) == (30, 120, 5)
    cli = spec.execution.with_overrides("command line", cell_timeout=0, start_timeout=None)
    assert cli.cell_timeout is None and cli.start_timeout == 120  # 0 switches the cell limit off
    with pytest.raises(RephelpersError, match=r"unknown keys \['cell_timout'\]"):
        ExecutionLimits.from_mapping({"cell_timout": 3})
    with pytest.raises(RephelpersError, match="stall_timeout must be > 0"):
        ExecutionLimits.from_mapping({"stall_timeout": 0})
    with pytest.raises(RephelpersError, match="number of seconds"):
        ExecutionLimits.from_mapping({"start_timeout": "soon"})


def test_a_cell_past_its_timeout_fails_clearly_within_the_bound(project):
    _add_notebook(project, "03_sleep", "import time\nprint('about to sleep', flush=True)\ntime.sleep(seconds)",
                  params='run_dir = "runs/x"\nseconds = 0')
    spec = _single(project, "slow", "03_sleep", {"seconds": 300}, {"cell_timeout": 2})
    started = time.time()
    with _within(120, "a cell past its timeout"), pytest.raises(
        RephelpersError, match="run slow failed: run slow: notebook 03_sleep, cell 1"
    ):
        run_spec(spec, runs_root=project / "runs")
    elapsed = time.time() - started
    assert elapsed < 60, f"a 2 s cell timeout took {elapsed:.0f} s to surface"
    status = _status(project / "runs" / "slow")
    assert status["state"] == "failed" and status["kind"] == "cell-timeout"
    assert "cell_timeout=2 s" in status["error"] and "--cell-timeout" in status["error"]
    assert status["cell_source"] == "import time" and "about to sleep" in status["last_output"]


def test_a_kernel_killed_mid_cell_fails_clearly_instead_of_hanging(project):
    # The pause lets the kernel's I/O thread send the line before the kill: what the runner
    # must surface is output that left the kernel, not a message still inside a dying process
    # (without it, CI once lost the race and the line never reached the client).
    _add_notebook(project, "03_die", "import os, signal, time\nprint('going down', flush=True)\n"
                                     "time.sleep(1.0)\nos.kill(os.getpid(), signal.SIGKILL)")
    spec = _single(project, "die", "03_die", execution={"stall_timeout": 5})
    started = time.time()
    with _within(120, "a dead kernel"), pytest.raises(RephelpersError, match="notebook 03_die, cell 1"):
        run_spec(spec, runs_root=project / "runs")
    elapsed = time.time() - started
    assert elapsed < 60, f"a dead kernel took {elapsed:.0f} s to surface"
    status = _status(project / "runs" / "die")
    assert status["kind"] == "kernel-died" and "died during the cell" in status["error"]
    assert "going down" in status["last_output"]


def test_a_stall_after_the_last_cell_is_detected_and_retried_once(project, monkeypatch):
    # The cell counts its executions, so the retry is visible in the data as well as in status.json.
    _add_notebook(project, "03_mark", "from pathlib import Path\np = Path(run_dir); p.mkdir(parents=True, exist_ok=True)\n"
                                      "log = p / 'runs.log'\nlog.write_text((log.read_text() if log.exists() else '') + 'x')")
    monkeypatch.setenv(FAULT_ENV, "stall-after-last-cell:03_mark")
    spec = _single(project, "stall", "03_mark", execution={"stall_timeout": 5})
    started = time.time()
    with _within(150, "a stalled notebook"):
        top = run_spec(spec, runs_root=project / "runs")
    elapsed = time.time() - started
    assert elapsed < 90, f"stall + retry took {elapsed:.0f} s"
    status = _status(top)
    assert status["state"] == "done" and (top / "runs.log").read_text() == "xx"
    [retry] = status["retries"]
    assert (retry["notebook"], retry["kind"], retry["cell"]) == ("03_mark", "stall", 1)
    assert "after the notebook's last cell" in retry["error"] and "papermill #705" in retry["error"]
    assert "fault injection: client stalls" in (top / "notebooks" / "03_mark.log").read_text()


def test_an_interrupted_run_is_recorded_as_such_and_a_rerun_completes_it(project, capsys):
    # The cell holds while runs/held/hold exists, so the signal lands mid-cell.
    # It also starts a grandchild in a session of its own, as notebook 07's inner papermill
    # child is: the interrupted run must not leave it behind.
    _add_notebook(project, "03_hold", "import subprocess, time\nfrom pathlib import Path\np = Path(run_dir)\n"
                                      "child = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                                      "(p / 'grandchild').write_text(str(child.pid))\n"
                                      "(p / 'in_cell').touch()\nwhile (p / 'hold').exists(): time.sleep(0.1)\n"
                                      "(p / 'finished').touch()")
    spec_path = project / "held.yaml"
    spec_path.write_text(json.dumps({"name": "held", "notebooks": ["03_hold"]}))
    top = project / "runs" / "held"
    top.mkdir(parents=True)
    (top / "hold").touch()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rephelpers", "run", str(spec_path), "--runs-root", str(project / "runs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 90
        while not (top / "in_cell").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the held cell never started"
            time.sleep(0.2)
        kernel_pid = json.loads((top / "notebooks" / ".watch" / "03_hold.kernel.jsonl").read_text().splitlines()[0])["pid"]
        assert json.loads((top / "status.json").read_text())["state"] == "running"
        signalled = time.time()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.time() - signalled < 30
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "run the same command again" in err
    status = _status(top)
    assert (status["state"], status["signal"], status["notebook"], status["cell"]) == ("interrupted", "SIGTERM", "03_hold", 1)
    # the kernel is killed with its papermill child, not left behind
    assert _dies_within(kernel_pid, 5.0), "the kernel outlived the interrupted run"
    grandchild = int((top / "grandchild").read_text())
    assert _dies_within(grandchild, 5.0), "a process the notebook started in its own session outlived the interrupted run"
    assert not (top / "finished").exists()

    (top / "hold").unlink()
    capsys.readouterr()
    with _within(120, "the re-run"):
        run_spec(RunSpec.from_yaml(spec_path), runs_root=project / "runs")
    said = capsys.readouterr().out
    assert "held was interrupted by SIGTERM in 03_hold cell 1" in said and "will run 03_hold again" in said
    assert _status(top)["state"] == "done" and (top / "finished").exists()


# --- the progress line --------------------------------------------------------------------


def test_the_progress_line_shows_the_cell_and_the_running_bar(tmp_path):
    import io

    from rephelpers.runner import ProgressLine

    path = tmp_path / "nb.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("a = 1"), nbformat.v4.new_code_cell("b = 2")]
    nbformat.write(nb, path)
    out = io.StringIO()
    logged = ProgressLine("demo", "02_x", path, live=False, stream=out)
    logged.cell(0, 1.0)  # a markdown cell is not counted
    logged.show(now=1.0)
    assert out.getvalue() == ""
    logged.cell(1, 2.0)
    logged.show(now=2.0)
    logged.bar({"desc": "activations", "n": 3, "total": 12, "unit": "doc", "t": 2.5, "closed": False})
    logged.show(now=3.0)  # same cell, within PROGRESS_EVERY: not repeated in a log
    logged.show(now=40.0)
    logged.bar({"desc": "old", "n": 1, "total": 2, "unit": "it", "t": 1.5, "closed": False})  # before the cell: ignored
    logged.cell(2, 41.0)
    logged.show(now=41.0)
    assert out.getvalue().splitlines() == [
        "[rephelpers] demo: 02_x cell 1/2",
        "[rephelpers] demo: 02_x cell 1/2 · activations 3/12 doc (25%)",
        "[rephelpers] demo: 02_x cell 2/2",
    ]
    tty = io.StringIO()
    live = ProgressLine("demo", "02_x", path, live=True, stream=tty)
    live.cell(1, 2.0)
    live.show(now=2.0)
    live.bar({"desc": "configs", "n": 5, "total": 10, "unit": "it", "t": 3.0, "closed": False})
    live.show(now=3.0)
    live.bar({"desc": "configs", "n": 10, "total": 10, "unit": "it", "t": 4.0, "closed": True})
    live.show(now=4.0)
    live.end()
    frames = tty.getvalue().split("\r")
    assert frames[1] == "[rephelpers] demo: 02_x cell 1/2"
    assert frames[2] == "[rephelpers] demo: 02_x cell 1/2 · configs 5/10 (50%)"
    assert frames[3].rstrip() == "[rephelpers] demo: 02_x cell 1/2" and len(frames[3]) == len(frames[2])  # padded over
    assert frames[-1] == "" and frames[-2].strip() == ""  # end() blanks the line


def test_the_runner_prints_each_cell_and_the_kernels_progress_bar(project, capsys, monkeypatch):
    import rephelpers.runner.progressline as progressline

    monkeypatch.setattr(progressline, "PROGRESS_EVERY", 0.0)
    _add_notebook(project, "03_bar", "import time\nfrom rephelpers.progress import progress_bar\n"
                  "for _ in progress_bar(range(2), desc='work', unit='step'):\n    time.sleep(1.5)")
    with _within(120, "a notebook with a progress bar"):
        run_spec(_single(project, "bar", "03_bar"), runs_root=project / "runs")
    printed = capsys.readouterr().out
    assert "[rephelpers] bar: 03_bar cell 2/2" in printed
    assert "[rephelpers] bar: 03_bar cell 2/2 · work 1/2 step (50%)" in printed, printed


# --- the dask engine ---------------------------------------------------------------------


def test_the_dask_engine_shares_stages_records_failures_and_skips_on_rerun(project):
    """Two workers of a local dask cluster: shared stages once, the local runner's results, failures recorded,
    re-runs skip (the same at CI size against the local runner itself: test_sweep_engines.py)."""
    spec = _spec(project, {"x": [1, 2, 3]})
    with _within(240, "a sweep on a local dask cluster"):
        remote = run_spec(spec, runs_root=project / "dask", engine="dask", jobs=2)
    assert (remote / "base_runs.log").read_text() == "x"  # the shared stage ran once on the cluster
    table = pd.read_parquet(remote / "results.parquet").sort_values("x")
    assert table.value.tolist() == [31, 33] and table.point.tolist() == ["x=1", "x=3"]
    failed = json.loads((remote / "x=2" / "status.json").read_text())
    assert failed["state"] == "failed" and "planted failure" in failed["error"]
    done = {x: (remote / f"x={x}" / "influence.parquet").stat().st_mtime_ns for x in (1, 3)}
    with _within(120, "a re-run on a local dask cluster"):
        run_spec(spec, runs_root=project / "dask", engine="dask", jobs=2)
    assert {x: (remote / f"x={x}" / "influence.parquet").stat().st_mtime_ns for x in (1, 3)} == done
    assert pd.read_csv(remote / "failures.csv").point.tolist() == ["x=2"]


def test_a_dask_worker_killed_mid_point_is_redone_and_its_kernel_stops(project):
    """SIGKILL the worker running a point: dask re-submits the point, which finishes; the orphaned kernel exits."""
    _add_notebook(
        project, "02_point",
        "import os, time\nfrom pathlib import Path\nimport pandas as pd\n"
        "p = Path(run_dir); p.mkdir(parents=True, exist_ok=True)\n"
        "marker = p.parent / f'started_{x}'\n"
        "first = not marker.exists()\n"
        "marker.write_text(str(os.getpid()))\n"
        "if first and x == 3:\n    time.sleep(120)\n"
        "pd.DataFrame({'value': [x]}).to_parquet(p / 'influence.parquet')",
        params='run_dir = "runs/x"\nx = 0',
    )
    spec = _spec(project, {"x": [1, 3]})
    top = project / "runs" / "s"
    outcome: dict = {}

    def sweep():
        try:
            outcome["top"] = run_spec(spec, runs_root=project / "runs", engine="dask", jobs=2)
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    import threading

    runner = threading.Thread(target=sweep)
    with _within(300, "a sweep whose worker is killed"):
        runner.start()
        deadline = time.time() + 150
        while not (top / "started_3").exists():
            assert time.time() < deadline and runner.is_alive(), f"point x=3 never started: {outcome}"
            time.sleep(0.2)
        kernel = int((top / "started_3").read_text())
        chain, pid = [], kernel
        while pid > 1:  # kernel <- papermill child <- worker process
            chain.append(pid)
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        worker = next(p for p in chain if "distributed" in Path(f"/proc/{p}/cmdline").read_text()
                      or "spawn" in Path(f"/proc/{p}/cmdline").read_text())
        os.kill(worker, signal.SIGKILL)
        runner.join()
        assert "error" not in outcome, outcome
        assert _dies_within(kernel, 30), "the killed worker's kernel went on running"
    assert int((top / "started_3").read_text()) != kernel  # a second kernel ran the point
    assert _status(top / "x=3")["state"] == "done"
    assert sorted(pd.read_parquet(top / "results.parquet").value) == [1, 3]


def test_engine_choices_are_checked_before_any_work(project, monkeypatch):
    import rephelpers.engines

    monkeypatch.setattr(rephelpers.engines, "SCHEDULER_TIMEOUT", "3s")
    spec = _spec(project, {"x": [1]})
    with pytest.raises(RephelpersError, match="unknown engine 'ray'"):
        run_spec(spec, runs_root=project / "runs", engine="ray")
    with pytest.raises(RephelpersError, match="needs --engine dask"):
        run_spec(spec, runs_root=project / "runs", scheduler="tcp://127.0.0.1:1")
    with pytest.raises(RephelpersError, match="cannot reach a dask scheduler at tcp://127.0.0.1:9"):
        run_spec(spec, runs_root=project / "runs", engine="dask", scheduler="tcp://127.0.0.1:9")
    assert not (project / "runs" / "s" / "x=1").exists()
