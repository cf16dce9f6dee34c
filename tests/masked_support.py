"""A tiny masked LM built offline inside the tests: nothing is downloaded, no weights are committed.

:func:`build_tiny_masked_lm` trains a WordPiece vocabulary (the ``tokenizers`` library) on the
builtin corpus, builds a BERT (or RoBERTa / DistilBERT / ModernBERT) masked LM from its config with
random weights of a fixed seed, and saves both into a folder that ``load_model`` (and so
``model_name`` in the notebooks) takes like any HF masked-LM folder. Random weights suffice:
these tests check the mechanics (extraction, pseudo-log-likelihood, perturbations), not
what the model knows.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from rephelpers.representations.models import output_tensor, replace_output

LAYERS = 4
HIDDEN = 64


@functools.lru_cache(maxsize=1)
def _tokenizer(vocab_size: int = 1000):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    from rephelpers.corpus.loaders import load_corpus

    texts = load_corpus("builtin", seed=0, docs_per_domain=10)["text"].tolist()
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    return BertTokenizerFast(vocab=wordpiece.get_vocab(), do_lower_case=True)


def build_tiny_masked_lm(folder: Path, architecture: str = "bert", seed: int = 0) -> Path:
    """Save a ``LAYERS``-layer, ``HIDDEN``-wide masked LM and its tokenizer into ``folder``."""
    from transformers import (
        BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM,
        RobertaConfig, RobertaForMaskedLM,
    )

    tokenizer = _tokenizer()
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if architecture == "bert":
        model = BertForMaskedLM(BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                           intermediate_size=2 * HIDDEN, max_position_embeddings=512, **common))
    elif architecture == "roberta":
        model = RobertaForMaskedLM(RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                                                 intermediate_size=2 * HIDDEN, max_position_embeddings=514, **common))
    elif architecture == "distilbert":
        model = DistilBertForMaskedLM(DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=4, hidden_dim=2 * HIDDEN,
                                                       max_position_embeddings=512, **common))
    elif architecture == "modernbert":
        # Pre-LN, rotary positions, and local attention (16 tokens) in every other layer.
        special = dict(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        model = ModernBertForMaskedLM(ModernBertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=2 * HIDDEN,
            max_position_embeddings=512, global_attn_every_n_layers=2, local_attention=16, **special, **common))
    else:
        raise ValueError(f"unknown architecture {architecture!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- independent references: one unbatched HF forward per masked token, plain torch hooks --------
def hooked(model, hooks):
    """Register ``{(layer, component): edit(h)}`` as plain forward hooks on ``model.hf``; returns a remover."""
    handles = []
    for (layer, component), edit in hooks.items():
        def hook(module, args, output, edit=edit):
            return replace_output(output, edit(output_tensor(output)))
        handles.append(model.module(layer, component).register_forward_hook(hook))
    return lambda: [h.remove() for h in handles]


def reference_pll(model, ids: list[int], positions: list[int], hooks=None) -> tuple[float, list[bool]]:
    """``Σ_{t∈positions} log p(x_t | x_{\\t})``: one unbatched HF forward per masked token."""
    remove = hooked(model, hooks or {})
    total, greedy = 0.0, []
    try:
        for t in positions:
            x = torch.tensor([ids])
            x[0, t] = model.tokenizer.mask_token_id
            with torch.inference_mode():
                logp = torch.log_softmax(model.hf(input_ids=x).logits[0, t].double(), -1)
            total += float(logp[ids[t]])
            greedy.append(int(logp.argmax()) == ids[t])
    finally:
        remove()
    return total, greedy


def reference_text_pll(model, text: str, hooks=None, max_length: int = 256) -> tuple[float, int]:
    ids = model.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    positions = list(range(1, len(ids) - 1))  # all but [CLS] and [SEP]
    return reference_pll(model, ids, positions, hooks)[0], len(positions)


def ablate_hook(dims, values=None):
    def edit(h, dims=dims, values=values):
        h = h.clone()
        h[..., list(dims)] = 0.0 if values is None else torch.tensor(values, dtype=h.dtype)
        return h
    return edit


def reference_continuation(model, context: str, continuation: str, hooks=None) -> float:
    """``Σ_j log p(c_j | ctx, c_{\\j})`` from the tokenizer's own [CLS] ctx cont [SEP] encoding."""
    ids = model.tokenizer(context + continuation)["input_ids"]
    n_ctx = len(model.tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0
    return reference_pll(model, ids, list(range(1 + n_ctx, len(ids) - 1)), hooks)[0]
