"""Stage 01 corpus: the builtin corpus, loading files and datasets, chunking, splits."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rephelpers import RephelpersError
from rephelpers.corpus import demo as corpus_module
from rephelpers.corpus.loaders import (
    assign_splits,
    chunk_documents,
    corpus_fingerprint,
    load_corpus,
)
from rephelpers.corpus.demo import BUILTIN_DOMAINS, build_builtin_corpus, pack_paragraphs, python_definitions
from rephelpers.corpus.embeddings import embedder_path
from rephelpers.corpus.holdout import ABILITY_HOLDOUT_MODULES
from rephelpers.corpus.schema import MAX_CHARS, MIN_CHARS


@pytest.fixture(scope="module")
def builtin() -> pd.DataFrame:
    return build_builtin_corpus(docs_per_domain=20, seed=0)


@pytest.fixture(scope="module")
def bert_tokenizer():
    """MiniLM's WordPiece tokenizer: adds [CLS] and [SEP], unlike SmolLM2's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedder_path())


# -- the builtin corpus ----------------------------------------------------------------
def test_builtin_corpus_has_the_promised_shape(builtin):
    assert list(builtin.columns) == ["id", "doc_id", "text", "source", "domain"]
    counts = builtin["domain"].value_counts()
    assert set(counts.index) == set(BUILTIN_DOMAINS) and len(counts) >= 4
    assert (counts == 20).all()
    assert builtin["id"].is_unique and (builtin["id"] == builtin["doc_id"]).all()
    assert builtin["text"].map(lambda t: " ".join(t.split()).lower()).is_unique
    lengths = builtin["text"].str.len()
    assert lengths.between(MIN_CHARS, MAX_CHARS).all()
    assert builtin["text"].str.strip().astype(bool).all()
    # Documents come from many files, not one (at most two per source in the first pass).
    assert builtin.loc[builtin["domain"] == "code", "source"].nunique() >= 10


def test_builtin_corpus_is_deterministic_for_a_seed(builtin):
    again = build_builtin_corpus(docs_per_domain=20, seed=0)
    pd.testing.assert_frame_equal(builtin, again)
    other = build_builtin_corpus(docs_per_domain=20, seed=1)
    assert set(other["text"]) != set(builtin["text"])


def test_builtin_corpus_never_contains_ability_holdout_modules(builtin):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = builtin[builtin["domain"] == "code"]
    for source in code["source"]:
        top = source.removeprefix("stdlib/").split("/")[0].removesuffix(".py")
        assert top not in ABILITY_HOLDOUT_MODULES
        assert "/test/" not in source and "/tests/" not in source
    # Independently: no code document is a piece of any holdout module's source.
    holdout_sources = [
        p.read_text(encoding="utf-8", errors="replace")
        for name in ABILITY_HOLDOUT_MODULES
        for p in (stdlib / f"{name}.py", stdlib / name / "__init__.py")
        if p.exists()
    ]
    assert len(holdout_sources) == len(ABILITY_HOLDOUT_MODULES)
    flattened = [" ".join(s.split()) for s in holdout_sources]
    for text in code["text"]:
        assert not any(" ".join(text.split()) in s for s in flattened)


def test_math_documents_have_correct_worked_solutions(builtin):
    # Each "a op b op c = r" in a solution, evaluated independently with Python arithmetic.
    equation = re.compile(r"((?:\d+ ?[x+\-/] ?)+\d+) = (\d+)")
    checked = 0
    for text in builtin.loc[builtin["domain"] == "math", "text"]:
        assert text.startswith("Problem: ") and "\nSolution:\n" in text
        found = equation.findall(text)
        for expression, result in found:
            assert eval(expression.replace("x", "*")) == int(result), text  # digits and + - * / only
            checked += 1
        assert text.rstrip().endswith(f"Answer: {found[-1][1]}")
    assert checked >= 40


def test_builtin_options_are_validated():
    with pytest.raises(RephelpersError, match="unknown builtin domain"):
        build_builtin_corpus(docs_per_domain=2, domains=("code", "poetry"))
    with pytest.raises(RephelpersError, match="docs_per_domain"):
        build_builtin_corpus(docs_per_domain=0)


def test_load_corpus_builtin_caps_with_a_seeded_sample():
    capped = load_corpus("builtin", docs_per_domain=6, max_documents=10, seed=3)
    assert len(capped) == 10
    full = load_corpus("builtin", docs_per_domain=6, seed=3)
    assert set(capped["id"]) <= set(full["id"])
    pd.testing.assert_frame_equal(capped, load_corpus("builtin", docs_per_domain=6, max_documents=10, seed=3))


