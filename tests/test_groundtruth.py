"""The ground-truth testbed: planted skills, leave-cluster-out fine-tunes, and the agreement metrics.

Model tests train only the top layers for a few dozen steps on the embedded SmolLM2-135M,
on one thread, so the module stays within a few minutes on 2 cores.
"""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats

from rephelpers.views import charts
from rephelpers.testbed import finetune as ft
from rephelpers.testbed import groundtruth as gt
from rephelpers.testbed import planted as P
from rephelpers.abilities.suite import ABILITIES, build_tasks, read_items
from rephelpers.errors import RephelpersError
from rephelpers.estimators.run import PHI_ARTIFACT
from rephelpers.runner import RunSpec
from rephelpers.influence.stats import minimum_detectable_ais

SKILLS = list(P.PLANTED)


# -- the planted generator ----------------------------------------------------------------------
def test_planted_abilities_are_registered_multiple_choice_near_chance():
    for skill in SKILLS:
        spec = ABILITIES[P.planted_ability(skill)]
        assert spec.output_type == "multiple_choice" and spec.chance == 0.25 and spec.family == "planted"
    with pytest.raises(RephelpersError, match="unknown planted skill"):
        P.planted_ability("poetry")


def test_worlds_are_fixed_balanced_and_bijective():
    colours = P.creature_colours()
    assert len(colours) == P.N_CREATURES and set(colours.values()) == set(P.COLOURS)
    assert set(pd.Series(colours).value_counts()) == {P.N_CREATURES // len(P.COLOURS)}  # balanced: chance is 1/4
    lexicon = P.veltish_lexicon()
    assert sorted(lexicon.values()) == sorted(P.ENGLISH_NOUNS)  # one word per noun
    assert not set(lexicon) & set(colours)  # no made-up word is both a creature and a Veltish word
    assert P.glyph(47, 12) == "1247"


def test_planted_corpus_and_items_are_deterministic_per_seed(tmp_path):
    a = P.planted_corpus(SKILLS, docs_per_skill=15, seed=0)
    pd.testing.assert_frame_equal(a, P.planted_corpus(SKILLS, docs_per_skill=15, seed=0))
    other = P.planted_corpus(SKILLS, docs_per_skill=15, seed=1)
    assert not a["text"].equals(other["text"])
    assert list(a.columns) == ["id", "text", "source", "domain", "planted"]
    assert a["id"].is_unique and a["text"].is_unique and set(a["planted"]) == set(SKILLS)
    names = [P.planted_ability(s) for s in SKILLS]
    first = build_tasks(names, tmp_path / "a", items_per_task=12, seed=0)
    again = build_tasks(names, tmp_path / "b", items_per_task=12, seed=0)
    for name in names:
        assert first[name].data_path.read_bytes() == again[name].data_path.read_bytes()


def test_items_never_occur_in_the_corpus_and_their_answers_are_right(tmp_path):
    corpus = pd.concat([P.planted_corpus(SKILLS, docs_per_skill=150, seed=s) for s in (0, 1, 2)])
    texts = corpus["text"].tolist()
    names = [P.planted_ability(s) for s in SKILLS]
    tasks = build_tasks(names, tmp_path, items_per_task=24, seed=0)
    for name in names:
        items = read_items(tasks[name])
        assert gt.item_overlaps(items, texts) == [], name
        assert all(it["choices"][it["gold"]] not in it["choices"][:it["gold"]] for it in items)
    # glyph: the corpus never writes a reserved pair, every item is one, and all answers follow b‖a.
    equations = re.findall(r"^(\d+) ⊕ (\d+) = (\d+)$", "\n".join(texts), flags=re.M)
    assert len(equations) > 1000
    assert all(not P.glyph_reserved(int(a), int(b)) and c == b + a for a, b, c in equations)
    for it in read_items(tasks["planted_glyph"]):
        a, b = map(int, re.match(r"(\d+) ⊕ (\d+) =", it["prompt"]).groups())
        assert P.glyph_reserved(a, b) and it["choices"][it["gold"]] == f"{b}{a}"
    colours, lexicon = P.creature_colours(), P.veltish_lexicon()
    assert all(it["choices"][it["gold"]] == colours[it["question"]] for it in read_items(tasks["planted_facts"]))
    assert all(it["choices"][it["gold"]] == lexicon[it["question"]] for it in read_items(tasks["planted_lexicon"]))
    # the corpus does teach every fact the items ask
    joined = "\n".join(texts)
    assert all(name in joined for name in colours) and all(f'"{w}"' in joined for w in lexicon)


def test_item_overlaps_finds_a_leaked_item():
    items = [{"prompt": "12 ⊕ 34 ="}, {"prompt": "On the Varn Isles, the zorp is"}]
    assert gt.item_overlaps(items, ["nothing here", "line\n12 ⊕ 34 = 3412"]) == ["12 ⊕ 34 ="]


# -- fine-tuning --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    from rephelpers.representations.models import load_model

    return load_model("smollm2-135m")


def _blocks(model, docs_per_skill, block_tokens, seed=0, rest_docs=6):
    corpus = P.planted_corpus(SKILLS, docs_per_skill=docs_per_skill, seed=seed)
    rest = [f"Chapter {i}. The weather report says rain is likely in the north and sun in the south." * 3
            for i in range(rest_docs)]
    texts = corpus["text"].tolist() + rest
    groups = corpus["planted"].tolist() + ["rest"] * rest_docs
    return ft.pack_blocks(texts, groups, model.tokenizer, block_tokens)


def test_pack_blocks_keeps_groups_apart_and_budgets_match(model):
    blocks = _blocks(model, 4, 32)
    assert blocks.ids.shape[1] == 32 and len(blocks.group) == len(blocks)
    for group, ids in (("glyph", blocks.ids[blocks.group == "glyph"]),):
        assert "⊕" in model.tokenizer.decode(ids.flatten()) and "Veltish" not in model.tokenizer.decode(ids.flatten())
    cfg = ft.FineTuneConfig(steps=5, batch_size=3, block_tokens=32)
    allowed = np.flatnonzero(blocks.group != "glyph")
    with_all = ft.block_schedule(np.arange(len(blocks)), cfg)
    without = ft.block_schedule(allowed, cfg)
    assert with_all.shape == without.shape == (5, 3)  # same budget, steps · batch · T tokens
    assert not np.isin(without, np.flatnonzero(blocks.group == "glyph")).any()
    assert np.array_equal(without, ft.block_schedule(allowed, cfg))  # seeded


def test_top_layer_shortcut_reproduces_the_full_forward(model):
    blocks = _blocks(model, 2, 24)
    sub = ft.Blocks(blocks.ids[:3], blocks.group[:3])
    start = ft.first_trained_layer(model, 3)
    states = ft.prefix_states(model, sub, start)
    with torch.inference_mode():
        full = model.hf(sub.ids).logits
        hidden = model.hf(sub.ids, output_hidden_states=True).hidden_states[start]
        short = ft._top_logits(model, states, start)
    torch.testing.assert_close(states, hidden)
    torch.testing.assert_close(short, full, atol=1e-3, rtol=1e-3)
    assert len(ft._layers(model)) == model.n_layers  # the swap was undone


def test_a_short_finetune_lowers_loss_on_the_planted_clusters(model):
    blocks = _blocks(model, 10, 48)
    heldout = _blocks(model, 3, 48, seed=1)  # unseen documents of the same clusters
    cfg = ft.FineTuneConfig(steps=15, batch_size=4, block_tokens=48, lr=1e-3, train_layers=2, warmup=3)
    states = ft.prefix_states(model, blocks, ft.first_trained_layer(model, cfg.train_layers))
    before_weights = ft.snapshot(model, cfg.train_layers)
    before = ft.block_loss(model, heldout)
    trained, losses = ft.finetune(model, blocks, states, cfg)
    for name, value in ft.snapshot(model, cfg.train_layers).items():  # the model itself is untouched
        assert torch.equal(value, before_weights[name])
    with ft.using_weights(model, trained):
        after = ft.block_loss(model, heldout)
    assert ft.block_loss(model, heldout) == before  # restored after the context
    assert len(losses) == 15 and np.mean(losses[-3:]) < np.mean(losses[:3])
    for skill in SKILLS:
        assert after[skill] < before[skill] - 0.3, (skill, before[skill], after[skill])


def test_leaving_a_cluster_out_loses_its_skill_and_finetunes_are_cached(model, tmp_path, monkeypatch):
    # glyph (a rule) is the planted skill a few dozen steps teach; f_-glyph spends the same budget on lexicon.
    # The mix is pinned (as many glyph as lexicon statements per document, about half the tokens glyph's) so that
    # 50 steps teach glyph whatever the testbed's own shares (LINES_PER_DOCUMENT) are.
    monkeypatch.setitem(P.LINES_PER_DOCUMENT, "glyph", (7, 9))
    monkeypatch.setitem(P.LINES_PER_DOCUMENT, "lexicon", (7, 9))
    corpus = P.planted_corpus(["glyph", "lexicon"], docs_per_skill=20, seed=0)
    blocks = ft.pack_blocks(corpus["text"].tolist(), corpus["planted"].tolist(), model.tokenizer, 32)
    cfg = ft.FineTuneConfig(steps=50, batch_size=8, block_tokens=32, lr=3e-3, train_layers=4, warmup=3)
    states = ft.prefix_states(model, blocks, ft.first_trained_layer(model, cfg.train_layers))
    tasks = build_tasks(["planted_glyph"], tmp_path / "tasks", items_per_task=16, seed=0)
    scores, runs = gt.leave_out_scores(model, blocks, states, cfg, ["glyph"], [0], tasks, tmp_path / "ft", progress=False)
    m = scores.groupby("model")["score"].mean()
    # measured: 0.44 with D_glyph (0.56 with the 24-word lexicon of world v1), 0.0 without (the base model
    # scores 0.0: it prefers a + b)
    assert m["all"] >= 0.4 and m["-glyph"] <= 0.25 and m["all"] - m["-glyph"] >= 0.35, m.to_dict()
    assert set(runs["tokens"]) == {cfg.tokens} and not runs["cached"].any()
    stars = gt.phi_star(scores, n_boot=200)
    row = stars.set_index(["cluster", "ability"]).loc[("glyph", "planted_glyph")]
    assert row["phi_star"] > 0.5 and not row["null"]
    # resuming: both fine-tunes and their scores come back from the cache, no training
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: pytest.fail("a cached fine-tune was redone"))
    again, runs_again = gt.leave_out_scores(model, blocks, states, cfg, ["glyph"], [0], tasks, tmp_path / "ft", progress=False)
    assert runs_again["cached"].all()
    pd.testing.assert_frame_equal(again, scores)
    assert set(gt.f_all_weights(tmp_path / "ft", runs, 0)) == set(ft.trained_parameters(model, cfg.train_layers))


