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

from tests import ui_check

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
                               "ngram@custom-3", "sample@custom", "leaderboard", "report",
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
    assert ran_stages(third) == {"ngram@custom-4", "sample@custom", "leaderboard", "report"}
    table = pd.read_csv(repo / "reports" / "leaderboard.csv")
    assert {"kn2", "kn3", "kn4"} <= set(table["model"])
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], repo, env)
    assert "test_ppl" in shown and "kn4" in shown


def test_report_page_and_plots(workspace):
    repo, env, log = workspace
    assert "report" in ran_stages(log)
    page = (repo / "reports" / "leaderboard.html").read_text()
    assert "<h2 id='custom'>" in page and "class=\"best\"" in page
    for model in ["kn2", "kn3", "window", "rnn", "lstm", "lstm2"]:
        assert f"<td>{model}</td>" in page or f"★ {model}</td>" in page
        assert f"<h4>{model}</h4>" in page  # its sample, side by side with the others
    # curves, size, orders (no published reference exists for a custom corpus)
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page  # opens offline
    plots = sorted(p.name for p in (repo / "reports" / "plots").iterdir())
    assert plots == ["custom-curves.png", "custom-orders.png", "custom-size.png"]


def test_learning_curve_plot_has_one_line_per_model(workspace):
    from pipeline.report import load_curves, plot_curves

    repo, _, _ = workspace
    table = pd.read_csv(repo / "reports" / "leaderboard.csv")
    neural = ["window", "rnn", "lstm", "lstm2"]
    curves = load_curves(repo / "reports" / "curves", "custom", neural)
    fig = plot_curves("custom", curves, table)
    by_epoch, by_time = fig.axes
    labels = [line.get_label() for line in by_epoch.lines]
    assert labels[:4] == neural and len(by_time.lines) == 5  # + the best n-gram, dashed
    assert list(by_epoch.lines[0].get_xdata()) == [1, 2]


def test_mlflow_server_serves_every_run_and_curve(workspace):
    repo, env, _ = workspace
    with ui_check.mlflow_server(env["MLFLOW_TRACKING_URI"]) as url:
        experiment = ui_check.rest(url, "experiments/get-by-name?experiment_name=custom")
        runs = ui_check.rest(url, "runs/search", {
            "experiment_ids": [experiment["experiment"]["experiment_id"]]})["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert {"custom/kn2", "custom/kn3", "custom/window", "custom/rnn", "custom/lstm",
                "custom/lstm2", "custom/samples"} <= set(by_name)
        for model in ("window", "rnn", "lstm", "lstm2"):
            run_id = by_name[f"custom/{model}"]["info"]["run_id"]
            history = ui_check.rest(
                url, f"metrics/get-history?run_id={run_id}&metric_key=epoch_valid_ppl")
            assert [m["step"] for m in history["metrics"]] == [1, 2]
        summary = ui_check.rest(url, "experiments/get-by-name?experiment_name=summary")
        runs = ui_check.rest(url, "runs/search", {
            "experiment_ids": [summary["experiment"]["experiment_id"]]})["runs"]
        # one per report rerun (the order change above made one)
        assert {r["info"]["run_name"] for r in runs} == {"summary/leaderboard"}


def test_browser_shows_the_runs_and_the_report(workspace):
    repo, env, _ = workspace
    shots = repo.parent / "screenshots"
    report = (repo / "reports" / "leaderboard.html").as_uri()
    assert "lstm2" in ui_check.page_text(report, wait_ms=2000)
    assert ui_check.screenshot(report, shots / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    with ui_check.mlflow_server(env["MLFLOW_TRACKING_URI"]) as url:
        page = ui_check.experiment_url(url, "custom")
        dom = ui_check.page_text(page)
        for model in ("kn2", "window", "lstm2"):
            assert f"custom/{model}" in dom  # the run table, rendered by the UI's scripts
        assert ui_check.screenshot(page, shots / "mlflow.png").stat().st_size > 10_000


def test_one_param_switches_to_the_paper_preset(workspace):
    repo, env, _ = workspace
    log = run([str(BIN / "dvc"), "exp", "run", "-S", "train.preset=paper"], repo, env)
    # every neural model retrains under the other preset; nothing upstream reruns
    assert {s for s in ran_stages(log) if s.startswith("train@")} == {
        f"train@custom-{m}" for m in ("window", "rnn", "lstm", "lstm2")}
    assert not {s for s in ran_stages(log) if s.startswith(("download@", "prepare@", "ngram@"))}
    lstm2 = json.loads((repo / "reports" / "metrics" / "custom" / "lstm2.json").read_text())
    assert lstm2["preset"] == "paper" and lstm2["epochs"] == 3
