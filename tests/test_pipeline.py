"""The real pipeline: `dvc repro` in a temporary copy of the repository, on a small
custom corpus cut from PTB, tracked in a temporary MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{cmd} failed:\n{output[-4000:]}"
    return output


def ran_stages(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("pipeline")
    repo = root / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and name != "dvc.lock":
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    # a small corpus: the first lines of each PTB split
    corpus = root / "mini-ptb"
    corpus.mkdir()
    for split, n in [("train", 4000), ("valid", 400), ("test", 400)]:
        lines = (mirror / "ptb" / f"ptb.{split}.txt").read_text().splitlines(keepends=True)
        (corpus / f"{split}.txt").write_text("".join(lines[:n]))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpora"] = ["custom"]
    params["download"]["custom_path"] = str(corpus)
    params["ngram"]["orders"] = [2, 3]
    # neural models as small as they come: this checks the plumbing, not the quality
    for preset in params["train"]["presets"].values():
        for model in params["train"]["models"]:
            preset[model].update(embedding_size=16, hidden_size=16, epochs=2,
                                 time_budget_s=0, batch_size=16, bptt=20)
        preset["overrides"] = {}
    params["train"]["presets"]["paper"]["lstm2"]["epochs"] = 3  # tell the presets apart
    params["sample"]["words"] = 12
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    env.pop("LMB_MIRROR", None)
    run(["git", "init", "-q"], repo, env)
    first = run([str(BIN / "dvc"), "repro"], repo, env)
    # `dvc exp run` needs a commit to branch from
    run(["git", "add", "-A"], repo, env)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm",
         "pipeline run"], repo, env)
    return repo, env, first


def test_repro_builds_the_leaderboard(workspace):
    repo, _, log = workspace
    neural = {"window", "rnn", "lstm", "lstm2"}
    assert ran_stages(log) == {"download@custom", "prepare@custom", "ngram@custom-2",
                               "ngram@custom-3", "sample@custom", "leaderboard",
                               *(f"train@custom-{m}" for m in neural)}
    table = pd.read_csv(repo / "reports" / "leaderboard.csv")
    assert set(table["model"]) == {"kn2", "kn3", *neural}
    assert list(table["test_ppl"]) == sorted(table["test_ppl"])
    # the perplexity contract: every model predicted the same tokens
    assert table["test_tokens"].nunique() == 1 and table["valid_tokens"].nunique() == 1
    neural_rows = table[table["model"].isin(neural)]
    assert (neural_rows["epochs"] == 2).all() and (neural_rows["device"] == "cpu").all()
    curve = json.loads((repo / "reports" / "curves" / "custom" / "lstm2.json").read_text())
    assert [r["epoch"] for r in curve] == [1, 2]
    samples = (repo / "reports" / "samples" / "custom.md").read_text()
    assert all(f"## {m}" in samples for m in ["kn2", "kn3", *neural])
    assert (table["test_ppl"] > 1).all() and (table["test_ppl"] < 10_000).all()
    assert "## custom" in (repo / "reports" / "leaderboard.md").read_text()
    assert not list(repo.rglob(".tmp-*"))


def test_mlflow_holds_one_run_per_model(workspace):
    from mlflow.tracking import MlflowClient

    _, env, _ = workspace
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("custom")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["custom/kn2", "custom/kn3", "custom/lstm", "custom/lstm2",
                            "custom/rnn", "custom/samples", "custom/window"])
    lstm2 = next(r for r in runs if r.info.run_name == "custom/lstm2")
    curve = client.get_metric_history(lstm2.info.run_id, "epoch_valid_ppl")
    assert sorted(m.step for m in curve) == [1, 2]
    assert len(client.get_metric_history(lstm2.info.run_id, "test_ppl")) == 1
    for r in runs:
        if r.data.tags["family"] != "ngram":
            continue
        assert r.data.tags["corpus"] == "custom"
        assert r.data.tags["dvc_stage"] == f"ngram@custom-{r.data.tags['model'][2:]}"
        assert r.data.metrics["test_ppl"] > 1
        assert r.info.status == "FINISHED"


def test_second_repro_reruns_nothing_and_new_order_reruns_only_its_stages(workspace):
    repo, env, _ = workspace
    second = run([str(BIN / "dvc"), "repro"], repo, env)
    assert ran_stages(second) == set()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ngram"]["orders"] = [2, 3, 4]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run([str(BIN / "dvc"), "repro"], repo, env)
    assert ran_stages(third) == {"ngram@custom-4", "sample@custom", "leaderboard"}
    table = pd.read_csv(repo / "reports" / "leaderboard.csv")
    assert {"kn2", "kn3", "kn4"} <= set(table["model"])
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], repo, env)
    assert "test_ppl" in shown and "kn4" in shown


def test_one_param_switches_to_the_paper_preset(workspace):
    repo, env, _ = workspace
    log = run([str(BIN / "dvc"), "exp", "run", "-S", "train.preset=paper"], repo, env)
    # every neural model retrains under the other preset; nothing upstream reruns
    assert {s for s in ran_stages(log) if s.startswith("train@")} == {
        f"train@custom-{m}" for m in ("window", "rnn", "lstm", "lstm2")}
    assert not {s for s in ran_stages(log) if s.startswith(("download@", "prepare@", "ngram@"))}
    lstm2 = json.loads((repo / "reports" / "metrics" / "custom" / "lstm2.json").read_text())
    assert lstm2["preset"] == "paper" and lstm2["epochs"] == 3