# -- Φ* and the agreement metrics ------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_spearman_matches_scipy_including_ties():
    rng = np.random.default_rng(0)
    for n in (3, 9, 25):
        for _ in range(20):
            x = rng.integers(0, 4, n).astype(float)  # many ties
            y = x + rng.normal(0, 1, n)
            expected = scipy_stats.spearmanr(x, y).statistic
            if np.isnan(expected):
                assert math.isnan(gt.spearman(x, y))
            else:
                assert gt.spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(gt.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(gt.spearman([1.0, np.nan, 3.0], [1, 2, 3]))  # a NaN propagates, as in scipy
    assert gt.spearman([1.0, 2.0], [5.0, 3.0]) == pytest.approx(-1.0)
    assert math.isnan(gt.spearman_ci([1, 1, 1, 1], [1, 2, 3, 4], n_boot=50)[0])  # every replicate constant


def test_spearman_ci_is_a_bootstrap_over_cells():
    rng = np.random.default_rng(1)
    x = rng.normal(size=12)
    y = x + rng.normal(0, 0.5, 12)
    low, high = gt.spearman_ci(x, y, n_boot=2000, seed=0)
    rho = gt.spearman(x, y)
    assert low < rho < high <= 1
    idx = np.random.default_rng(0).integers(0, 12, size=(2000, 12))
    reps = [scipy_stats.spearmanr(x[i], y[i]).statistic for i in idx]
    reps = np.asarray([r for r in reps if np.isfinite(r)])
    assert (low, high) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), abs=1e-9)


