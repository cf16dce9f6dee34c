"""Sentence embeddings: equal to a direct SentenceTransformer call, cached by content."""

from __future__ import annotations

import numpy as np
import pytest

from rephelpers import RephelpersError
from rephelpers.corpus.embeddings import embed_texts, embedder_path, load_embedder

TEXTS = [
    "def add(a, b):\n    return a + b",
    "Permission is hereby granted, free of charge, to any person.",
    "Problem: Ada buys 3 apples at 2 dollars each. Answer: 6",
    "def add(a, b):\n    return a + b",  # a duplicate: embedded once, returned twice
    "The for statement is used to iterate over the elements of a sequence.",
]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPHELPERS_CACHE", str(tmp_path))
    return tmp_path


def test_embeddings_equal_a_direct_sentence_transformers_call(private_cache):
    from sentence_transformers import SentenceTransformer

    ours = embed_texts(TEXTS, max_seq_length=32, show_progress=False)
    reference = SentenceTransformer(str(embedder_path()), device="cpu")
    reference.max_seq_length = 32
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    assert ours.dtype == np.float32 and ours.shape == (5, 384)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(ours[0], ours[3])


def test_cache_serves_known_texts_and_embeds_only_new_ones(private_cache, monkeypatch):
    first = embed_texts(TEXTS[:3], max_seq_length=32, show_progress=False)
    assert list((private_cache / "embeddings").glob("*.sqlite"))
    encoder = load_embedder(max_seq_length=32)
    seen: list[list[str]] = []
    original = encoder.encode

    def spy(texts, **kwargs):
        seen.append(list(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", spy)
    again = embed_texts(TEXTS, max_seq_length=32, show_progress=False)
    assert seen == [[TEXTS[4]]]  # only the text not seen before
    assert np.array_equal(again[:3], first)  # bit-identical from the cache
    # Another configuration (no extra normalisation) has a cache of its own.
    embed_texts(TEXTS[:1], max_seq_length=32, normalize=False, show_progress=False)
    assert seen[-1] == [TEXTS[0]]
    assert len(list((private_cache / "embeddings").glob("*.sqlite"))) == 2


def test_embedder_errors_name_the_fix(private_cache):
    with pytest.raises(RephelpersError, match="neither one of"):
        embedder_path("not-a-model")
    with pytest.raises(RephelpersError, match="no texts"):
        embed_texts([])
    with pytest.raises(RephelpersError, match="max_seq_length"):
        load_embedder(max_seq_length=10_000)


# -- static embeddings distilled from the model ------------------------------------------
STATIC_TEXTS = [
    "def add(a, b): return a + b",
    "def mul(a, b): return a * b",
    "for item in items: print(item)",
    "class Point: x = 0",
    "Permission is hereby granted, free of charge, to any person obtaining a copy.",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND.",
    "Redistribution and use in source and binary forms are permitted.",
    "Licensed under the Apache License, Version 2.0.",
    "Problem: Ada buys 3 apples at 2 dollars each. Answer: 6",
    "Problem: Bo has 10 pens and gives away 4. Answer: 6",
    "Problem: a train travels 60 miles in 2 hours. Answer: 30",
    "Problem: Cy reads 5 pages a day for 7 days. Answer: 35",
]


def test_static_embeddings_are_the_ridge_regression_onto_the_model(private_cache):
    """Rebuilt independently: sklearn's TF-IDF of the word pieces, sklearn's Ridge towards the
    scaled prior, the prior as the model's embedding of each word piece alone."""
    from sentence_transformers import SentenceTransformer
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    from rephelpers.corpus.embeddings import static_embed, static_sample, word_piece_prior

    ours = static_embed(STATIC_TEXTS, sample_size=6, seed=3, ridge=0.5, show_progress=False)
    assert ours.dtype == np.float32 and ours.shape == (12, 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)

    encoder = load_embedder()
    pieces = lambda text: [str(i) for i in encoder.tokenizer(text, add_special_tokens=False)["input_ids"]]  # noqa: E731
    vocabulary = sorted({p for text in STATIC_TEXTS for p in pieces(text)})
    sample = static_sample(STATIC_TEXTS, 6, seed=3)
    assert len(sample) == 6 and set(sample) <= set(STATIC_TEXTS)
    assert static_sample(STATIC_TEXTS[::-1], 6, seed=3) == sample  # the set decides, not the order
    # idf counted on the sample, over every word piece of the corpus (unsampled ones: df = 0)
    vectorizer = TfidfVectorizer(analyzer=pieces, sublinear_tf=True, vocabulary=vocabulary).fit(sample)
    x_sample, x_all = vectorizer.transform(sample).toarray(), vectorizer.transform(STATIC_TEXTS).toarray()
    prior = word_piece_prior(token_ids=[int(t) for t in vocabulary], show_progress=False).astype(np.float64)
    targets = np.asarray(SentenceTransformer(str(embedder_path()), device="cpu").encode(sample, normalize_embeddings=True), dtype=np.float64)
    guess = x_sample @ prior
    scale = np.linalg.lstsq(guess.reshape(-1, 1), targets.ravel(), rcond=None)[0][0]
    ridge = Ridge(alpha=0.5, fit_intercept=False, solver="cholesky").fit(x_sample, targets - scale * guess)
    expected = x_all @ (scale * prior + ridge.coef_.T)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, expected, atol=2e-4)
    # The prior row of a word is the model's sentence embedding of that word alone.
    for word in ("license", "def", "apples"):
        token = encoder.tokenizer.convert_tokens_to_ids(word)
        assert token != encoder.tokenizer.unk_token_id
        np.testing.assert_allclose(word_piece_prior(token_ids=[token], show_progress=False)[0],
                                   encoder.encode(word, normalize_embeddings=True), atol=1e-5)


def test_static_path_is_deterministic_offline_and_cached_apart_from_the_model(private_cache, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the static path tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    first = embed_texts(STATIC_TEXTS, method="static", static_sample=4, show_progress=False)
    again = embed_texts(STATIC_TEXTS[::-1], method="static", static_sample=4, show_progress=False)
    assert np.array_equal(first, again[::-1])
    # The model's table holds only the sample, with the model's own vectors; the word-piece
    # prior has a table of its own; no static vector is ever cached.
    from rephelpers.corpus.embeddings import _Store, _cache_file, static_sample, text_key

    tables = sorted((private_cache / "embeddings").glob("*.sqlite"))
    assert len(tables) == 2
    sentence = _Store(_cache_file("all-MiniLM-L6-v2", 256, True), 384)
    sample = static_sample(STATIC_TEXTS, 4)
    cached = dict(sentence.read([text_key(t) for t in STATIC_TEXTS]))
    assert set(cached) == {text_key(t) for t in sample}
    exact = embed_texts(sample, method="transformer", cache=False, show_progress=False)
    for text, vector in zip(sample, exact):
        np.testing.assert_allclose(cached[text_key(text)], vector, atol=1e-6)
    rows = [STATIC_TEXTS.index(t) for t in sample]
    assert not np.allclose(first[rows], exact, atol=1e-3)  # static vectors are not the model's
    # The transformer path after the static one embeds exactly, whatever the static path cached.
    np.testing.assert_allclose(embed_texts(STATIC_TEXTS, method="transformer", show_progress=False),
                               embed_texts(STATIC_TEXTS, method="transformer", cache=False, show_progress=False), atol=1e-6)


def test_auto_embeds_statically_above_the_threshold(private_cache, monkeypatch):
    from rephelpers.corpus import embeddings

    assert embeddings.resolve_embedding_method("auto", embeddings.STATIC_THRESHOLD) == "transformer"
    assert embeddings.resolve_embedding_method("auto", embeddings.STATIC_THRESHOLD + 1) == "static"
    assert embeddings.resolve_embedding_method("transformer", 10**6) == "transformer"
    monkeypatch.setattr(embeddings, "STATIC_THRESHOLD", 11)
    texts = STATIC_TEXTS + STATIC_TEXTS[:1]  # 12 distinct texts: above the threshold
    np.testing.assert_array_equal(embed_texts(texts, show_progress=False), embed_texts(texts, method="static", show_progress=False))
    below = STATIC_TEXTS[:11]
    np.testing.assert_array_equal(embed_texts(below, show_progress=False), embed_texts(below, method="transformer", show_progress=False))


def test_static_errors_name_the_fix(private_cache, tmp_path):
    with pytest.raises(RephelpersError, match="neither one of"):
        embed_texts(STATIC_TEXTS, model=str(tmp_path / "no-such-model"), method="static")
    with pytest.raises(RephelpersError, match="embedding method must be one of"):
        embed_texts(STATIC_TEXTS, method="fast")
    with pytest.raises(RephelpersError, match=r"static_sample must be an int in 1\.\.12"):
        embed_texts(STATIC_TEXTS, method="static", static_sample=50)
    assert not list((private_cache / "embeddings").glob("*.sqlite"))  # failed before any work
