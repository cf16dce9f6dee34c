"""The offline ability suite: deterministic files, lm-eval finds them, items are right.

Item checks recompute answers independently (``operator`` arithmetic, the stdlib source
file read afresh, the fact tables) instead of trusting the generators.
"""

import json
import operator
import re
import sysconfig
from pathlib import Path

import pytest

from rephelpers.abilities.suite import (
    ABILITIES,
    SUITE_TAG,
    build_tasks,
    check_instruction,
    describe_abilities,
    instruction_compliance,
    read_items,
    stereotype_preference,
)
from rephelpers.errors import RephelpersError
from rephelpers.corpus.holdout import ABILITY_HOLDOUT_MODULES
from rephelpers.abilities.tasks import tables

N = 12


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tasks(list(ABILITIES), tmp_path_factory.mktemp("tasks"), items_per_task=N, seed=0)


def test_builds_are_deterministic_per_seed(built, tmp_path):
    again = build_tasks(list(ABILITIES), tmp_path / "again", items_per_task=N, seed=0)
    other = build_tasks(["icl", "code"], tmp_path / "other", items_per_task=N, seed=1)
    for name, info in built.items():
        assert info.data_path.read_bytes() == again[name].data_path.read_bytes(), name
        strip = lambda p: p.read_text().replace(str(p.parent), "DIR")  # noqa: E731
        assert strip(info.yaml_path) == strip(again[name].yaml_path), name
    for name in ("icl", "code"):
        assert read_items(other[name]) != read_items(built[name])


def test_lm_eval_finds_every_task_and_the_tag(built):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(next(iter(built.values())).yaml_path.parent), include_defaults=False)
    loaded = manager.load([SUITE_TAG])["tasks"]
    assert set(loaded) == {info.task for info in built.values()}
    for name, info in built.items():
        task = loaded[info.task]
        docs = list(task.test_docs())
        assert len(docs) == N == info.n_items
        assert task.OUTPUT_TYPE == ABILITIES[name].output_type
        assert info.metric in {m["metric"] for m in task.config.metric_list}
        first = docs[0]
        assert task.doc_to_text(first) == first["prompt"]
        if task.OUTPUT_TYPE == "multiple_choice":
            assert task.doc_to_choice(first) == first["choices"]
            assert task.doc_to_target(first) == first["gold"]


def test_items_are_unique_and_well_formed(built):
    for name, info in built.items():
        items = read_items(info)
        assert len({it["id"] for it in items}) == N
        assert len({(it["prompt"], json.dumps(it.get("choices"))) for it in items}) == N, name
        for it in items:
            if ABILITIES[name].output_type == "multiple_choice":
                assert 0 <= it["gold"] < len(it["choices"])
                assert len(set(it["choices"])) == len(it["choices"]), it
            else:
                assert isinstance(it["answer"], str) and it["answer"]


def test_arithmetic_answers_recomputed(built):
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    assert ABILITIES["arithmetic"].output_type == "multiple_choice" and ABILITIES["arithmetic"].chance == 0.25
    golds = []
    for it in read_items(built["arithmetic"]):
        a, op, b = re.fullmatch(r"Q: What is (\d+) ([-+*]) (\d+)\?\nA:", it["question"]).groups()
        answer = ops[op](int(a), int(b))
        assert it["choices"][it["gold"]] == it["answer"] == str(answer) and len(it["choices"]) == 4
        golds.append(it["gold"])
        # Distractors: off by one, the two other operations' results (larger minus smaller),
        # or a fallback offset when one collides; never negative, never the answer.
        wrong = {int(c) for j, c in enumerate(it["choices"]) if j != it["gold"]}
        others = {ops[o](max(int(a), int(b)), min(int(a), int(b))) for o in ops if o != op}
        assert len(wrong) == 3 and answer not in wrong and min(wrong) >= 0
        assert wrong & {answer - 1, answer + 1}
        assert wrong <= others | {answer + d for d in (1, -1, 10, -10, 2, -2, 11, -11, 20, -20)}
        assert it["prompt"].endswith(it["question"])
        # Three solved examples come first and are never asked again.
        demos = re.findall(r"Q: What is (\d+) ([-+*]) (\d+)\?\nA: (-?\d+)\n\n", it["prompt"])
        assert len(demos) == 3 and all(int(r) == ops[o](int(x), int(y)) for x, o, y, r in demos)
    assert len(set(golds)) > 1  # the answer's position varies


def test_reasoning_answers_are_positive_integers(built):
    for it in read_items(built["reasoning"]):
        assert int(it["answer"]) > 0
        assert it["prompt"].endswith(f"Question: {it['question']}\nAnswer:")
        assert it["prompt"].count("Answer:") == 3