def test_stratified_spearman_ci_keeps_each_replicates_composition_and_covers_the_expected_rho():
    rng = np.random.default_rng(2)
    diagonal = np.eye(4, dtype=bool).ravel()
    x = diagonal * 0.8 + rng.normal(0, 0.2, 16)
    y = diagonal * 0.8 + rng.normal(0, 0.05, 16)
    low, high = gt.spearman_ci(x, y, n_boot=1000, seed=3, strata=diagonal)
    # the documented draw: per stratum in sorted order (False, True), within it
    draw = np.random.default_rng(3)
    groups = [np.flatnonzero(~diagonal), np.flatnonzero(diagonal)]
    idx = np.concatenate([g[draw.integers(0, len(g), size=(1000, len(g)))] for g in groups], axis=1)
    assert (diagonal[idx].sum(axis=1) == 4).all()  # every replicate has the design's 4 own-skill cells
    reps = np.asarray([scipy_stats.spearmanr(x[i], y[i]).statistic for i in idx])
    assert (low, high) == pytest.approx(tuple(np.quantile(reps[np.isfinite(reps)], [0.025, 0.975])), abs=1e-9)
    # one stratum is the unstratified bootstrap
    assert gt.spearman_ci(x, y, 300, seed=1, strata=np.zeros(16)) == gt.spearman_ci(x, y, 300, seed=1)
    with pytest.raises(RephelpersError, match="strata"):
        gt.spearman_ci(x, y, strata=diagonal[:8])
    # simulated 4 x 4 testbeds: it covers the expected ρ about as often as it says, and is narrower
    sims = [(diagonal * 0.8 + rng.normal(0, 0.2, 16), diagonal * 0.8 + rng.normal(0, 0.05, 16)) for _ in range(400)]
    expected = np.mean([gt.spearman(p, s) for p, s in sims])
    covered, widths = [], []
    for i, (p, s) in enumerate(sims[:120]):
        for strata in (diagonal, None):
            lo, hi = gt.spearman_ci(p, s, 300, seed=i, strata=strata)
            covered.append((strata is not None, lo <= expected <= hi))
            widths.append((strata is not None, hi - lo))
    cover = {k: np.mean([c for key, c in covered if key == k]) for k in (True, False)}
    width = {k: np.mean([w for key, w in widths if key == k]) for k in (True, False)}
    assert 0.88 <= cover[True] <= 1.0 and cover[False] >= cover[True]
    assert width[True] < 0.75 * width[False]


def _leave_out_frame():
    """Two seeds, 4 items; f_all scores 1 on items 0-2 of 'planted_glyph', f_-glyph 0 everywhere on it."""
    rows = []
    for seed in (0, 1):
        for model, left in (("all", ""), ("-glyph", "glyph"), ("-facts", "facts")):
            for ability in ("planted_glyph", "planted_facts"):
                for item in range(4):
                    if ability == "planted_glyph":
                        score = float(item < 3) if model != "-glyph" else 0.0
                    else:
                        score = float(item < 2) if model != "-facts" else float(item < 1)
                    rows.append({"seed": seed, "model": model, "left_out": left, "ability": ability,
                                 "item": f"i{item}", "score": score, "p_correct": 0.5})
    return pd.DataFrame(rows)


def test_phi_star_formula_and_interval():
    stars = gt.phi_star(_leave_out_frame(), n_boot=500).set_index(["cluster", "ability"])
    assert stars.loc[("glyph", "planted_glyph"), "phi_star"] == pytest.approx(1.0)  # (0.75 - 0) / 0.75
    assert stars.loc[("facts", "planted_facts"), "phi_star"] == pytest.approx(0.5)  # (0.5 - 0.25) / 0.5
    assert stars.loc[("glyph", "planted_facts"), "phi_star"] == pytest.approx(0.0)
    assert stars.loc[("glyph", "planted_facts"), "null"]
    assert not stars.loc[("glyph", "planted_glyph"), "null"]
    assert (stars["phi_star_low"] <= stars["phi_star"] + 1e-12).all()
    assert set(stars["n_seeds"]) == {2} and set(stars["n_items"]) == {4}


def test_map_clusters_uses_majorities():
    docs = pd.DataFrame({
        "cluster": [0, 0, 0, 1, 1, 1, 1, 2, 2],
        "domain": ["planted_glyph"] * 3 + ["planted_facts", "planted_facts", "code", "code", "planted_facts", "code"],
    })
    m = gt.map_clusters(docs, ["glyph", "facts"]).set_index("skill")
    assert m.loc["glyph", "cluster"] == 0 and m.loc["glyph", "purity"] == 1.0 and m.loc["glyph", "mapped"]
    assert m.loc["facts", "cluster"] == 1 and m.loc["facts", "recall"] == pytest.approx(2 / 3)
    assert m.loc["facts", "purity"] == 0.5 and m.loc["facts", "mapped"]


