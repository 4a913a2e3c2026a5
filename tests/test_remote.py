"""Shared DVC storage: what one machine built is pushed once to a DVC remote and pulled on
another instead of being rebuilt.

In a temporary copy of the repository with the tiny configuration (tests/conftest.py TINY:
the synthetic corpus, a KN 2-gram and a small RNN), `dvc repro` of the stages that build
what is worth sharing (download, prepare, ngram, train: the per-corpus and summary stages
on top only read them and cost CI time, not coverage), then commit (dvc.lock and the
`cache: false` outputs, reports/metrics and the curves, live in git) and `dvc push` to a
remote that is a local folder (S3 or SSH for users: notes-team.md). A `git clone` of that
copy has neither DVC's cache nor any cached output; after `dvc pull` there, `dvc status` is
clean, `dvc repro` runs no stage (and so opens no MLflow store), and every output equals
the first machine's byte for byte: the raw and prepared corpus, the n-gram binary, the
trained model and its resume point (a `persist: true` out, which `dvc repro` needs as much
as the model: without it the train stage would rerun). 30 to 70 s on 2 cores.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests import regression
from tests.conftest import GIT, TINY, tiny_workspace
from tests.regression import BIN, ran_stages, run

pytestmark = pytest.mark.slow
DVC = str(BIN / "dvc")




def outs(repo: Path) -> list[str]:
    """Every output of the stages that ran, from dvc.lock (cached or not)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return sorted(out["path"] for stage in lock["stages"].values()
                  for out in stage.get("outs", []))


def digests(repo: Path, folders: tuple[str, ...] = ("data", "models", "reports")) -> dict:
    """relative path -> sha256 of every file under `folders` (what the pipeline wrote)."""
    return {str(path.relative_to(repo)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted((repo / folder).rglob("*"))
            if path.is_file()}


def test_pull_on_another_clone_instead_of_rebuilding(tmp_path, mirror):
    first, env = tiny_workspace(tmp_path / "first", mirror)
    corpus, model = TINY["corpora"][0], TINY["train"]["models"][0]
    targets = [f"ngram@{corpus}-2", f"train@{corpus}-{model}"]
    remote = tmp_path / "remote"  # for users: s3://bucket/path or ssh://host/path
    run([DVC, "remote", "add", "--default", "shared", str(remote)], first, env)
    built = regression.repro(first, env, *targets)
    log = built.stdout + built.stderr
    assert built.returncode == 0, f"dvc repro failed:\n{log[-4000:]}"
    assert ran_stages(log) == {f"download@{corpus}", f"prepare@{corpus}", *targets}
    # what git holds in real use: the code, params, dvc.lock, .dvc/config (the remote)
    # and the `cache: false` outputs (metrics, curves, samples, reports)
    run([*GIT, "add", "-A"], first)
    run([*GIT, "commit", "-qm", "tiny pipeline"], first)
    pushed = run([DVC, "push"], first, env)
    assert "pushed" in pushed and remote.is_dir()

    # another machine: a clone of the git repository, nothing of DVC's
    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    assert not (second / ".dvc" / "cache").exists()
    in_git = {out for out in outs(first) if (second / out).exists()}
    cached = set(outs(first)) - in_git
    assert cached == {f"data/raw/{corpus}", f"data/prepared/{corpus}", f"models/{corpus}/kn2.bin",
                      f"models/{corpus}/{model}.pt", f"models/{corpus}/{model}.ckpt"}
    assert {f"reports/metrics/{corpus}/kn2.json", f"reports/metrics/{corpus}/{model}.json"} \
        <= in_git  # `cache: false`: git carries them
    store = tmp_path / "second-mlflow.db"
    env2 = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    before = run([DVC, "status", *targets], second, env2)
    assert "deleted" in before  # without the pull, repro would rebuild them

    pulled = run([DVC, "pull"], second, env2)
    assert "fetched" in pulled or "added" in pulled, pulled
    status = run([DVC, "status", *targets], second, env2)
    assert "Data and pipelines are up to date" in status, status
    again = run([DVC, "repro", *targets], second, env2)
    assert ran_stages(again) == set(), again
    assert not store.exists()  # no stage ran, so none opened the tracking store
    assert digests(second) == digests(first)
