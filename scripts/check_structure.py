"""The package's shape: import cycles (imports inside functions included), long functions, long modules.

Reads every module of ``rephelpers`` with :mod:`ast` (nothing is imported or run), builds the
graph "module A imports module B" from every ``import``/``from … import`` statement wherever it
stands (top level, inside a function, under ``if TYPE_CHECKING``), and reports

- each strongly connected component of more than one module (an import cycle), with one
  edge that closes it and the line it is on;
- stage-order inversions: a stage's subpackage importing a later stage's
  (``corpus`` 01 → ``representations`` 02 → ``interventions`` (shared by 03-05) → ``dimensions`` 03 → ``perturbations`` 04 →
  ``abilities`` 05 → ``estimators`` → ``influence`` 06 → ``testbed`` 07 → ``views``);
- functions longer than ``--max-function`` lines and modules longer than ``--max-module``.

    python scripts/check_structure.py [--max-function 120] [--max-module 800] [--json]

Exit status 1 when anything is reported, so a test can run it.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "rephelpers"
STAGES = ("corpus", "representations", "interventions", "dimensions", "perturbations", "abilities", "estimators", "influence",
          "testbed", "views")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path) -> tuple[dict[str, list[tuple[str, int]]], dict[str, Path]]:
    """``module → [(imported module, line)]`` over the package, and each module's file."""
    files = {module_name(p, root.parent): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, is_package)
                # `from pkg import mod` imports a submodule when pkg.mod is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # `import a.b.c` where only a.b is a module
                    target = target.rpartition(".")[0]
                if target and target != module and target.startswith(PACKAGE) and (target, node.lineno) not in graph[module]:
                    graph[module].append((target, node.lineno))
    return graph, files


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else None


def inversions(graph: dict[str, list[tuple[str, int]]]) -> list[dict]:
    out = []
    for module, edges in sorted(graph.items()):
        for target, line in edges:
            a, b = _stage(module), _stage(target)
            if a is not None and b is not None and b > a:
                out.append({"module": module, "imports": target, "line": line})
    return out


def long_functions(files: dict[str, Path], limit: int) -> list[dict]:
    out = []
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append({"module": module, "function": node.name, "line": node.lineno, "lines": lines})
    return sorted(out, key=lambda r: -r["lines"])


def long_modules(files: dict[str, Path], limit: int) -> list[dict]:
    sizes = [{"module": m, "lines": len(p.read_text().splitlines())} for m, p in files.items()]
    return sorted((s for s in sizes if s["lines"] > limit), key=lambda r: -r["lines"])


def check(root: Path, max_function: int = 120, max_module: int = 800) -> dict:
    graph, files = imports(root)
    report = {
        "cycles": [],
        "stage_inversions": inversions(graph),
        "long_functions": long_functions(files, max_function),
        "long_modules": long_modules(files, max_module),
    }
    for component in cycles(graph):
        members = set(component)
        edges = [{"module": m, "imports": t, "line": line}
                 for m in component for t, line in graph[m] if t in members]
        report["cycles"].append({"modules": component, "edges": edges})
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / PACKAGE))
    parser.add_argument("--max-function", type=int, default=120)
    parser.add_argument("--max-module", type=int, default=800)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = check(Path(args.root), args.max_function, args.max_module)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for c in report["cycles"]:
            print("cycle:", " ↔ ".join(c["modules"]))
            for e in c["edges"]:
                print(f"    {e['module']}:{e['line']} imports {e['imports']}")
        for e in report["stage_inversions"]:
            print(f"stage order: {e['module']}:{e['line']} imports the later {e['imports']}")
        for f in report["long_functions"]:
            print(f"long function: {f['module']}.{f['function']} (line {f['line']}): {f['lines']} lines")
        for m in report["long_modules"]:
            print(f"long module: {m['module']}: {m['lines']} lines")
    return 1 if any(report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