@pytest.mark.parametrize("new_columns", [False, True])
def test_agreement_cells_recovery_and_false_positives(new_columns):
    skills = ["facts", "glyph", "lexicon"]
    abilities = [P.planted_ability(s) for s in skills]
    stars = pd.DataFrame([
        {"cluster": s, "ability": a, "phi_star": 0.8 if a == P.planted_ability(s) else 0.01 * i,
         "phi_star_low": 0.5 if a == P.planted_ability(s) else -0.1, "phi_star_high": 0.9 if a == P.planted_ability(s) else 0.1,
         "null": a != P.planted_ability(s), "m_all": 0.8, "m_minus": 0.2}
        for i, (s, a) in enumerate((s, a) for s in skills for a in abilities)
    ])
    mapping = pd.DataFrame({"skill": skills, "cluster": [5, 6, 7], "recall": 1.0, "purity": 1.0, "mapped": True})
    rows = []
    for setting, good in (("kind=a", True), ("kind=b", False)):
        for s, k in zip(skills, (5, 6, 7)):
            for a in abilities:
                own = a == P.planted_ability(s)
                phi = (0.6 if own else 0.05) if good else (0.1 if own else 0.3)
                rows.append({"setting": setting, "cluster": k, "ability": a, "phi": phi, "phi_control": 0.0,
                             "exc": phi > 0.2, "flag": phi > 0.2})
        rows.append({"setting": setting, "cluster": 0, "ability": abilities[0], "phi": 0.9, "phi_control": 0.0,
                     "exc": True, "flag": True})  # a demo-corpus cluster: not a planted cell
    influence = pd.DataFrame(rows).rename(columns={
        "exc": "exceeds_controls" if new_columns else "exceeds_control",
        "flag": "finding" if new_columns else "significant"})
    cells = gt.agreement_cells(influence, stars, mapping)
    assert len(cells) == 2 * 9 and cells["diagonal"].sum() == 2 * 3
    assert (cells["beyond"] == cells["exceeds"]).all()  # without phi_minus_control_low, stage 06's test decides
    table = gt.setting_agreement(cells, skills, n_boot=200).set_index("setting")
    assert len(table) == 2 * 2 and set(table["score"]) == {"phi", "phi_minus_control"}
    assert table.index[0].startswith("kind=a, score=")  # best first
    a, b = "kind=a, score=phi", "kind=b, score=phi"
    assert table.loc[a, "diagonal_recovery"] == 1.0 and table.loc[a, "off_diagonal_false_positives"] == 0
    assert table.loc[a, "diagonal_recovery_strict"] == 1.0
    assert table.loc[b, "diagonal_recovery"] == 0.0 and table.loc[b, "off_diagonal_false_positives"] == 6
    good = cells[cells.setting == "kind=a"]
    assert table.loc[a, "spearman_rho"] == pytest.approx(scipy_stats.spearmanr(good.phi, good.phi_star).statistic)
    low, high = gt.spearman_ci(good.phi, good.phi_star, n_boot=200, strata=good.diagonal)
    assert (table.loc[a, "spearman_low"], table.loc[a, "spearman_high"]) == pytest.approx((low, high))
    low, high = gt.spearman_ci(good.phi, good.phi_star, n_boot=200)
    assert (table.loc[a, "spearman_low_unstratified"], table.loc[a, "spearman_high_unstratified"]) == pytest.approx((low, high))
    summary = gt.agreement_summary(table.reset_index(), mapping)
    assert summary["best_setting"].startswith("kind=a") and summary["diagonal_recovery"] == 1.0
    assert {"spearman_rho", "spearman_ci", "off_diagonal_false_positives"} <= set(summary)
    assert "Meets" in gt.headline(table.reset_index()) or "Falls short" in gt.headline(table.reset_index())
    spec = charts.scatter_chart(cells).to_dict()
    assert "facet" in spec and all("data" not in layer for layer in spec["spec"]["layer"])  # each panel: its setting only


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_beyond_controls_uses_the_interval_of_phi_minus_control_and_scores_it_too():
    """With 2 control draws stage 06's rank test can never pass (p ≥ 1/3): recovery then rests
    on Φ − Φ_control's interval; the Φ − Φ_control score is ranked against Φ* like Φ."""
    skills = ["facts", "glyph"]
    abilities = [P.planted_ability(s) for s in skills]
    stars = pd.DataFrame([
        {"cluster": s, "ability": a, "phi_star": 0.9 if a == P.planted_ability(s) else 0.0, "phi_star_low": 0.0,
         "phi_star_high": 1.0, "null": a != P.planted_ability(s), "m_all": 0.9, "m_minus": 0.1}
        for s in skills for a in abilities
    ])
    mapping = pd.DataFrame({"skill": skills, "cluster": [0, 1], "recall": 1.0, "purity": 1.0, "mapped": True})
    # facts' row: its own cell has the larger Φ − Φ_control but a smaller Φ (the other ability is fragile
    # to random edits too); glyph's row: its own cell's interval of Φ − Φ_control covers 0.
    influence = pd.DataFrame([
        {"cluster": 0, "ability": "planted_facts", "phi": 0.8, "phi_control": 0.1, "phi_minus_control_low": 0.3},
        {"cluster": 0, "ability": "planted_glyph", "phi": 0.9, "phi_control": 0.6, "phi_minus_control_low": 0.1},
        {"cluster": 1, "ability": "planted_facts", "phi": 0.2, "phi_control": 0.0, "phi_minus_control_low": 0.05},
        {"cluster": 1, "ability": "planted_glyph", "phi": 0.5, "phi_control": 0.1, "phi_minus_control_low": -0.1},
    ]).assign(setting="s", exceeds_controls=False, significant=True, min_p_vs_controls=1 / 3)
    cells = gt.agreement_cells(influence, stars, mapping)
    np.testing.assert_allclose(cells["phi_minus_control"], cells["phi"] - cells["phi_control"])
    assert cells.set_index(["planted", "ability"])["beyond"].to_dict() == {
        ("facts", "planted_facts"): True, ("facts", "planted_glyph"): True,
        ("glyph", "planted_facts"): True, ("glyph", "planted_glyph"): False}
    assert gt.diagonal_recovery(cells, skills, "beyond", "phi") == (0.0, {"facts": False, "glyph": False})
    assert gt.diagonal_recovery(cells, skills, "beyond", "phi_minus_control") == (0.5, {"facts": True, "glyph": False})
    assert gt.diagonal_argmax(cells, skills, "phi") == 0.5  # glyph's own 0.5 tops its row, facts' 0.8 < 0.9
    assert gt.diagonal_argmax(cells, skills, "phi_minus_control") == 1.0  # 0.7 > 0.3 and 0.4 > 0.2
    table = gt.setting_agreement(cells, skills, n_boot=100).set_index("score")
    assert table.loc["phi_minus_control", "diagonal_recovery"] == 0.5
    assert table.loc["phi", "diagonal_argmax"] == 0.5 and table.loc["phi_minus_control", "diagonal_argmax"] == 1.0
    assert (table["diagonal_recovery_strict"] == 0.0).all() and np.allclose(table["min_p_vs_controls"], 1 / 3)
    assert (table["off_diagonal_false_positives"] == 2).all()  # both off-diagonal cells: significant, Φ* null
    for score in ("phi", "phi_minus_control"):
        assert table.loc[score, "spearman_rho"] == pytest.approx(scipy_stats.spearmanr(cells[score], cells.phi_star).statistic)
    # the same chain through the long form and the one agreement table gives the same figures
    long = gt.chain_phi_long(influence)
    assert set(long["setting"]) == {"s, score=phi", "s, score=phi_minus_control"} and long["phi_low"].isna().any()
    rows = gt.estimator_agreement(long, stars, mapping, "discovered", n_boot=100).set_index("setting")
    for score in ("phi", "phi_minus_control"):
        row = rows.loc[f"s, score={score}"]
        assert row["spearman_rho"] == pytest.approx(table.loc[score, "spearman_rho"])
        assert row["diagonal_recovery"] == table.loc[score, "diagonal_recovery"]
        assert row["off_diagonal_false_positives"] == table.loc[score, "off_diagonal_false_positives"]


def test_an_unfound_cluster_is_not_recovered():
    cells = pd.DataFrame({"planted": ["glyph"], "diagonal": [True], "exceeds": [True], "phi": [0.5]})
    share, per_skill = gt.diagonal_recovery(cells, ["glyph", "facts"])
    assert share == 0.5 and per_skill == {"glyph": True, "facts": False}


def test_chain_spec_runs_01_to_06_on_the_finetuned_folder(tmp_path):
    spec = gt.chain_spec(tmp_path / "c.jsonl", tmp_path / "model", ["planted_glyph"], {"n_clusters": 8},
                         {"intervention_layer": [15, 24]}, items_per_task=12)
    assert spec.notebooks == list(gt.CHAIN_NOTEBOOKS)
    assert spec.parameters["model_name"] == str(tmp_path / "model") and spec.parameters["items_per_task"] == 12
    assert len(spec.points()) == 2
    lean = gt.chain_spec("c.jsonl", "m", ["planted_glyph"], {}, notebooks=[n for n in gt.CHAIN_NOTEBOOKS if n[:2] != "04"])
    assert lean.notebooks == [n for n in gt.CHAIN_NOTEBOOKS if n != "04_perturbations"]
    with pytest.raises(RephelpersError, match="only 04_perturbations"):
        gt.chain_spec("c.jsonl", "m", ["planted_glyph"], {}, notebooks=["01_corpus_clusters"])
    # the learned kind's subspace is fitted by notebook 04: a chain without it cannot evaluate it
    no_04 = [n for n in gt.CHAIN_NOTEBOOKS if n[:2] != "04"]
    for params, grid in (({"perturbation": "learned"}, None), ({}, {"perturbation": [["ablate"], ["ablate", "learned"]]})):
        with pytest.raises(RephelpersError, match="add 04_perturbations to chain_notebooks"):
            gt.chain_spec("c.jsonl", "m", ["planted_glyph"], params, grid, notebooks=no_04)
        assert gt.chain_spec("c.jsonl", "m", ["planted_glyph"], params, grid).notebooks == list(gt.CHAIN_NOTEBOOKS)
    assert gt.chain_spec("c.jsonl", "m", ["planted_glyph"], {}, {"perturbation": [["ablate"]]}, notebooks=no_04)
    with pytest.raises(RephelpersError, match="cannot vary"):
        gt.chain_spec("c.jsonl", "m", ["planted_glyph"], {}, {"model_name": ["a", "b"]})