def test_pack_paragraphs_respects_bounds_and_keeps_text():
    paragraphs = [f"Paragraph {i} " + "word " * (i * 20) for i in range(1, 12)]
    text = "\n\n".join(paragraphs)
    chunks = pack_paragraphs(text, min_chars=100, max_chars=600)
    assert all(100 <= len(c) <= 600 for c in chunks)
    # The chunks are consecutive, non-overlapping spans of the text.
    flat = " ".join(text.split())
    position = 0
    for chunk in chunks:
        found = flat.find(" ".join(chunk.split()), position)
        assert found >= position
        position = found + len(" ".join(chunk.split()))
    assert sum(len(c.split()) for c in chunks) >= 0.8 * len(text.split())


def test_python_definitions_splits_long_classes_into_methods():
    method = "    def method_{0}(self):\n        return " + " + ".join(["self.value"] * 12) + "\n"
    source = (
        "import os\n\n"
        "def short():\n    return 1\n\n"
        "@decorator\ndef decorated(argument):\n    '''" + "Documented. " * 20 + "'''\n    return argument\n\n"
        "class Long:\n" + "".join(method.format(i) for i in range(8))
    )
    chunks = python_definitions(source, min_chars=100, max_chars=400)
    assert chunks[0].startswith("@decorator\ndef decorated(")
    assert [c.split("(")[0] for c in chunks[1:]] == [f"def method_{i}" for i in range(8)]
    assert all(not c.startswith(" ") for c in chunks)
    assert python_definitions("def broken(:\n", 1, 100) == []


# -- loading files and datasets --------------------------------------------------------
def _pile_records() -> list[dict]:
    return [
        {"text": "First document about code and tests.", "meta": {"pile_set_name": "Github", "year": 2020}},
        {"text": "Second document about a court ruling.", "meta": {"pile_set_name": "FreeLaw", "year": 2019}},
        {"text": "Third document about primes.", "meta": {"pile_set_name": "DM Mathematics", "year": 2021}},
    ]


def test_load_jsonl_with_nested_metadata(tmp_path):
    path = tmp_path / "pile.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _pile_records()) + "\n\n")
    frame = load_corpus(path, domain_field="meta.pile_set_name")
    assert list(frame.columns[:5]) == ["id", "doc_id", "text", "source", "domain"]
    assert frame["id"].tolist() == ["doc-000000", "doc-000001", "doc-000002"]
    assert frame["domain"].tolist() == ["Github", "FreeLaw", "DM Mathematics"]
    assert (frame["source"] == "pile.jsonl").all()
    assert frame["meta.year"].tolist() == [2020, 2019, 2021]
    assert len(load_corpus(path, max_documents=2)) == 2


def test_load_parquet_flattens_structs_and_keeps_ids(tmp_path):
    records = _pile_records()
    frame = pd.DataFrame({
        "id": [11, 12, 13],
        "content": [r["text"] for r in records],
        "meta": [r["meta"] for r in records],
    })
    path = tmp_path / "pile.parquet"
    frame.to_parquet(path)
    loaded = load_corpus(path, text_field="content", domain_field="meta.pile_set_name", source_field="meta.year")
    assert loaded["id"].tolist() == ["11", "12", "13"]
    assert loaded["text"].tolist() == [r["text"] for r in records]
    assert loaded["domain"].tolist() == ["Github", "FreeLaw", "DM Mathematics"]
    assert loaded["source"].tolist() == ["2020", "2019", "2021"]


@pytest.mark.parametrize(
    "records, match",
    [
        ([{"text": "fine"}, {"text": "   "}], "empty or non-string text"),
        ([{"id": "a", "text": "one"}, {"id": "a", "text": "two"}], "occur more than once"),
        ([{"body": "no text column"}], "no text column 'text'"),
    ],
)
def test_corrupt_corpora_give_clear_errors(tmp_path, records, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(RephelpersError, match=match):
        load_corpus(path)


def test_unreadable_or_missing_inputs_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RephelpersError, match="zero documents"):
        load_corpus(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(RephelpersError, match="not valid JSON Lines"):
        load_corpus(broken)
    with pytest.raises(RephelpersError, match="neither 'builtin'"):
        load_corpus(tmp_path / "nowhere.jsonl")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "ok"}))
    with pytest.raises(RephelpersError, match="domain_field='meta.kind' is not a column"):
        load_corpus(good, domain_field="meta.kind")


