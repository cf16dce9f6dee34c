"""The CI-size chain (notebooks 01-06, papermill_params/ci.yaml) on a masked LM built in the test.

A 4-layer, 64-wide BERT with random weights and a WordPiece tokenizer trained on the
builtin corpus (tests/masked_support.py) is saved to a folder, and the runner runs the six
notebooks with ``model_name`` pointing at it, as a user would point it at any HF masked-LM
folder. The outputs are then checked, some against an independent masking loop: stage 04's
pseudo-perplexity of a cluster's held-out texts and stage 05's pseudo-log-likelihood margins.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from masked_support import build_tiny_masked_lm, reference_continuation, reference_text_pll
from rephelpers.abilities.suite import build_tasks, read_items
from rephelpers.perturbations.specificity import sample_heldout
from rephelpers.representations.models import load_model
from rephelpers.runner import RunSpec, notebook_parameters, run_spec
from rephelpers.testbed.chain import SINGLE_ROUND

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ["01_corpus_clusters", "02_representations", "03_cluster_dimensions", "04_perturbations",
         "05_capability_impact", "06_influence_matrix"]
# The CI parameters, with the layers of a 4-layer model.
LAYERS = {"layers": [1, 2], "intervention_layer": 1, "mediation_layer": 1}


@pytest.mark.slow
def test_a_config_built_masked_lm_runs_the_ci_size_chain(tmp_path, monkeypatch):
    folder = build_tiny_masked_lm(tmp_path / "tiny-bert")
    monkeypatch.setenv("REPHELPERS_CACHE", str(tmp_path / "cache"))  # nothing of this model in the user's cache
    monkeypatch.setenv("REPHELPERS_PROJECT_ROOT", str(ROOT))
    # the kernels import this checkout's package
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # A model this small runs fastest on one thread; the runner keeps a value already set.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    ci = yaml.safe_load((ROOT / "papermill_params" / "ci.yaml").read_text())
    # ci.yaml also holds notebook 07's parameters; the runner rejects a name no notebook of the chain reads.
    chain_names = set().union(*(notebook_parameters(n) for n in CHAIN))
    params = {k: v for k, v in {**ci["parameters"], "model_name": str(folder), **LAYERS}.items() if k in chain_names}
    # every control draw at once, so the checks below can count stage 04's arms and stage 05's configs
    params.update(SINGLE_ROUND)
    path = tmp_path / "masked.yaml"
    path.write_text(yaml.safe_dump({"name": "masked", "parameters": params, "notebooks": CHAIN}))

    started = time.time()
    run = run_spec(RunSpec.from_yaml(path), runs_root=tmp_path / "runs")
    elapsed = time.time() - started
    assert elapsed < 600, f"the chain took {elapsed:.0f} s"

    docs = pd.read_parquet(run / "documents.parquet")
    clusters = sorted(docs.cluster.unique())
    assert len(clusters) == params["n_clusters"]
    index = json.loads((run / "activations" / "index.json").read_text())
    assert index["layers"] == LAYERS["layers"] and index["d_model"] == 64 and index["skip_first"] == 1

    mediation = pd.read_parquet(run / "mediation.parquet")
    assert set(mediation.nll_kind) == {"pseudo-NLL"} and len(mediation) == len(clusters) * params["mediation_top_n"]
    assert np.isfinite(mediation[["nll_original", "nll_intervened"]]).all().all()

    model = load_model(str(folder), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_specificity(run, docs, clusters, params, model)
        _check_scores(run, params, model, len(clusters))
    finally:
        torch.set_num_threads(threads)

    # what the notebooks print names the pseudo-likelihoods
    printed = {name: _printed(run / "notebooks" / f"{name}.ipynb") for name in CHAIN[1:5]}
    assert "(masked LM): 4 layers × 64" in printed["02_representations"]
    assert "text is scored by pseudo-perplexity" in printed["04_perturbations"]
    assert "Specificity verdicts (Δ log pseudo-perplexity)" in printed["04_perturbations"]
    assert "choices are scored by pseudo-log-likelihood; fast=True does not apply" in printed["05_capability_impact"]

    influence = pd.read_parquet(run / "influence.parquet")
    assert set(zip(influence.cluster, influence.ability)) == {(k, a) for k in clusters for a in params["abilities"]}
    assert (run / "report.html").exists()


def _check_specificity(run: Path, docs: pd.DataFrame, clusters: list, params: dict, model) -> None:
    report = pd.read_parquet(run / "specificity.parquet")
    assert set(report.ppl_kind) == {"pseudo-perplexity"}
    assert len(report) == len(clusters) * (1 + params["n_controls"]) and "specific" in report.columns
    # stage 04's pseudo-perplexity of cluster k's held-out texts, before any perturbation
    k = int(clusters[0])
    target, _ = sample_heldout(docs, k, params["n_texts"], params["seed"])
    plls = [reference_text_pll(model, text, max_length=params["max_tokens"]) for text in target.text]
    expected = math.exp(-sum(p for p, _ in plls) / sum(n for _, n in plls))
    row = report[(report.cluster == k) & (report.arm == "perturbation")].iloc[0]
    assert row.ppl_target_before == pytest.approx(expected, rel=1e-4)
    assert row.ppl_target_after != pytest.approx(row.ppl_target_before, rel=1e-6)


def _check_scores(run: Path, params: dict, model, n_clusters: int) -> None:
    scores = pd.read_parquet(run / "scores.parquet")
    configs = 1 + n_clusters * (1 + params["n_controls"])
    assert scores.config_id.nunique() == configs and set(scores.likelihood) == {"pseudo-log-likelihood"}
    per_config = scores.groupby("config_id").size()
    assert (per_config == len(params["abilities"]) * params["items_per_task"]).all()
    assert scores.margin.notna().all()
    # two baseline items per task against the masking loop (the tasks rebuilt as notebook 05 built them)
    tasks = build_tasks(params["abilities"], run / "tasks", items_per_task=params["items_per_task"], seed=params["seed"])
    items = {row["id"]: row for info in tasks.values() for row in read_items(info)}
    delimiter = {"rh_code": ""}
    baseline = scores[scores.config_id == "baseline"].groupby("task").head(2)
    for row in baseline.itertuples():
        item = items[row.item]
        ll = [reference_continuation(model, row.prompt, delimiter.get(row.task, " ") + c) for c in item["choices"]]
        gold = item["gold"]
        assert row.margin == pytest.approx(ll[gold] - max(v for j, v in enumerate(ll) if j != gold), abs=1e-4)


def _printed(path: Path) -> str:
    """Everything an executed notebook printed (its stream outputs)."""
    cells = json.loads(path.read_text())["cells"]
    return "".join("".join(out.get("text", "")) for cell in cells for out in cell.get("outputs", [])
                   if out.get("output_type") == "stream")