def test_a_list_of_chain_grids_is_the_union_of_their_points(tmp_path):
    grids = gt.chain_grids([{"intervention_layer": [15], "perturbation": ["ablate", "leace"]},
                            {"intervention_layer": [24, 15], "perturbation": ["leace"]}])
    assert len(grids) == 2 and gt.chain_grids({"a": (1, 2)}) == [{"a": [1, 2]}] and gt.chain_grids(None) == [{}]
    with pytest.raises(RephelpersError, match="leaves out"):
        gt.chain_grids([{"intervention_layer": [15]}, {"perturbation": ["leace"]}])
    # A key one grid leaves out takes the chain's fixed value, so every grid varies the same keys.
    filled = gt.chain_grids([{"perturbation": ["leace", "mean_ablate"]}, {"perturbation": ["mean_ablate"], "standardize": [True]}],
                            {"standardize": False, "n_clusters": 8})
    assert filled == [{"perturbation": ["leace", "mean_ablate"], "standardize": [False]},
                      {"perturbation": ["mean_ablate"], "standardize": [True]}]
    specs = [gt.chain_spec("c.jsonl", "m", ["planted_glyph"], {"magnitude": 1.0}, g) for g in grids]
    from rephelpers.runner import point_name

    names = [point_name(p) for s in specs for p in s.points()]
    assert len(names) == 4 and len(set(names)) == 3  # (15, leace) is in both grids
    for name in set(names) - {"intervention_layer=24,perturbation=leace"}:  # one point never finished
        (tmp_path / name).mkdir()
        (tmp_path / name / "status.json").write_text(json.dumps({"state": "done"}))
        pd.DataFrame({"cluster": [0], "ability": ["planted_glyph"], "phi": [0.5]}).to_parquet(tmp_path / name / "influence.parquet")
    influence = gt.chain_influence(tmp_path, specs)
    assert sorted(influence["point"]) == sorted(set(names) - {"intervention_layer=24,perturbation=leace"})
    assert set(influence["setting"]) == {"perturbation=ablate, intervention_layer=15, magnitude=1.0, scoring=raw S",
                                         "perturbation=leace, intervention_layer=15, magnitude=1.0, scoring=LEACE"}

    # multi-layer LEACE is a point of its own: its label and the layer profile name every layer it erases at
    multi = [{"intervention_layer": [15, 24], "perturbation": ["leace"]},
             {"intervention_layer": [24], "perturbation": ["leace"], "leace_layers": [[24, 27]]}]
    assert gt.intervention_layers(multi, {"leace_layers": None}) == [15, 24, 27]
    labels = [gt.with_setting(pd.DataFrame({"phi": [0.1]}), {"perturbation": "leace", "intervention_layer": 24,
                                                             "leace_layers": sites, "magnitude": 1.0}, "p").loc[0, "setting"]
              for sites in ([24, 27], None)]
    assert labels == ["perturbation=leace, intervention_layer=24, leace_layers=24+27, magnitude=1.0, scoring=LEACE",
                      "perturbation=leace, intervention_layer=24, magnitude=1.0, scoring=LEACE"]


def test_a_setting_names_how_it_chose_what_to_perturb():
    assert gt.scoring_name({"perturbation": "mean_ablate"}) == "raw S"
    assert gt.scoring_name({"perturbation": "ablate", "standardize": True}) == "Cohen's d"
    assert gt.scoring_name({"perturbation": "noise", "token_level": "True", "standardize": False}) == "token-level raw S"
    assert gt.scoring_name({"perturbation": "mean_ablate", "token_level": True, "standardize": True}) == "token-level Cohen's d"
    assert gt.scoring_name({"perturbation": "mean_ablate", "method": "probe_l1", "standardize": True}) == "probe (L1)"
    # Kinds that do not act on R_k ignore stage 03's selection.
    assert gt.scoring_name({"perturbation": "project", "standardize": True}) == "SVD V_k"
    assert gt.scoring_name({"perturbation": "leace", "method": "probe_l1"}) == "LEACE"
    table = pd.DataFrame({"scoring": ["LEACE", "raw S", "LEACE", "Cohen's d"], "setting": list("abcd"),
                          "spearman_rho": [0.9, 0.5, 0.4, 0.3]})
    best = gt.best_by(table)
    assert best["scoring"].tolist() == ["LEACE", "raw S", "Cohen's d"] and best["setting"].tolist() == ["a", "b", "d"]
    with pytest.raises(RephelpersError, match="no 'layer' column"):
        gt.best_by(table, "layer")


# -- issue 25: the agreement table for any estimator, oracle/discovered clusters, dose, power -------------
def _truth(skills, diag=0.8):
    abilities = [P.planted_ability(s) for s in skills]
    return pd.DataFrame([
        {"cluster": s, "dropped": 1.0, "ability": a, "phi_star": diag if a == P.planted_ability(s) else 0.01 * i,
         "phi_star_low": 0.5 if a == P.planted_ability(s) else -0.1,
         "phi_star_high": 0.9 if a == P.planted_ability(s) else 0.1, "null": a != P.planted_ability(s)}
        for i, (s, a) in enumerate((s, a) for s in skills for a in abilities)
    ])


