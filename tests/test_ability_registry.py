"""The ability registry: the suite never imports the testbed, yet finds its planted abilities by name."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from rephelpers.abilities import suite
from rephelpers.errors import RephelpersError


def test_the_suite_alone_registers_no_planted_ability_and_loads_them_by_name(tmp_path):
    # a fresh interpreter, as a stage-05 kernel of the testbed's chain is: it imports only the suite
    code = (
        "import sys; from rephelpers.abilities import suite\n"
        "print(any(n.startswith('planted_') for n in suite.ABILITIES), 'rephelpers.testbed.planted' in sys.modules)\n"
        f"tasks = suite.build_tasks(['planted_glyph', 'icl'], {str(tmp_path)!r}, items_per_task=4, seed=0)\n"
        "print(sorted(tasks), len(suite.read_items(tasks['planted_glyph'])), 'rephelpers.testbed.planted' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split("\n")[:2] == ["False False", "['icl', 'planted_glyph'] 4 True"]


def test_ability_spec_finds_planted_abilities_and_refuses_unknown_names():
    from rephelpers.testbed import planted

    assert suite.ability_spec("planted_facts") is planted.PLANTED["facts"].ability
    assert suite.ability_spec("planted_nonesuch") is None and suite.ability_spec("nonesuch") is None
    with pytest.raises(RephelpersError, match=r"unknown abilities \['planted_nonesuch'\]"):
        suite.build_tasks(["planted_nonesuch"], "unused")


def test_register_ability_keeps_one_definition_per_name():
    spec = suite.ABILITIES["icl"]
    assert suite.register_ability(spec) is spec and suite.ABILITIES["icl"] is spec
    with pytest.raises(RephelpersError, match="'icl' is already registered with another definition"):
        suite.register_ability(dataclasses.replace(spec, max_items=spec.max_items + 1))
    assert suite.ABILITIES["icl"] is spec
