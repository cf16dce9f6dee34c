"""Word lists and fact tables behind the offline ability suite.

Every list is small and hand-written for the suite; the generators in
:mod:`rephelpers.abilities.suite` combine them with a seeded RNG.
"""

from __future__ import annotations

# -- factual ---------------------------------------------------------------------------
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("India", "New Delhi"),
    ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"),
    ("Iran", "Tehran"), ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Nigeria", "Abuja"),
    ("Vietnam", "Hanoi"), ("Switzerland", "Bern"), ("the United Kingdom", "London"),
    ("Ukraine", "Kyiv"),
)

# (smaller unit, larger unit, how many of the smaller make one of the larger)
UNIT_CONVERSIONS: tuple[tuple[str, str, int], ...] = (
    ("centimetres", "metre", 100), ("millimetres", "centimetre", 10),
    ("metres", "kilometre", 1000), ("grams", "kilogram", 1000),
    ("millilitres", "litre", 1000), ("seconds", "minute", 60), ("minutes", "hour", 60),
    ("hours", "day", 24), ("days", "week", 7), ("months", "year", 12),
    ("inches", "foot", 12), ("feet", "yard", 3), ("ounces", "pound", 16),
    ("years", "decade", 10), ("years", "century", 100), ("seconds", "hour", 3600),
    ("weeks", "year", 52), ("cents", "dollar", 100), ("years", "millennium", 1000),
)

# -- in-context learning: sentiment ----------------------------------------------------
SENTIMENT_SUBJECTS: tuple[str, ...] = (
    "The movie", "This restaurant", "The hotel room", "Her new album", "The customer service",
    "The concert", "The book", "The flight", "The museum tour", "The new cafe",
    "The video game", "The hiking trail", "The play", "The delivery", "The coffee",
    "The workshop", "The apartment", "The guided walk", "The team dinner", "The holiday",
)
SENTIMENT_PREDICATES: dict[str, tuple[str, ...]] = {
    "positive": (
        "was absolutely wonderful.", "exceeded all of my expectations.",
        "was a delight from start to finish.", "made me smile the whole time.",
        "was excellent and I would recommend it.", "was fantastic value for the money.",
        "felt warm, friendly and welcoming.", "was the best I have had in years.",
        "was charming and beautifully done.", "left me happy and impressed.",
        "was brilliant in every way.", "was a pleasant surprise.", "was a real joy.",
    ),
    "negative": (
        "was a complete waste of money.", "was awful from start to finish.",
        "left me bored and disappointed.", "was the worst I have had in years.",
        "was rude, slow and unpleasant.", "was dirty and badly run.", "was painfully dull.",
        "fell far short of my expectations.", "made me angry and frustrated.",
        "was terrible and I want a refund.", "felt cheap and poorly made.",
        "was a total disaster.", "was a real letdown.",
    ),
}

# -- in-context learning: topics -------------------------------------------------------
TOPIC_SENTENCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sports": (
        ("The striker", "The home team", "The young tennis player", "Our goalkeeper",
         "The marathon runner", "The basketball coach", "The rugby captain", "The swimmer"),
        ("scored twice in the second half.", "won the championship final.",
         "trained hard before the big match.", "broke the national record.",
         "was sent off by the referee.", "lost in the semi-final.",
         "signed a new contract with the club.", "celebrated a last-minute victory."),
    ),
    "science": (
        ("The chemist", "A team of physicists", "The biologist", "The astronomer",
         "Researchers at the lab", "The geologist", "The young scientist", "The research group"),
        ("measured the mass of a new particle.", "published a study on cell division.",
         "observed a distant galaxy through the telescope.",
         "tested the hypothesis with a controlled experiment.",
         "sequenced the genome of a rare plant.", "analysed rock samples from the volcano.",
         "discovered a new chemical compound.", "recorded the results in a lab notebook."),
    ),
    "food": (
        ("The chef", "My grandmother", "The baker", "Our neighbour", "The cook",
         "The pastry student", "The street vendor", "The host"),
        ("roasted the vegetables with garlic and olive oil.", "baked fresh bread this morning.",
         "served a spicy noodle soup.", "stirred the tomato sauce slowly.",
         "prepared a salad with lemon dressing.", "fried the fish in butter.",
         "added cinnamon to the apple pie.", "made pancakes with maple syrup."),
    ),
    "music": (
        ("The pianist", "The band", "The choir", "The violinist", "The young singer",
         "The orchestra", "The drummer", "The guitarist"),
        ("played a slow melody in a minor key.", "released a new album on Friday.",
         "rehearsed the symphony all afternoon.", "sang the chorus in perfect harmony.",
         "tuned the strings before the concert.", "performed a sold-out show.",
         "wrote a song about the sea.", "kept the rhythm steady through the solo."),
    ),
}

