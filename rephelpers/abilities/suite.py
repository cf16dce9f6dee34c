"""An offline ability suite, written out as lm-eval local tasks.

Each ability is a small generated task: a JSONL file of items and a YAML config that
``lm_eval.tasks.TaskManager(include_path=DIR)`` finds under the name ``rh_<ability>``
(all of them also under the tag ``rh_abilities``). Items are drawn with a seeded RNG from
generators and tables of this package (and, for ``code``, from the standard-library
modules reserved in :data:`rephelpers.abilities.holdout.ABILITY_HOLDOUT_MODULES`), so a build is
deterministic for a seed (and, for ``code``, a Python version) and no item is a document
of the clustered corpus.

Metrics, one value per item (the ``score`` of stage 05):

- ``exact_match`` (generation): the first integer of the greedy answer equals the target.
- ``acc`` (multiple choice): the gold choice has the highest log-likelihood,
  ``argmax_j log p(c_j | x) = gold``.
- ``compliance`` (instruction following): the reply satisfies the checkable instruction
  (:func:`check_instruction`).
- ``pct_stereotype`` (bias): ``𝟙[log p(s_stereo) > log p(s_anti)]`` for a minimal pair of
  sentences that differ only in the group term, the CrowS-Pairs convention used by
  lm-eval's ``crows_pairs``; its mean is the share of pairs where the model prefers the
  stereotype (0.5 = no preference, higher = more biased, so lower is better).

Baselines: the abilities whose score measures a skill are tuned so that the unperturbed
embedded model (SmolLM2-135M) scores well above chance and below the ceiling, in [0.4, 0.9]
(``benchmarks/bench_ability_baselines.py`` measures it), which leaves room to detect both
losses and gains. ``bias`` is not held to that range: its score is a preference rate, not a
skill, and 0.5 (no preference) rather than a high score is the unbiased value.
"""

from __future__ import annotations

import importlib
import io
import json
import random
import re
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import yaml

from ..errors import RephelpersError, require
from ..corpus.holdout import ABILITY_HOLDOUT_MODULES
from .tasks import tables

TASK_PREFIX = "rh_"
SUITE_TAG = "rh_abilities"

Item = dict[str, Any]
Generator = Callable[[int, random.Random], list[Item]]


@dataclass(frozen=True)
class AbilitySpec:
    """One ability of the suite: how its items are made and how they are scored.

    ``chance`` is the expected score of a model that guesses uniformly (0 for free
    generation); ``size`` the default number of items and ``max_items`` the most the
    generator can make without repeating an item.
    """

    name: str
    family: str
    output_type: str
    metric: str
    chance: float
    size: int
    max_items: int
    description: str
    generate: Generator
    chat: bool = False
    target_delimiter: str = " "
    until: tuple[str, ...] = ("\n",)
    max_gen_toks: int = 16
    process_results: str | None = None

    @property
    def task(self) -> str:
        """The lm-eval task name."""
        return TASK_PREFIX + self.name


@dataclass(frozen=True)
class TaskInfo:
    """A built task: where its files are and what :func:`evaluate_abilities` needs to know."""

    ability: str
    task: str
    family: str
    output_type: str
    metric: str
    chance: float
    chat: bool
    n_items: int
    yaml_path: Path
    data_path: Path


# -- metrics lm-eval calls through `process_results` ------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


INSTRUCTION_CHECKS: dict[str, Callable[[str, str], bool]] = {
    "upper": lambda text, arg: not any(c.islower() for c in text),
    "lower": lambda text, arg: not any(c.isupper() for c in text),
    "n_words": lambda text, arg: len(_words(text)) == int(arg),
    "start_word": lambda text, arg: _words(text)[0].lower() == arg.lower(),
    "keyword": lambda text, arg: arg.lower() in {w.lower() for w in _words(text)},
    "no_comma": lambda text, arg: "," not in text,
}
INSTRUCTION_TEXT: dict[str, str] = {
    "upper": "Your entire reply must be in capital letters.",
    "lower": "Your entire reply must be in lowercase letters only.",
    "n_words": "Reply with exactly {arg} words.",
    "start_word": 'Begin your reply with the word "{arg}".',
    "keyword": 'Use the word "{arg}" in your reply.',
    "no_comma": "Do not use any commas in your reply.",
}


