"""The runner package's parts on their own, without running a notebook: its lazy exports, the
kernel probe, the child's cell numbering, the kernels' thread variables, and its shape
(no cycle with the engines, no function over 120 lines, no module over 800).

The runner's behaviour with real notebooks is tested in test_runner.py and test_sweep_engines.py.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import rephelpers.runner as runner
from rephelpers import engines
from rephelpers.runner.child import ClientEvents
from rephelpers.runner.probe import install, kernel_argument
from rephelpers.runner.protocol import KERNEL_EVENTS_ENV, JobFiles, Lines

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_to_the_object_of_its_module():
    assert sorted(runner.__all__) == sorted(runner._WHERE)
    for name in runner.__all__:
        module = sys.modules.get(runner._WHERE[name]) or __import__(runner._WHERE[name], fromlist=[name])
        assert getattr(runner, name) is getattr(module, name), name
    # a submodule imported later must not shadow a function of the same name
    assert callable(runner.collect) and not isinstance(runner.collect, type(runner))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        runner.nothing_here  # noqa: B018


def test_the_kernel_probe_and_the_child_import_neither_pandas_nor_papermill():
    # They run at every notebook's start: the kernel must not pay for the runner's own imports.
    code = ("import sys, rephelpers.runner.probe, rephelpers.runner.child; "
            "print([m for m in ('pandas', 'papermill', 'nbformat', 'rephelpers.runner.spec') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class _Events:
    def __init__(self) -> None:
        self.handlers: dict[str, list] = {}

    def register(self, event: str, handler) -> None:
        self.handlers.setdefault(event, []).append(handler)


def test_the_probe_reports_ready_and_each_cell_and_hides_its_file_from_the_notebook(tmp_path, monkeypatch):
    path = tmp_path / "kernel.jsonl"
    monkeypatch.setenv(KERNEL_EVENTS_ENV, str(path))
    shell = SimpleNamespace(events=_Events())
    assert install(shell) is None  # an exec line's value would be displayed
    assert KERNEL_EVENTS_ENV not in os.environ  # a notebook's own runs must not write into this file
    for handler in shell.events.handlers["pre_run_cell"]:
        handler(object())
    for handler in shell.events.handlers["post_run_cell"]:
        handler(object())
    events = [json.loads(line) for line in Lines(path).read()]
    assert [e["e"] for e in events] == ["ready", "pre", "post"]
    assert {e["pid"] for e in events} == {os.getpid()}
    assert events[0]["t"] <= events[1]["t"] <= events[2]["t"]

    monkeypatch.delenv(KERNEL_EVENTS_ENV, raising=False)
    untouched = SimpleNamespace(events=_Events())
    install(untouched)  # a kernel the watcher did not start: no events, no file
    assert untouched.events.handlers == {}
    assert kernel_argument().startswith("--IPKernelApp.exec_lines=__import__('rephelpers.runner.probe'")


def _cell(source: str, tags: list[str] | None = None, cell_type: str = "code") -> SimpleNamespace:
    cell = SimpleNamespace(source=source, cell_type=cell_type, metadata={"tags": tags or []})
    cell.get = lambda key, default=None: getattr(cell, key, default)
    return cell


def test_the_childs_cell_numbers_are_the_source_notebooks_without_the_injected_cell():
    events, out = io.StringIO(), io.StringIO()
    hooks = ClientEvents(events, out, last_code=2, stall_last=False)
    executed = [_cell("x = 1", ["parameters"]), _cell("x = 2", ["injected-parameters"]), _cell("# t", cell_type="markdown"),
                _cell("print(x)\nmore")]
    for index, cell in enumerate(executed):
        hooks.on_start(cell, index)
        hooks.on_execute(cell, index)
        hooks.on_executed(cell, index)
    starts = [json.loads(line) for line in events.getvalue().splitlines() if '"start"' in line]
    assert [(e["cell"], e["src"]) for e in starts] == [
        (0, "x = 1"), (0, "(injected parameters)"), (1, "# t"), (2, "print(x)")]
    assert out.getvalue().splitlines() == ["[rephelpers] --- cell 0: x = 1", "[rephelpers] --- cell 2: print(x)"]
    kinds = [json.loads(line)["e"] for line in events.getvalue().splitlines()]
    assert kinds == ["start", "sent", "done"] * 4


def test_job_files_are_cleared_before_an_attempt(tmp_path):
    files = JobFiles.under(tmp_path / "notebooks", "01_x")
    files.job.parent.mkdir(parents=True)
    files.client.write_text('{"e": "start"}\n')
    files.result.write_text("{}")
    files.clear()
    assert not files.client.exists() and not files.result.exists()
    assert files.kernel == tmp_path / "notebooks" / ".watch" / "01_x.kernel.jsonl"


def test_each_kernel_gets_its_share_of_the_cores_unless_the_environment_says_otherwise(monkeypatch):
    for name in engines.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    share = str(max(1, engines.available_cores() // 2))
    assert engines.kernel_threads(2) == {name: share for name in engines.THREAD_ENV}
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    assert engines.kernel_threads(2)["MKL_NUM_THREADS"] == "7"
    assert engines.kernel_threads(2)["OMP_NUM_THREADS"] == share


def test_the_runner_has_no_cycle_no_long_function_and_no_long_module():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_structure.py"), "--json"],
                          capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout)
    ours = ("rephelpers.runner", "rephelpers.engines")
    assert not [c for c in report["cycles"] if any(m.startswith(ours) for m in c["modules"])]
    assert not [f for f in report["long_functions"] if f["module"].startswith(ours)]
    assert not [m for m in report["long_modules"] if m["module"].startswith(ours)]
    assert "rephelpers.runner.watch" in {f["module"] for f in _all_functions()}


def _all_functions() -> list[dict]:
    # The checker at a limit of 0 lines lists every function: proves it read the runner's modules.
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_structure.py"), "--json",
                           "--max-function", "0"], capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout)["long_functions"]
