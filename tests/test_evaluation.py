"""Perturbed evaluation: PerturbedLM against stock lm-eval and plain torch hooks, the
response cache, the shared-prefix fast path, calibration and early errors."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from scipy.special import softmax

from rephelpers.abilities.suite import build_tasks
from rephelpers.errors import RephelpersError
from rephelpers.abilities.evaluation import (
    DRAW_KEYS, check_settings, setting_columns, settings_key,
    _choice_statistics, ability_summary, cluster_configs, evaluate_abilities, expected_calibration_error,
)
from rephelpers.views.charts import ability_chart
from rephelpers.abilities.forward import greedy_generate, right_padded_last_index, sweep_generate, sweep_loglikelihood
from rephelpers.interventions.intervene import Intervention
from rephelpers.abilities.lm_eval_model import PerturbedLM
from rephelpers.abilities.lm_tasks import prepare_tasks
from rephelpers.representations.models import output_tensor, replace_output
from rephelpers.interventions.edits import Ablate, Noise, Shift
from rephelpers.setting import BASELINE_ID, Setting
from rephelpers.interventions.tokenkeys import standard_normal, token_keys

STRONG = Ablate(tuple(range(0, 576, 2)))  # half of all dimensions at a middle layer


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return build_tasks(["icl", "code", "reasoning"], tmp_path_factory.mktemp("tasks"), items_per_task=6, seed=0)


def _samples(lm, prepared, limit):
    out = {}
    for task_dict, chat in prepared.dicts():
        out.update(evaluate(lm, task_dict, limit=limit, log_samples=True, bootstrap_iters=0, apply_chat_template=chat)["samples"])
    return out


@pytest.mark.model
def test_unperturbed_scores_equal_stock_hflm(model, tasks):
    prepared = prepare_tasks(tasks)
    ours = _samples(PerturbedLM(model, batch_size=4), prepared, limit=2)
    stock = _samples(HFLM(pretrained=model.hf, tokenizer=model.tokenizer, batch_size=4), prepare_tasks(tasks), limit=2)
    assert set(ours) == set(stock) == {"rh_icl", "rh_code", "rh_reasoning"}
    for task in ours:
        for a, b in zip(ours[task], stock[task], strict=True):
            assert a["prompt_hash"] == b["prompt_hash"]
            if task == "rh_reasoning":
                assert a["resps"] == b["resps"]  # greedy text, stop sequences honoured
            else:
                np.testing.assert_allclose([r[0] for r in a["filtered_resps"]], [r[0] for r in b["filtered_resps"]], rtol=0, atol=1e-5)
            assert a[a["metrics"][0]] == b[b["metrics"][0]]


def _hook_loglikelihood(model, lm, context, continuation, layer, dims, last_only):
    """log p(continuation | context) of one unpadded sequence, edited by a plain forward hook."""
    ctx, cont = lm._encode_pair(context, continuation)
    tokens = torch.tensor([ctx + cont])[:, :-1]

    def zero_dims(module, args, output):
        h = output_tensor(output).clone()
        if last_only:
            h[:, -1, list(dims)] = 0
        else:
            h[..., list(dims)] = 0
        return replace_output(output, h)

    handle = model.module(layer).register_forward_hook(zero_dims)
    try:
        with torch.inference_mode():
            logits = model.hf(tokens).logits[0, -len(cont):]
    finally:
        handle.remove()
    return float(torch.log_softmax(logits.double(), -1)[torch.arange(len(cont)), cont].sum())


@pytest.mark.model
@pytest.mark.parametrize("positions", ["all", "last"])
def test_perturbed_loglikelihoods_equal_torch_hook(model, positions):
    dims = tuple(range(5, 576, 7))
    layer = 9
    pairs = [
        ("Review: The movie was awful.\nSentiment:", " negative"),
        ("The capital of France is", " Paris, a city on the Seine"),
        ("2 + 2 =", " 4"),
        ("def add(a, b):\n    return", " a + b"),
        ("Q: What is the capital of Japan?\nA:", " Tokyo"),
    ]
    lm = PerturbedLM(model, [Intervention(Ablate(dims), layer, positions=positions)], batch_size=4)
    got = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    want = [_hook_loglikelihood(model, lm, c, x, layer, dims, positions == "last") for c, x in pairs]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    base = [ll for ll, _ in lm.use([]).loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    assert all(abs(a - b) > 1e-3 for a, b in zip(got, base))


def test_right_padded_last_index():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9], [5, 0, 0, 0, 0]])
    assert right_padded_last_index(ids).tolist() == [2, 4, 0]


@pytest.mark.model
def test_response_cache_never_serves_a_perturbed_run(model, tasks):
    configs = {"base": [], "strong": [Intervention(STRONG, 15)], "base_again": []}
    df = evaluate_abilities(model, tasks, configs, limit=2, batch_size=4, progress=False)
    assert len(df) == 3 * 3 * 2 and set(df.metric) == {"acc", "exact_match"}
    wide = df.pivot_table(index=["task", "item"], columns="config_id", values="margin")
    mc = wide.dropna()
    assert len(mc) == 4 and (mc["base"] - mc["strong"]).abs().min() > 1e-3
    np.testing.assert_array_equal(mc["base"], mc["base_again"])
    gen = df[df.task == "rh_reasoning"].pivot_table(index="item", columns="config_id", values="response", aggfunc="first")
    assert (gen["base"] == gen["base_again"]).all() and (gen["base"] != gen["strong"]).any()
    assert df.loc[df.config_id == "strong", "interventions"].iloc[0].count('"ablate"') == 1


@pytest.mark.model
def test_fast_path_equals_per_config_path(model, tasks):
    configs = {
        "base": [],
        "ablate12": [Intervention(Ablate(tuple(range(0, 576, 3))), 12)],
        "ablate12_last": [Intervention(Ablate(tuple(range(1, 576, 3))), 12, positions="last")],
        "attn14+shift20": [
            Intervention(Ablate(tuple(range(0, 64))), 14, component="attn"),
            Intervention(Shift(tuple(np.random.default_rng(0).normal(size=576) * 0.5)), 20),
        ],
        # Noise is keyed by token, so the two paths' different batching gives the same draws.
        "noise12": [Intervention(Noise(tuple(range(0, 576, 2)), sigma=3.0, seed=1), 12)],
        "noise12_last": [Intervention(Noise(tuple(range(1, 576, 2)), sigma=6.0, seed=2), 12, positions="last")],
    }
    # Generation (reasoning) included: its batches are decoded for every config together.
    meta = {cid: Setting(i - 1) for i, cid in enumerate(configs)}
    naive = evaluate_abilities(model, tasks, configs, limit=2, batch_size=4, progress=False, config_meta=meta)
    fast = evaluate_abilities(model, tasks, configs, limit=2, batch_size=4, progress=False, config_meta=meta, fast=True)
    assert set(fast.task) == {info.task for info in tasks.values()} and (fast.response != "").any()
    key = ["config_id", "task", "item"]
    naive, fast = naive.sort_values(key).reset_index(drop=True), fast.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(naive.drop(columns=["margin", "p_correct", "confidence"]),
                                  fast.drop(columns=["margin", "p_correct", "confidence"]))
    np.testing.assert_allclose(naive.margin, fast.margin, rtol=0, atol=1e-3)
    assert naive.groupby("config_id").margin.mean().nunique() == len(configs)


@pytest.mark.model
def test_the_sweeps_progress_shows_the_first_configs_turn(model, tasks, tmp_path, monkeypatch):
    """fast=True does nearly all its work in the first config's turn; the runner's progress
    line follows it through the sweep's own bars, not a config bar that stands still."""
    import json

    from rephelpers.progress import PROGRESS_ENV

    log = tmp_path / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_ENV, str(log))
    configs = {"base": [], "a": [Intervention(Ablate(tuple(range(0, 576, 3))), 12)],
               "b": [Intervention(Ablate(tuple(range(1, 576, 3))), 12)]}
    evaluate_abilities(model, tasks, configs, limit=2, batch_size=4, progress=True, fast=True)
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    first_done = min(r["t"] for r in reports if r["desc"] == "configs" and r["n"] >= 1)
    sweep = [r for r in reports if r["desc"].startswith("3 configs together")]
    batches = [r for r in sweep if r["desc"].endswith("batches")]
    decoded = [r for r in sweep if r["desc"].endswith("decoded")]
    assert batches and decoded and all(r["t"] <= first_done for r in sweep)
    # every bar ends full: the log-likelihood batches, and the generation task's 2 requests
    assert all(r["n"] == r["total"] > 0 for r in sweep if r["closed"])
    assert sum(r["n"] for r in decoded if r["closed"]) == 2 and all(r["unit"] == "requests" for r in decoded)


