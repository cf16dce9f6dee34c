"""Issue 26: the estimators beside perturbation, each against an independent computation."""

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

import bm25s

from rephelpers.abilities.suite import build_tasks, read_items
from rephelpers.artifacts import RunDir
from rephelpers.errors import RephelpersError
from rephelpers.estimators import ESTIMATORS
from rephelpers.estimators.aggregate import (
    agreement_summary, cluster_phi, permutation_pvalues, rank_agreement,
)
from rephelpers.estimators.bm25 import bm25_scores
from rephelpers.estimators.items import ability_items, run_tasks
from rephelpers.estimators.repsim import repsim_scores
from rephelpers.estimators.run import (
    DOCUMENT_SCORERS, PHI_ARTIFACT, EstimatorInputs, check_estimators, documents_artifact, estimator_phi,
)
from rephelpers.representations.activations import extract_activations, load_activations, save_activations


def _doc_scores(values: dict[str, list[float]], ability="a") -> pd.DataFrame:
    """{doc id: [score per item]} → long document-score frame."""
    return pd.DataFrame([{"id": d, "ability": ability, "item_id": f"i{j}", "score": s}
                         for d, row in values.items() for j, s in enumerate(row)])


# -- aggregation -------------------------------------------------------------------------------
def test_cluster_phi_matches_hand_computation():
    values = {"d1": [1.0, 3.0], "d2": [2.0, 2.0], "d3": [0.0, 1.0], "d4": [5.0, 1.0], "d5": [0.0, 0.0]}
    labels = {"d1": 0, "d2": 0, "d3": 1, "d4": 1, "d5": 2}
    phi = cluster_phi(_doc_scores(values), labels, "bm25").set_index("cluster")
    assert list(phi.columns) == ["ability", "phi", "estimator"] and set(phi.estimator) == {"bm25"}
    # item means: d1 2, d2 2, d3 0.5, d4 3, d5 0 -> plain loop over clusters
    means = {d: sum(v) / len(v) for d, v in values.items()}
    for c in (0, 1, 2):
        inside = [means[d] for d in means if labels[d] == c]
        rest = [means[d] for d in means if labels[d] != c]
        expected = len(inside) * (sum(inside) / len(inside) - sum(rest) / len(rest))
        assert phi.loc[c, "phi"] == pytest.approx(expected)
    assert phi.loc[0, "phi"] == pytest.approx(2 * (2 - 3.5 / 3))  # and one by hand


def test_cluster_phi_sampled_documents_keep_the_partition_size():
    # Only d1, d3, d4 scored (an estimator that samples documents): n_C counts the labels.
    values = {"d1": [4.0], "d3": [1.0], "d4": [1.0]}
    labels = {"d1": 0, "d2": 0, "d3": 1, "d4": 1}
    phi = cluster_phi(_doc_scores(values), labels, "x").set_index("cluster").phi
    assert phi[0] == pytest.approx(2 * (4 - 1)) and phi[1] == pytest.approx(2 * (1 - 4))
    with pytest.raises(RephelpersError, match="no scored document"):
        cluster_phi(_doc_scores({"d1": [1.0], "d2": [2.0]}), labels, "x")
    with pytest.raises(RephelpersError, match="at least two"):
        cluster_phi(_doc_scores(values), {"d1": 0, "d3": 0}, "x")
    with pytest.raises(RephelpersError, match="lack the columns"):
        cluster_phi(pd.DataFrame({"id": ["d1"], "score": [1.0]}), labels, "x")


def test_permutation_p_matches_scipy_exact_test():
    rng = np.random.default_rng(3)
    values = rng.normal(size=10)
    values[:4] += 1.0
    docs = {f"d{i}": [v] for i, v in enumerate(values)}
    labels = {f"d{i}": (0 if i < 4 else 1) for i in range(10)}
    ours = permutation_pvalues(_doc_scores(docs), labels, n_permutations=4999, seed=0, correction="none")
    # scipy enumerates all C(10,4) = 210 splits exactly (an independent computation of the same null).
    exact = sps.permutation_test((values[:4], values[4:]), lambda x, y: x.mean() - y.mean(),
                                 permutation_type="independent", alternative="greater", n_resamples=10**6).pvalue
    p0 = ours.set_index("cluster").loc[0, "p_value"]
    assert p0 == pytest.approx(exact, abs=0.02)
    assert ours.p_value.min() >= 1 / 5000 and (ours.p_adjusted == ours.p_value).all()
    # The same seed gives the same p; BH never lowers a p-value.
    again = permutation_pvalues(_doc_scores(docs), labels, n_permutations=4999, seed=0)
    assert (again.p_value.to_numpy() == ours.p_value.to_numpy()).all() and (again.p_adjusted >= again.p_value).all()