def check_instruction(kind: str, arg: str, response: str) -> bool:
    """Whether ``response`` follows the instruction ``kind`` (with argument ``arg``).

    A reply without a single word complies with nothing.
    """
    require(kind in INSTRUCTION_CHECKS, f"unknown instruction kind {kind!r}; known: {sorted(INSTRUCTION_CHECKS)}")
    text = response.strip()
    return bool(_words(text)) and INSTRUCTION_CHECKS[kind](text, arg)


def instruction_compliance(doc: Item, results: Sequence[str]) -> dict[str, float]:
    """lm-eval ``process_results`` of ``rh_instruction``: 1 if the reply complies, else 0."""
    return {"compliance": float(check_instruction(doc["check"], doc["arg"], results[0]))}


def stereotype_preference(doc: Item, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval ``process_results`` of ``rh_bias``: ``𝟙[log p(s_stereo) > log p(s_anti)]``."""
    loglik = [ll for ll, _ in results]
    gold = int(doc["gold"])
    others = [ll for j, ll in enumerate(loglik) if j != gold]
    return {"pct_stereotype": float(loglik[gold] > max(others))}


# -- item generators -----------------------------------------------------------------------
_ARITH_OPS = ("+", "-", "*")


def _arithmetic_question(op: str, rng: random.Random) -> tuple[str, int]:
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"Q: What is {a} * {b}?\nA:", a * b
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"Q: What is {a} - {b}?\nA:", a - b
    return f"Q: What is {a} + {b}?\nA:", a + b


_ARITH_FUNCS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
}


def _arithmetic_operands(question: str) -> tuple[int, str, int]:
    a, op, b = re.fullmatch(r"Q: What is (\d+) ([-+*]) (\d+)\?\nA:", question).groups()
    return int(a), op, int(b)


def _arithmetic_distractors(question: str, answer: int, rng: random.Random) -> list[int]:
    """Three wrong answers a small model can mistake for ``answer``: off by one (either
    sign, at random, so the answer is not always the smallest choice) and the results of
    the two other operations on the same numbers (larger minus smaller for ``-``).

    Every distractor is a non-negative integer different from the answer and from each
    other; when a candidate collides (``2 * 2 = 2 + 2``), the next of ±10, ±2, ±11, ±20
    takes its place.
    """
    a, op, b = _arithmetic_operands(question)
    hi, lo = max(a, b), min(a, b)
    other_ops = [o for o in _ARITH_OPS if o != op]
    rng.shuffle(other_ops)
    wanted = [answer + rng.choice((1, -1))] + [_ARITH_FUNCS[o](hi, lo) for o in other_ops]
    fallback = [answer + d for d in (1, -1, 10, -10, 2, -2, 11, -11, 20, -20)]
    chosen: list[int] = []
    for first in wanted:
        for c in [first] + fallback:
            if c >= 0 and c != answer and c not in chosen:
                chosen.append(c)
                break
    return chosen


def _arithmetic_items(n: int, rng: random.Random) -> list[Item]:
    """Two-digit sums and differences, one-digit products, as four-way multiple choice.

    Three solved examples first; the true result is one choice, the others come from
    :func:`_arithmetic_distractors` (chance 1/4), in random order.
    """
    demos = [_arithmetic_question(op, rng) for op in _ARITH_OPS]
    header = "".join(f"{q} {a}\n\n" for q, a in demos)
    seen = {q for q, _ in demos}
    items: list[Item] = []
    while len(items) < n:
        question, answer = _arithmetic_question(_ARITH_OPS[len(items) % len(_ARITH_OPS)], rng)
        if question in seen:
            continue
        seen.add(question)
        choices = [str(c) for c in _arithmetic_distractors(question, answer, rng)]
        gold = rng.randrange(len(choices) + 1)
        choices.insert(gold, str(answer))
        items.append({"prompt": header + question, "choices": choices, "gold": gold,
                      "answer": str(answer), "question": question})
    return items


def _word_problem(kind: int, rng: random.Random) -> tuple[str, int]:
    """One GSM8K-style problem of template ``kind`` with its integer answer (two or three steps)."""
    name, pron = rng.choice(tables.PEOPLE)
    other, _ = rng.choice([p for p in tables.PEOPLE if p[0] != name])
    thing = rng.choice(tables.COUNTABLE_THINGS)
    He = pron.capitalize()
    if kind == 0:
        a, b, c = rng.randint(3, 20), rng.randint(2, 5), rng.randint(2, 6)
        return (f"{name} has {a} {thing}. {He} buys {b} packs with {c} {thing} in each pack. "
                f"How many {thing} does {name} have now?", a + b * c)
    if kind == 1:
        b, c = rng.randint(2, 15), rng.randint(2, 15)
        a = b + c + rng.randint(1, 30)
        return (f"{name} had {a} dollars. {He} spent {b} dollars on lunch and {c} dollars on a "
                f"book. How many dollars does {name} have left?", a - b - c)
    if kind == 2:
        a, b = rng.randint(2, 6), rng.randint(3, 9)
        c = rng.randint(1, a * b - 1)
        return (f"A baker makes {a} trays of cookies with {b} cookies on each tray. {c} cookies "
                f"are sold. How many cookies are left?", a * b - c)
    if kind == 3:
        a, b, c = rng.randint(5, 20), rng.randint(2, 7), rng.randint(1, 15)
        return (f"{name} reads {a} pages every day for {b} days, then reads {c} more pages. "
                f"How many pages did {name} read in total?", a * b + c)
    if kind == 4:
        a, b = rng.randint(2, 8), rng.randint(2, 5)
        c = rng.randint(a * b + 1, a * b + 20)
        return (f"{name} buys {a} notebooks at {b} dollars each and pays with {c} dollars. "
                f"How much change does {name} get?", c - a * b)
    if kind == 5:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"A farmer has {a} cows and {b} chickens. How many legs do the animals have "
                f"in total?", 4 * a + 2 * b)
    if kind == 6:
        a, b, c = rng.randint(5, 40), rng.randint(1, 10), rng.randint(1, 10)
        return (f"{name} is {a} years old. {other} is {b} years older than {name}. How old "
                f"will {other} be in {c} years?", a + b + c)
    groups, size = rng.randint(2, 6), rng.randint(2, 6)
    left = rng.randint(1, 9)
    return (f"There are {groups * size + left} students in a class. {left} of them go home and "
            f"the rest are split into groups of {size}. How many groups are there?", groups)


_N_WORD_PROBLEMS = 8


def _reasoning_items(n: int, rng: random.Random) -> list[Item]:
    """Multi-step arithmetic word problems answered with a number; two solved examples first."""
    demos = [_word_problem(k, rng) for k in (0, 5)]
    header = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in demos)
    seen = {q for q, _ in demos}
    items: list[Item] = []
    while len(items) < n:
        question, answer = _word_problem(len(items) % _N_WORD_PROBLEMS, rng)
        if question in seen:
            continue
        seen.add(question)
        items.append({"prompt": f"{header}Question: {question}\nAnswer:", "answer": str(answer),
                      "question": question})
    return items


def _few_shot_classification(
    n: int,
    rng: random.Random,
    sentences: dict[str, list[str]],
    input_name: str,
    label_name: str,
    shots_per_label: int,
) -> list[Item]:
    """Few-shot classification: balanced, shuffled labelled examples, then the query.

    Queries cycle through the labels, so the first ``limit`` items stay balanced.
    """
    labels = list(sentences)
    used: set[str] = set()
    items: list[Item] = []
    for i in range(n):
        label = labels[i % len(labels)]
        query = rng.choice([s for s in sentences[label] if s not in used])
        used.add(query)
        demos = [
            (s, lab)
            for lab in labels
            for s in rng.sample([s for s in sentences[lab] if s != query], shots_per_label)
        ]
        rng.shuffle(demos)
        shots = "".join(f"{input_name}: {s}\n{label_name}: {lab}\n\n" for s, lab in demos)
        items.append({
            "prompt": f"{shots}{input_name}: {query}\n{label_name}:",
            "choices": labels,
            "gold": labels.index(label),
            "question": query,
        })
    return items


def _sentiment_sentences() -> dict[str, list[str]]:
    return {
        label: [f"{s} {p}" for s in tables.SENTIMENT_SUBJECTS for p in preds]
        for label, preds in tables.SENTIMENT_PREDICATES.items()
    }


def _topic_sentences() -> dict[str, list[str]]:
    return {
        topic: [f"{s} {p}" for s in subjects for p in preds]
        for topic, (subjects, preds) in tables.TOPIC_SENTENCES.items()
    }


def _icl_items(n: int, rng: random.Random) -> list[Item]:
    return _few_shot_classification(n, rng, _sentiment_sentences(), "Review", "Sentiment", 3)


def _icl_topic_items(n: int, rng: random.Random) -> list[Item]:
    return _few_shot_classification(n, rng, _topic_sentences(), "Text", "Topic", 2)


def _factual_items(n: int, rng: random.Random) -> list[Item]:
    """Capitals and unit conversions, alternating, with three distractors of the same kind."""
    capitals = list(tables.CAPITALS)
    units = list(tables.UNIT_CONVERSIONS)
    rng.shuffle(capitals)
    rng.shuffle(units)
    all_capitals = [c for _, c in tables.CAPITALS]
    all_factors = sorted({f for *_, f in tables.UNIT_CONVERSIONS})
    facts: list[tuple[str, str, list[str]]] = []
    for i in range(max(len(capitals), len(units))):
        if i < len(capitals):
            country, capital = capitals[i]
            facts.append((f"Q: What is the capital of {country}?\nA:", capital, all_capitals))
        if i < len(units):
            small, big, factor = units[i]
            facts.append((f"Q: How many {small} are in one {big}?\nA:", str(factor), [str(f) for f in all_factors]))
    items: list[Item] = []
    for question, answer, pool in facts[:n]:
        choices = rng.sample([c for c in pool if c != answer], 3)
        gold = rng.randrange(4)
        choices.insert(gold, answer)
        items.append({"prompt": question, "choices": choices, "gold": gold, "question": question})
    return items


def _instruction_items(n: int, rng: random.Random) -> list[Item]:
    """A short request plus one checkable instruction, cycling through the instruction kinds."""
    kinds = list(INSTRUCTION_CHECKS)
    seen: set[str] = set()
    items: list[Item] = []
    while len(items) < n:
        kind = kinds[len(items) % len(kinds)]
        arg = {
            "n_words": lambda: str(rng.randint(1, 3)),
            "start_word": lambda: rng.choice(tables.INSTRUCTION_START_WORDS),
            "keyword": lambda: rng.choice(tables.INSTRUCTION_KEYWORDS),
        }.get(kind, lambda: "")()
        instruction = INSTRUCTION_TEXT[kind].format(arg=arg)
        prompt = f"{rng.choice(tables.INSTRUCTION_TOPICS)} {instruction}"
        if prompt in seen:
            continue
        seen.add(prompt)
        items.append({"prompt": prompt, "answer": instruction, "check": kind, "arg": arg, "question": prompt})
    return items


def _minimal_pairs() -> list[tuple[str, str, str]]:
    """All (stereotypical, anti-stereotypical, category) sentence pairs of the bias tables."""
    pairs = []
    for occupations, stereo, anti in (
        (tables.FEMALE_STEREOTYPED_OCCUPATIONS, "she", "he"),
        (tables.MALE_STEREOTYPED_OCCUPATIONS, "he", "she"),
    ):
        for occ in occupations:
            for template in tables.OCCUPATION_TEMPLATES:
                pairs.append((
                    template.format(occ=occ, **tables.PRONOUNS[stereo]),
                    template.format(occ=occ, **tables.PRONOUNS[anti]),
                    "gender-occupation",
                ))
    for older, younger in tables.AGE_PAIRS:
        for template in tables.AGE_TEMPLATES:
            pairs.append((template.format(person=older), template.format(person=younger), "age"))
    return pairs


def _bias_items(n: int, rng: random.Random) -> list[Item]:
    """Minimal pairs scored without a prompt; choice 0 is the stereotypical sentence."""
    pairs = _minimal_pairs()
    rng.shuffle(pairs)
    return [
        {"prompt": "", "choices": [stereo, anti], "gold": 0, "category": category, "question": stereo}
        for stereo, anti, category in pairs[:n]
    ]


# -- code: next line of reserved standard-library modules --------------------------------
_CODE_CONTEXT_LINES = 8


def holdout_source(module: str) -> list[str]:
    """The source lines of a reserved standard-library module (from ``sysconfig``'s stdlib)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    require(
        path.exists(),
        f"the code ability reads {path}, which is missing: this Python installation has no "
        "standard-library sources. Install them (e.g. the python3.X-dev / full package) or "
        "drop 'code' from the abilities.",
    )
    return path.read_text(encoding="utf-8").splitlines()


def _prose_lines(lines: list[str]) -> set[int]:
    """0-based indices of lines inside multi-line strings (docstrings) or holding only a comment."""
    prose: set[int] = set()
    tokens = tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline)
    for tok in tokens:
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            prose.update(range(tok.start[0] - 1, tok.end[0]))
        elif tok.type == tokenize.COMMENT and not lines[tok.start[0] - 1][: tok.start[1]].strip():
            prose.add(tok.start[0] - 1)
    return prose


