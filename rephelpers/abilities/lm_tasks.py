"""lm-eval task plumbing beside the ability suite (:mod:`rephelpers.abilities.suite`).

:func:`prepare_tasks` turns the suite's local task folders and any registered lm-eval task
names into lm-eval task dicts (plain and chat-templated), built once per run, offline by
default, with what each leaf task measures (ability, family, metric, chance).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..errors import RephelpersError, require
from ..paths import cache_subdir
from .suite import ABILITIES, TaskInfo, ability_spec, build_tasks


@dataclass
class PreparedTasks:
    """The lm-eval task dicts (plain and chat-templated) and what each leaf task measures."""

    plain: dict[str, Any]
    chat: dict[str, Any]
    ability: dict[str, str] = field(default_factory=dict)
    family: dict[str, str] = field(default_factory=dict)
    metric: dict[str, str | None] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)

    def dicts(self) -> Iterator[tuple[dict[str, Any], bool]]:
        for task_dict, chat in ((self.plain, False), (self.chat, True)):
            if task_dict["tasks"]:
                yield task_dict, chat


@contextlib.contextmanager
def _quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """Silence lm-eval's per-call chatter: INFO logs and a progress bar per task and call.

    lm-eval offers no switch for the bar drawn while building requests, so its ``tqdm``
    is swapped for a disabled one for the duration.
    """
    import lm_eval.api.task

    logger = logging.getLogger("lm_eval")
    saved_level, saved_tqdm = logger.level, lm_eval.api.task.tqdm
    logger.setLevel(level)
    lm_eval.api.task.tqdm = functools.partial(saved_tqdm, disable=True)
    try:
        yield
    finally:
        logger.setLevel(saved_level)
        lm_eval.api.task.tqdm = saved_tqdm


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Make ``datasets``/``huggingface_hub`` fail at once instead of reaching for the network."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (
        {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")},
        datasets.config.HF_HUB_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
    )
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved[0].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        datasets.config.HF_HUB_OFFLINE = saved[1]
        huggingface_hub.constants.HF_HUB_OFFLINE = saved[2]


def _empty_task_dict() -> dict[str, Any]:
    return {"tasks": {}, "groups": {}, "group_map": {}}


def _task_manager(include_paths: Sequence[str], include_defaults: bool) -> Any:
    """A ``TaskManager`` over ``include_paths``, reused while their YAML files are unchanged.

    Indexing lm-eval's own task tree takes seconds, so managers are memoised, keyed by
    the paths and modification times of every YAML file they index.
    """
    files = tuple(sorted(
        (str(f), f.stat().st_mtime_ns) for d in include_paths for f in Path(d).rglob("*.yaml")
    ))
    return _memo_task_manager(tuple(include_paths), include_defaults, files)


@functools.lru_cache(maxsize=8)
def _memo_task_manager(include_paths: tuple[str, ...], include_defaults: bool, files: tuple) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def prepare_tasks(
    tasks: Mapping[str, TaskInfo] | Sequence[str | TaskInfo],
    task_dir: str | Path | None = None,
    allow_download: bool = False,
    task_paths: Sequence[str | Path] = (),
) -> PreparedTasks:
    """Build the lm-eval task dict once: suite abilities and registered lm-eval task names.

    ``tasks`` is the output of :func:`~rephelpers.abilities.suite.build_tasks`, or a list of
    ability names (built into ``task_dir`` with the defaults), ``TaskInfo``s and
    registered lm-eval task or group names (gsm8k, mmlu, arc_easy, …). ``task_paths`` are
    folders of your own lm-eval task YAMLs (lm-eval's ``include_path``); their tasks are
    named in ``tasks`` like registered ones. A registered task whose dataset is not
    available offline (or, with ``allow_download``, not reachable) raises a
    :class:`RephelpersError` naming it, before any model work.
    """
    own = [Path(p).expanduser() for p in task_paths]
    missing = [str(p) for p in own if not p.is_dir()]
    require(not missing, f"task_paths {missing} are not folders: give folders of lm-eval task YAMLs (include_path)")
    require(not own or any(f for p in own for f in p.rglob("*.yaml")),
            f"task_paths {[str(p) for p in own]} hold no .yaml task file")
    entries = list(tasks.values()) if isinstance(tasks, Mapping) else [tasks] if isinstance(tasks, str) else list(tasks)
    require(len(entries) > 0, "no tasks given: pass ability names (" + ", ".join(ABILITIES) + ") or lm-eval task names")
    suite_names = [e for e in entries if isinstance(e, str) and ability_spec(e) is not None]
    infos = [e for e in entries if isinstance(e, TaskInfo)]
    if suite_names:
        infos += build_tasks(suite_names, task_dir or cache_subdir("tasks"), items_per_task=40, seed=0).values()
    registered = [e for e in entries if isinstance(e, str) and e not in suite_names]
    bad = [e for e in entries if not isinstance(e, (str, TaskInfo))]
    require(not bad, f"tasks must be ability names, lm-eval task names or TaskInfo, got {bad[:3]}")

    paths = sorted({str(i.yaml_path.parent) for i in infos} | {str(p.resolve()) for p in own})
    manager = _task_manager(paths, False)
    if any(name not in manager.all_tasks for name in registered):  # lm-eval's own tree: indexing it takes seconds
        manager = _task_manager(paths, True)
    prepared = PreparedTasks(plain=_empty_task_dict(), chat=_empty_task_dict())
    loads = [(i.task, i) for i in infos] + [(name, None) for name in registered]
    with _quiet_lm_eval(), _hub_offline(not allow_download):
        for name, info in loads:
            if info is None and name not in manager.all_tasks:
                raise RephelpersError(
                    f"{name!r} is neither an ability of the suite ({', '.join(ABILITIES)}) nor a "
                    "registered lm-eval task or group (see `lm_eval ls tasks`)"
                    + (f" nor a task in task_paths {[str(p) for p in own]}" if own else "") + "."
                )
            try:
                loaded = manager.load([name])
            except Exception as err:  # datasets raises many types for a missing dataset
                hint = (
                    "its dataset is not in the local Hugging Face cache and downloads are off: "
                    "download it where the Hub is reachable (or pass allow_download=True)"
                    if not allow_download else "its dataset could not be loaded"
                )
                raise RephelpersError(
                    f"lm-eval task {name!r} cannot be evaluated: {hint}. ({type(err).__name__}: {err})"
                ) from err
            target = prepared.chat if info is not None and info.chat else prepared.plain
            for key in ("tasks", "groups", "group_map"):
                target[key].update(loaded.get(key, {}))
            for leaf in loaded["tasks"]:
                prepared.ability[leaf] = info.ability if info else name
                prepared.family[leaf] = info.family if info else name
                prepared.metric[leaf] = info.metric if info else None
                # A registered task's guessing rate is not known here; 0 is the safe floor.
                prepared.chance[leaf] = info.chance if info else 0.0
    return prepared
