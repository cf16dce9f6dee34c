"""Stage 01, part one: a corpus of documents, chunked to the model's budget and split.

A corpus is a ``pandas.DataFrame`` with one row per document and the columns

- ``id``: unique string id of the row (a chunk of a longer document gets ``<doc_id>#<n>``);
- ``doc_id``: the original document's id, shared by its chunks;
- ``text``: non-empty text;
- ``source``: where the text comes from (a file, a dataset, a package);
- ``domain``: a coarse provenance label (``code``, ``legal``, a Pile set name, ...).

``load_corpus("builtin")`` builds a multi-domain demo corpus from real text that every
Python installation carries, so the whole chain runs offline. Other specs load JSONL or
Parquet files and Hugging Face datasets.
"""

from __future__ import annotations

import ast
import email
import hashlib
import json
import math
import os
import re
import sysconfig
import textwrap
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .errors import RephelpersError, require
from .holdout import ABILITY_HOLDOUT_MODULES

CORPUS_COLUMNS = ("id", "doc_id", "text", "source", "domain")
BUILTIN_DOMAINS = ("code", "docs", "legal", "markdown", "math")
MIN_CHARS = 200
MAX_CHARS = 1500

# Folders of the standard library that hold test suites or third-party packages: test
# code is repetitive boilerplate, and site-packages is not the standard library.
_SKIPPED_STDLIB_PARTS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)


# -- the builtin corpus ----------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    """One place documents come from, read lazily: ``read()`` returns its chunks."""

    name: str
    read: Callable[[], list[str]]


def build_builtin_corpus(
    docs_per_domain: int = 60,
    seed: int = 0,
    domains: Sequence[str] = BUILTIN_DOMAINS,
    min_chars: int = MIN_CHARS,
    max_chars: int = MAX_CHARS,
    per_source: int = 2,
) -> pd.DataFrame:
    """A multi-domain corpus of real text shipped with Python, deterministic for ``seed``.

    Domains (each a pool of chunks of ``min_chars``..``max_chars`` characters):

    - ``code``: top-level functions and classes (methods, for long classes) of the
      standard library's ``.py`` files, excluding test packages and the modules that
      :data:`rephelpers.holdout.ABILITY_HOLDOUT_MODULES` reserves for the code ability;
    - ``docs``: the language reference prose of ``pydoc_data.topics``;
    - ``legal``: license texts (the standard library's ``LICENSE.txt``, license files
      and long ``License:`` fields of the installed distributions' ``*.dist-info``);
    - ``markdown``: the Markdown READMEs in those distributions' ``METADATA`` bodies;
    - ``math``: arithmetic word problems with worked solutions from a seeded generator.

    Sources are visited in a seeded order and at most ``per_source`` chunks are taken
    from each in a first pass (so 60 documents come from ~30 files, not one), then the
    rest of the pool fills any shortfall. Texts are deduplicated across domains after
    whitespace normalisation. Editable installs (such as this package) are skipped, so the
    result depends only on the interpreter and the pinned installed packages.
    """
    require(
        isinstance(docs_per_domain, int) and docs_per_domain >= 1,
        f"docs_per_domain must be a positive int, got {docs_per_domain!r}",
    )
    require(0 < min_chars < max_chars, f"need 0 < min_chars < max_chars, got {min_chars}, {max_chars}")
    unknown = sorted(set(domains) - set(BUILTIN_DOMAINS))
    require(
        not unknown and len(domains) > 0,
        f"unknown builtin domain(s) {unknown}: choose from {', '.join(BUILTIN_DOMAINS)}",
    )
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for index, domain in enumerate(BUILTIN_DOMAINS):
        if domain not in domains:
            continue
        rng = np.random.default_rng([seed, index])
        if domain == "math":
            picked = _math_documents(rng, docs_per_domain, seen)
        else:
            sources = _builtin_sources(domain, min_chars, max_chars)
            picked = _take_spread(rng, sources, docs_per_domain, per_source, seen)
        if len(picked) < docs_per_domain:
            warnings.warn(
                f"builtin domain {domain!r} has only {len(picked)} distinct documents of "
                f"{min_chars}-{max_chars} characters; asked for {docs_per_domain}.",
                stacklevel=2,
            )
        for n, (source, text) in enumerate(picked):
            doc_id = f"{domain}-{n:05d}"
            rows.append({"id": doc_id, "doc_id": doc_id, "text": text, "source": source, "domain": domain})
    return pd.DataFrame(rows, columns=list(CORPUS_COLUMNS))