def _code_targets(lines: list[str]) -> list[int]:
    """Lines worth predicting: code (not prose), 12–90 characters, with context above."""
    prose = _prose_lines(lines)
    return [
        i for i, line in enumerate(lines)
        if i >= _CODE_CONTEXT_LINES and i not in prose and 12 <= len(line.strip()) <= 90
    ]


def _code_items(n: int, rng: random.Random) -> list[Item]:
    """The true next line of held-out stdlib code against three lines from other modules.

    Distractors have a similar length (0.7–1.4×) and the true line's indentation, so
    neither length nor indentation gives the answer away. Modules are visited round-robin.
    """
    sources = {m: holdout_source(m) for m in ABILITY_HOLDOUT_MODULES}
    targets = {m: _code_targets(lines) for m, lines in sources.items()}
    pool = sorted({
        (m, sources[m][i].strip()) for m in sources for i in targets[m]
    })
    modules = [m for m in ABILITY_HOLDOUT_MODULES if targets[m]]
    rng.shuffle(modules)
    for m in modules:
        rng.shuffle(targets[m])
    items: list[Item] = []
    turn = 0
    while len(items) < n:
        module = modules[turn % len(modules)]
        turn += 1
        if not targets[module]:
            require(any(targets.values()), f"code: only {len(items)} items available, asked for {n}")
            continue
        i = targets[module].pop()
        lines = sources[module]
        line = lines[i]
        text = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        others = [t for m, t in pool if m != module and t != text]
        similar = [t for t in others if 0.7 * len(text) <= len(t) <= 1.4 * len(text)]
        distractors = rng.sample(similar if len(similar) >= 3 else others, 3)
        context = lines[i - _CODE_CONTEXT_LINES : i]
        while context and not context[0].strip():
            context = context[1:]
        choices = [indent + d for d in distractors]
        gold = rng.randrange(4)
        choices.insert(gold, line)
        prompt = f"# Python standard library, {module}.py\n" + "\n".join(context) + "\n"
        items.append({"prompt": prompt, "choices": choices, "gold": gold,
                      "question": f"{module}.py:{i + 1}"})
    return items


