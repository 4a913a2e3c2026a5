"""The throughput benchmark measures the train stage's own step and the one scorer; the
precision check seeds its runs and judges their means; the GPU checklist's trainings run
without DVC, MLflow or KenLM."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import benchmarks.precision as precision
import benchmarks.throughput as throughput
from pipeline import perplexity, steps
from pipeline.encoding import prepare_corpus
from pipeline.params import load_section
from pipeline.presets import TrainParams
from tests.conftest import PREPARE_PARAMS, REPO, write_custom_splits


def test_throughput_times_the_train_stages_own_step_and_scorer(monkeypatch):
    calls = {"train_step": 0, "score_stream": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    # the stage's step and the one scorer, not copies
    assert throughput.make_step is steps.make_step
    assert throughput.score_stream is perplexity.score_stream
    monkeypatch.setattr(steps, "train_step", counted("train_step", steps.train_step))
    monkeypatch.setattr(throughput, "score_stream",
                        counted("score_stream", throughput.score_stream))
    row = throughput.measure("quick", "lstm", vocab=300, steps=10, eval_tokens=700,
                             device="cpu", precision="fp32")
    assert calls == {"train_step": 5 + 10, "score_stream": throughput.EVAL_PASSES}
    assert row["model"] == "lstm" and row["precision"] == "fp32"
    assert row["batch"] == "20x35"  # the quick preset's resolved batch and unroll
    assert row["train_tok_s"] > 0 and row["eval_tok_s"] > 0 and row["peak_mib"] > 0
    # 6 x the parameters in matrix products per token: all of them, the embedding being
    # tied to the output projection
    assert row["gflop_s"] == 6 * row["parameters"] * row["train_tok_s"] / 1e9


def test_matrix_product_peak_and_profile_are_real_measurements():
    assert throughput.matmul_peak("cpu", torch.float32, size=256, seconds=0.2) > 0.1
    shares = throughput.profile_step("quick", "window", vocab=300, device="cpu",
                                     precision="fp32", steps=2, top=5)
    assert len(shares) == 5 and all(0 < share <= 1 for _, share in shares)
    assert sum(share for _, share in shares) <= 1 + 1e-9
    assert any("mm" in name for name, _ in shares)  # the window model's products


def test_precision_check_sets_only_the_seed_and_judges_the_means():
    params = load_section("train", TrainParams)
    seeded = precision.with_seed(params, "ptb", 7)
    assert seeded.spec("ptb", "lstm2").training.seed == 7
    assert params.spec("ptb", "lstm2").training.seed != 7  # the loaded params untouched
    assert dataclasses.replace(seeded.spec("ptb", "lstm2").training, seed=1) == \
        dataclasses.replace(params.spec("ptb", "lstm2").training, seed=1)
    assert seeded.spec("brown", "lstm2") == params.spec("brown", "lstm2")

    def run(valid, speed=100.0):
        return {"valid_ppl": valid, "test_ppl": valid, "tokens_per_s": speed, "wall_s": 1.0}

    # per seed bf16 is 2% worse and 1.5% better; on the means (100.5 against 100.25) +0.25%
    runs = {("fp32", 1): run(100.0, 90.0), ("bf16 autocast", 1): run(102.0, 140.0),
            ("fp32", 2): run(100.5, 110.0), ("bf16 autocast", 2): run(100.0 * 0.99, 160.0)}
    text = precision.report(runs, [1, 2], "head")
    assert "(means): +0.25%" in text and ": pass;" in text
    assert "per seed: +2.00%, -1.49%" in text
    assert "training speed x1.50" in text  # mean 150 against mean 100
    assert "fp32: mean valid ppl 100.25 over 2 seed(s), valid ppl from 100.00 to 100.50" in text
    runs["bf16 autocast", 2] = run(103.0)
    assert ": FAIL;" in precision.report(runs, [1, 2], "head")
    runs["bf16 autocast", 2] = run(97.0)  # 2% better on the means: no quality lost
    assert ": pass;" in precision.report(runs, [1, 2], "head")


def test_precision_check_on_the_regression_configuration_judges_each_model_on_its_means():
    runs = {("fp32", 1): {"a/lstm": 100.0, "b/gru": 50.0},
            ("bf16 autocast", 1): {"a/lstm": 101.0, "b/gru": 52.0},
            ("fp32", 2): {"a/lstm": 102.0, "b/gru": 50.0},
            ("bf16 autocast", 2): {"a/lstm": 100.0, "b/gru": 51.0}}
    text = precision.regression_report(runs, [1, 2], "head")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    # a/lstm: 100.5 against 101 (-0.50%), +1.00% and -1.96% per seed, fp32 2% from itself
    assert "| -0.50% | +1.00%, -1.96% | 2.00% |" in rows["a/lstm"]
    assert "+3.00% (worse by over 1%)" in rows["b/gru"]  # 51.5 against 50
    assert "1 of 2 models worse by over 1% (means over 2 seed(s)): FAIL" in text
    runs["bf16 autocast", 1]["b/gru"] = runs["bf16 autocast", 2]["b/gru"] = 48.0  # 4% better
    text = precision.regression_report(runs, [1, 2], "head")
    assert "0 of 2 models worse by over 1% (means over 2 seed(s)): pass" in text


def test_precision_check_seeds_every_model_of_the_regression_configuration(tmp_path):
    from tests import regression

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(regression.configuration()))
    regression.change_params(params_file, precision.regression_changes("bf16 autocast", 5))
    params = load_section("train", TrainParams, params_file)
    assert params.cpu_precision == "bf16"
    for corpus in yaml.safe_load(params_file.read_text())["corpora"]:
        for model in params.models:  # no model or corpus layer sets a seed of its own
            assert params.spec(corpus, model).training.seed == 5, (corpus, model)
    assert precision.regression_changes("fp32", 5)[0] == "train.cpu_precision=fp32"


def test_gpu_checklist_trains_without_dvc_mlflow_or_kenlm(mirror, tmp_path):
    """The lent GPU machine has torch but no DVC, MLflow or KenLM: the checklist's
    trainings run with those imports refused (here on the CPU, on the first lines of PTB,
    the presets shrunk), and two trainings from one seed agree bit for bit, as they must
    on a CPU."""
    lines = {split: "".join((mirror / "ptb" / f"ptb.{split}.txt").read_text()
                            .splitlines(keepends=True)[:n])
             for split, n in (("train", 1000), ("valid", 100), ("test", 100))}
    raw = write_custom_splits(tmp_path / "raw", lines["train"], lines["valid"], lines["test"])
    prepare_corpus("custom", raw, tmp_path / "ptb", PREPARE_PARAMS)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny = {"embedding_size": 16, "hidden_size": 16, "epochs": 1, "max_tokens": 14_000}
    params["train"]["presets"]["quick"]["models"]["lstm2"].update(tiny)
    params["train"]["presets"]["medium"]["defaults"].update(tiny, evals_per_epoch=1)
    params["train"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    refuse = ("import sys; sys.modules.update(dict.fromkeys(['mlflow', 'dvc', 'kenlm'])); "
              "from benchmarks import gpu; gpu.main()")
    done = subprocess.run([sys.executable, "-c", refuse, "--out", "out", "--data", "ptb",
                           "medium", "determinism"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    medium = json.loads((out / "medium-ptb-lstm2.json").read_text())
    assert medium["preset"] == "medium" and medium["config"]["hidden_size"] == 16
    assert medium["train_tokens"] >= 14_000 and medium["peak_memory_mib"] > 0
    # Zaremba et al.'s medium result, shown as context: this run is not their configuration
    assert medium["published"] == {"valid": 86.2, "test": 82.7, "source": medium["published"][
        "source"], "same_configuration": False}
    assert len(json.loads((out / "medium-ptb-lstm2-curve.json").read_text())) == 1
    determinism = json.loads((out / "determinism.json").read_text())
    first, second = determinism["runs"]
    assert first == second and determinism["max_weight_difference"] == 0.0
    summary = (out / "summary.md").read_text()
    assert summary.startswith("GPU checklist on cpu (")
    assert f"test {medium['test_ppl']:.2f} (best checkpoint" in summary
    assert "with the stage within 300 s: not met" in summary  # a 16-unit model: far above 84
    assert "the same numbers and weights, bit for bit" in summary
    assert (tmp_path / "models" / "gpu-checklist" / "medium-ptb-lstm2" / "model.pt").exists()


def test_a_failing_checklist_part_is_one_line_and_the_next_parts_still_run(tmp_path,
                                                                          monkeypatch):
    import benchmarks.gpu as gpu

    ran = []

    def part(name, *args):
        ran.append(name)
        if name == "precision":
            raise SystemExit("cpu: no hardware bf16 matrix products here; nothing to compare")
        return f"**{name}**: done"

    monkeypatch.setattr(gpu, "run_part", part)
    monkeypatch.chdir(REPO)  # params.yaml
    gpu.main(["--out", str(tmp_path), "precision", "determinism"])
    assert ran == ["precision", "determinism"]
    summary = (tmp_path / "summary.md").read_text()
    assert "**precision**: failed: SystemExit: cpu: no hardware bf16 matrix products here" \
        in summary
    assert "**determinism**: done (" in summary
    with pytest.raises(SystemExit):  # an unknown part: refused before any work
        gpu.main(["--out", str(tmp_path / "other"), "medum"])
    assert not (tmp_path / "other").exists()


def test_a_signal_stops_the_whole_checklist_and_says_where(tmp_path, monkeypatch):
    """A time limit's SIGTERM during one part: the summary names the part, no later part
    starts (a lent GPU machine's files come back only once the command returns)."""
    import signal as signals

    import benchmarks.gpu as gpu

    ran = []

    def part(name, *args):
        ran.append(name)
        if name == "medium":
            os.kill(os.getpid(), signals.SIGTERM)
        return f"**{name}**: done"

    monkeypatch.setattr(gpu, "run_part", part)
    monkeypatch.chdir(REPO)
    before = signals.getsignal(signals.SIGTERM)
    try:
        gpu.main(["--out", str(tmp_path), "graphs", "medium", "peer"])
    finally:
        signals.signal(signals.SIGTERM, before)
        signals.signal(signals.SIGINT, signals.default_int_handler)
    assert ran == ["graphs", "medium"]
    summary = (tmp_path / "summary.md").read_text()
    assert "**graphs**: done (" in summary
    assert "**medium**: stopped (SIGTERM) after" in summary and "later parts not run" in summary
    assert "peer" not in summary.split("\n\n", 1)[1]