def test_estimator_agreement_rows_for_any_estimator_match_scipy():
    skills = ["facts", "glyph", "lexicon", "ledger"]
    stars = _truth(skills)
    mapping = pd.DataFrame({"skill": skills, "cluster": [5, 6, 7, 8], "recall": 1.0, "purity": 1.0, "mapped": True,
                            "dominated": ["5", "6", "7", "8"], "recall_dominated": 1.0, "status": "found"})
    rng = np.random.default_rng(0)
    rows = []
    for s, k in zip(skills, (5, 6, 7, 8)):
        for a in map(P.planted_ability, skills):
            own = a == P.planted_ability(s)
            rows.append({"cluster": k, "ability": a, "estimator": "bm25", "phi": (0.6 if own else 0.0) + rng.normal(0, 0.05)})
            rows.append({"cluster": k, "ability": a, "estimator": "repsim", "phi": rng.normal(0, 0.05),
                         "flagged": a == "planted_glyph" and s == "facts"})
    phi = pd.DataFrame(rows)
    dose = pd.DataFrame({"estimator": "bm25", "dose": [0, 1 / 3, 2 / 3, 1], "phi": [0.0, 0.2, 0.1, 0.6]})
    cost = pd.DataFrame({"estimator": ["bm25"], "seconds": [3.0], "peak_rss_mb": [100.0]})
    table = gt.estimator_agreement(phi, stars, mapping, "oracle", dose=dose, cost=cost, n_boot=200)
    assert list(table.columns[:len(gt.AGREEMENT_COLUMNS)]) == list(gt.AGREEMENT_COLUMNS)
    t = table.set_index("setting")
    assert list(table["setting"]) == ["bm25", "repsim"]  # best first
    for name in ("bm25", "repsim"):
        sub = phi[phi["estimator"] == name].assign(planted=lambda d: d["cluster"].map(dict(zip((5, 6, 7, 8), skills))))
        merged = sub.merge(stars, left_on=["planted", "ability"], right_on=["cluster", "ability"])
        assert t.loc[name, "spearman_rho"] == pytest.approx(scipy_stats.spearmanr(merged["phi"], merged["phi_star"])[0])
        assert t.loc[name, "spearman_low"] <= t.loc[name, "spearman_rho"] <= t.loc[name, "spearman_high"]
    assert t.loc["bm25", "diagonal_recovery"] == 1.0 and t.loc["bm25", "n_cells"] == 16
    # a set the fine-tunes did not learn (own Φ* null) has nothing to recover: ranking it first is no hit,
    # missing it no failure: bm25 recovers the 3 learned sets, and lexicon leaves the denominator
    unlearned = stars.assign(null=stars["null"] | ((stars["cluster"] == "lexicon") & (stars["ability"] == "planted_lexicon")))
    u = gt.estimator_agreement(phi, unlearned, mapping, "oracle", n_boot=50).set_index("setting")
    assert u.loc["bm25", "diagonal_recovery"] == 1.0 and u.loc["bm25", "recovered"] == "facts,glyph,ledger"
    assert u.loc["bm25", "unlearned_sets"] == "lexicon" and u.loc["bm25", "found_sets"] == 4
    assert "not counted, as their own Φ* is null: lexicon" in gt.agreement_headline(u.reset_index())
    assert t.loc["bm25", "dose_rho"] == pytest.approx(scipy_stats.spearmanr([0, 0.2, 0.1, 0.6], [0, 1, 2, 3])[0])
    assert t.loc["bm25", "seconds"] == 3.0 and t.loc["bm25", "peak_rss_mb"] == 100.0
    assert pd.isna(t.loc["bm25", "off_diagonal_false_positives"])  # makes no claims: no flagged column
    assert t.loc["repsim", "off_diagonal_false_positives"] == 1 and t.loc["repsim", "null_off_diagonal_cells"] == 12
    assert (table["cluster_source"] == "oracle").all() and table["clustering_misses"].eq("").all()
    with pytest.raises(RephelpersError, match="cluster_source"):
        gt.estimator_agreement(phi, stars, mapping, "guessed")
    with pytest.raises(RephelpersError, match="lacks the columns"):
        gt.estimator_agreement(phi.drop(columns="estimator"), stars, mapping, "oracle")


def test_a_split_planted_set_is_a_clustering_miss_not_a_null():
    # glyph's texts split over clusters 0 and 1 (each pure), facts in 2 with code texts (purity 2/3), ledger merged
    docs = pd.DataFrame({
        "cluster": [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3,
        "domain": ["planted_glyph"] * 6 + ["planted_facts"] * 2 + ["code"] + ["planted_ledger"] + ["code"] * 2,
    })
    m = gt.map_clusters(docs, ["glyph", "facts", "ledger"]).set_index("skill")
    assert m.loc["glyph", "status"] == "split" and m.loc["glyph", "dominated"] == "0,1"
    assert m.loc["glyph", "recall"] == 0.5 and m.loc["glyph", "recall_dominated"] == 1.0 and m.loc["glyph", "purity"] == 1.0
    assert m.loc["facts", "status"] == "found" and m.loc["facts", "purity"] == pytest.approx(2 / 3)
    assert m.loc["ledger", "status"] == "merged" and not m.loc["ledger", "mapped"]
    misses = gt.clustering_misses(m.reset_index())
    assert "glyph: split over clusters 0,1 (best recall 0.50, purity 1.00)" in misses and "ledger: merged" in misses
    stars = _truth(["glyph", "facts", "ledger"])
    phi = pd.DataFrame([{"cluster": k, "ability": P.planted_ability(s), "phi": 0.5 if k == c else 0.0, "estimator": "x"}
                        for k in range(4) for s, c in (("glyph", 0), ("facts", 2), ("ledger", 3))])
    row = gt.estimator_agreement(phi, stars, m.reset_index(), "discovered", n_boot=50).iloc[0]
    # facts is the only set found, and recovered; glyph's zero row counts as a clustering miss, not a failure
    assert row["diagonal_recovery"] == 1.0 and row["found_sets"] == 1 and "glyph: split" in row["clustering_misses"]


def test_phi_star_uses_the_dose_models_and_the_dose_curve_formula():
    rows = []
    means = {"all": [1, 1, 1, 0], "-glyph": [0, 0, 0, 0], "-glyph~0.33": [1, 1, 0, 0], "-glyph~0.67": [1, 0, 0, 0]}
    for seed in (0, 1):
        for model, sc in means.items():
            dropped = {"all": 0.0, "-glyph": 1.0, "-glyph~0.33": 1 / 3, "-glyph~0.67": 2 / 3}[model]
            for i, v in enumerate(sc):
                rows.append({"seed": seed, "model": model, "left_out": "" if model == "all" else "glyph",
                             "dropped": dropped, "ability": "planted_glyph", "item": i, "score": float(v)})
    scores = pd.DataFrame(rows)
    stars = gt.phi_star(scores, n_boot=200).set_index("dropped")
    assert stars.loc[1.0, "phi_star"] == pytest.approx(1.0)
    assert stars.loc[1 / 3, "phi_star"] == pytest.approx((0.75 - 0.5) / 0.75)
    curve = gt.dose_curve(scores, "glyph", n_boot=200).set_index("dose")
    assert list(curve.index) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # Φ*(d) = (M(f_d) − M(f_0)) / M(f_d): every kept share here is all the model knows of glyph
    assert curve["phi_star"].tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])
    # and the removed share's Φ* against f_all, the curve: 0, 1/3, 2/3 and all of D_glyph left out
    assert curve["phi_star_removed"].tolist()[::-1] == pytest.approx([0.0, (0.75 - 0.5) / 0.75, (0.75 - 0.25) / 0.75, 1.0])