def test_hf_corpus_streams_and_reports_unreachable_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "offline/corpus":
            raise ConnectionError("Couldn't reach 'offline/corpus' on the Hub")
        return iter(_pile_records() * 5)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    frame = load_corpus("hf:EleutherAI/pile:all", max_documents=4, domain_field="meta.pile_set_name")
    assert calls[-1] == ("EleutherAI/pile", "all", "train", True)
    assert len(frame) == 4 and frame["domain"].tolist()[:3] == ["Github", "FreeLaw", "DM Mathematics"]
    assert (frame["source"] == "EleutherAI/pile:all").all()
    with pytest.raises(RephelpersError, match="could not stream the Hugging Face dataset 'offline/corpus'"):
        load_corpus("hf:offline/corpus", max_documents=3)
    with pytest.raises(RephelpersError, match="pass max_documents"):
        load_corpus("hf:EleutherAI/pile")


# -- chunking --------------------------------------------------------------------------
def _check_chunks(frame: pd.DataFrame, chunks: pd.DataFrame, tokenizer, max_tokens: int) -> None:
    assert chunks["id"].is_unique
    for text, count in zip(chunks["text"], chunks["n_tokens"]):
        ids = tokenizer(text)["input_ids"]  # with special tokens, as the model stage encodes
        assert len(ids) == count <= max_tokens
    for record in frame.itertuples():
        pieces = chunks[chunks["doc_id"] == record.doc_id]
        assert (pieces["domain"] == record.domain).all() and (pieces["source"] == record.source).all()
        if len(pieces) == 1:
            assert pieces["id"].iloc[0] == record.id and pieces["text"].iloc[0] == record.text
            continue
        assert pieces["id"].tolist() == [f"{record.doc_id}#{n}" for n in range(len(pieces))]
        # The chunks are consecutive spans of the original text.
        position = 0
        for piece in pieces["text"]:
            found = record.text.find(piece, position)
            assert found >= position and record.text[position:found].strip() == ""
            position = found + len(piece)
        assert record.text[position:].strip() == ""


def test_chunking_keeps_doc_id_and_respects_the_budget_with_special_tokens(builtin, bert_tokenizer):
    frame = builtin.groupby("domain").head(3).reset_index(drop=True)
    chunks = chunk_documents(frame, bert_tokenizer, max_tokens=48)
    assert len(chunks) > 2 * len(frame)
    _check_chunks(frame, chunks, bert_tokenizer, 48)
    # balanced: a split document's chunks are of about equal size, with no short remainder
    # (only re-tokenisation at chunk edges moves a few tokens between neighbours)
    split = chunks[chunks["doc_id"].duplicated(keep=False)]
    smallest_share = split.groupby("doc_id")["n_tokens"].agg(lambda n: n.min() / n.max())
    assert len(smallest_share) > 0 and smallest_share.min() >= 0.75, smallest_share.sort_values().head()


@pytest.mark.model
def test_chunking_with_the_model_tokenizer(builtin):
    from rephelpers.representations.models import load_model

    tokenizer = load_model().tokenizer
    frame = builtin.groupby("domain").head(4).reset_index(drop=True)
    chunks = chunk_documents(frame, tokenizer, max_tokens=64)
    assert chunks["doc_id"].nunique() == len(frame) < len(chunks)
    _check_chunks(frame, chunks, tokenizer, 64)


def test_chunking_rejects_a_budget_smaller_than_the_special_tokens(builtin, bert_tokenizer):
    with pytest.raises(RephelpersError, match="max_tokens=5"):
        chunk_documents(builtin.head(2), bert_tokenizer, max_tokens=5)


# -- splits ----------------------------------------------------------------------------
def _clustered_chunks() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for d in range(60):
        cluster = d % 4 if d < 56 else 4  # cluster 4: only four documents
        for n in range(int(rng.integers(1, 4))):
            rows.append({"id": f"d{d}#{n}", "doc_id": f"d{d}", "cluster": cluster})
    rows.append({"id": "lonely", "doc_id": "lonely", "cluster": 5})
    return pd.DataFrame(rows)


def test_assign_splits_is_stratified_grouped_and_deterministic():
    frame = _clustered_chunks()
    split = assign_splits(frame, heldout_fraction=0.2, seed=0)
    assert set(split["split"]) == {"train", "heldout"}
    # Whole documents go to one side.
    assert (split.groupby("doc_id")["split"].nunique() == 1).all()
    per_cluster = split.drop_duplicates("doc_id").groupby("cluster")["split"].apply(lambda s: (s == "heldout").sum())
    assert per_cluster.to_dict() == {0: 3, 1: 3, 2: 3, 3: 3, 4: 1, 5: 0}  # round(0.2 * 14) = 3; min 1; singleton 0
    pd.testing.assert_frame_equal(split, assign_splits(frame, heldout_fraction=0.2, seed=0))
    assert not split["split"].equals(assign_splits(frame, heldout_fraction=0.2, seed=1)["split"])
    unstratified = assign_splits(frame, heldout_fraction=0.25, stratify=None)
    assert unstratified.drop_duplicates("doc_id")["split"].eq("heldout").sum() == round(0.25 * 61)