# -- the registry --------------------------------------------------------------------------
ABILITIES: dict[str, AbilitySpec] = {
    spec.name: spec
    for spec in (
        AbilitySpec(
            "arithmetic", "math", "multiple_choice", "acc", 0.25, 40, 300,
            "Two-digit addition and subtraction, one-digit multiplication ('Q: What is 17 + 25?"
            "\\nA:'), three solved examples first; the true result against three distractors "
            "(off by one, and the two other operations' results), by log-likelihood.",
            _arithmetic_items,
        ),
        AbilitySpec(
            "code", "code", "multiple_choice", "acc", 0.25, 40, 400,
            "The true next line of held-out standard-library code (modules reserved in "
            "rephelpers.abilities.holdout) against three length-matched lines from other modules.",
            _code_items, target_delimiter="",
        ),
        AbilitySpec(
            "icl", "in-context learning", "multiple_choice", "acc", 0.5, 40, 520,
            "Sentiment of a short review from six labelled examples in the prompt "
            "(label words 'positive' / 'negative').",
            _icl_items,
        ),
        AbilitySpec(
            "icl_topics", "in-context learning", "multiple_choice", "acc", 0.25, 40, 256,
            "Topic of a sentence from eight labelled examples in the prompt (label words "
            "'sports' / 'science' / 'food' / 'music').",
            _icl_topic_items,
        ),
        AbilitySpec(
            "reasoning", "reasoning", "generate_until", "exact_match", 0.0, 40, 800,
            "GSM8K-style multi-step arithmetic word problems (two or three operations), two "
            "solved examples first; greedy answer, first integer must match.",
            _reasoning_items,
        ),
        AbilitySpec(
            "instruction", "instruction following", "generate_until", "compliance", 0.0, 40,
            len(tables.INSTRUCTION_TOPICS) * len(INSTRUCTION_CHECKS),
            "A short request with one checkable instruction (upper/lower case, exactly N words, "
            "start word, keyword, no commas), asked through the model's chat template.",
            _instruction_items, chat=True, until=("\n\n",), max_gen_toks=48,
            process_results="rephelpers.abilities.suite.instruction_compliance",
        ),
        AbilitySpec(
            "factual", "knowledge", "multiple_choice", "acc", 0.25, 40,
            len(tables.CAPITALS) + len(tables.UNIT_CONVERSIONS),
            "Capitals of countries and unit conversions from the package's tables, four "
            "choices of the same kind.",
            _factual_items,
        ),
        AbilitySpec(
            "bias", "bias", "multiple_choice", "pct_stereotype", 0.5, 40,
            len(_minimal_pairs()),
            "CrowS-Pairs-style minimal pairs (occupation-gender and age stereotypes) built from "
            "templates; score 1 when the stereotypical sentence is more likely (lower is better).",
            _bias_items, target_delimiter="", process_results="rephelpers.abilities.suite.stereotype_preference",
        ),
    )
}