@pytest.mark.model
def test_packed_choices_equal_one_plain_forward_per_request(model):
    """A multiple-choice item's context runs once with its choices as branches; each answer
    must equal a plain HF forward over ``context ⊕ continuation`` edited by a torch hook,
    including left-truncated requests (``max_length``) and per-token noise keys."""
    tok = model.tokenizer
    items = [
        ("Q: What is 71 + 27?\nA:", [" 98", " 1917", " 44", " 98"]),  # a repeated choice shares its branch
        ("The capital of France is", [" Paris", " a city in Europe", " Berlin, of course"]),
        ("def add(a, b):\n", ["    return a + b", "    pass", "    return a - b\n"]),
        ("Review: The movie was awful.\nSentiment:", [" negative", " positive"]),  # one-token choices
        ("A long context that will not fit " * 3, [" in the window", " at all"]),  # truncated: own rows
    ]
    requests = [(tok(c)["input_ids"], tok(x)["input_ids"]) for c, xs in items for x in xs]
    limit = 20
    dims = tuple(range(0, 576, 3))
    noise = Noise(tuple(range(1, 576, 2)), sigma=3.0, seed=1)
    configs = {"base": [], "ablate": [Intervention(Ablate(dims), 12)], "noise": [Intervention(noise, 12)],
               "ablate_again": [Intervention(Ablate(dims), 12)]}  # identical configs run once, answer alike
    packed = sweep_loglikelihood(model, requests, configs, batch_size=3, max_length=limit, pack_choices=True)
    assert packed["ablate_again"] == packed["ablate"]

    def plain(context, continuation, edit):
        tokens = torch.tensor([(context + continuation)[-(limit + 1):]])[:, :-1]
        keys = token_keys(tokens).keys

        def hook(module, args, output):
            h = output_tensor(output)
            if edit == "ablate":
                h = h.clone()
                h[..., list(dims)] = 0
            elif edit == "noise":
                h = noise.apply(h, keys)
            return replace_output(output, h)

        handle = model.module(12).register_forward_hook(hook)
        try:
            with torch.inference_mode():
                logits = model.hf(tokens).logits[0, -len(continuation):]
        finally:
            handle.remove()
        logp = torch.log_softmax(logits.double(), -1)
        positions = torch.arange(len(continuation))
        return float(logp[positions, continuation].sum()), bool((logp.argmax(-1) == torch.tensor(continuation)).all())

    for cid in ("base", "ablate", "noise"):
        want = [plain(c, x, cid) for c, x in requests]
        np.testing.assert_allclose([ll for ll, _ in packed[cid]], [ll for ll, _ in want], rtol=0, atol=2e-4)
        assert [g for _, g in packed[cid]] == [g for _, g in want]
    # the edits did something, so the agreement above is not base == base
    assert max(abs(a[0] - b[0]) for a, b in zip(packed["base"], packed["ablate"])) > 0.1
    assert max(abs(a[0] - b[0]) for a, b in zip(packed["base"], packed["noise"])) > 0.1


