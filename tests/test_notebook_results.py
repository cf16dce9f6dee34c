"""Issue 29: notebooks 01 and 07 write their results through run.cached (keyed; a stale result moves to .history/)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from rephelpers.artifacts import RunDir
from rephelpers.corpus.clustering import ClusterResult
from rephelpers.corpus.stage import ARTIFACTS, Clustering, cached_clustering
from rephelpers.testbed.groundtruth import AGREEMENT_ARTIFACTS, CORPUS_FILE, save_agreement, save_corpus


def _clustering(labels) -> Clustering:
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    documents = pd.DataFrame({"id": [f"d{i}" for i in range(n)], "doc_id": [f"d{i}" for i in range(n)],
                              "text": [f"text {i}" for i in range(n)], "source": "s", "domain": "x",
                              "split": ["train", "heldout"] * (n // 2), "cluster": labels})
    result = ClusterResult(labels=labels, names=["a", "b"], method="kmeans", params={"n_clusters": 2},
                           top_terms=[["a"], ["b"]])
    report = {**result.to_dict(), "validation": {"silhouette": 0.5}, "clusters": [{"cluster": 0}, {"cluster": 1}],
              "corpus": {"fingerprint": "f"}, "splits": {"train": n // 2, "heldout": n // 2}}
    return Clustering(documents, result, report)


def test_stage01_is_cached_and_a_stale_result_moves_to_history(tmp_path):
    run = RunDir(tmp_path / "run")
    calls = []

    def compute(labels):
        def go():
            calls.append(labels)
            return _clustering(labels)
        return go

    first = cached_clustering(run, compute([0, 1, 0, 1]), params={"n_clusters": 2, "fingerprint": "f"})
    assert calls == [[0, 1, 0, 1]] and first.result.labels.tolist() == [0, 1, 0, 1]
    key = run.key_of("documents.parquet")
    assert key == run.key_of("clusters.json") == run.key_for(ARTIFACTS[0], {"n_clusters": 2, "fingerprint": "f"})
    again = cached_clustering(run, compute([1, 0, 1, 0]), params={"n_clusters": 2, "fingerprint": "f"})
    assert len(calls) == 1  # fresh: loaded, not recomputed
    assert again.result.labels.tolist() == [0, 1, 0, 1] and again.validation == {"silhouette": 0.5}
    pd.testing.assert_frame_equal(again.characterization, pd.DataFrame([{"cluster": 0}, {"cluster": 1}]))
    cached_clustering(run, compute([1, 1, 0, 0]), params={"n_clusters": 2, "fingerprint": "g"})
    assert len(calls) == 2 and run.load_parquet("documents.parquet")["cluster"].tolist() == [1, 1, 0, 0]
    moved = sorted(p.name for p in (run.root / ".history").iterdir())
    assert len(moved) == 2 and all(key in name for name in moved)  # both old files, under their old key


def test_agreement_is_keyed_by_what_it_is_computed_from(tmp_path):
    run = RunDir(tmp_path / "run")
    cells = pd.DataFrame({"cluster": [0, 1], "phi": [0.5, 0.1]})
    text, back = save_agreement(run, json.dumps({"rho": 1.0}), cells, params={"cells": cells})
    assert json.loads(run.path(AGREEMENT_ARTIFACTS[0]).read_text()) == {"rho": 1.0}
    pd.testing.assert_frame_equal(run.load_parquet(AGREEMENT_ARTIFACTS[1]), cells)
    # same inputs: what is on disk is kept, even if the text offered now differs (e.g. wall times)
    text, back = save_agreement(run, json.dumps({"rho": 2.0}), cells, params={"cells": cells})
    assert json.loads(text) == {"rho": 1.0} and not (run.root / ".history").exists()
    other = cells.assign(phi=[0.2, 0.3])
    save_agreement(run, json.dumps({"rho": 0.0}), other, params={"cells": other})
    assert json.loads(run.path(AGREEMENT_ARTIFACTS[0]).read_text()) == {"rho": 0.0}
    assert len(list((run.root / ".history").iterdir())) == 2


def test_the_testbed_corpus_is_rewritten_only_when_it_changes(tmp_path):
    run = RunDir(tmp_path / "run")
    corpus = pd.DataFrame({"id": ["a", "b"], "text": ["x", "y"], "source": "s", "domain": ["d", "e"], "planted": ""})
    path = save_corpus(run, corpus)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"id": "a", "text": "x", "source": "s", "domain": "d"}, {"id": "b", "text": "y", "source": "s", "domain": "e"}]
    written = path.stat().st_mtime_ns
    assert save_corpus(run, corpus.assign(planted="p")) == path and path.stat().st_mtime_ns == written  # same corpus
    save_corpus(run, corpus.assign(text=["x", "z"]))
    assert json.loads(path.read_text().splitlines()[1])["text"] == "z"
    assert [p.name.split(".")[0] for p in (run.root / ".history").iterdir()] == [CORPUS_FILE.split(".")[0]]


@pytest.mark.parametrize("notebook", ["01_corpus_clusters", "07_ground_truth"])
def test_the_notebooks_write_no_result_by_hand(notebook):
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / f"{notebook}.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for by_hand in (".to_parquet(", ".to_json(", "save_text(", "save_parquet(", "save_json(", "write_text(",
                    "write_corpus(", "stable_hash(", "is_fresh("):
        assert by_hand not in code, (notebook, by_hand)
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
