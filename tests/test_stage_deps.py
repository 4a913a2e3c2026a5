"""dvc.yaml lists, as each stage's deps, exactly the pipeline modules its code imports
(transitively, lazy imports in functions included), so that `dvc repro` reruns a stage
whenever code it runs changed, and only then. Other deps must be read by the stage: a
data path its command line names, or a data file under pipeline/ that its code opens."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.imports import PACKAGE, ROOT, direct_imports, imported_closure

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
# data files under pipeline/ (not modules) a stage may depend on: stage -> {dep: the name
# its code opens it by}; the name must occur as a string in a module the stage imports
DATA_FILES = {"download": {"pipeline/checksums": "checksums"}}


def body(stage: str) -> dict:
    """The stage's definition (foreach stages keep it under `do`)."""
    return STAGES[stage].get("do", STAGES[stage])


def entry_module(stage: str) -> Path:
    """The module its command runs: `python -m pipeline.stages.<stage> ...`."""
    match = re.search(r"python -m pipeline\.stages\.(\w+)", body(stage)["cmd"])
    assert match, f"{stage}: the command does not run `python -m pipeline.stages.<stage>`"
    assert match.group(1) == stage, f"{stage}: runs the entry point of {match.group(1)}"
    return PACKAGE / "stages" / f"{match.group(1)}.py"


def relative(files: set[Path]) -> set[str]:
    return {file.relative_to(ROOT).as_posix() for file in files}


def listed_modules(stage: str) -> set[str]:
    return {dep for dep in body(stage)["deps"] if dep.endswith(".py")}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_list_every_module_the_stage_imports(stage):
    imported = relative(imported_closure(entry_module(stage)))
    missing = sorted(imported - listed_modules(stage))
    assert not missing, f"{stage} imports {missing} but dvc.yaml does not list them as deps"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_list_no_module_the_stage_does_not_import(stage):
    imported = relative(imported_closure(entry_module(stage)))
    extra = sorted(listed_modules(stage) - imported)
    assert not extra, f"{stage} lists {extra} in dvc.yaml but does not import them"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_other_deps_are_read_by_the_stage(stage):
    deps = body(stage)["deps"]
    assert len(deps) == len(set(deps)), f"{stage}: a dep listed twice"
    sources = "".join(f.read_text(encoding="utf-8")
                      for f in imported_closure(entry_module(stage)))
    for dep in deps:
        if dep.endswith(".py"):
            continue
        if dep.startswith(f"{PACKAGE.name}/"):
            name = DATA_FILES.get(stage, {}).get(dep)
            assert name is not None, f"{stage}: {dep} is neither a module nor an allowed file"
            assert f'"{name}"' in sources, f"{stage}: no module it imports opens {dep}"
        else:  # a stage output upstream: the stage reads the paths its command names
            assert dep in body(stage)["cmd"], f"{stage}: {dep} is not on its command line"


@pytest.mark.parametrize("module", sorted(f.relative_to(PACKAGE).as_posix()
                                          for f in PACKAGE.rglob("*.py")))
def test_no_module_imports_itself_through_another(module):
    """No import circle (lazy imports included): each module's deps end below it."""
    path = PACKAGE / module
    circles = sorted(dep.name for dep in direct_imports(path) if path in imported_closure(dep))
    assert not circles, f"{module} and {circles} import each other"


def test_every_stage_entry_point_is_a_dvc_stage():
    """pipeline/stages/ holds the entry points of dvc.yaml's stages, and nothing else."""
    entries = {f.stem for f in (PACKAGE / "stages").glob("*.py")} - {"__init__"}
    assert entries == set(STAGES)


def test_package_markers_are_empty():
    """The deps leave out __init__.py files: that is right only while they hold no code."""
    for marker in PACKAGE.rglob("__init__.py"):
        assert not marker.read_text(encoding="utf-8").strip(), f"{marker} holds code"