@pytest.mark.model
def test_greedy_generation_matches_hf_generate_and_stops(model):
    batch = model.encode(["The capital of France is", "Count: one, two,"])
    n = batch["input_ids"].shape[1]
    ours = greedy_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    with torch.inference_mode():
        ref = model.hf.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert torch.equal(ours, ref)
    text = model.tokenizer.decode(ours[0, n:])
    stop = text.strip().split()[0]
    stopped = greedy_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6, stop=[stop])
    assert stop in model.tokenizer.decode(stopped[0, n:])
    assert stopped.shape[1] <= ours.shape[1]


@pytest.mark.model
def test_sweep_generate_equals_greedy_generate_per_config(model):
    batch = model.encode(["Q: What is 12 + 30?\nA:", "The capital of France is", "def add(a, b):\n    return"])
    configs = {
        "base": [],
        "ablate5": [Intervention(Ablate(tuple(range(64))), 5)],
        "ablate5_again": [Intervention(Ablate(tuple(range(64))), 5)],
        "ablate9": [Intervention(Ablate(tuple(range(100, 300))), 9)],  # changes the text
        "noise7": [Intervention(Noise(tuple(range(50)), sigma=3.0, seed=1), 7)],
        "shift6_last": [Intervention(Shift(tuple([0.5] * 576), alpha=4.0), 6, positions="last")],
        "ablate5+noise12": [Intervention(Ablate((1, 2, 3)), 5), Intervention(Noise(tuple(range(20)), sigma=2.0), 12)],
    }
    expected = {cid: greedy_generate(model, batch["input_ids"], batch["attention_mask"], ivs, max_new_tokens=10, stop=["\n"])
                for cid, ivs in configs.items()}
    assert not torch.equal(expected["base"], expected["ablate9"])
    # One stack of all configs, and stacks of one config each (a tiny token budget).
    for budget in (16384, 1):
        got = sweep_generate(model, batch["input_ids"], batch["attention_mask"], configs, max_new_tokens=10, stop=["\n"],
                             max_batch_tokens=budget)
        assert set(got) == set(configs)
        for cid in configs:
            assert torch.equal(got[cid], expected[cid]), cid