def _normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def _take_spread(
    rng: np.random.Generator, sources: list[_Source], n: int, per_source: int, seen: set[str]
) -> list[tuple[str, str]]:
    """Up to ``n`` new chunks, at most ``per_source`` per source first, then the leftovers."""
    picked: list[tuple[str, str]] = []
    leftovers: list[tuple[str, str]] = []
    for i in rng.permutation(len(sources)):
        source = sources[i]
        chunks = source.read()
        taken = 0
        for j in rng.permutation(len(chunks)):
            text = chunks[j]
            key = _normalised(text)
            if key in seen:
                continue
            if taken < per_source and len(picked) < n:
                seen.add(key)
                picked.append((source.name, text))
                taken += 1
            else:
                leftovers.append((source.name, text))
        if len(picked) >= n:
            return picked
    for name, text in leftovers:
        key = _normalised(text)
        if len(picked) >= n:
            break
        if key not in seen:
            seen.add(key)
            picked.append((name, text))
    return picked


def _builtin_sources(domain: str, min_chars: int, max_chars: int) -> list[_Source]:
    if domain == "code":
        return _code_sources(min_chars, max_chars)
    if domain == "docs":
        return _docs_sources(min_chars, max_chars)
    if domain == "legal":
        return _legal_sources(min_chars, max_chars)
    return _markdown_sources(min_chars, max_chars)


def pack_paragraphs(text: str, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """Split ``text`` at blank lines and pack consecutive paragraphs into chunks.

    Paragraphs are joined greedily (with a blank line) while the chunk stays within
    ``max_chars``; a longer paragraph is packed line by line, and a longer line is wrapped
    at spaces. Chunks shorter than ``min_chars`` are dropped.
    """
    pieces: list[tuple[str, str]] = []  # (text, separator that joins it to the previous piece)
    for paragraph in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        paragraph = paragraph.strip("\n").rstrip()
        if not paragraph.strip():
            continue
        if len(paragraph) <= max_chars:
            pieces.append((paragraph, "\n\n"))
            continue
        for n, line in enumerate(paragraph.split("\n")):
            for wrapped in textwrap.wrap(line, max_chars) if len(line) > max_chars else [line]:
                pieces.append((wrapped, "\n\n" if n == 0 else "\n"))
    chunks: list[str] = []
    current = ""
    for piece, separator in pieces:
        candidate = f"{current}{separator}{piece}" if current else piece
        if len(candidate) <= max_chars:
            current = candidate
            continue
        chunks.append(current)
        current = piece
    chunks.append(current)
    return [c for c in chunks if len(c.strip()) >= min_chars]


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def is_holdout_module(relative: Path) -> bool:
    """True when a standard-library path belongs to a module the ability suite keeps."""
    top = relative.parts[0]
    return (top[:-3] if top.endswith(".py") else top) in ABILITY_HOLDOUT_MODULES


def _code_sources(min_chars: int, max_chars: int) -> list[_Source]:
    root = _stdlib_root()
    files = []
    for folder, subfolders, names in os.walk(root):
        # Prune in place so os.walk never descends into test suites or site-packages.
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED_STDLIB_PARTS]
        relative_folder = Path(folder).relative_to(root)
        for name in names:
            relative = relative_folder / name
            if name.endswith(".py") and not name.startswith("test_") and not is_holdout_module(relative):
                files.append(relative)
    return [
        _Source(f"stdlib/{relative.as_posix()}", _code_reader(root / relative, min_chars, max_chars))
        for relative in sorted(files)
    ]


