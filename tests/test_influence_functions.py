"""Influence functions (kronfluence) on a tiny Llama built here, against independent computations.

The references never go through kronfluence or the module's own loss: per-module weight
gradients come from ``torch.autograd`` on a plain unbatched loss, the curvatures (K-FAC's
``S ⊗ A``, EK-FAC's re-fitted eigenvalues) are formed explicitly from hooked activations and
output gradients, and the damped inverse is a dense ``numpy.linalg.solve``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rephelpers.errors import RephelpersError
from rephelpers.estimators import influence_functions as inf
from rephelpers.representations.models import load_model  # noqa: E402

WORDS = ("the cat sat on mat dog ran in park a red blue green sky is sun moon star two plus three equals five "
         "four one six seven eight nine ten def return print if else for while").split()
HIDDEN = 16

DOCS = pd.DataFrame({"id": ["d0", "d1", "d2", "d3", "d4"], "text": [
    "the cat sat on the mat",
    "two plus three equals five",
    "def return print if else for while",
    "the sky is blue and the sun is a star",
    "four plus one equals five and two plus two equals four",
]})
ITEMS = pd.DataFrame({"ability": ["math", "animals"], "item_id": [0, 1],
                      "context": ["two plus three equals", "the cat sat on the"], "answer": [" five", " mat"]})


def _tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama (hidden 16, tied lm_head) with random weights of a fixed seed and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _no_full_collections(monkeypatch):
    """kronfluence runs ``gc.collect()`` several times per call to free GPU memory; in a test process
    full of objects that is most of a tiny model's time, and these tests measure nothing about it."""
    from kronfluence.utils import state

    monkeypatch.setattr(state.gc, "collect", lambda *args: 0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))), device="cpu")


# -- independent references ---------------------------------------------------------------------
def _ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _rows(model):
    """(ids, first labelled position) per document and per item, unbatched."""
    docs = [(_ids(model, t), 1) for t in DOCS["text"]]
    items = [(_ids(model, c) + _ids(model, a), len(_ids(model, c))) for c, a in zip(ITEMS["context"], ITEMS["answer"])]
    return docs, items


def _loss(model, ids: list[int], start: int) -> torch.Tensor:
    """Σ_{t ≥ start} −log p(x_t | x_<t), one unpadded row, by a plain loop over positions."""
    logp = torch.log_softmax(model.hf(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return -sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))


def _captured(model, names, ids, start):
    """Per module: the weight gradient of the row's loss, the input activations a_t and output gradients g_t."""
    modules = {n: model.hf.get_submodule(n) for n in names}
    acts, outs, handles = {}, {}, []
    for n, m in modules.items():
        def hook(mod, args, output, n=n):
            acts[n] = args[0].detach()[0]
            output.retain_grad()
            outs[n] = output
        handles.append(m.register_forward_hook(hook))
    weights = [m.weight for m in modules.values()]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        loss = _loss(model, ids, start)
        grads = torch.autograd.grad(loss, weights + [outs[n] for n in names])
    finally:
        for h in handles:
            h.remove()
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    k = len(names)
    return {n: (grads[i].double().numpy(), acts[n].double().numpy(), grads[k + i][0].double().numpy())
            for i, n in enumerate(names)}


def _matrix(frame: pd.DataFrame) -> np.ndarray:
    """items × documents, in ITEMS and DOCS order."""
    table = frame.pivot(index="item_id", columns="id", values="score")
    return table.loc[ITEMS["item_id"], DOCS["id"]].to_numpy()


# -- (1) identity = the gradient dot product, and its sign ------------------------------------------
def test_identity_is_the_gradient_dot_product_and_positive_means_helps(model, tmp_path):
    names = inf.tracked_modules(model, [1])
    out = inf.influence_scores(model, DOCS, ITEMS, strategy="identity", layers=[1], cache_dir=tmp_path, batch_size=2)
    assert list(out.columns) == ["id", "ability", "item_id", "score"] and len(out) == len(DOCS) * len(ITEMS)
    docs, items = _rows(model)
    expected = np.zeros((len(items), len(docs)))
    for i, item in enumerate(items):
        gq = _captured(model, names, *item)
        for j, doc in enumerate(docs):
            gz = _captured(model, names, *doc)
            expected[i, j] = sum(float((gq[n][0] * gz[n][0]).sum()) for n in names)
    got = _matrix(out)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())

    # Sign, from first principles: a small gradient step on document j changes item i's loss by
    # −η · score(j, i), so a positive score lowers the item's loss (the document helps).
    eta = 1e-3
    weights = [model.hf.get_submodule(n).weight for n in names]
    saved = [w.detach().clone() for w in weights]
    for j, doc in enumerate(docs):
        gz = _captured(model, names, *doc)
        with torch.no_grad():
            for w, n in zip(weights, names):
                w -= eta * torch.from_numpy(gz[n][0]).to(w.dtype)
            after = [float(_loss(model, *item)) for item in items]
            for w, s in zip(weights, saved):
                w.copy_(s)
            before = [float(_loss(model, *item)) for item in items]
        change = np.array(after) - np.array(before)
        np.testing.assert_allclose(change, -eta * got[:, j], rtol=0.05, atol=2e-3 * eta * np.abs(got).max())