def test_rank_agreement_equals_pearson_of_ranks_and_summary_names_disagreement():
    clusters = [0, 1, 2, 3, 4]
    a, b, c = [5.0, 3.0, 1.0, 2.0, 4.0], [4.0, 3.0, 0.0, 1.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]
    phi = pd.concat([pd.DataFrame({"cluster": clusters, "ability": "x", "phi": v, "estimator": e})
                     for e, v in (("perturbation", a), ("repsim", b), ("bm25", c))])
    table = rank_agreement(phi)
    assert len(table) == 3
    rho = table.set_index(["estimator_a", "estimator_b"]).rho
    ranks = {k: pd.Series(v).rank().to_numpy() for k, v in (("a", a), ("b", b))}
    assert rho["perturbation", "repsim"] == pytest.approx(np.corrcoef(ranks["a"], ranks["b"])[0, 1])
    text = agreement_summary(phi, table, {0: "prose", 4: "code"})
    assert "disagree" in text and "perturbation: prose" in text and "bm25: code" in text
    tied = pd.concat([phi[phi.estimator != "perturbation"],
                      pd.DataFrame({"cluster": clusters, "ability": "x", "phi": [0, 0, -1, -1, -1.0],
                                    "estimator": "perturbation"})])
    assert "perturbation: tie of prose and 1" in agreement_summary(tied, rank_agreement(tied), {0: "prose"})
    same = phi.assign(phi=lambda f: np.where(f.cluster == 2, 9.0, 0.0))
    assert agreement_summary(same, rank_agreement(same), {2: "math"}).startswith("x: every estimator ranks cluster math first")


# -- bm25 --------------------------------------------------------------------------------------
DOCS = pd.DataFrame({
    "id": ["a", "b", "c", "d"],
    "text": ["the cat sat on the mat with another cat", "dogs chase cats in the park",
             "stock prices fell sharply on monday", "a cat and a dog share the mat"],
})
ITEMS = pd.DataFrame({"ability": ["pets", "pets", "finance"], "item_id": ["p1", "p2", "f1"],
                      "context": ["Where did the cat sit?", "Who chases", "What fell"],
                      "answer": [" on the mat", " dogs", " prices"]})


