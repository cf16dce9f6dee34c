"""What the ability suite keeps for itself, so no ability item is also a corpus document.

It lives with the corpus (stage 01), the lower of the two stages that read it, so stage 05
imports it from here and the corpus never imports a later stage.

The corpus builder skips these standard-library modules; the code ability draws its
items only from them. Arithmetic items are deduplicated against the corpus by text.
"""

ABILITY_HOLDOUT_MODULES: tuple[str, ...] = (
    "textwrap",
    "shlex",
    "fractions",
    "statistics",
    "heapq",
    "bisect",
    "calendar",
    "colorsys",
    "difflib",
    "fnmatch",
    "glob",
    "base64",
    "graphlib",
    "numbers",
    "string",
    "operator",
    "queue",
    "sched",
    "secrets",
    "ipaddress",
)