def test_drop_share_nests_the_doses_and_keeps_the_blocks():
    blocks = ft.Blocks(ids=torch.arange(40).view(10, 4), group=np.array(["glyph"] * 6 + ["rest"] * 4))
    third, label = gt.drop_share(blocks, "glyph", 1 / 3)
    two, _ = gt.drop_share(blocks, "glyph", 2 / 3)
    assert label == "glyph~drop" and (third.group == label).sum() == 2 and (two.group == label).sum() == 4
    assert set(np.flatnonzero(third.group == label)) <= set(np.flatnonzero(two.group == label))
    assert torch.equal(third.ids, blocks.ids) and (third.group[6:] == "rest").all()
    with pytest.raises(RephelpersError, match="no blocks"):
        gt.drop_share(blocks, "facts", 0.5)


def test_weight_change_per_layer_against_a_plain_loop():
    rng = torch.Generator().manual_seed(0)
    base = {f"model.layers.{l}.{p}": torch.randn(3, 4, generator=rng) for l in range(4) for p in ("a", "b")}
    trained = {k: v + 0.1 * (i + 1) for i, (k, v) in enumerate(base.items()) if int(k.split(".")[2]) >= 2}
    table = gt.weight_change(base, trained, "model.layers", 4)
    for layer in range(4):
        keys = [k for k in trained if int(k.split(".")[2]) == layer]
        expect = (math.sqrt(sum(float(((trained[k] - base[k]) ** 2).sum()) for k in keys))
                  / math.sqrt(sum(float((base[k] ** 2).sum()) for k in keys))) if keys else 0.0
        assert table.loc[layer, "relative_change"] == pytest.approx(expect)
    assert table["trained"].tolist() == [False, False, True, True]


def test_power_helpers_behave_like_their_formulas():
    # Φ* is an AIS of f_-p against f_all: the library's detectable AIS on the pooled items of all seeds
    assert gt.detectable_phi(0.8, 96, 3) == minimum_detectable_ais(288, 0.8)
    assert gt.detectable_phi(0.8, 96, 3) < gt.detectable_phi(0.8, 96, 1) < gt.detectable_phi(0.8, 24, 1) < 1
    narrow = gt.rho_interval_width(4, 4, 0.05, 0.05, n_sims=20, n_boot=200)
    wide = gt.rho_interval_width(3, 3, 0.3, 0.3, n_sims=20, n_boot=200)
    assert 0 < narrow < wide <= 2
    assert narrow < gt.rho_interval_width(4, 4, 0.05, 0.05, n_sims=20, n_boot=200, stratified=False)


def test_dose_phi_takes_the_dose_sets_own_cell_of_every_chain_and_feeds_dose_rho():
    def chain(phi_own):
        long = pd.DataFrame([{"cluster": k, "ability": a, "phi": phi_own if (k == 1 and a == "planted_glyph") else 0.9,
                              "estimator": "perturbation", "setting": s}
                             for k in (0, 1) for a in ("planted_glyph", "planted_facts") for s in ("A", "B")])
        mapping = pd.DataFrame({"skill": ["glyph"], "cluster": [1], "mapped": [True]})
        return long, mapping

    out = gt.dose_phi({0.0: chain(0.0), 0.5: chain(0.2), 1.0: chain(0.6)}, "glyph")
    assert sorted(out["dose"].unique()) == [0.0, 0.5, 1.0]
    assert out[out["setting"] == "A"].sort_values("dose")["phi"].tolist() == [0.0, 0.2, 0.6]
    lost = gt.dose_phi({0.0: (chain(0.0)[0], pd.DataFrame({"skill": ["glyph"], "cluster": [1], "mapped": [False]}))}, "glyph")
    assert lost["phi"].isna().all()  # a set the clustering lost gives no Φ, not 0


def test_intervention_layers_of_a_grid_union():
    params = {"intervention_layer": 15, "perturbation": "ablate"}
    assert gt.intervention_layers({}, params) == [15]
    grids = [{"intervention_layer": [15, 24], "perturbation": ["leace"]}, {"intervention_layer": [27], "perturbation": ["ablate"]}]
    assert gt.intervention_layers(grids, params) == [15, 24, 27]


def test_chain_cost_reads_the_runner_status_and_matches_the_long_form_labels(tmp_path):
    from rephelpers.runner import RunSpec

    spec = RunSpec(name="chain", parameters={"perturbation": "ablate", "intervention_layer": 27, "magnitude": 1.0},
                   notebooks=["01_corpus_clusters"], grid={})
    (tmp_path / "status.json").write_text(json.dumps({"state": "done", "stages": {
        "01_corpus_clusters": {"seconds": 50.0, "peak_rss_mb": 1000}, "02_representations": {"seconds": 20.5, "peak_rss_mb": 1300}}}))
    cost = gt.chain_cost(tmp_path, spec)
    influence = gt.with_setting(pd.DataFrame({"cluster": [0], "ability": ["planted_glyph"], "phi": [0.1],
                                               "phi_control": [0.0], "significant": [False],
                                               "exceeds_control": [False]}), spec.parameters, "run")
    assert set(cost["setting"]) == set(gt.chain_phi_long(influence)["setting"])
    assert (cost["seconds"] == 70.5).all() and (cost["peak_rss_mb"] == 1300).all()


