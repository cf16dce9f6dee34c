"""Issue 29: no import cycle, no stage importing a later one, no function over 120 lines, no module over 800."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]


def _report(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_structure.py"), "--json", *args],
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout)


def test_the_package_has_no_import_cycle_and_no_stage_inversion():
    report = _report()
    assert report == {"cycles": [], "stage_inversions": [], "long_functions": [], "long_modules": []}, report


def test_the_checker_reads_the_modules_split_here():
    # at a limit of 0 lines every function is "long": proves the checker saw the new modules
    seen = {f["module"] for f in _report("--max-function", "0")["long_functions"]}
    assert {"rephelpers.views.labels", "rephelpers.testbed.agreement", "rephelpers.testbed.phistar",
            "rephelpers.testbed.chain", "rephelpers.testbed.corpus", "rephelpers.testbed.power",
            "rephelpers.influence.findings", "rephelpers.perturbations.controls", "rephelpers.interventions.edits"} <= seen
    # and that it can fail: a cycle planted in a copy of the package is found

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "rephelpers"
        shutil.copytree(ROOT / "rephelpers", copy, ignore=shutil.ignore_patterns("__pycache__"))
        with open(copy / "corpus" / "schema.py", "a") as fh:
            fh.write("\n\ndef _late():\n    from ..testbed import planted  # a stage importing a later one, inside a function\n")
        with open(copy / "testbed" / "planted.py", "a") as fh:
            fh.write("\nfrom ..corpus import schema\n")
        report = _report("--root", str(copy))
    assert any("rephelpers.corpus.schema" in c["modules"] for c in report["cycles"])
    assert {"module": "rephelpers.corpus.schema", "imports": "rephelpers.testbed.planted"} in [
        {k: e[k] for k in ("module", "imports")} for e in report["stage_inversions"]]


def test_the_checker_reports_a_module_over_800_lines_and_a_function_over_120():
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "rephelpers"
        shutil.copytree(ROOT / "rephelpers", copy, ignore=shutil.ignore_patterns("__pycache__"))
        (copy / "views" / "planted_long.py").write_text("".join(f"x{i} = {i}\n" for i in range(801)))
        (copy / "views" / "planted_short.py").write_text("".join(f"x{i} = {i}\n" for i in range(800)))
        lines = [f"    y{i} = {i}\n" for i in range(120)]  # with its def line: 121 lines, then 120 (the limit)
        (copy / "views" / "planted_function.py").write_text(
            "def long_one():\n" + "".join(lines) + "\n\ndef fine():\n" + "".join(lines[:119]))
        report = _report("--root", str(copy))
    assert report["long_modules"] == [{"module": "rephelpers.views.planted_long", "lines": 801}]
    assert report["long_functions"] == [
        {"module": "rephelpers.views.planted_function", "function": "long_one", "line": 1, "lines": 121}]
