"""The layout's contracts, checked from the code itself: the stage table agrees with dvc.yaml, each stage's DVC code
deps are exactly the project modules it runs, no stage imports another, and project imports form no cycle.

Imports are read with `ast`, inside functions too (only `if TYPE_CHECKING:` blocks, which never run, are skipped);
a module that runs a sibling file as a program (`Path(__file__).with_name("jail.py")`) depends on that file as well.
`python -m tests.unit.test_layout` prints the code deps each stage should list.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from llmops.common.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("llmops", "tasks", "flows")

pytestmark = pytest.mark.unit


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    """Dotted names a module imports (a `from X import y` gives X.y and X; the resolver keeps what is a module)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _module_file(name: str) -> Path | None:
    """The project file a dotted module name loads: package/module.py or package/__init__.py; None outside the project."""
    if name.split(".")[0] not in CODE_DIRS:
        return None
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts if rel.name == "__init__" else parts[:-1])


def _programs_run(tree: ast.AST, path: Path) -> list[Path]:
    """Sibling files a module runs as programs: `Path(__file__).with_name("x.py")`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "with_name" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.endswith(".py") and (path.parent / arg.value).is_file():
                found.append(path.parent / arg.value)
    return found


@cache
def direct_deps(path: Path) -> frozenset[Path]:
    """Project files that `path` imports (or runs), with the parent packages each import loads."""
    tree = ast.parse(path.read_text(), filename=str(path))
    deps: set[Path] = set(_programs_run(tree, path))
    for name in _imported_names(tree, _package_of(path)):
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
            if (found := _module_file(".".join(parts[:i]))) is not None:
                deps.add(found)
    deps.discard(path)
    return frozenset(deps)


def closure(path: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(direct_deps(current))
    return seen


def runs_code(path: Path) -> bool:
    """False for an `__init__.py` that holds nothing but its docstring (importing it executes nothing)."""
    body = ast.parse(path.read_text()).body
    return not (path.name == "__init__.py" and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body))


def code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))


def stage_code(stage: str) -> set[Path]:
    """The project files `dvc repro <stage>` runs: the stage module and everything it imports, docstring-only packages aside."""
    return {p for p in closure(ROOT / "tasks" / f"{stage}.py") if runs_code(p)}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def split_deps(deps: list[str]) -> tuple[list[str], list[str]]:
    """(code deps, data deps) of a dvc.yaml stage."""
    code = [d for d in deps if d.split("/")[0] in CODE_DIRS]
    return code, [d for d in deps if d not in code]


def dep_problems(stage: str, deps: list[str]) -> list[str]:
    code_deps, _ = split_deps(deps)
    needed = stage_code(stage)
    problems = []
    covered: set[Path] = set()
    for dep in code_deps:
        target = ROOT / dep
        if target.is_dir():
            files = {p for p in target.rglob("*.py") if runs_code(p)}
            if unused := sorted(rel(p) for p in files - needed):
                problems.append(f"{stage}: dep {dep}/ is a folder the stage does not wholly run (unused: {', '.join(unused)})")
            covered |= files
        elif target.is_file():
            if target not in needed:
                problems.append(f"{stage}: dep {dep} is code the stage does not run")
            covered.add(target)
        else:
            problems.append(f"{stage}: dep {dep} does not exist")
    if missing := sorted(rel(p) for p in needed - covered):
        problems.append(f"{stage}: code the stage runs is not in its deps: {', '.join(missing)}")
    return problems


def test_stage_table_and_dvc_yaml_declare_the_same_stages():
    assert list(dvc_stages()) == list(STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_table_matches_dvc_yaml(name):
    stage, declared = STAGES[name], dvc_stages()[name]
    assert declared["cmd"] == f"llmops stage {name}"
    assert tuple(declared.get("params") or ()) == stage.params
    assert tuple(split_deps(declared.get("deps") or [])[1]) == stage.inputs
    outs = [out if isinstance(out, str) else next(iter(out)) for out in declared.get("outs") or ()]
    metrics_file = f"${{paths.metrics}}/{stage.metrics}"
    if stage.dvc_metric:
        assert tuple(outs) == stage.outputs
        assert [next(iter(m)) for m in declared.get("metrics") or []] == [metrics_file]
    else:  # one metrics file per dvc.yaml (summary's): the stage files are plain outputs, never cached
        assert tuple(outs) == (*stage.outputs, metrics_file)
        assert declared["outs"][-1] == {metrics_file: {"cache": False}}
        assert "metrics" not in declared


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_code_deps_are_exactly_the_code_each_stage_runs(name):
    assert dep_problems(name, dvc_stages()[name]["deps"]) == []


def test_a_missing_or_unused_code_dep_is_caught():
    """The check itself fails on the two mistakes it exists for."""
    deps = dvc_stages()["pretrain"]["deps"]
    dropped = [d for d in deps if d != "llmops/training/runtime.py"]
    assert any("not in its deps: llmops/training/runtime.py" in p for p in dep_problems("pretrain", dropped))
    assert any("llmops/serving" in p and "does not wholly run" in p for p in dep_problems("pretrain", [*deps, "llmops/serving"]))
    assert any("does not run" in p for p in dep_problems("ingest", [*dvc_stages()["ingest"]["deps"], "llmops/params/serve.py"]))


def test_no_stage_module_imports_another_stage():
    for name in STAGES:
        others = {rel(p) for p in stage_code(name) if p.parent == ROOT / "tasks" and p.stem != name}
        assert not others, f"tasks/{name}.py runs {sorted(others)}: shared code belongs in llmops/"


def test_package_inits_hold_only_a_docstring():
    """So importing a package runs nothing, and they are rightly left out of every stage's deps."""
    assert [rel(p) for p in code_files() if not runs_code(p)] == [rel(p) for p in code_files() if p.name == "__init__.py"]


def find_cycle(files: list[Path]) -> list[str]:
    import networkx as nx

    graph = nx.DiGraph()
    for path in files:
        graph.add_node(rel(path))
        graph.add_edges_from((rel(path), rel(dep)) for dep in direct_deps(path) if dep.name != "__init__.py" or runs_code(dep))
    try:
        return [a for a, _ in nx.find_cycle(graph)]
    except nx.NetworkXNoCycle:
        return []


def test_project_imports_form_no_cycle():
    assert find_cycle(code_files()) == []


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    a, b = ROOT / "llmops/common/errors.py", ROOT / "llmops/common/io.py"
    real = direct_deps.__wrapped__

    def with_back_edge(path: Path) -> frozenset[Path]:
        return real(path) | ({b} if path == a else set())

    monkeypatch.setattr(sys.modules[__name__], "direct_deps", with_back_edge)
    assert set(find_cycle([a, b])) == {"llmops/common/errors.py", "llmops/common/io.py"}


def expected_deps(stage: str) -> list[str]:
    return sorted(rel(p) for p in stage_code(stage))


if __name__ == "__main__":
    for name in STAGES:
        print(f"{name}:")
        for dep in expected_deps(name):
            print(f"      - {dep}")