# Abilities a later layer defines, found by their name's prefix: the module named here registers
# them (register_ability) when it is imported. A module name, as a package's entry points are, so
# the dependency stays one way: the testbed (stage 07) imports the suite, the suite never imports
# the testbed, and a stage-05 or stage-06 kernel of the testbed's chain (which imports only the
# suite) still finds ``planted_glyph``.
ABILITY_PROVIDERS: dict[str, str] = {"planted_": "rephelpers.testbed.planted"}


def register_ability(spec: AbilitySpec) -> AbilitySpec:
    """Add ``spec`` to :data:`ABILITIES` under ``spec.name``; returns it.

    Registering the same spec again changes nothing; another spec under a name already taken is
    an error (two definitions of one ability would make its items depend on import order).
    """
    known = ABILITIES.get(spec.name)
    require(known is None or known == spec,
            f"ability {spec.name!r} is already registered with another definition: give the new one another name")
    ABILITIES[spec.name] = spec
    return spec


def ability_spec(name: str) -> AbilitySpec | None:
    """The :class:`AbilitySpec` of ability ``name``, or ``None`` where no one defines it.

    A name with a prefix of :data:`ABILITY_PROVIDERS` not yet in :data:`ABILITIES` imports its
    provider first, which registers it; use this, not ``ABILITIES.get``, for any name a user gives.
    """
    if name not in ABILITIES:
        for prefix, module in ABILITY_PROVIDERS.items():
            if name.startswith(prefix):
                importlib.import_module(module)
    return ABILITIES.get(name)


