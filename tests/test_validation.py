"""A run file is checked before anything runs (rephelpers.validation), and the notebooks'
defaults are the demo's, so a notebook run by hand on runs/demo computes what the chain did."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from rephelpers.artifacts import project_root
from rephelpers.errors import RephelpersError
from rephelpers.runner import RunSpec, available_notebooks, notebook_parameters, notebooks_dir
from rephelpers.validation import check_run, key_lines, notebook_defaults

ROOT = Path(__file__).resolve().parents[1]
PARAMS = sorted((ROOT / "papermill_params").glob("*.yaml"))

# A toy project for the nested check: "07" runs a chain of "01" and "02".
DECLARED = {"01_a": {"run_dir", "alpha", "beta"}, "02_b": {"run_dir", "gamma"},
            "07_c": {"run_dir", "chain_parameters", "chain_grid", "chain_notebooks", "delta"}}


def _check(tmp_path: Path, text: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    data = yaml.safe_load(text)
    check_run(data.get("parameters", {}), data.get("grid"), data.get("notebooks", list(DECLARED)),
              DECLARED.__getitem__, list(DECLARED), path)


def test_key_lines_are_the_lines_of_the_yaml_keys(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("name: k\n# a comment\nparameters:\n  a: 1\n  nested:\n    - {b: 2}\n    - c: 3\n")
    lines = key_lines(path)
    assert lines[("parameters", "a")] == 4 and lines[("parameters", "nested", 0, "b")] == 6
    assert lines[("parameters", "nested", 1, "c")] == 7


def test_nested_chain_parameters_and_grids_are_held_against_the_chain_notebooks(tmp_path):
    good = ("parameters:\n  delta: 1\n  chain_parameters: {alpha: 1, gamma: 2}\n"
            "  chain_grid:\n    - {beta: [1, 2]}\n    - {beta: [3]}\n")
    _check(tmp_path, good)  # no error: every name is read by some notebook of its chain
    bad = ("parameters:\n  delta: 1\n  chain_parameters:\n    alpha: 1\n    gama: 2\n"
           "  chain_grid:\n    - {beta: [1, 2]}\n    - {bta: [3]}\n")
    with pytest.raises(RephelpersError) as err:
        _check(tmp_path, bad)
    message = str(err.value)
    assert "run.yaml:5: chain_parameters entry 'gama'" in message and "did you mean 'gamma'?" in message
    assert "run.yaml:8: chain_grid key 'bta'" in message and "did you mean 'beta'?" in message
    assert "2 problem(s)" in message
    # A chain that leaves out the notebook reading a name makes that name unread.
    with pytest.raises(RephelpersError, match="chain_parameters entry 'gamma' is read by no notebook of the chain \\(01_a\\)"):
        _check(tmp_path, "parameters:\n  chain_notebooks: [01_a]\n  chain_parameters: {gamma: 2}\n")
    # 07's own parameter at the top level is fine; one of 01 there is not, when the chain is 07 alone.
    with pytest.raises(RephelpersError, match="parameter 'alpha' is read by no notebook of the chain \\(07_c\\)"):
        _check(tmp_path, "notebooks: [07_c]\nparameters:\n  delta: 1\n  alpha: 1\n")


def test_a_learned_chain_without_notebook_04_is_refused_before_anything_runs(tmp_path):
    """The learned kind's U is fitted by notebook 04; a nested chain running 05 without 04 names each place."""
    declared = {"03_cluster_dimensions": {"run_dir", "layers"},
                "04_perturbations": {"run_dir", "perturbation", "n_texts"},
                "05_capability_impact": {"run_dir", "perturbation"},
                "07_ground_truth": {"run_dir", "chain_parameters", "chain_grid", "chain_notebooks"}}

    def check(text: str) -> None:
        path = tmp_path / "gt.yaml"
        path.write_text(text)
        data = yaml.safe_load(text)
        check_run(data["parameters"], None, ["07_ground_truth"], declared.__getitem__, list(declared), path)

    without_04 = "  chain_notebooks: [03_cluster_dimensions, 05_capability_impact]\n"
    grid = "  chain_grid:\n    - {perturbation: [[ablate], [ablate, learned]]}\n    - {perturbation: [learned]}\n"
    with pytest.raises(RephelpersError) as err:
        check("parameters:\n" + without_04 + grid)
    message = str(err.value)
    assert "2 problem(s)" in message and message.count("add 04_perturbations to chain_notebooks") == 2
    assert "gt.yaml:4: perturbation 'learned' is fitted by notebook 04_perturbations" in message
    assert "gt.yaml:5: perturbation 'learned'" in message
    with pytest.raises(RephelpersError, match="gt.yaml:3: perturbation 'learned'"):
        check("parameters:\n" + without_04 + "  chain_parameters: {perturbation: learned}\n")
    # fine: 04 in the chain, the default chain (every notebook but 07, so 04 too), or no learned kind
    check("parameters:\n  chain_notebooks: [03_cluster_dimensions, 04_perturbations, 05_capability_impact]\n" + grid)
    check("parameters:\n" + grid)
    check("parameters:\n" + without_04 + "  chain_grid:\n    - {perturbation: [[ablate, leace]]}\n")