# -- (2) K-FAC and EK-FAC against the explicitly formed, damped curvature ---------------------------
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_and_ekfac_equal_an_explicit_damped_inverse(model, tmp_path, strategy):
    damping = 1e-2
    settings = inf.KronfluenceSettings(damping=damping, empirical_fisher=True)
    out = inf.influence_scores(model, DOCS, ITEMS, strategy=strategy, layers=[1], cache_dir=tmp_path, batch_size=2,
                               settings=settings)
    names = inf.tracked_modules(model, [1])
    docs, items = _rows(model)
    per_doc = [_captured(model, names, *d) for d in docs]
    per_item = [_captured(model, names, *q) for q in items]
    expected = np.zeros((len(items), len(docs)))
    for n in names:
        # A = mean over every document token of a aᵀ, S = the same of g gᵀ (g: gradient at the output)
        a = np.concatenate([d[n][1] for d in per_doc])
        g = np.concatenate([d[n][2] for d in per_doc])
        A, S = a.T @ a / len(a), g.T @ g / len(g)
        if strategy == "kfac":
            curvature = np.kron(S, A)  # acts on row-major vec(G), G = Σ_t g_t a_tᵀ (d_out × d_in)
        else:
            Q = np.kron(np.linalg.eigh(S)[1], np.linalg.eigh(A)[1])
            lam = np.mean([(Q.T @ d[n][0].reshape(-1)) ** 2 for d in per_doc], axis=0)
            curvature = Q @ np.diag(lam) @ Q.T
        inverse = np.linalg.inv(curvature + damping * np.eye(len(curvature)))
        train = np.stack([d[n][0].reshape(-1) for d in per_doc], axis=1)
        query = np.stack([q[n][0].reshape(-1) for q in per_item])
        expected += query @ inverse @ train
    np.testing.assert_allclose(_matrix(out), expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())


# -- (3) a document equal to the item ranks first ----------------------------------------------------
def test_a_document_equal_to_the_item_ranks_first(model, tmp_path):
    out = inf.influence_scores(model, DOCS, ITEMS, strategy="ekfac", layers=[1], cache_dir=tmp_path, batch_size=2)
    got = _matrix(out)
    twins = {0: 1, 1: 0}  # item 0 is document d1's text, item 1 is d0's
    for i, j in twins.items():
        assert got[i, j] > 0, f"item {i}: its own text scores {got[i, j]} (should help: > 0)"
        assert np.argmax(got[i]) == j, f"item {i}: scores {got[i]}, its own text is document {j}"


# -- (4) the factor cache: reused, keyed, corruption detected --------------------------------------
def test_factors_are_cached_reused_and_refitted_when_corrupt(model, tmp_path, monkeypatch):
    from kronfluence.analyzer import Analyzer

    fits = []
    original = Analyzer.fit_all_factors
    monkeypatch.setattr(Analyzer, "fit_all_factors", lambda self, *a, **k: (fits.append(1), original(self, *a, **k)))
    args = dict(strategy="kfac", layers=[1], cache_dir=tmp_path, batch_size=2)
    folder = inf.fit_factors(model, DOCS, **args)  # ahead of time, as the benchmark times it
    assert len(fits) == 1 and (folder / inf._MANIFEST).exists() and list(folder.glob("*.safetensors"))
    first = _matrix(inf.influence_scores(model, DOCS, ITEMS, **args))
    assert len(fits) == 1, "influence_scores fitted again what fit_factors had cached"
    second = _matrix(inf.influence_scores(model, DOCS, ITEMS, **args))
    assert len(fits) == 1, "a second call with the same documents fitted the factors again"
    np.testing.assert_allclose(second, first, rtol=1e-6)

    # other documents are another key: a second analysis folder, the first one kept
    inf.influence_scores(model, DOCS.iloc[:4], ITEMS, **args)
    assert len(fits) == 2 and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2

    # a corrupted factor file is detected, named and fitted again; it never feeds the scores
    manifests = {json.loads(m.read_text())["documents"]: m for m in tmp_path.rglob(inf._MANIFEST)}
    victim = sorted(manifests[len(DOCS)].parent.glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-4:] = bytes(255 - b for b in data[-4:])
    victim.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="do not match their manifest"):
        third = _matrix(inf.influence_scores(model, DOCS, ITEMS, **args))
    assert len(fits) == 3
    np.testing.assert_allclose(third, first, rtol=1e-5)