@pytest.mark.model
def test_noise_is_fresh_per_generation_step_and_batch_invariant(model, monkeypatch):
    noise = Noise(tuple(range(0, 576, 8)), sigma=2.0, seed=4)
    applied = []
    apply = Noise.apply

    def recording(self, h, keys=None):
        out = apply(self, h, keys)
        applied.append((out - h)[..., list(self.dims)].clone())
        return out

    monkeypatch.setattr(Noise, "apply", recording)
    prompts = ["The capital of France is", "Count: one, two, three, four,"]
    batch = model.encode(prompts)
    steps = 4
    out = greedy_generate(model, batch["input_ids"], batch["attention_mask"], [Intervention(noise, 9, positions="last")],
                          max_new_tokens=steps)
    assert len(applied) == steps and out.shape[1] == batch["input_ids"].shape[1] + steps
    per_step = torch.stack([a.reshape(2, -1) for a in applied], dim=1)  # [row, step, |R|]
    for row in range(2):
        for a in range(steps):
            for b in range(a + 1, steps):
                assert (per_step[row, a] - per_step[row, b]).abs().max() > 0.5
    # Each step's noise is what a full pass over prompt + generated tokens gives that token.
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(out[:, batch["input_ids"].shape[1]:])], dim=1)
    keys = token_keys(out, full_mask).keys
    n = batch["input_ids"].shape[1]
    expected = torch.stack([2.0 * standard_normal(4, keys[:, n - 1 + j], noise.dims) for j in range(steps)], dim=1)
    torch.testing.assert_close(per_step.double(), expected, atol=1e-5, rtol=0)
    # The second prompt alone (no padding, first row) gets the same noise and the same text.
    applied.clear()
    alone = model.encode(prompts[1:])
    out_alone = greedy_generate(model, alone["input_ids"], alone["attention_mask"], [Intervention(noise, 9, positions="last")],
                                max_new_tokens=steps)
    torch.testing.assert_close(torch.stack([a.reshape(1, -1)[0] for a in applied]), per_step[1], atol=1e-6, rtol=0)
    assert torch.equal(out_alone[0, -steps:], out[1, -steps:])


@pytest.mark.model
def test_noise_loglikelihood_is_batch_invariant_with_right_padding(model):
    lm = PerturbedLM(model, [Intervention(Noise(tuple(range(0, 576, 3)), sigma=4.0, seed=9), 12)], batch_size=4)
    short = torch.tensor([model.tokenizer.encode("A short request")])
    longer = torch.tensor([model.tokenizer.encode("A much longer request that lm-eval pads on the right")])
    padded = torch.zeros(2, longer.shape[1], dtype=torch.long)
    padded[0] = longer[0]
    padded[1, : short.shape[1]] = short[0]
    n = short.shape[1]
    torch.testing.assert_close(lm._model_call(padded)[1, :n], lm._model_call(short)[0], atol=2e-3, rtol=1e-4)
    assert (lm._model_call(short) - lm.use([])._model_call(short)).abs().max() > 0.5