def _lucene_bm25(docs: list[list[str]], query: list[str], k1=1.5, b=0.75) -> np.ndarray:
    """Plain-loop Lucene (8+) BM25, the formula in rephelpers.estimators.bm25's docstring."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    out = np.zeros(n)
    for i, doc in enumerate(docs):
        tf = Counter(doc)
        for term in query:
            df = sum(term in d for d in docs)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            out[i] += idf * tf[term] / (tf[term] + k1 * (1 - b + b * len(doc) / avgdl))
    return out


def test_bm25_matches_formula_and_library_ranking():
    scores = bm25_scores(DOCS, ITEMS, stopwords=None, progress=False)
    assert list(scores.columns) == ["id", "ability", "item_id", "score"] and len(scores) == 12
    docs = bm25s.tokenize(DOCS.text.tolist(), stopwords=None, show_progress=False, return_ids=False)
    for item in ITEMS.itertuples():
        query = bm25s.tokenize([item.context + item.answer], stopwords=None, show_progress=False,
                               return_ids=False)[0]
        got = scores[scores.item_id == item.item_id].set_index("id").score.loc[DOCS.id].to_numpy()
        np.testing.assert_allclose(got, _lucene_bm25(docs, query), rtol=1e-5, atol=1e-6)
        # The library's own top-k search returns the same scores for its documents.
        retriever = bm25s.BM25(method="lucene")
        retriever.index(bm25s.tokenize(DOCS.text.tolist(), stopwords=None, show_progress=False), show_progress=False)
        found, top = retriever.retrieve(bm25s.tokenize([item.context + item.answer], stopwords=None,
                                                       show_progress=False), k=len(DOCS), show_progress=False)
        np.testing.assert_allclose(got[found[0]], top[0], rtol=1e-5)
    assert scores[scores.item_id == "f1"].set_index("id").score.idxmax() == "c"


def test_bm25_bad_input_is_a_clear_error():
    with pytest.raises(RephelpersError, match="columns id and text"):
        bm25_scores(DOCS.drop(columns="text"), ITEMS)
    with pytest.raises(RephelpersError, match="k1"):
        bm25_scores(DOCS, ITEMS, k1=-1)


# -- items -------------------------------------------------------------------------------------
def test_ability_items_are_prompt_and_gold_continuation(tmp_path):
    tasks = build_tasks(["arithmetic", "reasoning"], tmp_path / "tasks", items_per_task=3, seed=0)
    items = ability_items(tasks)
    assert list(items.columns) == ["ability", "item_id", "context", "answer"] and len(items) == 6
    raw = read_items(tasks["arithmetic"])[0]
    first = items.iloc[0]
    assert first.context == raw["prompt"] and first.answer == " " + raw["choices"][int(raw["gold"])]
    gen = read_items(tasks["reasoning"])[1]
    assert items[items.item_id == gen["id"]].answer.item() == " " + gen["answer"]
    kept = ability_items(tasks, item_ids={"arithmetic": [raw["id"]]})
    assert len(kept) == 4
    # run_tasks reads the files stage 05 wrote into <run>/tasks without rebuilding them.
    back, skipped = run_tasks(tmp_path, ["arithmetic", "gsm8k"])
    assert skipped == ["gsm8k"] and ability_items(back).equals(ability_items({"arithmetic": tasks["arithmetic"]}))
    with pytest.raises(RephelpersError, match="notebook 05"):
        run_tasks(tmp_path / "other", ["arithmetic"])


# -- registry and stage-06 driver -------------------------------------------------------------
def test_estimator_names_are_checked_before_compute():
    assert ESTIMATORS == ("perturbation", "repsim", "bm25", "influence_functions")
    assert check_estimators(["perturbation", "bm25", "bm25"]) == ["perturbation", "bm25"]
    with pytest.raises(RephelpersError, match=r"unknown estimators \['tracin'\].*perturbation"):
        check_estimators(["tracin"])
    if "influence_functions" not in DOCUMENT_SCORERS:
        with pytest.raises(RephelpersError, match="influence_functions is not installed in this build"):
            check_estimators(["bm25", "influence_functions"])


def _run_with_documents(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    docs = DOCS.assign(cluster=[0, 1, 2, 0])
    run.save_parquet("documents.parquet", docs, "docs-key")
    return run


def test_estimator_phi_writes_keyed_artifacts_and_reuses_them(tmp_path):
    run = _run_with_documents(tmp_path)
    docs = run.load_parquet("documents.parquet")
    influence = pd.DataFrame({"cluster": [0, 1, 2, 0], "ability": ["pets", "pets", "pets", "other"],
                              "phi": [0.3, -0.1, 0.0, 0.2]})
    run.save_parquet("influence.parquet", influence, "infl-key")
    calls = []

    def loader():
        calls.append(1)
        raise AssertionError("bm25 needs no model")

    inputs = EstimatorInputs(run, docs, ITEMS, docs.set_index("id").cluster, loader,
                             params={"bm25": {"stopwords": None, "progress": False}})
    phi = estimator_phi(["perturbation", "bm25"], inputs, influence, n_permutations=199)
    assert not calls and run.exists(documents_artifact("bm25")) and run.exists(PHI_ARTIFACT)
    meta = run.meta_of(documents_artifact("bm25"))
    assert meta["seconds"] >= 0 and meta["peak_rss_mb"] > 0
    # perturbation keeps only the items' abilities; bm25's Φ equals cluster_phi on the saved scores.
    assert set(phi[phi.estimator == "perturbation"].ability) == {"pets"}
    saved = run.load_parquet(documents_artifact("bm25"))
    expected = cluster_phi(saved, docs.set_index("id").cluster, "bm25")
    got = phi[phi.estimator == "bm25"].merge(expected, on=["cluster", "ability"])
    np.testing.assert_allclose(got.phi_x, got.phi_y)
    assert phi[phi.estimator == "bm25"].p_value.between(0.01, 1).all()
    assert (phi[phi.estimator == "bm25"].peak_rss_mb == meta["peak_rss_mb"]).all()
    key = run.key_of(PHI_ARTIFACT)
    estimator_phi(["perturbation", "bm25"], inputs, influence, n_permutations=199)  # fresh: read back
    assert run.key_of(PHI_ARTIFACT) == key
    # Another partition or permutation count: recomputed, the old table moved to .history/.
    estimator_phi(["bm25"], inputs, n_permutations=149)
    assert run.key_of(PHI_ARTIFACT) != key and any((run.root / ".history").glob("estimators__phi.parquet.*"))
    with pytest.raises(RephelpersError, match="needs the influence table"):
        estimator_phi(["perturbation"], inputs)
    alone = estimator_phi(["perturbation"], inputs, influence)
    assert list(alone.columns) == list(phi.columns) and alone.p_value.isna().all() and len(alone) == 3


# -- repsim ------------------------------------------------------------------------------------
@pytest.mark.model
def test_repsim_equals_direct_cosine_of_hf_hidden_states(model, tmp_path, monkeypatch):
    monkeypatch.setenv("REPHELPERS_CACHE", str(tmp_path / "cache"))
    run = RunDir(tmp_path / "run")
    layers = [2, 4]
    acts = extract_activations(model, DOCS.text.tolist(), layers, batch_size=2, max_length=32, progress=False)
    save_activations(run, DOCS.id.tolist(), acts, "resid", "mean", key="acts", model=model.name, max_tokens=32,
                     skip_first=1)
    items = ITEMS.iloc[:2]
    scores = repsim_scores(model, DOCS.iloc[::-1], items, load_activations(run), batch_size=2, progress=False)

    def hf_mean(text):  # independent: HF output_hidden_states, mean over tokens 1..T-1
        enc = model.tokenizer(text, return_tensors="pt", truncation=True, max_length=32)
        with torch.inference_mode():
            hidden = model.hf(**enc, output_hidden_states=True).hidden_states
        return {l: hidden[l + 1][0, 1:].double().mean(0).numpy() for l in layers}

    doc_h = {d.id: hf_mean(d.text) for d in DOCS.itertuples()}
    for item in items.itertuples():
        item_h = hf_mean(item.context + item.answer)
        for doc_id, h in doc_h.items():
            expected = np.mean([h[l] @ item_h[l] / np.linalg.norm(h[l]) / np.linalg.norm(item_h[l]) for l in layers])
            got = scores[(scores.id == doc_id) & (scores.item_id == item.item_id)].score.item()
            assert got == pytest.approx(expected, abs=1e-4)
    with pytest.raises(RephelpersError, match=r"layers \[7\]"):
        repsim_scores(model, DOCS, items, load_activations(run), layers=[7])


# -- calibration -------------------------------------------------------------------------------
def test_permutation_test_holds_alpha_on_nulls_and_finds_a_planted_cluster():
    from rephelpers.estimators import calibration
    from rephelpers.estimators.calibration import permutation_calibration

    frame = permutation_calibration(n_sims=6, n_permutations=999, effects=(1.0,), docs_per_cluster=30, n_items=5)
    nulls = frame[frame.effect == 0]
    assert set(nulls.null) == {"normal", "skewed", "unequal"} and (nulls.n_cells == 6 * 15).all()
    # 90 cells per null: allow α + 0.05 for simulation noise (the bench runs the full-size version).
    assert (nulls.fpr <= 0.10).all(), nulls.to_string()
    power = frame[frame.effect > 0].set_index("null").power
    # A one-SD shift of a 30-document cluster is found; under "unequal" the planted cluster is the smallest (10 docs).
    assert power["normal"] >= 0.8 and power["skewed"] >= 0.8 and power["unequal"] >= 0.5, frame.to_string()
    # Too few permutations for the correction: said before anyone reads an empty result.
    scores, labels = calibration.simulate_doc_scores(docs_per_cluster=5, n_items=2)
    with pytest.warns(UserWarning, match="raise n_permutations"):
        permutation_pvalues(scores, labels, n_permutations=199)


def test_estimator_chart_has_one_panel_per_estimator_scaled_to_its_own_range():
    from rephelpers.views import charts

    phi = pd.DataFrame({"cluster": [0, 1, 0, 1], "ability": "x", "phi": [0.2, -0.1, 30.0, 60.0],
                        "estimator": ["perturbation", "perturbation", "bm25", "bm25"],
                        "p_adjusted": [np.nan, np.nan, 0.01, 0.5]})
    frame = charts.estimator_phi_frame(phi, {0: "prose"})
    assert frame.scaled.tolist() == pytest.approx([1.0, -0.5, 0.5, 1.0])
    assert frame.label.tolist() == ["+0.2", "-0.1", "+30*", "+60"] and frame.cluster_label[0] == "0: prose"
    spec = charts.estimator_phi_chart(phi).to_dict()
    assert [p["title"] for p in spec["hconcat"]] == ["perturbation", "bm25"]
    agreement = rank_agreement(pd.concat([phi, phi.assign(cluster=phi.cluster + 2)]))
    assert "layer" in charts.rank_agreement_chart(agreement).to_dict()