def test_a_chains_other_estimators_enter_the_agreement_table_as_rows_of_their_own(tmp_path):
    # stage 06 of a chain wrote estimators/phi.parquet: perturbation's rows (left out: chain_phi_long has them per
    # setting) beside repsim's and bm25's, with the permutation test's adjusted p and each estimator's cost
    skills = ["facts", "glyph", "lexicon", "ledger"]
    stars = _truth(skills)
    mapping = pd.DataFrame({"skill": skills, "cluster": [5, 6, 7, 8], "recall": 1.0, "purity": 1.0, "mapped": True,
                            "dominated": ["5", "6", "7", "8"], "recall_dominated": 1.0, "status": "found"})
    rows = []
    for name, gain, seconds in (("perturbation", 0.0, np.nan), ("repsim", 0.4, 12.0), ("bm25", 0.0, 0.5)):
        for s, k in zip(skills, (5, 6, 7, 8)):
            for a in map(P.planted_ability, skills):
                own = a == P.planted_ability(s)
                rows.append({"cluster": k, "ability": a, "phi": gain * own + 0.01 * k, "estimator": name,
                             "p_value": 0.01 if own else 0.5, "p_adjusted": 0.02 if own else 0.9 if name == "repsim" else 0.01,
                             "n_permutations": 999, "seconds": seconds, "peak_rss_mb": 800.0})
    (tmp_path / PHI_ARTIFACT).parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(tmp_path / PHI_ARTIFACT)
    spec = RunSpec(name="chain", parameters={}, notebooks=list(gt.CHAIN_NOTEBOOKS))
    phi, cost = gt.chain_estimator_phi(tmp_path, spec)
    assert set(phi["estimator"]) == {"repsim", "bm25"} and (phi["setting"] == phi["estimator"]).all()
    assert phi.loc[phi["estimator"] == "bm25", "flagged"].all()  # every bm25 cell claimed (p_adjusted 0.01)
    table = gt.estimator_agreement(phi, stars, mapping, "discovered", cost=cost, n_boot=100).set_index("setting")
    assert table.loc["repsim", "diagonal_recovery"] == 1.0 and table.loc["repsim", "off_diagonal_false_positives"] == 0
    assert table.loc["bm25", "off_diagonal_false_positives"] == 12  # claims every null off-diagonal cell
    assert table.loc["repsim", "seconds"] == 12.0 and table.loc["bm25", "peak_rss_mb"] == 800.0
    # a chain whose stage 06 ran perturbation alone adds no row
    pd.DataFrame([r for r in rows if r["estimator"] == "perturbation"]).to_parquet(tmp_path / PHI_ARTIFACT)
    assert gt.chain_estimator_phi(tmp_path, spec)[0].empty


# -- issue 26: the field's estimators scored once per model, Φ per cluster source ----------------------
def _chain_with_documents(root, name, documents):
    from rephelpers.artifacts import RunDir
    RunDir(root / name / "_shared").save_parquet("documents.parquet", documents, key=name)
    return [RunSpec(name=name, parameters={"model_name": "smollm2-135m"}, notebooks=list(gt.CHAIN_NOTEBOOKS),
                    grid={"intervention_layer": [15]})], root / name


def test_field_estimators_score_documents_once_and_aggregate_them_per_cluster_source(tmp_path):
    from rephelpers.estimators.aggregate import cluster_phi, permutation_pvalues
    from rephelpers.estimators.bm25 import bm25_scores
    from rephelpers.estimators.items import ability_items

    corpus = P.planted_corpus(["facts", "glyph", "lexicon"], docs_per_skill=8, seed=0)
    documents = corpus.assign(cluster=corpus["planted"].map({"facts": 0, "glyph": 1, "lexicon": 1}))
    oracle = documents.assign(cluster=corpus["planted"].map({"facts": 0, "glyph": 1, "lexicon": 2}))
    chains = {"discovered": _chain_with_documents(tmp_path, "chain", documents),
              "oracle": _chain_with_documents(tmp_path, "chain_oracle", oracle)}
    tasks = build_tasks([P.planted_ability(s) for s in ("facts", "glyph", "lexicon")], tmp_path / "tasks",
                        items_per_task=6, seed=0)
    out = gt.field_estimator_phi(chains, ["perturbation", "bm25"], tasks, seed=0, n_permutations=199)
    # scored once, on the first chain's documents: the oracle chain holds no copy
    assert (tmp_path / "chain" / "_shared" / "estimators" / "bm25_documents.parquet").exists()
    assert not (tmp_path / "chain_oracle" / "_shared" / "estimators").exists()
    # against the library's scorer and the aggregation run directly, per partition
    direct = bm25_scores(documents, ability_items(tasks))
    for source, frame in (("discovered", documents), ("oracle", oracle)):
        phi, cost = out[source]
        labels = frame.set_index(frame["id"].astype(str))["cluster"]
        want = cluster_phi(direct, labels, "bm25").merge(
            permutation_pvalues(direct, labels, n_permutations=199, seed=0), on=["cluster", "ability"])
        got = phi.merge(want, on=["cluster", "ability"], suffixes=("", "_want"))
        assert len(got) == len(want) == len(phi) == labels.nunique() * 3
        np.testing.assert_allclose(got["phi"], got["phi_want"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["p_adjusted"], got["p_adjusted_want"])
        assert (got["flagged"] == (got["p_adjusted"] < 0.05)).all() and set(phi["setting"]) == {"bm25"}
        assert list(cost["setting"]) == ["bm25"] and cost["seconds"].iloc[0] > 0
    # on oracle clusters BM25 ranks each planted set first for its own skill
    phi = out["oracle"][0]
    own = {0: "facts", 1: "glyph", 2: "lexicon"}
    for ability, rows in phi.groupby("ability"):
        assert own[int(rows.loc[rows["phi"].idxmax(), "cluster"])] in ability
    # chains that chunked the corpus differently cannot share scores
    chains["oracle"] = _chain_with_documents(tmp_path, "chain_other", oracle.iloc[1:])
    with pytest.raises(RephelpersError, match="chunked the corpus into other documents"):
        gt.field_estimator_phi(chains, ["bm25"], tasks, seed=0, n_permutations=199)


def test_field_estimator_parameters_are_checked_before_any_fine_tune():
    chain = {"estimators": ["perturbation"]}
    assert gt.check_field_estimators(["perturbation", "repsim", "bm25"], ["bm25"], {"bm25": {"k1": 1.2}}, chain) == \
        ["repsim", "bm25"]
    with pytest.raises(RephelpersError, match="unknown estimators"):
        gt.check_field_estimators(["bm52"], [], {}, chain)
    with pytest.raises(RephelpersError, match="dose_estimators"):
        gt.check_field_estimators(["bm25"], ["repsim"], {}, chain)
    with pytest.raises(RephelpersError, match="estimator_options for"):
        gt.check_field_estimators(["bm25"], [], {"influence_functions": {"strategy": "kfac"}}, chain)
    with pytest.raises(RephelpersError, match="docs_per_clustr"):
        gt.check_field_estimators(["influence_functions"], [], {"influence_functions": {"docs_per_clustr": 32}}, chain)
    with pytest.raises(RephelpersError, match="seed"):  # set by the estimator's wrapper, not an option
        gt.check_field_estimators(["influence_functions"], [], {"influence_functions": {"seed": 1}}, chain)
    assert gt.check_field_estimators(["influence_functions"], [], {"influence_functions": {"docs_per_cluster": 32,
                                                                                           "strategy": "kfac"}}, chain)
    for stage06 in ({}, {"estimators": ["perturbation", "repsim"]}):
        with pytest.raises(RephelpersError, match="runs perturbation alone"):
            gt.check_field_estimators(["bm25"], [], {}, stage06)
