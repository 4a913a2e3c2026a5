"""Shared fixtures: the offline corpus mirror, prepared real corpora, and one run of the
regression pipeline that the pipeline, regression and fault tests share."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.encoding import CustomCorpusParams, PrepareParams, prepare_corpus
from pipeline.fetch import DownloadParams, download_corpus
from pipeline.params import load_section

REPO = Path(__file__).resolve().parents[1]


def mirror_path() -> Path:
    """The corpora mirror: $LMB_MIRROR, else a `shared/corpora` beside the checkout."""
    path = Path(os.environ.get("LMB_MIRROR") or REPO.parent / "shared" / "corpora")
    if not (path / "ptb" / "ptb.train.txt").is_file():
        pytest.fail(f"the tests need the corpora mirror; none at {path} (set LMB_MIRROR)")
    return path


@pytest.fixture(scope="session")
def mirror() -> Path:
    return mirror_path()


@pytest.fixture
def no_mirror(monkeypatch):
    monkeypatch.delenv("LMB_MIRROR", raising=False)


def download_params(mirror: str = "", custom_path: str = "", **synthetic) -> DownloadParams:
    """The repository's download params with these values (and `synthetic` changes)."""
    defaults = load_section("download", DownloadParams, REPO / "params.yaml")
    return dataclasses.replace(defaults, mirror=mirror, custom_path=custom_path,
                               synthetic=dataclasses.replace(defaults.synthetic, **synthetic))


PREPARE_PARAMS = PrepareParams(custom=CustomCorpusParams(level="word", ratios=(0.8, 0.1, 0.1),
                                                         min_count=1))


def write_custom_splits(folder: Path, train: str, valid: str, test: str) -> Path:
    """A `custom` corpus folder with the three split files."""
    folder.mkdir(parents=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text)
    return folder


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, mirror):
    """prepare(name) -> folder of the real corpus `name`, downloaded from the mirror."""
    root = tmp_path_factory.mktemp("corpora")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            raw = download_corpus(name, root / "raw" / name, download_params(str(mirror)))
            cache[name] = root / "prepared" / name
            prepare_corpus(name, raw, cache[name], PREPARE_PARAMS)
        return cache[name]

    return get


@dataclasses.dataclass(frozen=True)
class PipelineRun:
    repo: Path  # read only: a test that changes the workspace works on a clone()
    env: dict
    log: str  # what the first `dvc repro` printed
    values: dict  # tests.regression.collect() right after it
    template: Path  # an untouched copy of repo, for clone()

    def clone(self, dest: Path, mlflow_uri: str | None = None) -> tuple[Path, dict]:
        """A copy of the freshly run workspace (git history, DVC cache and outputs) with its
        own MLflow store (None: the default one inside the copy)."""
        shutil.copytree(self.template, dest, symlinks=True)
        env = {k: v for k, v in self.env.items() if k != "MLFLOW_TRACKING_URI"}
        if mlflow_uri:
            env["MLFLOW_TRACKING_URI"] = mlflow_uri
        return dest, env


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, mirror) -> PipelineRun:
    """`dvc repro` of the regression configuration (tests/regression.yaml), once per session,
    committed (dvc exp needs a commit). No test changes it: a test that changes the
    workspace works on a clone(). LMB_PIPELINE_RUN=<folder> reuses the run that
    `python -m tests.regression --keep <folder>` left there (when iterating on tests)."""
    from tests import regression

    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    kept = os.environ.get("LMB_PIPELINE_RUN")
    if kept:
        root = Path(kept).resolve()
        repo, env, log = root / "repo", regression.workspace_env(root), \
            (root / "repro.log").read_text()
    else:
        root = tmp_path_factory.mktemp("pipeline")
        repo, env = regression.make_workspace(root, mirror)
        done = regression.repro(repo, env)
        log = done.stdout + done.stderr
        assert done.returncode == 0, f"dvc repro failed:\n{log[-4000:]}"
    template = root / "template"
    if not template.exists():
        subprocess.run([*git, "add", "-A"], cwd=repo, check=True, capture_output=True)
        subprocess.run([*git, "commit", "-qm", "pipeline run"], cwd=repo, check=True)
        shutil.copytree(repo, template, symlinks=True)
    return PipelineRun(repo, env, log, regression.collect(repo), template)


# The smallest whole pipeline, for the tests that run it end to end somewhere other than
# the shared run (tests/test_team_server.py: into a tracking server; tests/test_remote.py:
# through a DVC remote): the synthetic corpus, one n-gram and one small network (the
# regression's sizes, tests/regression.yaml), and every per-corpus and summary stage on top
# of them, with the analyses cut down to a few windows.
TINY = {
    "corpora": ["synthetic"],
    "download": {"synthetic": {"tokens": [20000, 2000, 2000]}},
    "ngram": {"orders": [2]},
    "train": {"models": ["rnn"]},
    "analyse": {"gradients": {"distance": 10, "windows": 4, "warmup": 10, "batch": 4},
                "context": {"lengths": [1, 2, 5], "targets": 50, "span": 1000,
                            "batch_tokens": 2000}},
}
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def tiny_workspace(root: Path, mirror: Path) -> tuple[Path, dict]:
    """tests.regression.make_workspace() with TINY merged over its params: a git-initialised
    copy of the repository under root/repo and the environment to run DVC in (its MLflow
    store: root/mlflow.db, unless the caller sets MLFLOW_TRACKING_URI)."""
    import yaml

    from tests import regression

    repo, env = regression.make_workspace(root, mirror)
    params = regression.merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo, env
