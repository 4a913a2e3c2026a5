"""Data-parallel training: 2 gloo ranks on the CPU train the one-process model.

One spawn of 2 ranks runs every 2-rank scenario (process start-up is most of the
cost); the parent trains the one-process references and compares. Dropout is 0
wherever weights are compared across rank counts: each rank draws its own masks.

Tolerances (float32; only the order of summation differs between 1 and 2 ranks):
- weights after a few steps: |a - b| <= 1e-6 + 1e-5 |b| (torch.testing.assert_close;
  measured: 3e-8 at most);
- a full small run's curve: valid perplexity per point within 1e-5 relative, the
  training perplexity and gradient-norm median within 1e-5 (measured: 1e-7), steps,
  tokens and lr exact;
- a resumed 2-rank run against an uninterrupted one, and 1 rank under a process group
  against the plain process: exactly equal;
- a resume point of 1 process resumed by 2 ranks, and one of 2 ranks resumed by 1
  process, against the uninterrupted one-process run: as a full run's curve (dropout 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline import distributed, steps, training
from pipeline.checkpoints import load_checkpoint
from pipeline.distributed import UnevenColumns, World
from pipeline.errors import UserError
from pipeline.model_spec import ModelSpec
from pipeline.training import Runtime, Splits, TrainingInterrupted
from tests.test_training import TRAIN, VALID, net, train_cfg, without_timings

RANKS = 2
# name -> (network, config): the 2-rank scenarios compared with one process
FEW_STEPS = (net("lstm2", dropout=0.0),  # 5 steps of SGD with the clip active
             train_cfg(optimizer="sgd", lr=1.0, clip=0.1, epochs=1, max_tokens=200))
CURVE = (net("lstm", dropout=0.0),  # time_sum loss units, plateau schedule (broadcast ppl)
         train_cfg(optimizer="sgd", loss="time_sum", lr=0.1, clip=2.0, epochs=2,
                   evals_per_epoch=2, schedule="plateau", lr_decay=2.0))
RESUMED = (net("lstm2", dropout=0.1),  # dropout on: the per-rank RNG must be restored
           train_cfg(epochs=1, evals_per_epoch=2))
ACROSS = (net("lstm2", dropout=0.0),  # resumed under another number of ranks (mid-epoch:
          train_cfg(epochs=1, evals_per_epoch=2))  # the carried state of all 4 columns too)
SIGNAL_AT = 12  # rank 1 alone gets SIGINT after this step; the ranks agree at step 15
CHECK_EVERY = 5


def train(case, folder: Path, world: World = distributed.SINGLE) -> dict:
    network, cfg = case
    return training.train_model(ModelSpec(network=network, training=cfg),
                                Splits(train=TRAIN, valid=VALID, eos_id=0),
                                Runtime(checkpoint_dir=folder, world=world))


@contextlib.contextmanager
def counted_steps(signal_rank: int | None = None, world: World = distributed.SINGLE):
    """Count the training steps this process takes (the list's one item); with
    `signal_rank`, that rank gets SIGINT at its SIGNAL_AT-th step."""
    step, calls = steps.train_step, [0]

    def counted_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == SIGNAL_AT and world.rank == signal_rank:
            signal.raise_signal(signal.SIGINT)
        return step(*args, **kwargs)

    steps.train_step = counted_step
    try:
        yield calls
    finally:
        steps.train_step = step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_rank(rank: int, size: int, port: int) -> None:
    """The environment torchrun gives a rank."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def rank_main(rank: int, port: int, folder: Path) -> None:
    """One of the 2 ranks (spawned): every scenario in turn; rank 0 writes the results."""
    torch.set_num_threads(1)
    join_as_rank(rank, RANKS, port)
    training.CHECK_EVERY = CHECK_EVERY  # agreement points close enough for SIGINT_AT
    with distributed.initialised("cpu") as world:
        results = {"few_steps": train(FEW_STEPS, folder / "few_steps", world),
                   "curve": train(CURVE, folder / "curve", world),
                   "straight": train(RESUMED, folder / "straight", world)}
        try:
            with counted_steps(1, world):  # rank 1 alone gets SIGINT
                train(RESUMED, folder / "resumed", world)
            raise AssertionError("SIGINT on rank 1 did not stop both ranks")
        except TrainingInterrupted as exc:
            results["interrupted"] = {"message": str(exc)}
            if world.is_main:  # its writer
                last = load_checkpoint(folder / "resumed" / "last.pt")
                results["interrupted"]["step"] = last["progress"]["step"]
        results["resumed"] = train(RESUMED, folder / "resumed", world)
        # another number of ranks: the parent's one-process resume point, resumed here;
        # a 2-rank one (SIGINT on rank 1), left for the parent to resume in one process
        with counted_steps() as calls:
            results["one_to_two"] = train(ACROSS, folder / "one_to_two", world)
        results["one_to_two"]["steps_taken"] = calls[0]
        with counted_steps(1, world), contextlib.suppress(TrainingInterrupted):
            train(ACROSS, folder / "two_to_one", world)
            raise AssertionError("SIGINT on rank 1 did not stop both ranks")
        if world.is_main:
            (folder / "results.json").write_text(json.dumps(results))
        torch.distributed.barrier()  # rank 0 hosts the rendezvous: it leaves last


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("ranks")
    torch.set_num_threads(1)
    with counted_steps(0), pytest.raises(TrainingInterrupted):  # SIGINT: a resume point
        train(ACROSS, folder / "one_to_two")  # of one process, at step SIGNAL_AT
    mp.spawn(rank_main, args=(free_port(), folder), nprocs=RANKS, join=True)
    return folder, json.loads((folder / "results.json").read_text())


def test_two_ranks_take_the_one_process_steps(two_ranks, tmp_path):
    torch.set_num_threads(1)
    folder, results = two_ranks
    one = train(FEW_STEPS, tmp_path)
    two = results["few_steps"]
    assert two["tokens"] == one["tokens"] and two["plan"] == one["plan"]
    a = load_checkpoint(folder / "few_steps" / "last.pt")
    b = load_checkpoint(tmp_path / "last.pt")
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    # the global gradient norm (before clipping) and the global training loss
    (ra,), (rb,) = two["history"], one["history"]
    assert ra["clipped_fraction"] == rb["clipped_fraction"] > 0
    assert ra["grad_norm_max"] == pytest.approx(rb["grad_norm_max"], rel=1e-5)
    assert ra["train_ppl"] == pytest.approx(rb["train_ppl"], rel=1e-5)
    # the carried state of all 4 columns, gathered on rank 0
    assert [t.shape for t in a["progress"]["state"]] == [t.shape for t in b["progress"]["state"]]


def test_a_full_two_rank_run_has_the_one_process_curve(two_ranks, tmp_path):
    torch.set_num_threads(1)
    one = train(CURVE, tmp_path)["history"]
    two = two_ranks[1]["curve"]["history"]
    assert [(r["step"], r["tokens"], r["lr"]) for r in two] == \
        [(r["step"], r["tokens"], r["lr"]) for r in one]
    assert len(two) == 4
    for key in ("valid_ppl", "train_ppl", "grad_norm_median"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    assert (two_ranks[0] / "curve" / "best.pt").exists()


def test_a_two_rank_run_resumes_exactly(two_ranks):
    folder, results = two_ranks
    assert results["interrupted"]["step"] == 15  # the first agreement point after step 12
    assert results["interrupted"]["message"].startswith("SIGINT")
    straight, resumed = results["straight"], results["resumed"]
    assert without_timings(resumed["history"]) == without_timings(straight["history"])
    a, b = (load_checkpoint(folder / d / "last.pt")["model"] for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_same_curve(two: list[dict], one: list[dict]) -> None:
    """Two curves alike but for the order of summation (1 against 2 ranks)."""
    assert [(r["step"], r["tokens"], r["lr"]) for r in two] == \
        [(r["step"], r["tokens"], r["lr"]) for r in one]
    for key in ("valid_ppl", "train_ppl", "grad_norm_median"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key


def test_a_resume_point_resumes_under_another_number_of_ranks(two_ranks, tmp_path, capsys):
    """A resume point holds all B columns' state and every rank's RNG (README, "Several
    GPUs"); written by N ranks, it is resumed by M (pipeline/resume.py): each rank takes
    its own columns of the carried state, the run continues from the saved step and ends
    as the uninterrupted run (dropout 0: under dropout ranks > 0 draw new masks). Here
    1 -> 2 ranks and 2 -> 1, each against the uninterrupted one-process run."""
    torch.set_num_threads(1)
    folder, results = two_ranks
    one = train(ACROSS, tmp_path)["history"]
    total = one[-1]["step"]  # one epoch, 2 validation points
    assert len(one) == 2 and total > 15 + SIGNAL_AT
    # 1 -> 2: the ranks took only the steps after the one-process resume point's
    one_to_two = results["one_to_two"]
    assert one_to_two["steps_taken"] == total - SIGNAL_AT
    assert_same_curve(one_to_two["history"], one)
    # 2 -> 1: the 2-rank resume point (the ranks agreed on step 15) resumed by one process
    last = load_checkpoint(folder / "two_to_one" / "last.pt")
    assert (last["world_size"], last["progress"]["step"]) == (2, 15)
    capsys.readouterr()
    with counted_steps() as calls:
        two_to_one = train(ACROSS, folder / "two_to_one")
    said = capsys.readouterr().out
    assert "resuming from" in said and "written by 2 rank(s), resumed by 1" in said
    assert calls[0] == total - 15
    assert_same_curve(two_to_one["history"], one)


def test_one_rank_under_a_process_group_is_the_plain_process(tmp_path, monkeypatch):
    """The path torchrun --nproc-per-node 1 takes (DDP, collectives) changes no number:
    what a GPU run with NCCL is to show against the same run without torchrun."""
    torch.set_num_threads(1)
    case = RESUMED
    plain = train(case, tmp_path / "plain")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
    join_as_rank(0, 1, free_port())
    with distributed.initialised("cpu") as world:
        assert world.distributed
        grouped = train(case, tmp_path / "grouped", world)
    assert without_timings(grouped["history"]) == without_timings(plain["history"])


def test_uneven_columns_are_a_one_line_error_naming_the_key():
    with pytest.raises(UnevenColumns, match="batch_size: 4 columns cannot be split evenly"):
        World(rank=0, size=3).columns(4)
    assert World(rank=1, size=2).columns(4) == slice(2, 4)
    from pipeline.neural import check_ranks
    from tests.test_presets import train_params

    with pytest.raises(UserError, match=r"train\.presets\.quick\..*batch_size: "
                       r"\d+ columns cannot be split evenly across 3 ranks"):
        check_ranks(train_params(), "ptb", "lstm2", 3)


def test_the_train_stage_relaunches_itself_under_torchrun(tmp_path, mirror):
    """`train.nproc: 2` through the stage's own entry point: it execs torchrun, 2 gloo ranks
    train, rank 0 alone writes the metrics and the one MLflow run; the numbers are the
    one-process stage's (dropout 0; summation order aside)."""
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient

    from pipeline.encoding import prepare_corpus
    from tests.conftest import PREPARE_PARAMS, REPO, write_custom_splits

    lines = {s: (mirror / "ptb" / f"ptb.{s}.txt").read_text().splitlines(keepends=True)[:n]
             for s, n in (("train", 200), ("valid", 30), ("test", 30))}
    raw = write_custom_splits(tmp_path / "raw", *("".join(lines[s]) for s in lines))
    prepare_corpus("custom", raw, tmp_path / "data", PREPARE_PARAMS)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["presets"]["quick"]["corpora"]["custom"] = {
        "embedding_size": 16, "hidden_size": 16, "dropout": 0.0, "batch_size": 4, "bptt": 10,
        "epochs": 1, "max_tokens": 0, "evals_per_epoch": 2}
    # fp32: the ranks' sum equals one process's up to summation order; bf16 products round
    # each rank's half-batch differently enough to move this tiny model's ppl by ~0.2%
    params["train"].update(device="cpu", checkpoint_every_s=0, cpu_precision="fp32")
    metrics = {}
    for nproc in (1, 2):
        work = tmp_path / f"nproc{nproc}"
        work.mkdir()
        params["train"]["nproc"] = nproc
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.stages.train", "--corpus", "custom", "--model", "lstm",
             "--data", str(tmp_path / "data"), "--checkpoints", "ckpt", "--out", "lstm.pt",
             "--metrics", "metrics.json", "--curve", "curve.json"],
            cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        metrics[nproc] = json.loads((work / "metrics.json").read_text())
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.run_name for r in runs] == ["custom/lstm"]  # rank 0's only
    assert "torch.distributed.run --standalone --nproc-per-node 2" in done.stdout
    assert metrics[2]["ranks"] == 2 and "ranks" not in metrics[1]
    for key in ("valid_tokens", "test_tokens", "train_tokens", "epochs", "size"):
        assert metrics[2][key] == metrics[1][key], key
    for key in ("valid_ppl", "test_ppl"):
        assert metrics[2][key] == pytest.approx(metrics[1][key], rel=1e-5), key