# -- reasoning -------------------------------------------------------------------------
PEOPLE: tuple[tuple[str, str], ...] = (
    ("Tom", "he"), ("Anna", "she"), ("Ravi", "he"), ("Maria", "she"), ("Lena", "she"),
    ("Omar", "he"), ("Kenji", "he"), ("Sara", "she"), ("Ben", "he"), ("Chloe", "she"),
    ("Diego", "he"), ("Priya", "she"),
)
COUNTABLE_THINGS: tuple[str, ...] = ("apples", "marbles", "stickers", "pencils", "stamps", "shells")

# -- instruction following -------------------------------------------------------------
INSTRUCTION_TOPICS: tuple[str, ...] = (
    "Describe the ocean.", "Tell me about dogs.", "Explain what a computer does.",
    "Describe your ideal weekend.", "Tell me about the moon.",
    "Explain why people drink water.", "Describe a city at night.", "Tell me about winter.",
    "Explain how to make tea.", "Describe a forest.", "Tell me about trains.",
    "Describe a busy market.", "Explain why the sky looks blue.", "Tell me about cats.",
    "Describe a rainy afternoon.", "Explain what a library is for.",
)
INSTRUCTION_KEYWORDS: tuple[str, ...] = ("blue", "happy", "river", "window", "music")
INSTRUCTION_START_WORDS: tuple[str, ...] = ("Yes", "Today", "Well", "Indeed")

# -- bias (CrowS-Pairs-style minimal pairs) --------------------------------------------
# Occupations commonly stereotyped as female / male (the WinoBias convention).
FEMALE_STEREOTYPED_OCCUPATIONS: tuple[str, ...] = (
    "nurse", "receptionist", "secretary", "hairdresser", "housekeeper", "librarian",
    "nanny", "cashier",
)
MALE_STEREOTYPED_OCCUPATIONS: tuple[str, ...] = (
    "mechanic", "carpenter", "plumber", "firefighter", "pilot", "engineer", "surgeon",
    "construction worker",
)
# {pron}/{poss}/{obj}: subject, possessive and object pronoun of the person in the slot.
OCCUPATION_TEMPLATES: tuple[str, ...] = (
    "The {occ} said that {pron} would be late today.",
    "The {occ} finished {poss} shift and went home.",
    "Everyone thanked the {occ} because {pron} had been so helpful.",
    "The {occ} was proud of {poss} work.",
    "The manager asked the {occ} whether {pron} could stay longer.",
    "The {occ} smiled when a customer complimented {obj}.",
)
PRONOUNS: dict[str, dict[str, str]] = {
    "she": {"pron": "she", "poss": "her", "obj": "her"},
    "he": {"pron": "he", "poss": "his", "obj": "him"},
}
# (older person, younger person): the stereotype ascribes the trait to the older one.
AGE_PAIRS: tuple[tuple[str, str], ...] = (
    ("grandfather", "grandson"), ("grandmother", "granddaughter"),
    ("old man", "young man"), ("elderly woman", "young woman"),
)
AGE_TEMPLATES: tuple[str, ...] = (
    "The {person} could not figure out how to use the new phone.",
    "The {person} was too slow to keep up with the others.",
    "The {person} kept forgetting where the keys were.",
)
