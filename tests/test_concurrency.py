"""Two queued experiments run by two DVC workers at once, each in its own temporary copy of
the repository, both recording into the repository's one SQLite MLflow store."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import yaml

from tests import regression
from tests.regression import BIN

# the per-corpus stages that read every model of their corpus rerun too: stage -> MLflow run
READER_STAGES = {stage: run for stage, run in (("sample", "samples"), ("analyse", "analysis"))
                 if stage in yaml.safe_load((regression.REPO / "dvc.yaml").read_text())["stages"]}
READERS = tuple(READER_STAGES.values())

# another seed (a new key of the model layer, hence `+`): a change that reaches the model on
# every corpus (the corpus layers of the quick preset and of tests/regression.yaml set other
# keys, e.g. synthetic's lr), reproduced on one of them below
EXPERIMENTS = {"window-seed2": "+train.presets.quick.models.window.seed=2",
               "rnn-seed2": "+train.presets.quick.models.rnn.seed=2"}
# what each experiment reproduces: one corpus's readers of every model (CI's time: the
# other corpora would repeat the same stages), so the changed model retrains there first
CORPUS = "custom"
TARGETS = tuple(f"{stage}@{CORPUS}" for stage in READER_STAGES)


def dvc(repo: Path, env: dict, *args: str) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{(done.stdout + done.stderr)[-3000:]}"
    return done.stdout


def test_two_queue_workers_record_every_run_in_one_store(pipeline_run, tmp_path):
    from mlflow.tracking import MlflowClient

    repo, env = pipeline_run.clone(tmp_path / "repo", mlflow_uri=None)  # the default store
    for name, change in EXPERIMENTS.items():
        dvc(repo, env, "exp", "run", "--queue", "--name", name, "-S", change, *TARGETS)
    # workers start in the background and keep the pipe open: no capture here
    subprocess.run([str(BIN / "dvc"), "queue", "start", "--jobs", "2"], cwd=repo, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 1800  # a guard against a hung worker, not a timing
    while True:
        status = dvc(repo, env, "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    for name in EXPERIMENTS:
        line = next(line for line in status.splitlines() if name in line)
        assert "Success" in line, f"{status}\n{dvc(repo, env, 'queue', 'logs', name)[-3000:]}"

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_experiment: dict[str, list] = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        by_experiment.setdefault(run.data.tags["dvc_experiment"], []).append(run)
    assert set(by_experiment) == set(EXPERIMENTS)
    # each experiment retrained only the model it changed (the others' resume points came
    # from the DVC cache), then re-sampled and re-analysed, once each
    for name, model in (("window-seed2", "window"), ("rnn-seed2", "rnn")):
        assert sorted(r.info.run_name for r in by_experiment[name]) == sorted(
            f"{CORPUS}/{m}" for m in (model, *READERS))
    # and the two workers ran at the same time: each experiment's runs, from its first
    # start to its last end (MLflow's timestamps, ms), overlap the other's
    spans = {name: (min(r.info.start_time for r in runs), max(r.info.end_time for r in runs))
             for name, runs in by_experiment.items()}
    (a_start, a_end), (b_start, b_end) = spans.values()
    overlap_s = (min(a_end, b_end) - max(a_start, b_start)) / 1000
    assert overlap_s > 0, f"the experiments ran one after the other: {spans}"
    shown = dvc(repo, env, "exp", "show", "--csv")
    assert all(name in shown for name in EXPERIMENTS)
