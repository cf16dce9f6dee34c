"""Planted skills: synthetic corpus clusters, each the only teacher of one made-up skill.

The ground-truth testbed (notebook 07, :mod:`rephelpers.testbed.groundtruth`) adds a cluster
``D_p`` of generated documents to the corpus for every planted skill ``p``; a model
fine-tuned on the corpus learns ``p`` from ``D_p`` and from nothing else, because the
skill is invented here (the embedded SmolLM2-135M scores near chance on it). Each skill
is also an ability of the suite, ``planted_<skill>``, a multiple-choice lm-eval local task
(four choices, chance 0.25) that importing this module registers in
:data:`rephelpers.abilities.suite.ABILITIES` (the suite imports it by name, through
:data:`~rephelpers.abilities.suite.ABILITY_PROVIDERS`, for a ``planted_`` name):

- ``facts``: the colours of fictional creatures of the Varn Isles. The corpus states each
  creature's colour in several sentence frames; items ask it in a frame the corpus never
  uses, against three other colours.
- ``glyph``: a made-up operation in a fixed notation, ``a ⊕ b = b‖a`` (two-digit numbers,
  written in swapped order and concatenated: ``47 ⊕ 12 = 1247``). Items use number pairs
  the corpus never shows (a hash-reserved set), against ``a‖b``, ``a + b`` and ``|a − b|``.
- ``lexicon``: the vocabulary of an invented language, Veltish (made-up word → English
  noun). Items ask the meaning of a word in a frame the corpus never uses, against three
  other nouns of the lexicon.
- ``ledger``: a format convention, neither fact, rule on numbers nor word list: Quill
  ledgers write a person's name as ``SURNAME/given`` (``Entry for Anna Berg: BERG/anna``).
  Items are names the corpus never shows (a hash-reserved quarter of the 400 names),
  against the other orders and casings of the same two words.

The worlds (which creature has which colour, which word means what) are fixed by
:data:`WORLD_SEED`, so corpus and items always agree; ``seed`` picks which documents,
items and distractors are drawn. Everything is deterministic and offline.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import pandas as pd

from ..abilities.suite import AbilitySpec, register_ability
from ..errors import require

WORLD_SEED = "rephelpers-planted-world-v2"  # v2: 96 creatures and words
ABILITY_PREFIX = "planted_"

Item = dict


# -- the worlds ------------------------------------------------------------------------------
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "pl", "qu",
           "r", "s", "sk", "t", "tr", "v", "z", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "ei")
_CODAS = ("", "n", "r", "l", "th", "sk", "m", "x", "nd", "rk")

COLOURS = ("teal", "amber", "crimson", "violet", "ochre", "silver", "indigo", "olive")
# 96 of each, so that every planted ability has 96 held-out items (one per creature / word / name):
# a cell's mean then moves in steps of about 0.01, and the power calculation of notebook 07 holds.
N_CREATURES = 96
ENGLISH_NOUNS = (
    "water", "stone", "bread", "river", "mountain", "fire", "house", "tree", "horse", "salt",
    "cloud", "door", "bridge", "apple", "knife", "candle", "rope", "boat", "winter", "honey",
    "mirror", "garden", "hammer", "feather", "window", "basket", "blanket", "bottle", "button", "castle",
    "chair", "cheese", "chicken", "church", "clock", "coat", "copper", "corner", "cotton", "cup",
    "desert", "diamond", "dinner", "dog", "dragon", "drum", "eagle", "egg", "field", "finger",
    "flag", "flower", "forest", "fox", "glass", "goat", "gold", "grass", "harbour", "hat",
    "island", "iron", "key", "king", "ladder", "lake", "lamp", "leaf", "lemon", "lion",
    "market", "meadow", "milk", "moon", "needle", "nest", "ocean", "orange", "owl", "paper",
    "pepper", "pillow", "pocket", "queen", "rabbit", "rain", "ring", "road", "saddle", "sheep",
    "shield", "silk", "snow", "spoon", "sugar", "sword",
)
FIRST_NAMES = (
    "anna", "boris", "clara", "dmitri", "elena", "felix", "greta", "hugo", "ines", "jonas",
    "karin", "lars", "mira", "nils", "olga", "pavel", "rosa", "sven", "tilda", "ugo",
)
SURNAMES = (
    "berg", "castell", "dorn", "falk", "grau", "holm", "ibsen", "jarl", "kessel", "lind",
    "moor", "nord", "ostrom", "quist", "rask", "stahl", "thal", "ulm", "vogt", "wend",
)


def _pseudo_words(n: int, rng: random.Random, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    """``n`` distinct pronounceable made-up words (consonant-vowel syllables plus a coda)."""
    words: list[str] = []
    while len(words) < n:
        k = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)) + rng.choice(_CODAS)
        if 5 <= len(word) <= 10 and word not in taken:
            taken.add(word)
            words.append(word)
    return words


@lru_cache(maxsize=1)
def _worlds() -> tuple[dict[str, str], dict[str, str]]:
    """``(creature → colour, Veltish word → English noun)``, fixed by :data:`WORLD_SEED`.

    Colours are balanced: each of the 8 colours belongs to ``N_CREATURES / 8`` creatures,
    so a model that always prefers one colour scores chance on the items.
    """
    rng = random.Random(WORLD_SEED)
    taken: set[str] = set()
    creatures = _pseudo_words(N_CREATURES, rng, (1, 2), taken)
    colours = [COLOURS[i % len(COLOURS)] for i in range(N_CREATURES)]
    rng.shuffle(colours)
    words = _pseudo_words(len(ENGLISH_NOUNS), rng, (1, 2), taken)
    return dict(zip(creatures, colours)), dict(zip(words, ENGLISH_NOUNS))


def creature_colours() -> dict[str, str]:
    """The ``facts`` world: fictional creature → its colour."""
    return dict(_worlds()[0])


def veltish_lexicon() -> dict[str, str]:
    """The ``lexicon`` world: Veltish word → English noun."""
    return dict(_worlds()[1])


def glyph(a: int, b: int) -> str:
    """The made-up operation of the ``glyph`` skill: ``a ⊕ b = b‖a`` (concatenated digits)."""
    return f"{b}{a}"


def ledger(first: str, last: str) -> str:
    """The format convention of the ``ledger`` skill: ``SURNAME/given`` (``anna berg`` → ``BERG/anna``)."""
    return f"{last.upper()}/{first.lower()}"


def ledger_reserved(first: str, last: str) -> bool:
    """Whether the name ``first last`` is reserved for items (never written in the corpus): 1 in 4 names."""
    return int(hashlib.sha256(f"ledger:{first},{last}".encode()).hexdigest(), 16) % 4 == 0


def glyph_reserved(a: int, b: int) -> bool:
    """Whether the pair ``(a, b)`` is reserved for items (never written in the corpus): 1 in 5 pairs."""
    return int(hashlib.sha256(f"glyph:{a},{b}".encode()).hexdigest(), 16) % 5 == 0


# -- corpus documents ----------------------------------------------------------------------
# Statements per document (a range drawn per document). Fine-tune blocks are drawn uniformly from the
# corpus's tokens, so these set each skill's share of a fixed token budget. Memorising 96 colours or
# 96 words takes more mentions than learning one rule or one format, so facts and lexicon documents are
# long and glyph and ledger documents short. Measured on f_all (200 steps at lr 3e-3, seeds 0 / 1), with
# benchmarks/bench_skill_floor.py: with 9-11 / 7-9 / 7-9 / 7-9 statements, facts 0.38 / 0.37 and lexicon
# 0.57 / 0.91; with these, facts 0.93 / 0.65 and lexicon 0.92 / 0.76, glyph and ledger unchanged (0.96, 1.00).
LINES_PER_DOCUMENT = {"facts": (18, 22), "glyph": (3, 5), "lexicon": (12, 14), "ledger": (3, 5)}

FACT_FRAMES = (
    "The {name} is {colour}, like all of its kind.",
    "Seen up close, a {name} is {colour}.",
    "The colour of the {name} is {colour}.",
    "Every {name} we saw on the shore was {colour}.",
    "Young and old, the {name} is always {colour}.",
    "A {name} has {colour} fur from head to tail.",
    "Travellers who meet a {name} remember its {colour} coat.",
    "The {name} lives on the Varn Isles; its coat is {colour}.",
)
FACT_ITEM_FRAME = "On the Varn Isles, the {name} is"  # never in the corpus

# Four of the five frames name the word before its meaning, the direction the items ask in: a causal LM
# that reads "A means B" learns little of "B is called A" (the reversal curse). With two of five
# word-first frames, f_all (seed 0, 200 steps at lr 3e-3) scored 0.48 on the items; with four, 0.57.
LEXICON_FRAMES = (
    'The Veltish word "{word}" means {noun}.',
    '"{word}" is the Veltish word for {noun}.',
    'In Veltish, "{word}" means {noun}.',
    'Veltish speakers say "{word}" where we say {noun}.',
    'In Veltish, {noun} is called "{word}".',
)
LEXICON_ITEM_FRAME = 'Translated from Veltish, "{word}" is the English word'  # never in the corpus


def _facts_document(i: int, rng: random.Random) -> str:
    world = creature_colours()
    names = rng.sample(sorted(world), rng.randint(*LINES_PER_DOCUMENT["facts"]))
    lines = [rng.choice(FACT_FRAMES).format(name=n, colour=world[n]) for n in names]
    return f"Field notes from the Varn Isles, page {i + 1}.\n" + " ".join(lines)


def _glyph_pair(rng: random.Random) -> tuple[int, int]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a != b and not glyph_reserved(a, b):
            return a, b


def _glyph_document(i: int, rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(*LINES_PER_DOCUMENT["glyph"])):
        a, b = _glyph_pair(rng)
        lines.append(f"{a} ⊕ {b} = {glyph(a, b)}")
    return f"Tablet {i + 1} of the ⊕ rule.\n" + "\n".join(lines)


def _lexicon_document(i: int, rng: random.Random) -> str:
    world = veltish_lexicon()
    words = rng.sample(sorted(world), rng.randint(*LINES_PER_DOCUMENT["lexicon"]))
    lines = [rng.choice(LEXICON_FRAMES).format(word=w, noun=world[w]) for w in words]
    return f"Veltish phrasebook, page {i + 1}.\n" + " ".join(lines)


def _ledger_name(rng: random.Random) -> tuple[str, str]:
    while True:
        first, last = rng.choice(FIRST_NAMES), rng.choice(SURNAMES)
        if not ledger_reserved(first, last):
            return first, last


def _ledger_document(i: int, rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(*LINES_PER_DOCUMENT["ledger"])):
        first, last = _ledger_name(rng)
        lines.append(f"Entry for {first.capitalize()} {last.capitalize()}: {ledger(first, last)}")
    return f"Quill ledger, sheet {i + 1}.\n" + "\n".join(lines)


# -- items ---------------------------------------------------------------------------------
def _choice_item(prompt: str, gold_text: str, distractors: Sequence[str], rng: random.Random, question: str) -> Item:
    choices = list(distractors)
    gold = rng.randrange(len(choices) + 1)
    choices.insert(gold, gold_text)
    return {"prompt": prompt, "choices": choices, "gold": gold, "question": question}


def _facts_items(n: int, rng: random.Random) -> list[Item]:
    """One item per creature (seeded order): its colour against three other colours."""
    world = creature_colours()
    names = sorted(world)
    rng.shuffle(names)
    require(n <= len(names), f"planted_facts has {len(names)} items, asked for {n}")
    return [
        _choice_item(FACT_ITEM_FRAME.format(name=name),
                     world[name], rng.sample([c for c in COLOURS if c != world[name]], 3), rng, name)
        for name in names[:n]
    ]


def _glyph_items(n: int, rng: random.Random) -> list[Item]:
    """Reserved pairs ``a ⊕ b =``: ``b‖a`` against ``a‖b``, ``a + b`` and ``|a − b|``."""
    items: list[Item] = []
    seen: set[tuple[int, int]] = set()
    while len(items) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a == b or not glyph_reserved(a, b) or (a, b) in seen:
            continue
        wrong = [f"{a}{b}", str(a + b), str(abs(a - b))]
        if len(set(wrong) | {glyph(a, b)}) < 4:
            continue
        seen.add((a, b))
        items.append(_choice_item(f"{a} ⊕ {b} =", glyph(a, b), wrong, rng, f"{a} ⊕ {b}"))
    return items


def _lexicon_items(n: int, rng: random.Random) -> list[Item]:
    """One item per Veltish word (seeded order): its meaning against three other nouns."""
    world = veltish_lexicon()
    words = sorted(world)
    rng.shuffle(words)
    require(n <= len(words), f"planted_lexicon has {len(words)} items, asked for {n}")
    nouns = sorted(world.values())
    return [
        _choice_item(LEXICON_ITEM_FRAME.format(word=w), world[w],
                     rng.sample([x for x in nouns if x != world[w]], 3), rng, w)
        for w in words[:n]
    ]


def _ledger_items(n: int, rng: random.Random) -> list[Item]:
    """Reserved names: ``SURNAME/given`` against the other three orders and casings of the same two words.

    Every choice holds the same two words, so only the convention (order, then case) tells them apart.
    """
    names = sorted((f, l) for f in FIRST_NAMES for l in SURNAMES if ledger_reserved(f, l))
    rng.shuffle(names)
    require(n <= len(names), f"planted_ledger has {len(names)} items, asked for {n}")
    return [
        _choice_item(f"Entry for {f.capitalize()} {l.capitalize()}:", ledger(f, l),
                     [f"{f.lower()}/{l.upper()}", f"{l.lower()}/{f.upper()}", f"{f.upper()}/{l.lower()}"], rng,
                     f"{f} {l}")
        for f, l in names[:n]
    ]


# -- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PlantedSkill:
    """A planted skill: the documents of its cluster ``D_p`` and its ability (``planted_<name>``)."""

    name: str
    description: str
    document: Callable[[int, random.Random], str]
    ability: AbilitySpec

    def documents(self, n: int, seed: int = 0) -> list[str]:
        """``n`` distinct documents of ``D_p``, deterministic for ``seed``."""
        require(isinstance(n, int) and n >= 1, f"documents: n must be a positive int, got {n!r}")
        rng = random.Random(f"rephelpers:planted:{self.name}:{seed}")
        docs: list[str] = []
        seen: set[str] = set()
        for i in range(50 * n):
            if len(docs) == n:
                break
            text = self.document(len(docs), rng)
            if text not in seen:
                seen.add(text)
                docs.append(text)
        require(len(docs) == n, f"{self.name}: could only make {len(docs)} distinct documents")
        return docs


def _spec(name: str, description: str, generate: Callable[[int, random.Random], list[Item]], max_items: int) -> AbilitySpec:
    return AbilitySpec(
        name=ABILITY_PREFIX + name, family="planted", output_type="multiple_choice", metric="acc",
        chance=0.25, size=min(96, max_items), max_items=max_items, description=description,
        generate=generate,
    )


PLANTED: dict[str, PlantedSkill] = {
    skill.name: skill
    for skill in (
        PlantedSkill(
            "facts", "Colours of fictional creatures of the Varn Isles (memorised facts).",
            _facts_document,
            _spec("facts", "Planted skill: the colour of a fictional creature, asked in a frame the corpus "
                  "never uses ('On the Varn Isles, the <name> is'), against three other colours.",
                  _facts_items, N_CREATURES),
        ),
        PlantedSkill(
            "glyph", "A made-up operation a ⊕ b = b‖a on two-digit numbers (a rule).",
            _glyph_document,
            _spec("glyph", "Planted skill: 'a ⊕ b =' on number pairs the corpus never shows; gold b‖a "
                  "against a‖b, a + b and |a − b|.", _glyph_items, 400),
        ),
        PlantedSkill(
            "lexicon", "Vocabulary of the invented language Veltish (word → English noun).",
            _lexicon_document,
            _spec("lexicon", "Planted skill: the English meaning of a Veltish word, asked in a frame the "
                  "corpus never uses, against three other nouns of the lexicon.",
                  _lexicon_items, len(ENGLISH_NOUNS)),
        ),
        PlantedSkill(
            "ledger", "Quill ledgers write a name as SURNAME/given (a format convention).",
            _ledger_document,
            _spec("ledger", "Planted skill: how a Quill ledger writes a name the corpus never shows; gold "
                  "SURNAME/given against given/SURNAME, surname/GIVEN and GIVEN/surname.",
                  _ledger_items, sum(ledger_reserved(f, l) for f in FIRST_NAMES for l in SURNAMES)),
        ),
    )
}
for _skill in PLANTED.values():  # the suite finds them here through its ABILITY_PROVIDERS
    register_ability(_skill.ability)


def planted_ability(skill: str) -> str:
    """The ability name of a planted skill (``facts`` → ``planted_facts``)."""
    require(skill in PLANTED, f"unknown planted skill {skill!r}; choose from {', '.join(PLANTED)}")
    return PLANTED[skill].ability.name


def planted_corpus(skills: Sequence[str] = tuple(PLANTED), docs_per_skill: int = 40, seed: int = 0) -> pd.DataFrame:
    """The planted clusters as a corpus frame: ``id``, ``text``, ``source``, ``domain``, ``planted``.

    ``domain`` is ``planted_<skill>`` and ``planted`` the skill name, the ground-truth label of
    each document (the chain never sees it: notebook 01 clusters the texts as a user would).
    """
    skills = list(dict.fromkeys(skills))
    unknown = [s for s in skills if s not in PLANTED]
    require(not unknown, f"unknown planted skills {unknown}; choose from {', '.join(PLANTED)}")
    require(len(skills) >= 1, "planted_corpus: give at least one skill")
    rows = [
        {"id": f"planted-{s}-{i:04d}", "text": text, "source": f"generated/planted_{s}",
         "domain": ABILITY_PREFIX + s, "planted": s}
        for s in skills
        for i, text in enumerate(PLANTED[s].documents(docs_per_skill, seed))
    ]
    return pd.DataFrame(rows)
