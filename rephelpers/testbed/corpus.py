"""The testbed's corpus and fine-tuning inputs: the demo corpus plus one planted cluster per skill.

Part of :mod:`rephelpers.testbed.groundtruth` (which re-exports it; its docstring describes the
whole testbed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..abilities.suite import ABILITIES, ability_spec
from ..artifacts import RunDir, stable_hash
from ..corpus.loaders import load_corpus
from ..errors import require
from .planted import PLANTED, planted_corpus


REST = "rest"


# -- the corpus ---------------------------------------------------------------------------------
def testbed_corpus(
    docs_per_domain: int = 20,
    docs_per_skill: int = 60,
    skills: Sequence[str] = tuple(PLANTED),
    seed: int = 0,
) -> pd.DataFrame:
    """The builtin demo corpus plus the planted clusters: ``id, text, source, domain, planted``.

    ``planted`` is the skill a document teaches, or ``"rest"`` for the demo corpus. The
    planted documents' ``domain`` is ``planted_<skill>``, so stage 01's validation against
    domains also shows how well the clustering finds them.
    """
    demo = load_corpus("builtin", docs_per_domain=docs_per_domain, seed=seed)
    demo = demo[["id", "text", "source", "domain"]].assign(planted=REST)
    frame = pd.concat([demo, planted_corpus(skills, docs_per_skill, seed)], ignore_index=True)
    require(frame["id"].is_unique, "planted and demo document ids collide; report this bug")
    return frame


CORPUS_FILE = "groundtruth_corpus.jsonl"
"""Where notebook 07 keeps the testbed corpus in its run directory (the chain's ``corpus``)."""
CORPUS_COLUMNS = ("id", "text", "source", "domain")


def write_corpus(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the corpus as JSON Lines (``id, text, source, domain``), the chain's ``corpus`` input."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        json.dumps({k: row[k] for k in CORPUS_COLUMNS}, ensure_ascii=False) + "\n"
        for row in frame.to_dict("records")
    )
    if not (path.exists() and path.read_text(encoding="utf-8") == text):
        path.write_text(text, encoding="utf-8")
    return path


def save_corpus(run: RunDir, frame: pd.DataFrame) -> Path:
    """:func:`write_corpus` into ``run`` through ``run.cached``, keyed by the corpus' content
    (:data:`CORPUS_COLUMNS`): the same corpus is not rewritten, another one moves the old file to
    ``.history/``. Returns the file's path."""
    columns = list(CORPUS_COLUMNS)
    run.cached(CORPUS_FILE, lambda: frame, params={"corpus": frame[columns].reset_index(drop=True)},
               save=lambda value, key: run.save(CORPUS_FILE, key, lambda path: write_corpus(value, path)),
               load=lambda: None)
    return run.path(CORPUS_FILE)


def item_overlaps(items: Sequence[Mapping[str, Any]], texts: Sequence[str]) -> list[str]:
    """Prompts of ``items`` that occur verbatim in any of ``texts`` (should be none)."""
    joined = "\n\x00".join(texts)
    return [it["prompt"] for it in items if it["prompt"].strip() and it["prompt"] in joined]


# -- the fine-tuning inputs ------------------------------------------------------------------------
def training_blocks(model: Any, corpus: pd.DataFrame, config: Any, cache: Path | None = None) -> tuple[Any, Any]:
    """The corpus packed into blocks (one group per planted skill, ``rest`` for the demo corpus)
    and the frozen layers' hidden states entering the first trained layer, cached under
    ``cache`` keyed by the model, the blocks and that layer.
    """
    from .finetune import first_trained_layer, pack_blocks, prefix_states
    from ..representations.models import model_fingerprint

    blocks = pack_blocks(corpus["text"].tolist(), corpus["planted"].tolist(), model.tokenizer, config.block_tokens)
    start = first_trained_layer(model, config.train_layers)
    key = stable_hash("prefix-v1", model_fingerprint(model), blocks.ids.numpy(), blocks.group.astype(str), start)
    states = prefix_states(model, blocks, start, cache=Path(cache) / f"states-{key}.pt" if cache else None)
    return blocks, states




def check_abilities(abilities: Sequence[str]) -> list[str]:
    """``abilities`` as a list, if every name is an ability of the suite; else a clear error."""
    unknown = [a for a in abilities if ability_spec(a) is None]
    require(not unknown, f"unknown abilities {unknown}; the suite has {', '.join(ABILITIES)}")
    return list(abilities)
