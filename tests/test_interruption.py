"""Interrupting `dvc repro` mid-epoch: SIGKILL (a crash, a killed job), Ctrl-C and SIGTERM
(`timeout`, a batch scheduler, `docker stop`). Each way the next `dvc repro` resumes from
the last resume point and ends with exactly the numbers of the uninterrupted run
(deterministic on the CPU with one thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from pipeline.checkpoints import load_checkpoint
from tests.regression import BIN

STAGE = "train@custom-lstm2"
CHECKPOINTS = Path("models/custom/lstm2.ckpt")


def fresh_stage(pipeline_run, dest: Path, checkpoint_every_s: float) -> tuple[Path, dict]:
    """A clone where STAGE must train from scratch, with resume points this often."""
    repo, env = pipeline_run.clone(dest, f"sqlite:///{dest.parent / 'mlflow.db'}")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["checkpoint_every_s"] = checkpoint_every_s
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for path in (repo / CHECKPOINTS).iterdir():
        path.unlink()
    return repo, env


def start_repro(repo: Path, env: dict) -> subprocess.Popen:
    # its own session, like a terminal job: signals go to dvc and the stage together
    return subprocess.Popen([str(BIN / "dvc"), "repro", "-s", STAGE], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def resume_progress(repo: Path) -> dict | None:
    """The progress saved in the resume point, if there is one."""
    last = repo / CHECKPOINTS / "last.pt"
    if not last.exists():
        return None
    try:
        return load_checkpoint(last)["progress"]
    except (RuntimeError, EOFError, OSError, KeyError):  # replaced while being read
        return None


def mid_segment_progress(repo: Path) -> dict | None:
    """The resume point's progress when it was written between two validation points."""
    progress = resume_progress(repo)
    return progress if progress is not None and progress["segment_tokens"] > 0 else None


def wait_for_mid_segment_resume_point(repo: Path, job: subprocess.Popen) -> None:
    """Until the stage has written a resume point between two validation points: it is
    then inside its training loop (its signal handlers installed), mid-epoch."""
    deadline = time.monotonic() + 180
    while mid_segment_progress(repo) is None:
        assert job.poll() is None, f"finished before a resume point:\n{job.stdout.read()}"
        assert time.monotonic() < deadline, "no mid-epoch resume point within 180 s"
        time.sleep(0.05)  # polling a file: no event tells when it is written


def finish(repo: Path, env: dict) -> str:
    done = subprocess.run([str(BIN / "dvc"), "repro", "-s", STAGE], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def assert_same_as_uninterrupted(repo: Path, pipeline_run) -> None:
    template = pipeline_run.template
    for path in ("reports/metrics/custom/lstm2.json", "reports/curves/custom/lstm2.json"):
        now, before = (json.loads((root / path).read_text()) for root in (repo, template))
        if isinstance(now, dict):  # everything but timings
            timing = {"train_seconds", "tokens_per_s"}
            now, before = ({k: v for k, v in d.items() if k not in timing} for d in (now, before))
        else:
            now, before = ([{k: r[k] for k in ("step", "train_ppl", "valid_ppl", "lr", "tokens")}
                            for r in d] for d in (now, before))
        assert now == before, path


def test_sigkill_mid_epoch_then_repro_resumes_to_the_same_metrics(pipeline_run, tmp_path):
    repo, env = fresh_stage(pipeline_run, tmp_path / "repo", checkpoint_every_s=0.2)
    job = start_repro(repo, env)
    wait_for_mid_segment_resume_point(repo, job)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    job.stdout.close()
    assert not (repo / "reports/metrics/custom/lstm2.json").exists()  # DVC removed the old one
    log = finish(repo, env)
    assert "resuming from" in log and "step" in log.split("resuming from")[1].split("\n")[0]
    assert_same_as_uninterrupted(repo, pipeline_run)


def test_ctrl_c_writes_a_resume_point_and_repro_continues_from_it(pipeline_run, tmp_path):
    # resume points only at validation points and on the signal: the one found is Ctrl-C's
    repo, env = fresh_stage(pipeline_run, tmp_path / "repo", checkpoint_every_s=0)
    job = start_repro(repo, env)
    for line in job.stdout:
        if "Ctrl-C saves a resume point" in line:  # the training loop has started
            break
    time.sleep(1.0)  # an epoch takes several seconds
    os.killpg(job.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    output = job.stdout.read()
    job.stdout.close()
    assert job.wait() != 0
    # written when the signal was honoured: between two steps, or after a validation
    # point if it came during one
    progress = resume_progress(repo)
    assert progress is not None, output[-3000:]
    assert f"interrupted (SIGINT: stopped at step {progress['step']}" in output
    log = finish(repo, env)
    assert f"resuming from {CHECKPOINTS / 'last.pt'} (step {progress['step']} of" in log
    assert_same_as_uninterrupted(repo, pipeline_run)


def test_sigterm_writes_a_resume_point_and_repro_continues_from_it(pipeline_run, tmp_path):
    repo, env = fresh_stage(pipeline_run, tmp_path / "repo", checkpoint_every_s=0.2)
    job = start_repro(repo, env)
    wait_for_mid_segment_resume_point(repo, job)
    os.killpg(job.pid, signal.SIGTERM)  # `timeout`'s signal, to dvc and the stage together
    output = job.stdout.read()  # to its end: the stage's exit, whether dvc outlives it or not
    job.stdout.close()
    assert job.wait() != 0
    # the stage honoured it between two steps (or after a validation point under way) and
    # wrote its resume point there, then stopped
    progress = resume_progress(repo)
    assert progress is not None, output[-3000:]
    assert f"interrupted (SIGTERM: stopped at step {progress['step']}" in output, output[-3000:]
    log = finish(repo, env)
    assert f"resuming from {CHECKPOINTS / 'last.pt'} (step {progress['step']} of" in log
    assert_same_as_uninterrupted(repo, pipeline_run)
