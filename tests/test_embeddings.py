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