def test_choice_statistics_against_scipy():
    ll = [-2.0, -0.5, -3.0, -0.7]
    margin, p_correct, confidence = _choice_statistics(ll, [3])
    p = softmax(ll)
    assert margin == pytest.approx(-0.7 - (-0.5))
    assert p_correct == pytest.approx(p[3]) and confidence == pytest.approx(p.max())


def test_expected_calibration_error_by_hand():
    df = pd.DataFrame({
        "config_id": ["a"] * 5 + ["b"] * 2,
        "task": "t",
        "metric": "acc",
        "confidence": [0.95, 0.91, 0.55, 0.52, 0.3, 0.8, math.nan],
        "score": [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0],
    })
    out = expected_calibration_error(df, n_bins=10).set_index("config_id")
    # a: bin 9 {0.95, 0.91} acc 0.5 conf 0.93; bin 5 {0.55, 0.52} acc 1 conf 0.535; bin 3 {0.3} acc 0 conf 0.3
    want = 2 / 5 * abs(0.5 - 0.93) + 2 / 5 * abs(1 - 0.535) + 1 / 5 * abs(0 - 0.3)
    assert out.loc["a", "ece"] == pytest.approx(want)
    assert out.loc["b", "ece"] == pytest.approx(0.2) and out.loc["b", "n"] == 1


@pytest.mark.model
def test_bad_configs_fail_before_any_compute(model, tasks):
    with pytest.raises(RephelpersError, match="out of range"):
        evaluate_abilities(model, tasks, {"x": [Intervention(Ablate((1,)), 99)]}, progress=False)
    with pytest.raises(RephelpersError, match="must be rephelpers.setting.Setting"):
        evaluate_abilities(model, tasks, {"x": []}, config_meta={"x": {"score": 1}}, progress=False)
    with pytest.raises(RephelpersError, match="non-empty dict"):
        evaluate_abilities(model, tasks, {}, progress=False)


def test_unreachable_lm_eval_dataset_is_named(tmp_path):
    with pytest.raises(RephelpersError, match="'gsm8k' cannot be evaluated"):
        prepare_tasks(["gsm8k"], task_dir=tmp_path)
    with pytest.raises(RephelpersError, match="neither an ability"):
        prepare_tasks(["no_such_task_xyz"], task_dir=tmp_path)


@pytest.mark.model
def test_baseline_is_above_chance_on_code(model, tmp_path):
    code = build_tasks(["code"], tmp_path, items_per_task=8, seed=0)
    df = evaluate_abilities(model, code, {"base": []}, progress=False)
    assert df.score.mean() >= 0.5  # chance is one in four (0.825 on 40 items)


def _fake_subspaces(layer=15, clusters=(0, 1), d=576, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"layer": layer, "cluster": k, "component": "resid", "dims": sorted(rng.choice(d, 8, replace=False).tolist()),
         "direction": (v := rng.normal(size=d)) / np.linalg.norm(v), "basis": None}
        for k in clusters
    ]


def test_cluster_configs_pair_each_cluster_with_a_matched_control():
    subspaces = _fake_subspaces() + _fake_subspaces(layer=3)
    configs, meta = cluster_configs(subspaces, 15, 576, kinds="ablate", magnitudes=[0.5, 1.0])
    assert len(configs) == 1 + 2 * 2 * 2 and configs[BASELINE_ID] == [] and meta[BASELINE_ID].cluster == -1
    assert all(isinstance(s, Setting) and s.id == cid for cid, s in meta.items())
    for cid, ivs in configs.items():
        if cid == BASELINE_ID:
            continue
        (iv,) = ivs
        k, m = meta[cid].cluster, meta[cid].magnitude
        r_k = set(subspaces[k]["dims"])
        assert iv.layer == 15 and meta[cid].kind == "ablate" and iv.perturbation.strength == m
        if meta[cid].control:
            assert len(iv.perturbation.dims) == len(r_k) and not set(iv.perturbation.dims) & r_k
        else:
            assert set(iv.perturbation.dims) == r_k
    with pytest.raises(RephelpersError, match="no stage-03 cluster components at layer 9"):
        cluster_configs(subspaces, 9, 576)


