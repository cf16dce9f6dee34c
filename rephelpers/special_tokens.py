"""The special tokens a tokenizer wraps around one text, for code that builds inputs by hand.

Shared by the static word-piece prior (:func:`rephelpers.corpus.embeddings.word_piece_prior`,
each word piece fed as the one-token text the tokenizer would build) and masked-LM scoring
(:class:`rephelpers.abilities.masked_lm.MaskedPerturbedLM`, ``context + continuation``
wrapped as one text). Imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

from .errors import require


def special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after one text (BERT: ``[CLS]``, ``[SEP]``),
    located around the text's own tokens in its encoding of ``"a"``."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((o for o in range(len(full) - len(plain) + 1) if full[o : o + len(plain)] == plain), None)
    require(start is not None, "the tokenizer's special tokens could not be located around a text.")
    return list(full[:start]), list(full[start + len(plain):])
