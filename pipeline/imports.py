"""Which pipeline modules a module imports, read from its source (never executed).

Every import statement counts, a lazy one inside a function included: a stage runs
the code it imports there too. Two readers need the answer and must agree with
each other: tests/test_stage_deps.py checks each dvc.yaml stage's module deps
against it, and the resume fingerprint (pipeline/resume.py) hashes the
source of every module the training loop uses.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # pipeline/
ROOT = PACKAGE.parent  # where `import pipeline.x` resolves from


def direct_imports(path: Path) -> set[Path]:
    """The pipeline modules (files) that the module at `path` imports anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):  # every node: function-level imports too
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"{path}:{node.lineno}: a relative import; write it as "
                                 "`from pipeline.<module> import ...`")
            # `from pipeline import tracking` names a module; `from pipeline.x import y`, x
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return {file for name in names if (file := module_file(name)) is not None}


def module_file(name: str) -> Path | None:
    """The source file of module `name` if it is a module of this package, else None
    (packages' __init__.py files are empty markers, not modules a stage depends on)."""
    if name.split(".")[0] != PACKAGE.name:
        return None
    file = ROOT.joinpath(*name.split(".")).with_suffix(".py")
    return file if file.is_file() else None


def imported_closure(path: Path) -> set[Path]:
    """`path` and every pipeline module it imports, directly or through another."""
    seen, todo = {path}, [path]
    while todo:
        for file in direct_imports(todo.pop()) - seen:
            seen.add(file)
            todo.append(file)
    return seen
