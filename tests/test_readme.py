"""The README read against the code: the names, notebooks, perturbation kinds and commands it
gives must exist. Everything is found by pattern over the whole README, so sections added
later are checked too."""

from __future__ import annotations

import ast
import re
import shlex
import sys
from pathlib import Path

import pytest

from rephelpers.__main__ import build_parser
from rephelpers.runner import ExecutionLimits, available_notebooks, notebook_parameters

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Inline code spans, outside fenced blocks (a fence's lines are commands, checked below).
FENCES = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
PROSE = re.sub(r"```[a-z]*\n.*?```", "", README, flags=re.S)
SPANS = re.findall(r"`([^`\n]+)`", PROSE)
# Keys of other tools' formats the README shows (an lm-eval task YAML's).
EXTERNAL = {"dataset_path", "dataset_kwargs", "data_files"}
SNAKE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")


def _code_text() -> str:
    """Every file a name the README gives could be defined in (not the tests, not the README)."""
    files = [*(ROOT / "rephelpers").rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb"),
             *(ROOT / "papermill_params").glob("*.yaml"), *(ROOT / "scripts").glob("*"),
             *(ROOT / "benchmarks").glob("*.py"), ROOT / "pyproject.toml"]
    return "\n".join(p.read_text(errors="replace") for p in files if p.is_file())


def _yaml_keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(map(str, node)) | set().union(*(_yaml_keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_yaml_keys(v) for v in node)) if node else set()
    return set()


def _parameter_names() -> set[str]:
    """Names a user sets: notebook parameters, run-file keys, execution limits, and the keyword
    parameters of the package's functions (``load_model(..., allow_download=True)``)."""
    import yaml

    names = set().union(*(notebook_parameters(n) for n in available_notebooks()))
    for path in (ROOT / "papermill_params").glob("*.yaml"):
        names |= _yaml_keys(yaml.safe_load(path.read_text()))
    names |= set(ExecutionLimits.__dataclass_fields__)
    for path in (ROOT / "rephelpers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names |= {a.arg for a in node.args.args + node.args.kwonlyargs}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)  # dataclass fields
    return names


def _unknown_settings(spans: list[str], fences: list[str]) -> list[str]:
    # `name: value` and `name=value` spans: a setting a reader will copy into a run file or a call
    # (`name = "value"` with spaces is how the README shows an output column's value, not a setting).
    settings = {m.group(1) for s in spans if (m := re.match(r"^([a-z_][a-z0-9_]*)(?:=|: )\S", s))}
    settings |= {m for block in fences for m in re.findall(r"\b([a-z_][a-z0-9_]*): ", block)}
    assert len(settings) >= 5, settings  # the pattern finds what it should
    return sorted(settings - EXTERNAL - _parameter_names())


def test_parameters_the_readme_sets_exist():
    unknown = _unknown_settings(SPANS, FENCES)
    assert not unknown, f"README sets names that no notebook, run file or function has: {unknown}"


def _missing_names(spans: list[str], code: str) -> list[str]:
    names = {s for s in spans if SNAKE.match(s)}
    names |= {w for s in spans for w in re.findall(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b", s) if "/" not in s and "." not in s}
    assert len(names) >= 30, len(names)
    return sorted(n for n in names if not re.search(rf"\b{re.escape(n)}\b", code))


def test_every_snake_case_name_in_the_readme_exists_in_the_code():
    missing = _missing_names(SPANS, _code_text())
    assert not missing, f"README names that occur nowhere in the code: {missing}"


def _module_path(parts: list[str]) -> tuple[Path | None, list[str]]:
    """The module file a dotted name starts with, below rephelpers/, and the rest of the name."""
    base = ROOT / "rephelpers"
    for i in range(len(parts), 0, -1):
        path = base.joinpath(*parts[:i])
        if path.with_suffix(".py").is_file():
            return path.with_suffix(".py"), parts[i:]
        if (path / "__init__.py").is_file() and i == len(parts):
            return path / "__init__.py", []
    return None, parts


def test_dotted_names_in_the_readme_are_defined_where_it_says():
    dotted = {s.split("(")[0] for s in SPANS
              if re.match(r"^(rephelpers\.)?[a-z_]+(\.[A-Za-z_][A-Za-z0-9_]*)+(\(.*\))?$", s)}
    dotted = {d.removeprefix("rephelpers.") for d in dotted}
    candidates = [d for d in dotted if _module_path(d.split("."))[0] is not None]
    assert len(candidates) >= 5, dotted
    wrong = []
    for name in candidates:
        path, rest = _module_path(name.split("."))
        if not rest:
            continue
        tree = ast.parse(path.read_text())
        top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        top |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        top |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        if rest[0] not in top or any(not re.search(rf"\b{re.escape(r)}\b", path.read_text()) for r in rest[1:]):
            wrong.append(name)
    assert not wrong, f"README names not defined in the module it gives: {sorted(wrong)}"


def test_the_notebooks_the_readme_names_are_the_projects():
    available = available_notebooks()
    named = {s for s in SPANS if re.match(r"^\d\d_[a-z_]+$", s)}
    assert named and not named - set(available), f"README names notebooks that do not exist: {sorted(named - set(available))}"
    unnamed = [n for n in available if n not in README and f"notebook {n[:2]}" not in README]
    assert not unnamed, f"notebooks the README never mentions: {unnamed}"
    # The chain table lists notebooks 01-06 by number, name and in order.
    rows = re.findall(r"^\| (\d\d) \| `(\d\d_[a-z_]+)` \|", README, flags=re.M)
    assert rows and all(num == name[:2] for num, name in rows) and [n for _, n in rows] == sorted(n for _, n in rows)


def test_the_readmes_perturbation_kinds_are_kinds():
    from rephelpers.perturbations.kinds import KINDS

    row = next(line for line in README.splitlines() if line.startswith("| 04 | `04_perturbations`"))
    listed = {s for s in re.findall(r"`([^`]+)`", row) if "." not in s and not s[:2].isdigit()}
    assert listed == set(KINDS), f"the chain table's kinds {sorted(listed)} are not KINDS {sorted(KINDS)}"
    # A kind named anywhere as `perturbation: [...]`/`perturbation=...` must exist too.
    for value in re.findall(r"perturbation[:=]\s*\[?([a-z_, ]+)\]?", README):
        assert {v.strip() for v in value.split(",") if v.strip()} <= set(KINDS), value


def _commands() -> list[str]:
    lines = [ln for block in FENCES for ln in block.splitlines()]
    lines += [s for s in SPANS if s.startswith(("python ", "bash "))]
    return [ln.split(" #")[0].strip() for ln in lines if ln.strip().startswith(("python ", "bash "))]


def test_the_readmes_commands_parse_and_name_files_that_exist():
    commands = _commands()
    assert any("-m rephelpers run" in c for c in commands), commands
    parser = build_parser()
    for command in commands:
        words = shlex.split(command)
        for word in words:
            if re.match(r"^(papermill_params|scripts|benchmarks|tests|notebooks)/[\w./-]+$", word):
                assert (ROOT / word).exists(), f"{command!r}: {word} does not exist"
        if words[:3] == ["python", "-m", "rephelpers"]:
            try:
                parser.parse_args(words[3:])
            except SystemExit:
                pytest.fail(f"README command {command!r} is not accepted by python -m rephelpers")


def test_a_wrong_command_or_name_would_fail_these_checks():
    """The checks can fail: a misspelt flag is refused, an invented name or setting is reported."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "x.yaml", "--jbos", "2"])
    assert _missing_names(SPANS + ["n_contrlz_per_cluster"], _code_text()) == ["n_contrlz_per_cluster"]
    assert _unknown_settings(SPANS + ["n_contrlz: 20"], FENCES + ["items_per_tsk: 60\n"]) == ["items_per_tsk", "n_contrlz"]


def _package_map() -> dict[str, set[str]]:
    """The README's package map: ``{entry: names}``; an entry is a subpackage (``corpus/``) or ``""``
    for the top-level modules. Names are what an entry lists outside parentheses (which hold
    descriptions), separated by commas or semicolons: modules without ``.py`` inside a
    subpackage (``tasks/tables`` for a nested one), ``name.py`` and ``name/`` at top level."""
    block = README.split("## Package layout", 1)[1].split("```\nrephelpers/\n", 1)[1].split("```", 1)[0]
    entries: list[tuple[str, str]] = []
    for line in block.splitlines():
        head = re.match(r"^  (\S.*?)(?:\s{2,}(.*))?$", line)
        if head:
            entries.append((head.group(1), head.group(2) or ""))
        elif line.strip():
            entries[-1] = (entries[-1][0], entries[-1][1] + " " + line.strip())

    def outside_parentheses(text: str) -> str:
        while re.search(r"\([^()]*\)", text):
            text = re.sub(r"\([^()]*\)", "", text)
        return text

    found: dict[str, set[str]] = {"": set()}
    for field, text in entries:
        text = re.sub(r"^\d\d(?:→\d\d)?\s+", "", outside_parentheses(text).strip())
        names = {n.strip() for n in re.split(r"[,;]", text) if n.strip()}
        for name in (n.strip() for n in outside_parentheses(field).split(",")):
            if name.endswith("/"):
                found[name] = names
            else:
                found[""].add(name)
                found[""] |= names
        # a name must be a word (or a path), not prose left outside the parentheses
        assert all(re.fullmatch(r"[A-Za-z_][\w/]*(\.py)?", n) for n in names), (field, names)
    return found


def _package_tree() -> dict[str, set[str]]:
    """The same shape, from the files: each subpackage's modules, the top level's modules and subpackages."""
    root = ROOT / "rephelpers"
    tree: dict[str, set[str]] = {"": {p.name for p in root.glob("*.py") if p.name != "__init__.py"}}
    for package in sorted(p.parent for p in root.glob("*/__init__.py")):
        tree[""].add(package.name + "/")
        tree[package.name + "/"] = {str(p.relative_to(package).with_suffix("")) for p in package.rglob("*.py")
                                    if p.name != "__init__.py"}
    return tree


def test_the_package_map_names_every_module_and_nothing_else():
    readme, tree = _package_map(), _package_tree()
    entries = {name for name in readme if name} | {""}
    readme[""] |= {name for name in readme if name}
    assert set(readme) == set(tree), f"subpackages the map lacks: {sorted(set(tree) - set(readme))}; " \
                                     f"in the map, not in the tree: {sorted(set(readme) - set(tree))}"
    for entry in sorted(entries):
        missing, extra = tree[entry] - readme[entry], readme[entry] - tree[entry]
        assert not missing and not extra, \
            f"README package map, {entry or 'top level'}: not named {sorted(missing)}; named but absent {sorted(extra)}"


def test_the_package_map_check_would_catch_a_missing_or_a_stale_name(monkeypatch):
    tree = _package_tree()
    assert "stage" in tree["corpus/"] and "special_tokens.py" in tree[""] and "tasks/tables" in tree["abilities/"]
    readme = _package_map()
    assert readme["corpus/"] == tree["corpus/"]
    # the parser reads names, not descriptions: a module left out, or a stale one, shows as a difference
    monkeypatch.setattr(sys.modules[__name__], "README", README.replace("), stage (the stage as", "), stages (the stage as"))
    stale = _package_map()["corpus/"]
    assert tree["corpus/"] - stale == {"stage"} and stale - tree["corpus/"] == {"stages"}