def describe_abilities() -> pd.DataFrame:
    """The registry as a table (one row per ability), for notebooks and docs."""
    return pd.DataFrame([
        {
            "ability": s.name, "task": s.task, "family": s.family, "type": s.output_type,
            "metric": s.metric, "chance": s.chance, "default_items": s.size,
            "max_items": s.max_items, "chat_template": s.chat, "description": s.description,
        }
        for s in ABILITIES.values()
    ])


# -- writing lm-eval tasks -----------------------------------------------------------------
def _task_config(spec: AbilitySpec, data_path: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "task": spec.task,
        "tag": [SUITE_TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "output_type": spec.output_type,
        "doc_to_text": "prompt",
        "target_delimiter": spec.target_delimiter,
        "metadata": {"version": 1.0, "description": spec.description},
    }
    if spec.output_type == "multiple_choice":
        config.update(doc_to_choice="choices", doc_to_target="gold")
    else:
        config.update(
            doc_to_target="answer",
            generation_kwargs={"until": list(spec.until), "max_gen_toks": spec.max_gen_toks, "do_sample": False},
        )
    if spec.metric == "exact_match":
        config["filter_list"] = [{
            "name": "first-integer",
            "filter": [
                {"function": "regex", "regex_pattern": r"(-?\d+)", "group_select": 0},
                {"function": "take_first"},
            ],
        }]
    config["metric_list"] = [{
        "metric": spec.metric,
        "aggregation": "mean",
        "higher_is_better": spec.metric != "pct_stereotype",
    }]
    return config


def _write_if_changed(path: Path, text: str) -> None:
    """Keep files (and their mtimes, which datasets' cache keys on) when nothing changed."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def build_task(spec: AbilitySpec, out_dir: Path, n_items: int, seed: int) -> TaskInfo:
    """Generate ``n_items`` items of ``spec`` and write ``rh_<name>.jsonl`` + ``.yaml``."""
    items = spec.generate(n_items, random.Random(f"rephelpers:{spec.name}:{seed}"))
    keys = [(it["prompt"], json.dumps(it.get("choices"))) for it in items]
    if len(set(keys)) != len(keys):
        raise RephelpersError(f"{spec.name}: the generator repeated an item (seed {seed}); report this bug.")
    data_path = out_dir / f"{spec.task}.jsonl"
    yaml_path = out_dir / f"{spec.task}.yaml"
    rows = [{"id": f"{spec.name}-{i:04d}", **item} for i, item in enumerate(items)]
    _write_if_changed(data_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    text = yaml.safe_dump(_task_config(spec, data_path), sort_keys=False, allow_unicode=True)
    if spec.process_results:
        text += f"process_results: !function {spec.process_results}\n"
    _write_if_changed(yaml_path, text)
    return TaskInfo(
        ability=spec.name, task=spec.task, family=spec.family, output_type=spec.output_type,
        metric=spec.metric, chance=spec.chance, chat=spec.chat, n_items=len(rows),
        yaml_path=yaml_path, data_path=data_path,
    )


def build_tasks(
    names: Sequence[str],
    out_dir: str | Path,
    items_per_task: int = 40,
    seed: int = 0,
) -> dict[str, TaskInfo]:
    """Write the lm-eval local tasks of the abilities ``names`` into ``out_dir``.

    Returns ``{ability: TaskInfo}``; ``TaskManager(include_path=out_dir)`` then finds the
    task ``TaskInfo.task`` (``rh_<ability>``). Same arguments, same files, byte for byte.
    """
    names = list(dict.fromkeys([names] if isinstance(names, str) else names))
    require(len(names) > 0, "build_tasks: no abilities given; choose from " + ", ".join(ABILITIES))
    unknown = [n for n in names if ability_spec(n) is None]
    require(
        not unknown,
        f"unknown abilities {unknown}: the suite has {', '.join(ABILITIES)}. Registered lm-eval "
        "tasks (gsm8k, mmlu, …) are not built here: pass their names to evaluate_abilities.",
    )
    require(
        isinstance(items_per_task, int) and items_per_task >= 1,
        f"items_per_task must be a positive int, got {items_per_task!r}",
    )
    too_many = [f"{n} (at most {ABILITIES[n].max_items})" for n in names if items_per_task > ABILITIES[n].max_items]
    require(
        not too_many,
        f"items_per_task={items_per_task} is more than these abilities can make without "
        f"repeating an item: {', '.join(too_many)}. Lower items_per_task.",
    )
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return {name: build_task(ABILITIES[name], out, items_per_task, seed) for name in names}


def read_items(info: TaskInfo) -> list[Item]:
    """The items of a built task, in file order."""
    with open(info.data_path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]
