"""The ability items as stage 05 evaluated them: one row per item, its context and gold answer.

Every estimator that scores (document, item) pairs reads this table, so all of them look
at the same text: ``context`` is the prompt the model was given (the suite's ``prompt``
field, which the lm-eval task reads through ``doc_to_text``; chat-templated for a chat
ability when a tokenizer is given, as stage 05's lm-eval call does), and ``answer`` the
gold continuation exactly as lm-eval appends it, ``target_delimiter + gold`` (the gold
choice of a multiple-choice item, the ``answer`` field of a generation item), so that
``context + answer`` is the scored text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..abilities.suite import TaskInfo, ability_spec, read_items
from ..artifacts import RunDir
from ..errors import require

ITEM_COLUMNS = ("ability", "item_id", "context", "answer")


def _gold_text(item: Mapping[str, Any], ability: str) -> str:
    if "choices" in item:
        choices = list(item["choices"])
        gold = item.get("gold")
        require(gold is not None and str(gold).strip().lstrip("-").isdigit() and 0 <= int(gold) < len(choices),
                f"{ability} item {item.get('id')!r}: gold {gold!r} is not an index into its {len(choices)} choices; "
                "rebuild the task with build_tasks.")
        return str(choices[int(gold)])
    require("answer" in item, f"{ability} item {item.get('id')!r} has neither choices nor an answer; "
                              "rebuild the task with build_tasks.")
    return str(item["answer"])


def _context(prompt: str, chat: bool, tokenizer: Any | None) -> str:
    if not chat or tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        return prompt
    # lm-eval's HFLM.apply_chat_template for a zero-shot item: one user turn, generation prompt added.
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def ability_items(
    tasks: Mapping[str, TaskInfo],
    tokenizer: Any | None = None,
    item_ids: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Columns :data:`ITEM_COLUMNS` (``ability``, ``item_id``, ``context``, ``answer``), one row per item.

    ``tasks`` is :func:`rephelpers.abilities.suite.build_tasks`'s result (or
    :func:`run_tasks`'s, for the files a run's stage 05 wrote). ``item_ids`` keeps, per
    ability, only the items stage 05 scored (its ``limit``); ``tokenizer`` applies the chat
    template to chat abilities (without one their context is the bare prompt).
    """
    require(len(tasks) > 0, "ability_items: no tasks given; pass build_tasks(...)'s result.")
    rows = []
    for ability, info in tasks.items():
        keep = None if item_ids is None or ability not in item_ids else set(map(str, item_ids[ability]))
        spec = ability_spec(info.ability)
        delimiter = spec.target_delimiter if spec is not None else " "
        for i, item in enumerate(read_items(info)):
            item_id = str(item.get("id", i))
            if keep is not None and item_id not in keep:
                continue
            rows.append({"ability": info.ability, "item_id": item_id,
                         "context": _context(str(item.get("prompt", "")), info.chat, tokenizer),
                         "answer": delimiter + _gold_text(item, info.ability)})
    items = pd.DataFrame(rows, columns=list(ITEM_COLUMNS))
    require(len(items) > 0, "ability_items: the tasks hold no items (or none of item_ids); check stage 05's tasks.")
    return items


def run_tasks(run: RunDir | str, abilities: Sequence[str]) -> tuple[dict[str, TaskInfo], list[str]]:
    """The suite tasks stage 05 wrote into ``<run>/tasks/``, read as they are (never rebuilt).

    Returns ``({ability: TaskInfo}, skipped)``: ``skipped`` lists the abilities that are not
    suite tasks (registered or user lm-eval tasks), whose items this package does not read.
    """
    run = RunDir(run)
    tasks, skipped = {}, []
    for ability in dict.fromkeys(abilities):
        spec = ability_spec(ability)
        if spec is None:
            skipped.append(ability)
            continue
        data_path = Path(run.path("tasks")) / f"{spec.task}.jsonl"
        require(data_path.exists(), f"{data_path} is missing: run notebook 05_capability_impact first with the "
                                    f"same run_dir ({run.root}).")
        with open(data_path, encoding="utf-8") as fh:
            n_items = sum(1 for line in fh if line.strip())
        tasks[ability] = TaskInfo(
            ability=spec.name, task=spec.task, family=spec.family, output_type=spec.output_type,
            metric=spec.metric, chance=spec.chance, chat=spec.chat, n_items=n_items,
            yaml_path=data_path.with_suffix(".yaml"), data_path=data_path)
    return tasks, skipped
