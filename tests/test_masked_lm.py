"""Masked (BERT-style) LMs through stages 02-05, on tiny masked LMs built from a config in the test.

Every number is checked against an independent computation: HF's ``output_hidden_states``
for extraction, and for pseudo-log-likelihood a plain loop that masks one token at a time
and calls the HF module directly (no nnsight, no batching), perturbed by a plain torch
forward hook.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch
from lm_eval.api.instance import Instance

from masked_support import (
    LAYERS, ablate_hook, build_tiny_masked_lm, hooked, reference_continuation, reference_pll, reference_text_pll,
)
from rephelpers.abilities.evaluation import evaluate_abilities
from rephelpers.abilities.masked_lm import MaskedPerturbedLM
from rephelpers.abilities.suite import build_tasks, read_items
from rephelpers.dimensions.mediation import mediation_effects
from rephelpers.errors import RephelpersError
from rephelpers.interventions.intervene import (
    Intervention, forward_readout, likelihood_names, perplexity, sequence_nll, validate,
)
from rephelpers.interventions.edits import Ablate, Noise, Shift
from rephelpers.perturbations.specificity import metric_labels, specificity_long
from rephelpers.interventions.tokenkeys import token_keys
from rephelpers.representations.activations import extract_activations, pool
from rephelpers.representations.models import is_masked_lm, load_model, model_fingerprint

TEXTS = [
    "The licensee may redistribute the software provided that the notice is retained.",
    "import os\nfor name in os.listdir('.'):\n    print(name)",
    "x",
    "Q: Tom has 3 apples and buys 4 more. How many apples? A: 3 + 4 = 7.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small runs fastest on one thread (two threads on a busy 2-core machine spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _folder(root: str, architecture: str) -> str:
    return str(build_tiny_masked_lm(f"{root}/{architecture}", architecture))


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("masked_lms"))


@pytest.fixture(scope="module")
def bert(models_root):
    return load_model(_folder(models_root, "bert"), device="cpu")


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPHELPERS_CACHE", str(tmp_path / "cache"))


# -- loading --------------------------------------------------------------------------------
def test_masked_lm_loads_right_padded_with_its_own_fingerprint(bert, models_root):
    assert bert.masked and bert.kind == "masked LM" and bert.n_layers == LAYERS
    assert bert.tokenizer.padding_side == "right" and bert.layers_path == "bert.encoder.layer"
    assert model_fingerprint(bert).endswith("|masked")
    assert likelihood_names(bert).perplexity == "pseudo-perplexity"
    batch = bert.encode(["one", "one two three four"])
    assert batch["attention_mask"][0].tolist()[:3] == [1, 1, 1] and batch["attention_mask"][0, -1] == 0
    with pytest.raises(RephelpersError, match="no MLP submodule found.*BERT and RoBERTa have none"):
        bert.check_component("mlp")
    with pytest.raises(RephelpersError, match="masked LM.*positions='all'"):
        validate(bert, [Intervention(Ablate((1,)), 1, positions="last")])
    distil = load_model(_folder(models_root, "distilbert"), device="cpu")
    assert distil.masked and distil._attn_name == "attention" and distil._mlp_name == "ffn"


def test_is_masked_lm_reads_the_config():
    from transformers import BertConfig, LlamaConfig

    assert is_masked_lm(BertConfig(architectures=["BertForMaskedLM"]))
    assert not is_masked_lm(BertConfig(architectures=["BertLMHeadModel"]))
    assert is_masked_lm(BertConfig())  # no architectures recorded: BERT's head is a masked LM
    assert not is_masked_lm(BertConfig(is_decoder=True))
    assert not is_masked_lm(LlamaConfig())
    assert not is_masked_lm(LlamaConfig(architectures=["LlamaForCausalLM"]))


def test_last_pooling_reads_the_last_real_token_for_either_padding():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(h, right, "last").squeeze(-1).tolist() == [1.0, 7.0]
    assert torch.equal(pool(h, left, "last"), h[:, -1])


# -- stage 02 -------------------------------------------------------------------------------
ARCHITECTURES = ["bert", "roberta", "distilbert", "modernbert"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_activations_equal_hf_hidden_states(models_root, isolated_cache, architecture):
    model = load_model(_folder(models_root, architecture), device="cpu")
    # Not the last layer: ModernBERT's last hidden_states entry is after its final norm.
    layers = [0, 2]
    for pooling in ("mean", "last"):
        acts = extract_activations(model, TEXTS, layers, pooling=pooling, batch_size=3, max_length=64,
                                   progress=False, skip_first=1)
        for layer in layers:
            want = []
            for text in TEXTS:
                enc = model.tokenizer(text, return_tensors="pt", truncation=True, max_length=64)
                with torch.inference_mode():
                    hs = model.hf(**enc, output_hidden_states=True).hidden_states[layer + 1][0].double()
                kept = hs[1:] if len(hs) > 1 else hs  # skip_first=1 leaves out [CLS]
                want.append(kept.mean(0) if pooling == "mean" else hs[-1])
            np.testing.assert_allclose(acts[layer], torch.stack(want).numpy(), atol=1e-5, rtol=1e-5)


# -- stages 03 and 04: pseudo-log-likelihood --------------------------------------------------
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_pseudo_nll_equals_a_plain_masking_loop(models_root, architecture):
    model = load_model(_folder(models_root, architecture), device="cpu")
    nll, count = sequence_nll(model, TEXTS, batch_size=3, max_length=64, progress=False)
    want = [reference_text_pll(model, t, max_length=64) for t in TEXTS]
    np.testing.assert_allclose(nll, [-w for w, _ in want], rtol=1e-5)
    assert count.tolist() == [n for _, n in want] and count[2] == 1  # "x": one real token
    assert perplexity(nll, count) == pytest.approx(np.exp(-sum(w for w, _ in want) / sum(n for _, n in want)))


def test_perturbed_pseudo_nll_equals_torch_hooks_in_every_masked_copy(bert):
    dims = (1, 5, 9, 20, 33)
    direction = tuple(np.random.default_rng(0).normal(size=bert.d_model))
    noise = Noise((2, 4, 6, 8), sigma=3.0, seed=7)
    ivs = [Intervention(Ablate(dims), 1), Intervention(Shift(direction, alpha=0.7), 2, "attn"),
           Intervention(noise, 2)]
    got, _ = sequence_nll(bert, TEXTS, ivs, batch_size=3, max_length=64, progress=False)
    base, _ = sequence_nll(bert, TEXTS, batch_size=3, max_length=64, progress=False)
    want = []
    for text in TEXTS:
        ids = bert.tokenizer(text, truncation=True, max_length=64)["input_ids"]
        # Noise draws by the unmasked text's token keys: the same values at a token in every copy.
        keys = token_keys(torch.tensor([ids])).keys
        hooks = {(1, "resid"): ablate_hook(dims),
                 (2, "attn"): lambda h: h + 0.7 * torch.tensor(direction, dtype=h.dtype),
                 (2, "resid"): lambda h, keys=keys: noise.apply(h, keys)}
        want.append(-reference_pll(bert, ids, list(range(1, len(ids) - 1)), hooks)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.abs(got - base).min() > 1e-3  # the perturbation changed every text


def test_forward_readout_and_mediation_use_pseudo_nll(bert):
    batch = bert.encode(TEXTS[:3], max_length=64)
    ivs = [Intervention(Ablate((3, 7)), 1)]
    readout = forward_readout(bert, batch, ivs, read_layers=[2, 3], attention_layers=[3])
    want = [reference_text_pll(bert, t, {(1, "resid"): ablate_hook((3, 7))}, 64) for t in TEXTS[:3]]
    np.testing.assert_allclose(readout.nll.numpy(), [-w for w, _ in want], rtol=1e-5)
    assert readout.count.tolist() == [n for _, n in want]
    assert readout.attention[3].shape[:2] == (3, 4)
    # pooled states of the perturbed pass: mean over real tokens but [CLS] (skip_first=1)
    remove = hooked(bert, {(1, "resid"): ablate_hook((3, 7))})
    try:
        with torch.inference_mode():
            hs = bert.hf(**bert.tokenizer(TEXTS[0], return_tensors="pt"), output_hidden_states=True).hidden_states
    finally:
        remove()
    np.testing.assert_allclose(readout.pooled[2][0].numpy(), hs[3][0, 1:].mean(0).numpy(), atol=1e-5)

    effects = mediation_effects(bert, TEXTS[:2], None, 1, dims=[3], values=[0.5], batch_size=2, progress=False)
    plain = [reference_text_pll(bert, t, max_length=128) for t in TEXTS[:2]]
    edited = [reference_text_pll(bert, t, {(1, "resid"): ablate_hook((3,), (0.5,))}, 128) for t in TEXTS[:2]]
    tokens = sum(n for _, n in plain)
    assert effects.loc[0, "nll_kind"] == "pseudo-NLL"
    assert effects.loc[0, "nll_original"] == pytest.approx(-sum(w for w, _ in plain) / tokens, rel=1e-5)
    assert effects.loc[0, "nll_intervened"] == pytest.approx(-sum(w for w, _ in edited) / tokens, rel=1e-5)


def test_specificity_labels_say_pseudo_perplexity():
    report = pd.DataFrame({"cluster": [0], "arm": ["perturbation"], "draw": [0], "kind": ["ablate"], "magnitude": [1.0],
                           "layer": [1], "dlogppl_target": [0.2], "dlogppl_rest": [0.1], "cka_target": [0.9],
                           "cka_rest": [0.95], "attn_js_target": [np.nan], "attn_js_rest": [np.nan]})
    assert set(specificity_long(report).metric) == {"Δ log perplexity", "CKA (original, perturbed)"}
    masked = report.assign(ppl_kind="pseudo-perplexity")
    assert metric_labels(masked)["dlogppl"] == "Δ log pseudo-perplexity"
    assert "Δ log pseudo-perplexity" in set(specificity_long(masked).metric)


# -- stage 05: multiple choice by pseudo-log-likelihood -----------------------------------------
def test_masked_lm_loglikelihoods_equal_the_masking_loop(bert):
    pairs = [("Review: The movie was awful.\nSentiment:", " negative"),
             ("The capital of France is", " Paris, a city on the Seine"),
             ("2 + 2 =", " 4"),
             ("", "The nurse said she would help."),
             ("def add(a, b):\n    return ", "a + b")]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    lm = MaskedPerturbedLM(bert, batch_size=2)
    got = lm.loglikelihood(requests)
    np.testing.assert_allclose([g for g, _ in got], [reference_continuation(bert, c, x) for c, x in pairs], rtol=1e-5)
    dims = tuple(range(0, 64, 3))
    perturbed = lm.use([Intervention(Ablate(dims), 2)]).loglikelihood(requests)
    want = [reference_continuation(bert, c, x, {(2, "resid"): ablate_hook(dims)}) for c, x in pairs]
    np.testing.assert_allclose([g for g, _ in perturbed], want, rtol=1e-5)
    assert all(abs(a[0] - b[0]) > 1e-4 for a, b in zip(got, perturbed))


def test_evaluate_abilities_scores_choices_by_pseudo_log_likelihood(bert, tmp_path):
    tasks = build_tasks(["arithmetic", "bias"], tmp_path / "tasks", items_per_task=4, seed=0)
    dims = tuple(range(1, 64, 2))
    configs = {"base": [], "ablate": [Intervention(Ablate(dims), 1)]}
    scores = evaluate_abilities(bert, tasks, configs, limit=2, batch_size=4, progress=False)
    assert len(scores) == 2 * 2 * 2 and set(scores.likelihood) == {"pseudo-log-likelihood"}
    items = {row["id"]: row for info in tasks.values() for row in read_items(info)}
    delimiter = {"rh_arithmetic": " ", "rh_bias": ""}
    for row in scores.itertuples():
        item = items[row.item]
        hooks = {(1, "resid"): ablate_hook(dims)} if row.config_id == "ablate" else None
        ll = [reference_continuation(bert, row.prompt, delimiter[row.task] + c, hooks) for c in item["choices"]]
        gold = item["gold"]
        assert row.margin == pytest.approx(ll[gold] - max(v for j, v in enumerate(ll) if j != gold), abs=1e-4)
        assert row.score == float(np.argmax(ll) == gold) or row.task == "rh_bias"
    # fast=True has no masked-LM sweep: it falls back to the per-config path, with the same scores
    fast = evaluate_abilities(bert, tasks, configs, limit=2, batch_size=4, progress=False, fast=True)
    pd.testing.assert_frame_equal(fast, scores)


def test_the_testbed_refuses_a_masked_lm(bert):
    from rephelpers.testbed.finetune import first_trained_layer

    with pytest.raises(RephelpersError, match="masked LM: the testbed continues pre-training with the next-token loss"):
        first_trained_layer(bert, 2)


def test_generation_tasks_are_refused_before_any_evaluation(bert, tmp_path, monkeypatch):
    tasks = build_tasks(["arithmetic", "reasoning", "instruction"], tmp_path / "tasks", items_per_task=2, seed=0)

    def evaluated(*args, **kwargs):
        raise AssertionError("evaluation started before the error")

    monkeypatch.setattr(MaskedPerturbedLM, "score_pairs", evaluated)
    with pytest.raises(RephelpersError, match=r"masked LM.*rh_instruction \(generate_until\), rh_reasoning \(generate_until\)"):
        evaluate_abilities(bert, tasks, {"base": []}, limit=1, progress=False)
    with pytest.raises(RephelpersError, match="cannot generate text"):
        MaskedPerturbedLM(bert).generate_until([])