def test_a_missing_local_model_or_corpus_is_named_and_hf_names_are_left_alone(tmp_path):
    declared = {"01": {"run_dir", "corpus", "model_name"}}
    ok = {"corpus": "hf:wikitext", "model_name": "HuggingFaceTB/SmolLM2-360M"}
    check_run(ok, {"corpus": ["builtin"]}, ["01"], declared.__getitem__, ["01"])
    with pytest.raises(RephelpersError) as err:
        check_run({"model_name": str(tmp_path / "nothing")}, {"corpus": [str(tmp_path / "c.jsonl")]},
                  ["01"], declared.__getitem__, ["01"])
    assert f"model_name '{tmp_path / 'nothing'}' names a local model folder" in str(err.value)
    assert f"grid.corpus.0: corpus '{tmp_path / 'c.jsonl'}'" in str(err.value)


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: p.stem)
def test_every_shipped_run_file_passes_the_check(path):
    RunSpec.from_yaml(path).check()


def test_the_notebooks_defaults_are_the_demos_values():
    """For every demo.yaml parameter a notebook of its chain declares, the notebook's default is
    that value (a parameter added later to either is covered), and run_dir is runs/demo."""
    demo = RunSpec.from_yaml(ROOT / "papermill_params" / "demo.yaml")
    differ, covered = [], set()
    for name in demo.notebooks:
        defaults = notebook_defaults(notebooks_dir() / f"{name}.ipynb")
        assert defaults["run_dir"] == f"runs/{demo.name}", name
        for key, value in demo.parameters.items():
            if key in defaults:
                covered.add(key)
                if defaults[key] != value or type(defaults[key]) is not type(value):
                    differ.append(f"{name}: {key} = {defaults[key]!r}, demo.yaml: {value!r}")
    assert not differ, "notebook defaults differ from demo.yaml:\n" + "\n".join(differ)
    assert covered == set(demo.parameters)  # every demo parameter is some notebook's


@pytest.mark.parametrize("name", RunSpec.from_yaml(ROOT / "papermill_params" / "demo.yaml").notebooks)
def test_a_notebook_run_by_hand_on_runs_demo_sees_what_the_demo_chain_gave_it(name):
    """The namespace after the parameters cell, run as it is (JupyterLab's "Run all") and with
    papermill's injected cell for the demo (what the runner runs), is the same, run_dir aside,
    which points to the same folder; so every key the stage computes is the demo's, and its
    artifacts are found fresh instead of recomputed and moved to .history/."""
    demo = RunSpec.from_yaml(ROOT / "papermill_params" / "demo.yaml")
    run_dir = project_root() / "runs" / demo.name
    source = notebooks_dir() / f"{name}.ipynb"
    notebook = load_notebook_node(str(source))  # papermill's reader: every cell has its tags list
    sent = {k: v for k, v in {**demo.parameters, "run_dir": str(run_dir)}.items() if k in notebook_parameters(name)}
    injected = parameterize_notebook(notebook, sent)
    by_hand, by_chain = {}, {}
    exec("\n".join(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", [])), by_hand)
    exec("\n".join(c.source for c in injected.cells
                   if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", []))), by_chain)
    hand_dir, chain_dir = by_hand.pop("run_dir"), by_chain.pop("run_dir")
    by_hand.pop("__builtins__"), by_chain.pop("__builtins__")
    assert by_hand == by_chain
    # RunDir reads a relative run_dir from the project root (RunDir itself would create the folder).
    assert not Path(hand_dir).is_absolute() and (project_root() / hand_dir).resolve() == Path(chain_dir).resolve()


def test_available_notebooks_all_have_literal_defaults():
    for name in available_notebooks():
        assert notebook_defaults(notebooks_dir() / f"{name}.ipynb")  # raises on a non-literal default