def test_model_is_left_as_it_was(model, tmp_path):
    from kronfluence.module.tracked_module import TrackedModule

    ids = torch.tensor([_ids(model, DOCS["text"][0])])
    before = model.hf(input_ids=ids).logits.detach().clone()
    flags = {n: p.requires_grad for n, p in model.hf.named_parameters()}
    inf.influence_scores(model, DOCS, ITEMS, strategy="identity", layers=[0, 1], cache_dir=tmp_path, batch_size=2)
    assert not any(isinstance(m, TrackedModule) for m in model.hf.modules())
    assert {n: p.requires_grad for n, p in model.hf.named_parameters()} == flags
    assert not model.hf.training
    torch.testing.assert_close(model.hf(input_ids=ids).logits, before)


def test_tracked_modules_are_the_decoder_linears_only(model):
    names = inf.tracked_modules(model)  # default: the top DEFAULT_TOP_LAYERS layers (both, here)
    assert len(names) == 2 * 7
    assert all(n.startswith("model.layers.") for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    assert inf.tracked_modules(model, [-1]) == inf.tracked_modules(model, [1])


# -- sampling per cluster ---------------------------------------------------------------------------
def test_docs_per_cluster_scores_a_seeded_sample(model, tmp_path):
    labels = {"d0": 0, "d1": 1, "d2": 0, "d3": 0, "d4": 1}
    sample = inf.sample_documents(DOCS, labels, 1, seed=3)
    assert sorted(labels[i] for i in sample["id"]) == [0, 1]
    assert inf.sample_documents(DOCS, labels, 1, seed=3)["id"].tolist() == sample["id"].tolist()
    assert len(inf.sample_documents(DOCS, labels, 10, seed=3)) == len(DOCS)
    draws = {tuple(inf.sample_documents(DOCS, labels, 1, seed=s)["id"]) for s in range(20)}
    assert len(draws) > 1, "the sample does not depend on the seed"
    out = inf.influence_scores(model, DOCS, ITEMS, strategy="identity", layers=[1], docs_per_cluster=1,
                               labels=labels, seed=3, cache_dir=tmp_path, batch_size=2)
    assert set(out["id"]) == set(sample["id"]) and len(out) == 2 * len(ITEMS)
    # the same documents score the same whether sampled or passed alone (identity: no factors involved)
    alone = inf.influence_scores(model, sample, ITEMS, strategy="identity", layers=[1], cache_dir=tmp_path,
                                 batch_size=2)
    merged = out.merge(alone, on=["id", "ability", "item_id"])
    np.testing.assert_allclose(merged["score_x"], merged["score_y"], rtol=1e-5)


# -- clear errors, before any compute ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, documents, items, message", [
    (dict(strategy="lissa"), DOCS, ITEMS, "unknown strategy"),
    (dict(layers=[2]), DOCS, ITEMS, "out of range"),
    (dict(layers=[]), DOCS, ITEMS, "layers is empty"),
    (dict(), DOCS.iloc[:0], ITEMS, "documents is empty"),
    (dict(), DOCS, ITEMS.iloc[:0], "items is empty"),
    (dict(), DOCS.drop(columns="text"), ITEMS, "lacks column"),
    (dict(), DOCS, ITEMS.assign(answer=""), "empty answer"),
    (dict(batch_size=0), DOCS, ITEMS, "batch_size"),
    (dict(docs_per_cluster=2), DOCS, ITEMS, "needs labels"),
    (dict(docs_per_cluster=2, labels={"d0": 0}), DOCS, ITEMS, "no cluster in labels"),
    (dict(docs_per_cluster=0, labels={f"d{i}": 0 for i in range(5)}), DOCS, ITEMS, "positive int"),
])
def test_bad_input_is_refused_before_any_compute(model, tmp_path, monkeypatch, kwargs, documents, items, message):
    from kronfluence.analyzer import Analyzer

    monkeypatch.setattr(Analyzer, "__init__", lambda *a, **k: pytest.fail("compute started on bad input"))
    with pytest.raises(RephelpersError, match=message):
        inf.influence_scores(model, documents, items, cache_dir=tmp_path, **kwargs)


def test_nan_scores_are_an_error(model, tmp_path, monkeypatch):
    from kronfluence.analyzer import Analyzer

    original = Analyzer.load_pairwise_scores

    def poisoned(self, name):
        scores = original(self, name)
        scores["all_modules"][0, 0] = float("nan")
        return scores

    monkeypatch.setattr(Analyzer, "load_pairwise_scores", poisoned)
    with pytest.raises(RephelpersError, match="NaN or infinite"):
        inf.influence_scores(model, DOCS, ITEMS, strategy="identity", layers=[1], cache_dir=tmp_path, batch_size=2)