def _code_reader(path: Path, min_chars: int, max_chars: int) -> Callable[[], list[str]]:
    return lambda: python_definitions(path.read_text(encoding="utf-8", errors="replace"), min_chars, max_chars)


def python_definitions(source: str, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """Top-level functions and classes of a module, dedented, as function/class-sized chunks.

    A class longer than ``max_chars`` contributes its methods instead; definitions outside
    ``min_chars``..``max_chars`` are dropped. Unparseable sources give no chunks.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    chunks: list[str] = []

    def segment(node: ast.AST) -> str:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno])).strip("\n")

    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if not isinstance(node, definitions):
            continue
        text = segment(node)
        if len(text) > max_chars and isinstance(node, ast.ClassDef):
            chunks.extend(segment(child) for child in node.body if isinstance(child, definitions))
        else:
            chunks.append(text)
    return [c for c in chunks if min_chars <= len(c) <= max_chars]


def _docs_sources(min_chars: int, max_chars: int) -> list[_Source]:
    from pydoc_data.topics import topics

    return [
        _Source(f"pydoc_data.topics/{name}", _text_reader(topics[name], min_chars, max_chars))
        for name in sorted(topics)
    ]


def _text_reader(text: str, min_chars: int, max_chars: int) -> Callable[[], list[str]]:
    return lambda: pack_paragraphs(text, min_chars, max_chars)


def _file_reader(path: Path, min_chars: int, max_chars: int) -> Callable[[], list[str]]:
    return lambda: pack_paragraphs(path.read_text(encoding="utf-8", errors="replace"), min_chars, max_chars)


@lru_cache(maxsize=4)
def _distributions(site_packages: Path) -> tuple[tuple[Path, Any], ...]:
    """``(dist-info folder, parsed METADATA)`` of every non-editable installed distribution."""
    found = []
    for folder in sorted(site_packages.glob("*.dist-info")):
        direct_url = folder / "direct_url.json"
        if direct_url.exists():
            try:
                if json.loads(direct_url.read_text()).get("dir_info", {}).get("editable"):
                    continue
            except json.JSONDecodeError:
                continue
        metadata = folder / "METADATA"
        if metadata.exists():
            found.append((folder, email.message_from_string(metadata.read_text(encoding="utf-8", errors="replace"))))
    return tuple(found)


def _legal_sources(min_chars: int, max_chars: int) -> list[_Source]:
    sources = []
    stdlib_license = _stdlib_root() / "LICENSE.txt"
    if stdlib_license.exists():
        sources.append(_Source("stdlib/LICENSE.txt", _file_reader(stdlib_license, min_chars, max_chars)))
    site = _site_packages()
    for folder, metadata in _distributions(site):
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and _LICENSE_FILE.match(p.name)):
            name = f"site-packages/{path.relative_to(site).as_posix()}"
            sources.append(_Source(name, _file_reader(path, min_chars, max_chars)))
        license_field = metadata.get("License", "") or ""
        if len(license_field) >= min_chars:
            name = f"site-packages/{folder.name}/METADATA:License"
            sources.append(_Source(name, _text_reader(license_field, min_chars, max_chars)))
    return sources


def _markdown_sources(min_chars: int, max_chars: int) -> list[_Source]:
    sources = []
    for folder, metadata in _distributions(_site_packages()):
        if "markdown" not in (metadata.get("Description-Content-Type") or "").lower():
            continue
        body = metadata.get_payload()
        if isinstance(body, str) and body.strip():
            name = f"site-packages/{folder.name}/METADATA"
            sources.append(_Source(name, _text_reader(body, min_chars, max_chars)))
    return sources


# -- procedurally generated arithmetic word problems -----------------------------------
_NAMES = ("Ada", "Bao", "Chidi", "Dana", "Elif", "Farid", "Greta", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mira", "Noor", "Omar", "Priya")
_ITEMS = (("apples", 2), ("notebooks", 3), ("pencils", 1), ("tickets", 12), ("plants", 7), ("bottles of juice", 4), ("books", 15), ("candles", 5))
_PLACES = ("the market", "the school fair", "the bookshop", "the garden centre", "the bakery", "the station kiosk")


def _problem_shopping(rng: np.random.Generator) -> tuple[str, list[str], int]:
    name, place = rng.choice(_NAMES), rng.choice(_PLACES)
    (item_a, base_a), (item_b, base_b) = (_ITEMS[i] for i in rng.choice(len(_ITEMS), 2, replace=False))
    qa, qb = int(rng.integers(2, 12)), int(rng.integers(2, 12))
    pa, pb = base_a * int(rng.integers(1, 4)), base_b * int(rng.integers(1, 4))
    budget = qa * pa + qb * pb + int(rng.integers(5, 60))
    question = (
        f"{name} goes to {place} with {budget} dollars. {name} buys {qa} {item_a} at {pa} dollars each "
        f"and {qb} {item_b} at {pb} dollars each. How many dollars does {name} have left?"
    )
    steps = [
        f"The {item_a} cost {qa} x {pa} = {qa * pa} dollars.",
        f"The {item_b} cost {qb} x {pb} = {qb * pb} dollars.",
        f"Together they cost {qa * pa} + {qb * pb} = {qa * pa + qb * pb} dollars.",
        f"{name} has {budget} - {qa * pa + qb * pb} = {budget - qa * pa - qb * pb} dollars left.",
    ]
    return question, steps, budget - qa * pa - qb * pb


def _problem_travel(rng: np.random.Generator) -> tuple[str, list[str], int]:
    name = rng.choice(_NAMES)
    speed_a, hours_a = int(rng.integers(20, 90)), int(rng.integers(1, 6))
    speed_b, hours_b = int(rng.integers(3, 20)), int(rng.integers(1, 4))
    question = (
        f"{name} drives for {hours_a} hours at {speed_a} kilometres per hour, then cycles for "
        f"{hours_b} hours at {speed_b} kilometres per hour. How many kilometres does {name} travel in total?"
    )
    steps = [
        f"Driving covers {speed_a} x {hours_a} = {speed_a * hours_a} kilometres.",
        f"Cycling covers {speed_b} x {hours_b} = {speed_b * hours_b} kilometres.",
        f"The total is {speed_a * hours_a} + {speed_b * hours_b} = {speed_a * hours_a + speed_b * hours_b} kilometres.",
    ]
    return question, steps, speed_a * hours_a + speed_b * hours_b


def _problem_percent(rng: np.random.Generator) -> tuple[str, list[str], int]:
    name = rng.choice(_NAMES)
    price = 20 * int(rng.integers(2, 50))
    percent = int(rng.choice([5, 10, 15, 20, 25, 30, 40, 50]))
    discount = price * percent // 100
    tax = int(rng.integers(1, 20))
    question = (
        f"A coat costs {price} dollars. {name} gets a {percent} percent discount and then pays a "
        f"{tax} dollar delivery fee. How much does {name} pay?"
    )
    steps = [
        f"The discount is {percent}/100 x {price} = {discount} dollars.",
        f"After the discount the coat costs {price} - {discount} = {price - discount} dollars.",
        f"With delivery {name} pays {price - discount} + {tax} = {price - discount + tax} dollars.",
    ]
    return question, steps, price - discount + tax


def _problem_sharing(rng: np.random.Generator) -> tuple[str, list[str], int]:
    name = rng.choice(_NAMES)
    friends = int(rng.integers(2, 9))
    each = int(rng.integers(3, 25))
    kept = int(rng.integers(1, 15))
    item = _ITEMS[int(rng.integers(len(_ITEMS)))][0]
    total = friends * each + kept
    question = (
        f"{name} has {total} {item}. {name} keeps {kept} and shares the rest equally among "
        f"{friends} friends. How many {item} does each friend get?"
    )
    steps = [
        f"{name} shares {total} - {kept} = {total - kept} {item}.",
        f"Each friend gets {total - kept} / {friends} = {each} {item}.",
    ]
    return question, steps, each


def _problem_area(rng: np.random.Generator) -> tuple[str, list[str], int]:
    width, length = int(rng.integers(3, 40)), int(rng.integers(3, 40))
    tile = int(rng.choice([1, 2, 4]))
    price = int(rng.integers(2, 30))
    area = width * length
    tiles = -(-area // tile)
    question = (
        f"A floor is {width} metres wide and {length} metres long. Each box of tiles covers {tile} "
        f"square metres and costs {price} dollars. How much do the tiles for the whole floor cost?"
    )
    steps = [
        f"The area is {width} x {length} = {area} square metres.",
        f"The floor needs {area} / {tile} rounded up = {tiles} boxes.",
        f"The boxes cost {tiles} x {price} = {tiles * price} dollars.",
    ]
    return question, steps, tiles * price


def _problem_savings(rng: np.random.Generator) -> tuple[str, list[str], int]:
    name = rng.choice(_NAMES)
    start, weekly, weeks = int(rng.integers(0, 100)), int(rng.integers(5, 50)), int(rng.integers(2, 20))
    spend = int(rng.integers(1, start + weekly * weeks))
    saved = start + weekly * weeks
    question = (
        f"{name} has {start} dollars saved and adds {weekly} dollars every week for {weeks} weeks. "
        f"Then {name} spends {spend} dollars on a gift. How much money is left?"
    )
    steps = [
        f"Over {weeks} weeks {name} adds {weekly} x {weeks} = {weekly * weeks} dollars.",
        f"The savings reach {start} + {weekly * weeks} = {saved} dollars.",
        f"After the gift {saved} - {spend} = {saved - spend} dollars are left.",
    ]
    return question, steps, saved - spend


_PROBLEMS = (_problem_shopping, _problem_travel, _problem_percent, _problem_sharing, _problem_area, _problem_savings)


def arithmetic_word_problem(rng: np.random.Generator) -> str:
    """One word problem with a worked, step-by-step solution and its integer answer."""
    question, steps, answer = _PROBLEMS[int(rng.integers(len(_PROBLEMS)))](rng)
    return "\n".join([f"Problem: {question}", "Solution:", *steps, f"Answer: {answer}"])


def _math_documents(rng: np.random.Generator, n: int, seen: set[str]) -> list[tuple[str, str]]:
    picked: list[tuple[str, str]] = []
    for _ in range(100 * n):
        if len(picked) == n:
            break
        text = arithmetic_word_problem(rng)
        key = _normalised(text)
        if key not in seen:
            seen.add(key)
            picked.append(("generated/arithmetic", text))
    return picked


# -- loading any corpus ----------------------------------------------------------------
def load_corpus(
    spec: str | Path = "builtin",
    text_field: str = "text",
    max_documents: int | None = None,
    split: str = "train",
    seed: int = 0,
    docs_per_domain: int = 60,
    id_field: str = "id",
    domain_field: str | None = None,
    source_field: str | None = None,
    **builtin_options: Any,
) -> pd.DataFrame:
    """Load a corpus as a validated frame with :data:`CORPUS_COLUMNS` (plus any metadata).

    ``spec`` is one of

    - ``"builtin"``: :func:`build_builtin_corpus` (``docs_per_domain``, ``seed`` and
      ``builtin_options`` are passed on); ``max_documents`` keeps a seeded sample;
    - a ``.jsonl`` / ``.json`` (one object per line) or ``.parquet`` file with a text
      column ``text_field``; nested objects are flattened to dotted columns, so
      ``domain_field="meta.pile_set_name"`` reads The Pile's set name;
    - ``"hf:<dataset_id>[:config]"``: a Hugging Face dataset, streamed (``split`` is the
      dataset split) and capped at ``max_documents``, which is required here.

    Missing ids become ``doc-000000``, ...; a missing domain falls back to the source, and
    a missing source to the file name or dataset id. Other columns are kept.
    """
    require(
        max_documents is None or (isinstance(max_documents, int) and max_documents >= 1),
        f"max_documents must be a positive int or None, got {max_documents!r}",
    )
    spec_text = str(spec)
    if spec_text == "builtin":
        frame = build_builtin_corpus(docs_per_domain=docs_per_domain, seed=seed, **builtin_options)
        if max_documents is not None and max_documents < len(frame):
            keep = np.sort(np.random.default_rng(seed).choice(len(frame), max_documents, replace=False))
            frame = frame.iloc[keep].reset_index(drop=True)
        return validate_corpus(frame)
    require(
        not builtin_options,
        f"options {sorted(builtin_options)} only apply to the builtin corpus, not {spec_text!r}",
    )
    if spec_text.startswith("hf:"):
        raw, default_source = _read_hf(spec_text[3:], split, max_documents), spec_text[3:]
    else:
        path = Path(spec_text).expanduser()
        require(
            path.exists(),
            f"corpus {spec_text!r} is neither 'builtin', an existing .jsonl/.parquet file, nor "
            "'hf:<dataset_id>[:config]'. Check the path.",
        )
        raw, default_source = _read_file(path), path.name
        if max_documents is not None:
            raw = raw.iloc[:max_documents]
    return validate_corpus(_standardise(raw, text_field, id_field, domain_field, source_field, default_source))


def _read_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            with path.open(encoding="utf-8") as fh:
                records = [json.loads(line) for line in fh if line.strip()]
            return pd.json_normalize(records) if records else pd.DataFrame()
        if suffix == ".parquet":
            return _flatten(pd.read_parquet(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RephelpersError(f"{path} is not valid JSON Lines ({err}): one JSON object per line.") from err
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise RephelpersError(f"{path} could not be read as Parquet ({err}).") from err
    raise RephelpersError(f"unsupported corpus file {path.name!r}: use .jsonl or .parquet")


def _flatten(frame: pd.DataFrame) -> pd.DataFrame:
    """Expand columns holding dicts (Parquet structs) into dotted columns, recursively."""
    for column in list(frame.columns):
        values = frame[column]
        if values.map(lambda v: isinstance(v, dict)).any():
            nested = pd.json_normalize([v if isinstance(v, dict) else {} for v in values])
            nested = _flatten(nested.add_prefix(f"{column}."))
            frame = pd.concat([frame.drop(columns=[column]).reset_index(drop=True), nested], axis=1)
    return frame


def _read_hf(name: str, split: str, max_documents: int | None) -> pd.DataFrame:
    dataset_id, _, config = name.partition(":")
    require(bool(dataset_id), "write a Hugging Face corpus as 'hf:<dataset_id>[:config]'")
    require(
        max_documents is not None,
        f"hf:{name} is streamed: pass max_documents (e.g. 10_000) to cap how many documents are read.",
    )
    try:
        import datasets

        stream = datasets.load_dataset(dataset_id, config or None, split=split, streaming=True)
        records = [record for record, _ in zip(stream, range(max_documents))]
    except ImportError as err:
        raise RephelpersError("reading hf: corpora needs the `datasets` package: pip install datasets") from err
    except Exception as err:  # datasets raises many types: connection, missing config, auth
        raise RephelpersError(
            f"could not stream the Hugging Face dataset {dataset_id!r}"
            f"{f' (config {config!r})' if config else ''}, split {split!r}: {err.__class__.__name__}: {err}. "
            "It must be reachable or already in the local HF cache (offline: set HF_DATASETS_OFFLINE=1 "
            "after caching it); otherwise export it to .jsonl/.parquet and pass that path."
        ) from err
    return pd.json_normalize(records) if records else pd.DataFrame()


def _standardise(
    raw: pd.DataFrame,
    text_field: str,
    id_field: str,
    domain_field: str | None,
    source_field: str | None,
    default_source: str,
) -> pd.DataFrame:
    require(len(raw) > 0, "the corpus has zero documents: check the file or dataset split.")
    require(
        text_field in raw.columns,
        f"the corpus has no text column {text_field!r}; its columns are {sorted(raw.columns)}. "
        "Pass text_field= with the right name.",
    )
    for option, field in (("domain_field", domain_field), ("source_field", source_field)):
        require(
            field is None or field in raw.columns,
            f"{option}={field!r} is not a column; the corpus has {sorted(raw.columns)} "
            "(nested fields are flattened with dots, e.g. 'meta.pile_set_name').",
        )
    frame = raw.rename(columns={text_field: "text"}).reset_index(drop=True)
    if id_field in frame.columns:
        frame["id"] = frame.pop(id_field).astype(str)
    else:
        frame["id"] = [f"doc-{i:06d}" for i in range(len(frame))]
    if "doc_id" not in frame.columns:
        frame["doc_id"] = frame["id"]
    if source_field is not None:
        frame["source"] = frame[source_field].astype(str)
    elif "source" not in frame.columns:
        frame["source"] = default_source
    if domain_field is not None:
        frame["domain"] = frame[domain_field].astype(str)
    elif "domain" not in frame.columns:
        frame["domain"] = frame["source"].astype(str)
    frame["doc_id"] = frame["doc_id"].astype(str)
    rest = [c for c in frame.columns if c not in CORPUS_COLUMNS]
    return frame[list(CORPUS_COLUMNS) + rest]


def validate_corpus(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` unchanged if it is a usable corpus, else raise a clear error.

    Checks: the :data:`CORPUS_COLUMNS` exist, there is at least one document, every
    text is a non-blank string, and ids are unique.
    """
    missing = [c for c in CORPUS_COLUMNS if c not in frame.columns]
    require(
        not missing,
        f"the corpus lacks column(s) {missing}; load it with load_corpus() or add them "
        f"(needed: {', '.join(CORPUS_COLUMNS)}).",
    )
    require(len(frame) > 0, "the corpus has zero documents.")
    texts = frame["text"]
    blank = ~texts.map(lambda t: isinstance(t, str) and bool(t.strip()))
    if blank.any():
        ids = frame.loc[blank, "id"].astype(str).tolist()
        raise RephelpersError(
            f"{len(ids)} document(s) have empty or non-string text, e.g. ids {ids[:5]}. "
            "Drop them first, e.g. df = df[df['text'].str.strip().astype(bool)]."
        )
    duplicated = frame["id"].duplicated(keep=False)
    if duplicated.any():
        ids = sorted(frame.loc[duplicated, "id"].astype(str).unique())
        raise RephelpersError(
            f"{len(ids)} id(s) occur more than once, e.g. {ids[:5]}. Ids must be unique: "
            "deduplicate the corpus or drop the id column to number documents automatically."
        )
    return frame


def corpus_fingerprint(frame: pd.DataFrame) -> str:
    """A short hash of the corpus content (ids, texts, sources, domains) for cache keys."""
    h = hashlib.sha256()
    for column in CORPUS_COLUMNS:
        h.update(pd.util.hash_pandas_object(frame[column].astype(str), index=False).values.tobytes())
    return h.hexdigest()[:16]


# -- chunking and splits ---------------------------------------------------------------
def chunk_documents(frame: pd.DataFrame, tokenizer: Any, max_tokens: int) -> pd.DataFrame:
    """Split documents longer than ``max_tokens`` tokens into consecutive chunks.

    A document of n tokens becomes ``c = ⌈n / b⌉`` chunks of about ``n / c`` tokens each
    (b the budget after special tokens), not ``c − 1`` full ones and a remainder: a
    remainder can be a single token, and a representation mean-pooled over one token is
    noise that stage 03 would weigh like any other document.

    The budget counts the special tokens ``tokenizer`` adds (BOS/CLS/SEP...), so the
    model stage, which encodes each text with the same tokenizer and truncates at
    ``max_tokens``, sees every chunk whole. A chunk is the exact character span of its
    tokens (offset mapping of fast tokenizers; slow ones decode the token slice). Chunks
    keep ``doc_id`` and every other column, get ids ``<doc_id>#<n>``, and a column
    ``n_tokens`` (with special tokens) is added. Documents that fit keep their id.
    """
    validate_corpus(frame)
    special = tokenizer.num_special_tokens_to_add(pair=False)
    budget = max_tokens - special
    require(
        isinstance(max_tokens, int) and budget >= 8,
        f"max_tokens={max_tokens!r} leaves {budget} tokens after {special} special token(s): use at least {special + 8}.",
    )
    rows: list[dict[str, Any]] = []
    for record in frame.to_dict("records"):
        pieces = _token_spans(record["text"], tokenizer, budget)
        for n, (text, count) in enumerate(pieces):
            row = dict(record)
            row["text"] = text
            row["n_tokens"] = count + special
            if len(pieces) > 1:
                row["id"] = f"{record['doc_id']}#{n}"
            rows.append(row)
    return validate_corpus(pd.DataFrame(rows, columns=list(frame.columns) + ["n_tokens"]))


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_spans(text: str, tokenizer: Any, budget: int) -> list[tuple[str, int]]:
    """``(chunk text, token count)`` pairs covering ``text`` with at most ``budget`` tokens each."""
    if tokenizer.is_fast:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        n_tokens = len(offsets)

        def span(a: int, b: int) -> str:
            return text[offsets[a][0] : offsets[b - 1][1]]

    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_tokens = len(ids)

        def span(a: int, b: int) -> str:
            return tokenizer.decode(ids[a:b])

    if n_tokens <= budget:
        return [(text, n_tokens)]
    size = math.ceil(n_tokens / math.ceil(n_tokens / budget))  # balanced: no short remainder
    spans: list[tuple[str, int]] = []
    start = 0
    while start < n_tokens:
        end = min(start + size, n_tokens)
        piece = span(start, end)
        count = _count(tokenizer, piece)
        # Re-tokenising a span can merge differently at its edges; shrink until it fits.
        while count > budget and end - start > 1:
            end -= max(1, count - budget)
            piece = span(start, end)
            count = _count(tokenizer, piece)
        if piece.strip():
            spans.append((piece, count))
        start = end
    return spans


def assign_splits(
    frame: pd.DataFrame,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    stratify: str | None = "cluster",
) -> pd.DataFrame:
    """Add a ``split`` column, ``"train"`` or ``"heldout"``, deterministic for ``seed``.

    Whole documents (``doc_id`` groups) go to one side, so no chunk of a held-out document
    is trained on. Within each stratum (the group's most common ``stratify`` value) the
    ``round(heldout_fraction * g)`` groups with the smallest ``sha256(seed:doc_id)`` are
    held out, at least one and at most ``g - 1`` when the stratum has ``g >= 2`` groups.
    Hash order keeps splits stable: adding documents moves few existing ones across.
    """
    require(
        0.0 < heldout_fraction < 1.0,
        f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction!r}",
    )
    require(
        stratify is None or stratify in frame.columns,
        f"cannot stratify by {stratify!r}: not a column of the frame (columns: {sorted(frame.columns)}). "
        "Cluster the corpus first or pass stratify=None.",
    )
    groups = frame.groupby("doc_id", sort=True)
    strata = groups[stratify].agg(lambda s: s.mode().iloc[0]) if stratify else pd.Series(0, index=sorted(frame["doc_id"].unique()))
    order = {doc: hashlib.sha256(f"{seed}:{doc}".encode()).hexdigest() for doc in strata.index}
    heldout: set[str] = set()
    for _, docs in strata.groupby(strata, sort=True):
        g = len(docs)
        if g < 2:
            continue
        n_heldout = min(g - 1, max(1, round(heldout_fraction * g)))
        heldout.update(sorted(docs.index, key=order.__getitem__)[:n_heldout])
    result = frame.copy()
    result["split"] = np.where(result["doc_id"].isin(heldout), "heldout", "train")
    return result

