"""The layout stays one a newcomer can change safely (issue 22):

- stages apart from the library: nothing outside pipeline/stages/ imports from it, but a
  test may import a stage's `main` alone (to test its command line in-process);
- entry points that read in one screen: no function in pipeline/ over MAX_FUNCTION_LINES;
- no module in pipeline/ over MAX_MODULE_LINES (split a larger one along a real seam).

Import circles are tests/test_stage_deps.py's. Sizes are counted as the ast sees them
(a function from its `def` to its last line, decorators aside; a module in lines).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.imports import PACKAGE, ROOT

MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
STAGES = PACKAGE / "stages"
PYTHON_DIRS = ("pipeline", "benchmarks", "tests")  # every Python folder of the repository


def modules(*folders: str) -> list[Path]:
    return sorted(f for folder in folders for f in (ROOT / folder).rglob("*.py"))


def stage_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of each import of pipeline.stages in the module at `path`
    (names: those a `from ... import` takes; [] for `import pipeline.stages...`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names
                      if a.name.startswith("pipeline.stages")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("pipeline.stages"):
                found.append((node.lineno, node.module, [a.name for a in node.names]))
            elif node.module == "pipeline" and any(a.name == "stages" for a in node.names):
                found.append((node.lineno, "pipeline.stages", ["*"]))
    return found


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_nothing_outside_a_stage_imports_from_the_stages():
    wrong = []
    for path in modules(*PYTHON_DIRS):
        if path.is_relative_to(STAGES):
            continue
        for line, module, names in stage_imports(path):
            # a test of a stage's command line may take its main(), and nothing else
            if not (path.is_relative_to(ROOT / "tests") and module.count(".") == 2
                    and names == ["main"]):
                wrong.append(f"{where(path, line)}: {module} {names}")
    assert not wrong, ("import from pipeline.stages outside a stage (move what is shared "
                       f"into a library module of pipeline/): {wrong}")


def test_no_function_in_the_pipeline_is_over_the_limit():
    long = []
    for path in modules("pipeline"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{where(path, node.lineno)} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("module", [f.relative_to(ROOT).as_posix() for f in modules("pipeline")])
def test_no_module_in_the_pipeline_is_over_the_limit(module):
    lines = len((ROOT / module).read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines (at most {MAX_MODULE_LINES})"


def test_a_stage_module_is_its_command_line():
    """A stage holds argument parsing, main() and the resolving of paths and params: a
    function of some other kind (the work) belongs in a library module."""
    for path in STAGES.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path.name == "__init__.py":
            continue
        names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert "main" in names, f"{path.name}: no main()"
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        assert not classes, f"{path.name} defines {classes}: a library module's"