def test_code_items_are_true_next_lines_of_holdout_modules(built):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for it in read_items(built["code"]):
        module, line_no = it["question"].rsplit(".py:", 1)
        assert module in ABILITY_HOLDOUT_MODULES
        lines = (stdlib / f"{module}.py").read_text().splitlines()
        target = lines[int(line_no) - 1]
        assert it["choices"][it["gold"]] == target
        context = it["prompt"].split("\n", 1)[1]
        assert context.endswith("\n") and (context + target + "\n") in "\n".join(lines) + "\n"
        elsewhere = {
            line.strip()
            for m in ABILITY_HOLDOUT_MODULES if m != module
            for line in (stdlib / f"{m}.py").read_text().splitlines()
        }
        indent = target[: len(target) - len(target.lstrip())]
        for j, choice in enumerate(it["choices"]):
            if j != it["gold"]:
                assert choice.strip() != target.strip()
                assert choice.startswith(indent) and not choice[len(indent)].isspace()
                assert choice.strip() in elsewhere


def test_icl_labels_balanced_and_demonstrated(built):
    for name, shots in (("icl", 6), ("icl_topics", 8)):
        items = read_items(built[name])
        labels = items[0]["choices"]
        golds = [it["gold"] for it in items]
        assert sorted(set(golds)) == list(range(len(labels)))
        assert max(golds.count(g) for g in set(golds)) - min(golds.count(g) for g in set(golds)) <= 1
        for it in items:
            demo_labels = re.findall(r"\n(?:Sentiment|Topic): (\w+)\n\n", "\n" + it["prompt"])
            assert len(demo_labels) == shots and sorted(set(demo_labels)) == sorted(labels)
            assert it["question"] not in it["prompt"].rsplit("\n\n", 1)[0]


def test_factual_golds_match_tables(built):
    capitals = dict(tables.CAPITALS)
    units = {(s, b): f for s, b, f in tables.UNIT_CONVERSIONS}
    for it in read_items(built["factual"]):
        answer = it["choices"][it["gold"]]
        capital = re.fullmatch(r"Q: What is the capital of (.+)\?\nA:", it["prompt"])
        if capital:
            assert capitals[capital.group(1)] == answer
        else:
            small, big = re.fullmatch(r"Q: How many (.+) are in one (.+)\?\nA:", it["prompt"]).groups()
            assert str(units[(small, big)]) == answer


def test_bias_pairs_differ_in_one_group_word(built):
    for it in read_items(built["bias"]):
        stereo, anti = it["choices"]
        assert it["gold"] == 0 and it["prompt"] == ""
        a, b = stereo.split(), anti.split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


def test_instruction_checks():
    assert check_instruction("upper", "", "THE SEA IS BLUE.")
    assert not check_instruction("upper", "", "The sea")
    assert check_instruction("lower", "", "the sea, wide")
    assert check_instruction("n_words", "3", " Big blue sea. ")
    assert not check_instruction("n_words", "2", "Big blue sea")
    assert check_instruction("start_word", "Yes", '"Yes," she said')
    assert check_instruction("keyword", "river", "A River runs")
    assert not check_instruction("keyword", "river", "Rivers run")
    assert check_instruction("no_comma", "", "one two")
    assert not check_instruction("no_comma", "", "one, two")
    assert not check_instruction("upper", "", "   ")  # no words: complies with nothing
    with pytest.raises(RephelpersError, match="unknown instruction kind"):
        check_instruction("rhyme", "", "x")
    assert instruction_compliance({"check": "upper", "arg": ""}, ["OK THEN"]) == {"compliance": 1.0}


def test_instruction_items_are_checkable(built):
    for it in read_items(built["instruction"]):
        assert it["check"] in {"upper", "lower", "n_words", "start_word", "keyword", "no_comma"}
        assert it["answer"] in it["prompt"]
    assert ABILITIES["instruction"].chat and built["instruction"].chat


def test_stereotype_preference():
    assert stereotype_preference({"gold": 0}, [(-3.0, False), (-4.0, False)]) == {"pct_stereotype": 1.0}
    assert stereotype_preference({"gold": 0}, [(-5.0, False), (-4.0, False)]) == {"pct_stereotype": 0.0}


def test_bad_requests_fail_early(tmp_path):
    with pytest.raises(RephelpersError, match="unknown abilities"):
        build_tasks(["arithmetic", "poetry"], tmp_path)
    with pytest.raises(RephelpersError, match="items_per_task"):
        build_tasks(["factual"], tmp_path, items_per_task=10_000)
    assert not any(tmp_path.iterdir())


def test_registry_table():
    table = describe_abilities()
    assert set(table.ability) == set(ABILITIES) >= {"arithmetic", "code", "icl", "reasoning", "instruction", "factual", "bias"}
    assert (table.default_items <= table.max_items).all()