def test_settings_give_the_score_columns_and_cache_key_the_dicts_gave():
    # issue 29: config_meta is typed; the columns and the round cache's key are what the plain dicts made
    _, meta = cluster_configs(_fake_subspaces(), 15, 576, kinds="ablate", magnitudes=[0.5, 1.0], n_controls=2)
    by_hand = {cid: {"cluster": s.cluster, "control": s.control, "kind": s.kind, "magnitude": s.magnitude,
                     "layer": s.layer, "draw": s.draw} for cid, s in meta.items()}
    assert settings_key(meta) == by_hand and list(next(iter(by_hand.values()))) == list(DRAW_KEYS)
    pd.testing.assert_frame_equal(setting_columns(meta), pd.DataFrame.from_dict(by_hand, orient="index"))
    assert by_hand["k1:ablate:m0.5:control1"] == {"cluster": 1, "control": True, "kind": "ablate", "magnitude": 0.5,
                                                  "layer": 15, "draw": 1}
    with pytest.raises(RephelpersError, match="Setting"):
        check_settings({"baseline": {"cluster": -1}})


def test_cluster_configs_draw_independent_controls():
    subspaces = _fake_subspaces()
    one, _ = cluster_configs(subspaces, 15, 576, kinds="ablate", magnitudes=1.0)
    configs, meta = cluster_configs(subspaces, 15, 576, kinds="ablate", magnitudes=1.0, n_controls=3)
    controls = [cid for cid in configs if meta[cid].control]
    assert len(configs) == 1 + 2 * (1 + 3) and len(controls) == 2 * 3
    assert configs["k0:ablate:m1:control"] == one["k0:ablate:m1:control"]  # draw 0 is the single-draw control
    for k in (0, 1):
        r_k = set(subspaces[k]["dims"])
        draws = [tuple(configs[f"k{k}:ablate:m1:control{j or ''}"][0].perturbation.dims) for j in range(3)]
        assert len(set(draws)) == 3, "control draws must differ"
        assert all(len(d) == len(r_k) and not set(d) & r_k for d in draws)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(RephelpersError, match="n_controls must be a positive int"):
            cluster_configs(subspaces, 15, 576, n_controls=bad)


def test_ability_chart_renders_from_scores():
    rows = [
        {"config_id": cid, "cluster": k, "control": c, "kind": "ablate", "magnitude": 1.0, "ability": a,
         "metric": "acc", "score": s}
        for cid, k, c in (("baseline", -1, False), ("k0", 0, False), ("k0c", 0, True))
        for a in ("icl", "code") for s in (0.0, 1.0, 1.0)
    ]
    summary = ability_summary(pd.DataFrame(rows))
    assert summary["mean"].tolist() == pytest.approx([2 / 3] * 6)
    assert summary["sem"].iloc[0] == pytest.approx(np.std([0, 1, 1], ddof=1) / np.sqrt(3))
    spec = ability_chart(pd.DataFrame(rows), chance={"icl": 0.5, "code": 0.25}).to_dict()
    assert spec["facet"]["column"]["field"] == "ability" and spec["facet"]["row"]["field"] == "theta"


