"""The real pipeline: `dvc repro` of the regression configuration (the synthetic corpus
and a PTB slice as `custom`; see tests/regression.yaml) in a temporary copy of the
repository, tracked in a temporary MLflow store. The tests below share that workspace
and run in file order: later ones change it (a new n-gram order, the small preset)."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import yaml

from tests import ui_check
from tests.regression import BIN

CORPORA = ("synthetic", "custom")
NEURAL = ("window", "rnn", "lstm", "lstm2")


def run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{cmd} failed:\n{output[-4000:]}"
    return output


def ran_stages(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


def each_corpus(*stages: str) -> set[str]:
    """'ngram@{}-2' -> {'ngram@synthetic-2', 'ngram@custom-2'}"""
    return {stage.format(corpus) for stage in stages for corpus in CORPORA}


@pytest.fixture(scope="module")
def workspace(pipeline_run):
    return pipeline_run.repo, pipeline_run.env, pipeline_run.log


def test_repro_builds_the_leaderboard(workspace):
    repo, _, log = workspace
    assert ran_stages(log) == {"leaderboard", "report", *each_corpus(
        "download@{}", "prepare@{}", "ngram@{}-2", "ngram@{}-3", "sample@{}",
        *(f"train@{{}}-{m}" for m in NEURAL))}
    everything = pd.read_csv(repo / "reports" / "leaderboard.csv")
    assert list(everything["corpus"].unique()) == sorted(CORPORA)
    table = everything[everything["corpus"] == "custom"]
    assert set(table["model"]) == {"kn2", "kn3", *NEURAL}
    assert list(table["test_ppl"]) == sorted(table["test_ppl"])
    # the perplexity contract: every model predicted the same tokens
    assert table["test_tokens"].nunique() == 1 and table["valid_tokens"].nunique() == 1
    assert table["floor_ppl"].isna().all()  # no known source for real text
    neural_rows = table[table["model"].isin(NEURAL)]
    assert (neural_rows["epochs"] == 2).all() and (neural_rows["device"] == "cpu").all()
    curve = json.loads((repo / "reports" / "curves" / "custom" / "lstm2.json").read_text())
    # four validation points an epoch (quick preset), by training tokens seen
    assert [r["epoch"] for r in curve][3::4] == [1.0, 2.0] and len(curve) == 8
    tokens = [r["tokens"] for r in curve]
    assert tokens == sorted(set(tokens))
    metrics = json.loads((repo / "reports" / "metrics" / "custom" / "lstm2.json").read_text())
    assert metrics["train_tokens"] == tokens[-1] and metrics["epochs"] == 2
    samples = (repo / "reports" / "samples" / "custom.md").read_text()
    assert all(f"## {m}" in samples for m in ["kn2", "kn3", *NEURAL])
    assert (table["test_ppl"] > 1).all() and (table["test_ppl"] < 10_000).all()
    assert "## custom" in (repo / "reports" / "leaderboard.md").read_text()
    assert not list(repo.rglob(".tmp-*"))


def test_synthetic_corpus_shows_its_floor(workspace):
    repo, _, _ = workspace
    table = pd.read_csv(repo / "reports" / "leaderboard.csv")
    synthetic = table[table["corpus"] == "synthetic"]
    source = json.loads((repo / "data" / "raw" / "synthetic" / "source.json").read_text())
    assert synthetic["floor_ppl"].unique().tolist() == [pytest.approx(source["floor_ppl"])]
    assert (synthetic["test_ppl"] > source["floor_ppl"]).all()  # nothing beats the source
    assert synthetic.iloc[0]["model"] == "kn3"  # the source's own order comes closest
    markdown = (repo / "reports" / "leaderboard.md").read_text()
    assert f"Best achievable perplexity: {source['floor_ppl']:.3f}" in markdown
    metrics = json.loads((repo / "reports" / "leaderboard.json").read_text())
    assert metrics["synthetic"]["floor_ppl"] == pytest.approx(source["floor_ppl"])


def test_mlflow_holds_one_run_per_model(workspace):
    from mlflow.tracking import MlflowClient

    repo, env, _ = workspace
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("custom")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["custom/kn2", "custom/kn3", "custom/lstm", "custom/lstm2",
                            "custom/rnn", "custom/samples", "custom/window"])
    lstm2 = next(r for r in runs if r.info.run_name == "custom/lstm2")
    curve = client.get_metric_history(lstm2.info.run_id, "curve_valid_ppl")
    points = json.loads((repo / "reports" / "curves" / "custom" / "lstm2.json").read_text())
    assert sorted(m.step for m in curve) == [p["tokens"] for p in points]  # step = tokens
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
    assert ran_stages(third) == {"leaderboard", "report",
                                 *each_corpus("ngram@{}-4", "sample@{}")}
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
    # curves, size, orders per corpus (no published reference exists for these corpora)
    assert page.count("data:image/png;base64,") == 6
    assert "http://" not in page and "https://" not in page  # opens offline
    assert "Best achievable perplexity" in page
    plots = sorted(p.name for p in (repo / "reports" / "plots").iterdir())
    assert plots == [f"{c}-{kind}.png" for c in ("custom", "synthetic")
                     for kind in ("curves", "orders", "size")]


def test_learning_curve_plot_has_one_line_per_model(workspace):
    from pipeline.report import load_curves, plot_curves

    repo, _, _ = workspace
    table = pd.read_csv(repo / "reports" / "leaderboard.csv")
    table = table[table["corpus"] == "custom"]
    neural = list(NEURAL)
    curves = load_curves(repo / "reports" / "curves", "custom", neural)
    fig = plot_curves("custom", curves, table)
    by_epoch, by_time = fig.axes
    labels = [line.get_label() for line in by_epoch.lines]
    assert labels[:4] == neural and len(by_time.lines) == 5  # + the best n-gram, dashed
    assert list(by_epoch.lines[0].get_xdata()) == list(curves["window"]["tokens"])


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
                url, f"metrics/get-history?run_id={run_id}&metric_key=curve_valid_ppl")
            assert len(history["metrics"]) == 8  # 4 validation points an epoch, 2 epochs
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


def test_one_param_switches_to_the_small_preset(workspace):
    repo, env, _ = workspace
    log = run([str(BIN / "dvc"), "exp", "run", "-S", "train.preset=small"], repo, env)
    # every neural model retrains under the other preset; nothing upstream reruns
    assert {s for s in ran_stages(log) if s.startswith("train@")} == each_corpus(
        *(f"train@{{}}-{m}" for m in NEURAL))
    assert not {s for s in ran_stages(log) if s.startswith(("download@", "prepare@", "ngram@"))}
    lstm2 = json.loads((repo / "reports" / "metrics" / "custom" / "lstm2.json").read_text())
    assert lstm2["preset"] == "small" and lstm2["epochs"] == 3
    assert lstm2["config"]["loss"] == "time_sum" and lstm2["config"]["bptt"] == 20