def test_assign_splits_validates_its_inputs():
    frame = _clustered_chunks()
    with pytest.raises(RephelpersError, match="strictly between 0 and 1"):
        assign_splits(frame, heldout_fraction=1.0)
    with pytest.raises(RephelpersError, match="cannot stratify by 'topic'"):
        assign_splits(frame, stratify="topic")


def test_corpus_fingerprint_tracks_content(builtin):
    changed = builtin.copy()
    changed.loc[0, "text"] = changed.loc[0, "text"] + " "
    assert corpus_fingerprint(builtin) == corpus_fingerprint(builtin.copy())
    assert corpus_fingerprint(builtin) != corpus_fingerprint(changed)


# -- the pinned sources and the reference fingerprint ------------------------------------
def _distribution_of(source: str) -> str:
    return source.split("==")[0]


def test_builtin_corpus_reads_only_the_pinned_sources(builtin):
    by_domain = builtin.groupby("domain")["source"].apply(list)
    assert {s.removeprefix("stdlib/") for s in by_domain["code"]} <= set(corpus_module.BUILTIN_CODE_MODULES)
    legal = [s for s in by_domain["legal"] if s != "stdlib/LICENSE.txt"]
    assert {_distribution_of(s) for s in legal} <= set(corpus_module.BUILTIN_LEGAL_DISTRIBUTIONS)
    assert {_distribution_of(s) for s in by_domain["markdown"]} <= set(corpus_module.BUILTIN_MARKDOWN_DISTRIBUTIONS)
    # Labels name the distribution and version, never a path of this machine.
    assert all(re.fullmatch(r"[a-z0-9-]+==[^/]+/.+", s) for s in legal + by_domain["markdown"])
    # Installed but not pinned (pip and torch differ per machine) never enters.
    assert not any(_distribution_of(s) in ("pip", "setuptools", "torch", "numpy") for s in legal)


def test_builtin_sources_are_listed_in_their_pinned_order():
    for domain, pinned in (
        ("legal", corpus_module.BUILTIN_LEGAL_DISTRIBUTIONS),
        ("markdown", corpus_module.BUILTIN_MARKDOWN_DISTRIBUTIONS),
    ):
        missing: list[str] = []
        sources = corpus_module._builtin_sources(domain, MIN_CHARS, MAX_CHARS, missing)
        names = [_distribution_of(s.name) for s in sources if not s.name.startswith("stdlib/")]
        assert not missing
        assert list(dict.fromkeys(names)) == list(pinned)
    missing = []
    code = corpus_module._builtin_sources("code", MIN_CHARS, MAX_CHARS, missing)
    assert [s.name for s in code] == [f"stdlib/{m}" for m in corpus_module.BUILTIN_CODE_MODULES]
    assert not any(corpus_module.is_holdout_module(Path(m)) for m in corpus_module.BUILTIN_CODE_MODULES)


def test_another_installed_distribution_does_not_change_the_corpus(tmp_path, monkeypatch):
    before = build_builtin_corpus(docs_per_domain=8, seed=0, domains=("legal", "markdown"))
    extra = tmp_path / "zz_extra-1.0.dist-info"
    extra.mkdir()
    (extra / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: zz-extra\nVersion: 1.0\nDescription-Content-Type: text/markdown\n\n"
        + "# An extra package\n\n" + "It is installed here only. " * 40
    )
    (extra / "LICENSE").write_text("A license only this machine has. " * 30)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib.metadata

    assert importlib.metadata.version("zz-extra") == "1.0"
    pd.testing.assert_frame_equal(before, build_builtin_corpus(docs_per_domain=8, seed=0, domains=("legal", "markdown")))


def test_two_builds_in_separate_processes_are_identical():
    # Another process with another hash seed: nothing may depend on set or dict iteration order.
    import subprocess
    import sys

    script = (
        "from rephelpers.corpus.loaders import corpus_fingerprint; from rephelpers.corpus.demo import build_builtin_corpus;"
        "print(corpus_fingerprint(build_builtin_corpus(docs_per_domain=10, seed=0)))"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout.strip()
        for h in (1, 2)
    }
    assert outputs == {corpus_fingerprint(build_builtin_corpus(docs_per_domain=10, seed=0))}