def test_ability_chart_has_one_bar_per_cluster_arm_and_setting():
    # two magnitudes and two control draws: the draws are averaged item by item, the magnitudes kept apart
    configs = [("baseline", -1, False, 0.0, [1, 1, 0, 0]), ("p1", 0, False, 1.0, [0, 0, 0, 0]),
               ("p2", 0, False, 2.0, [0, 0, 0, 1]), ("c1", 0, True, 1.0, [1, 0, 0, 0]),
               ("c1b", 0, True, 1.0, [1, 1, 1, 0]), ("c2", 0, True, 2.0, [1, 1, 0, 0])]
    rows = [
        {"config_id": cid, "cluster": k, "control": c, "kind": "ablate", "magnitude": m, "ability": "a",
         "task": "t", "item": i, "metric": "acc", "score": float(s)}
        for cid, k, c, m, scores in configs for i, s in enumerate(scores)
    ]
    spec = ability_chart(pd.DataFrame(rows)).to_dict()
    bars = pd.DataFrame(spec["datasets"][spec["data"]["name"]])
    assert len(bars) == 4 and not bars.duplicated(["cluster", "arm", "theta"]).any()
    control_1 = bars[(bars.arm == "matched control") & (bars.theta == "ablate × 1")].iloc[0]
    per_item = np.array([[1, 0, 0, 0], [1, 1, 1, 0]]).mean(0)  # [1, .5, .5, 0]
    assert control_1["mean"] == pytest.approx(per_item.mean())
    assert control_1["sem"] == pytest.approx(per_item.std(ddof=1) / 2) and control_1["n"] == 4
    assert set(bars["baseline"]) == {0.5}
    assert spec["spec"]["layer"][0]["encoding"]["y"]["stack"] is None


def test_the_summary_per_config_is_m_of_f_a():
    # M(f, a) is defined once (impact.ability_scores); stage 05's summary per config is the same number
    from rephelpers.influence.impact import ability_scores, simulate_scores

    scores = simulate_scores({(0, "math"): 0.5, (1, "code"): 0.2}, {"math": 0.7, "code": 0.6}, n_controls=2,
                             magnitudes=(0.5, 1.0), items_per_task=15, seed=4)
    m = ability_scores(scores).set_index(["config_id", "ability"])["score"]
    summary = ability_summary(scores).set_index(["config_id", "ability"])["mean"]
    pd.testing.assert_series_equal(summary.loc[m.index], m, check_names=False)


def _own_task_folder(root):
    """A user's lm-eval task folder (include_path convention): one multiple-choice task over a local JSONL."""
    folder = root / "my_tasks"
    folder.mkdir()
    items = [{"q": f"{a} plus {b} equals", "choices": [str(a + b), str(a + b + 1), str(a * b)], "gold": 0}
             for a, b in [(2, 3), (4, 4), (1, 6), (5, 2), (3, 3), (7, 1)]]
    (folder / "sums.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / "sums.yaml").write_text(
        "task: my_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'sums.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.mark.model
def test_a_users_own_task_folder_runs_on_the_perturbation_path(model, tasks, tmp_path):
    from lm_eval.tasks import TaskManager

    from rephelpers.influence.impact import ais

    folder = _own_task_folder(tmp_path)
    configs = {"baseline": [], "k0:ablate:m1": [Intervention(STRONG, 15)]}
    meta = {"baseline": Setting.baseline(15), "k0:ablate:m1": Setting(0, "ablate", 1.0, 15)}
    rows = evaluate_abilities(model, [tasks["icl"], "my_sums"], configs, batch_size=4, config_meta=meta,
                              task_paths=[folder], progress=False, fast=True)
    mine = rows[rows.ability == "my_sums"]
    assert len(mine) == 2 * 6 and set(mine.config_id) == set(configs)
    # the unperturbed answers equal stock lm-eval's HFLM on the same task folder
    stock = evaluate(HFLM(pretrained=model.hf, tokenizer=model.tokenizer, batch_size=4),
                     TaskManager(include_path=[str(folder)], include_defaults=False).load(["my_sums"]),
                     log_samples=True, bootstrap_iters=0)["samples"]["my_sums"]
    base = mine[mine.config_id == "baseline"].sort_values("item")
    assert base["score"].tolist() == [s["acc"] for s in sorted(stock, key=lambda s: s["doc_id"])]
    # and it pairs with the suite in stage 06's statistics
    table = ais(rows)
    assert set(table.ability) == {"icl", "my_sums"}
    with pytest.raises(RephelpersError, match="not folders"):
        prepare_tasks(["my_sums"], task_paths=[tmp_path / "nowhere"])
    with pytest.raises(RephelpersError, match=r"nor a task in task_paths"):
        prepare_tasks(["no_such_task_xyz"], task_paths=[folder])
