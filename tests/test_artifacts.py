import json

import numpy as np
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


def test_cached_derives_its_key_from_params_and_upstream_keys(tmp_path):
    run = RunDir(tmp_path / "run")
    calls = []

    def compute(value):
        def f():
            calls.append(value)
            return pd.DataFrame({"x": [value]})
        return f

    with pytest.raises(RephelpersError, match=r"computed from \['documents.parquet'\]"):
        run.cached("scores.parquet", compute(1), params={"a": 1}, upstream=["documents.parquet"])
    assert calls == []  # nothing is computed before its inputs are known
    run.save_parquet("documents.parquet", pd.DataFrame({"id": ["d1"]}), key="docs-v1")
    first = run.cached("scores.parquet", compute(1), params={"a": 1}, upstream=["documents.parquet"])
    again = run.cached("scores.parquet", compute(2), params={"a": 1}, upstream=["documents.parquet"])
    assert calls == [1] and again["x"].tolist() == first["x"].tolist() == [1]
    # other parameters: recomputed, the old result kept in .history
    run.cached("scores.parquet", compute(3), params={"a": 2}, upstream=["documents.parquet"])
    assert calls == [1, 3] and len(list((run.root / ".history").iterdir())) == 1
    # the upstream artifact re-made from other inputs: recomputed though the notebook's parameters did not change
    run.save_parquet("documents.parquet", pd.DataFrame({"id": ["d1"]}), key="docs-v2")
    assert run.cached("scores.parquet", compute(4), params={"a": 2}, upstream=["documents.parquet"])["x"].tolist() == [4]
    assert run.key_of("scores.parquet") == run.key_for("scores.parquet", {"a": 2}, ["documents.parquet"])
    # several files written together, with their own writer and reader: fresh only when all are
    saved = {}

    def save(value, key):
        run.save_json("a.json", value, key)
        run.save_text("b.txt", "b", key)
        saved["n"] = saved.get("n", 0) + 1

    pair = ["a.json", "b.txt"]
    assert run.cached(pair, lambda: {"v": 1}, params={}, save=save, load=lambda: run.load_json("a.json")) == {"v": 1}
    assert run.cached(pair, lambda: {"v": 2}, params={}, save=save, load=lambda: run.load_json("a.json")) == {"v": 1}
    run.save_text("b.txt", "b", key="other")
    assert run.cached(pair, lambda: {"v": 3}, params={}, save=save, load=lambda: run.load_json("a.json")) == {"v": 3}
    assert saved["n"] == 2
    with pytest.raises(RephelpersError, match="pass save= and load="):
        run.cached("activations", lambda: None, params={})


def test_stable_hash_counts_nested_arrays_and_frames_by_content():
    big = np.zeros(5000)
    changed = big.copy()
    changed[2500] = 1.0  # the printed form of both arrays is the same ("[0. 0. 0. ... 0. 0. 0.]")
    assert str(big) == str(changed)
    assert stable_hash({"x": big}) != stable_hash({"x": changed})
    frame = pd.DataFrame({"a": range(1000)})
    other = frame.copy()
    other.loc[500, "a"] = -1
    assert stable_hash([frame]) != stable_hash([other]) and stable_hash([frame]) == stable_hash([frame.copy()])
    # plain JSON parts hash as before: keys of caches written without arrays stay valid
    import hashlib
    import json as _json

    plain = {"b": [1, 2, (3, 4)], "a": "x"}
    expected = hashlib.sha256(_json.dumps(plain, sort_keys=True, default=str).encode() + b"\x00").hexdigest()[:16]
    assert stable_hash(plain) == expected