def test_a_missing_pinned_source_is_skipped_with_a_warning(monkeypatch):
    monkeypatch.setattr(corpus_module, "BUILTIN_LEGAL_DISTRIBUTIONS", ("no-such-distribution", *corpus_module.BUILTIN_LEGAL_DISTRIBUTIONS))
    monkeypatch.setattr(corpus_module, "BUILTIN_CODE_MODULES", ("no_such_module.py", *corpus_module.BUILTIN_CODE_MODULES))
    with pytest.warns(corpus_module.PinnedSourceWarning, match=r"stdlib/no_such_module\.py \(not in this Python.*no-such-distribution \(not installed\)") as caught:
        frame = build_builtin_corpus(docs_per_domain=5, seed=0, domains=("code", "legal"))
    assert len(caught) == 1
    assert (frame["domain"].value_counts() == 5).all()


def test_reference_versions_are_the_constraints_pins():
    pins = {}
    for line in (Path(__file__).parents[1] / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    pinned = set(corpus_module.BUILTIN_LEGAL_DISTRIBUTIONS) | set(corpus_module.BUILTIN_MARKDOWN_DISTRIBUTIONS)
    assert pinned <= set(corpus_module.BUILTIN_REFERENCE_VERSIONS)
    assert {n: pins.get(n) for n in corpus_module.BUILTIN_REFERENCE_VERSIONS} == corpus_module.BUILTIN_REFERENCE_VERSIONS


@pytest.mark.model
def test_reference_fingerprint_is_what_the_pinned_stack_builds():
    if corpus_module.builtin_corpus_differences():
        pytest.skip(f"not the pinned stack: {corpus_module.builtin_corpus_differences()}")
    from rephelpers.representations.models import load_model

    chunks = chunk_documents(build_builtin_corpus(docs_per_domain=10, seed=0), load_model().tokenizer, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert corpus_module.check_builtin_fingerprint(corpus_fingerprint(chunks), 10, 48, 0) is True


def test_fingerprint_check_names_what_differs(monkeypatch):
    reference = corpus_module.DEMO_CORPUS_FINGERPRINTS[(60, 128, 0)]
    assert corpus_module.check_builtin_fingerprint(reference, 60, 128, 1) is None  # no reference for seed 1
    assert corpus_module.check_builtin_fingerprint("0" * 16, 60, 128, 0, model_name="my-model") is None
    monkeypatch.setattr(corpus_module, "BUILTIN_REFERENCE_PYTHON", "3.10.0")
    monkeypatch.setitem(corpus_module.BUILTIN_REFERENCE_VERSIONS, "chardet", "5.0.0")
    monkeypatch.setattr(corpus_module, "_pinned_distribution", lambda name: None if name == "rich" else _real_distribution(name))
    with pytest.warns(corpus_module.PinnedSourceWarning) as caught:
        assert corpus_module.check_builtin_fingerprint("0" * 16, 60, 128, 0) is False
    message = str(caught[0].message)
    assert reference in message and "0" * 16 in message
    assert f"Python {platform.python_version()} instead of 3.10.0" in message
    assert f"chardet {importlib.metadata.version('chardet')} instead of 5.0.0" in message
    assert "rich is not installed (pinned 15.0.0)" in message


def _real_distribution(name: str):
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_a_local_hugging_face_dataset_is_a_corpus(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    texts = [f"Document {i} about {topic}: " + "words " * 50 for i, topic in enumerate(["rivers", "ledgers", "stars"])]
    rows = {"text": texts, "meta": [{"set": s} for s in ("geo", "finance", "astro")]}
    # 1. a DatasetDict written by save_to_disk: the split picks, nested fields become dotted columns
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({"text": texts[:1], "meta": rows["meta"][:1]})}).save_to_disk(saved)
    frame = load_corpus(saved, domain_field="meta.set")
    assert frame["text"].tolist() == texts and frame["domain"].tolist() == ["geo", "finance", "astro"]
    assert len(load_corpus(saved, split="test")) == 1 and len(load_corpus(saved, max_documents=2)) == 2
    with pytest.raises(RephelpersError, match=r"splits \['test', 'train'\], not 'validation'"):
        load_corpus(saved, split="validation")
    # 2. a folder of data files, read by datasets.load_dataset without the network
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "id": f"d{i}"}) + "\n" for i, t in enumerate(texts)))
    frame = load_corpus(folder)
    assert sorted(frame["text"]) == sorted(texts) and sorted(frame["id"]) == ["d0", "d1", "d2"]
    # 3. a folder that is no dataset says so
    (tmp_path / "empty").mkdir()
    with pytest.raises(RephelpersError, match="not a dataset that `datasets` can read"):
        load_corpus(tmp_path / "empty")
