import json

import pandas as pd
import pytest

from rephelpers.artifacts import RunDir, stable_hash
from rephelpers.errors import RephelpersError


def test_changed_inputs_archive_instead_of_overwrite(tmp_path):
    run = RunDir(tmp_path / "r")
    run.save_parquet("x.parquet", pd.DataFrame({"a": [1]}), key="k1")
    assert run.is_fresh("x.parquet", "k1") and not run.is_fresh("x.parquet", "k2")
    run.save_parquet("x.parquet", pd.DataFrame({"a": [2]}), key="k2")
    assert run.load_parquet("x.parquet").a.tolist() == [2]
    archived = list((run.root / ".history").iterdir())
    assert len(archived) == 1 and pd.read_parquet(archived[0]).a.tolist() == [1]


def test_missing_and_corrupt_artifacts_name_the_fix(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(RephelpersError, match="run notebook 01 first"):
        run.load_parquet("documents.parquet", stage="notebook 01")
    run.save_json("c.json", {"a": 1}, key="k")
    run.path("c.json").write_text("{broken")
    with pytest.raises(RephelpersError, match="corrupt.*re-run"):
        run.load_json("c.json")
    (run.root / "manifest.json").write_text("{nope")
    with pytest.raises(RephelpersError, match="manifest.json is corrupt"):
        run.is_fresh("c.json", "k")


def test_stable_hash_is_order_insensitive_for_dicts_and_sensitive_to_values():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert stable_hash(pd.DataFrame({"t": ["x", "y"]})) != stable_hash(pd.DataFrame({"t": ["y", "x"]}))
    json.dumps(stable_hash([1, 2]))


def test_relative_run_dir_resolves_against_project_root(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path / "notebooks")
    monkeypatch.delenv("REPHELPERS_PROJECT_ROOT", raising=False)
    assert RunDir("runs/x").root == (tmp_path / "runs" / "x").resolve()
