"""The one training loop: every architecture learns; an interrupted run resumes exactly."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.networks import KINDS, NetworkConfig
from pipeline.training import (
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    load_checkpoint,
    load_model,
    next_lr,
    train_model,
)

V = 8
# a stream with structure: a cycle 2 3 4 5 6 <eos>, with every 7th token replaced at random
rng = np.random.default_rng(0)
STREAM = np.tile(np.array([2, 3, 4, 5, 6, 0]), 300)
STREAM[::7] = rng.integers(1, V, size=len(STREAM[::7]))
TRAIN, VALID = STREAM[:1500], STREAM[1500:]


def net(kind, **changes):
    base = dict(kind=kind, vocab_size=V, embedding_size=16, hidden_size=16, context=3,
                dropout=0.1, tie_weights=False, direct_connections=False, init_range=0.1)
    return NetworkConfig(**{**base, **changes})


def train_cfg(**changes):
    base = dict(batch_size=4, bptt=10, epochs=6, optimizer="adam", lr=0.01, schedule="decay",
                lr_decay=1.2, decay_after=3, clip=5.0, time_budget_s=0, seed=0)
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("kind", KINDS)
def test_each_architecture_learns_the_stream(kind, tmp_path):
    torch.set_num_threads(1)
    result = train_model(net(kind), train_cfg(), TRAIN, VALID, 0, tmp_path)
    history = result["history"]
    assert len(history) == 6
    # uniform guessing is ppl 8; the cycle with 1-in-7 noise allows about 1.7
    assert history[-1]["train_ppl"] < 2.6
    assert result["best_valid_ppl"] < 2.6
    assert history[-1]["lr"] == pytest.approx(0.01 / 1.2**3)  # decayed after epochs 3, 4, 5
    best = load_model(tmp_path / "best.pt")  # loads with weights_only=True
    assert best.num_parameters() == result["parameters"]


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    torch.set_num_threads(1)
    cfg, network = train_cfg(optimizer="sgd", lr=1.0, epochs=4), net("lstm2")
    straight = train_model(network, cfg, TRAIN, VALID, 0, tmp_path / "a")

    def interrupt_after_two(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(network, cfg, TRAIN, VALID, 0, tmp_path / "b", on_epoch=interrupt_after_two)
    resumed = train_model(network, cfg, TRAIN, VALID, 0, tmp_path / "b")
    strip = [{k: v for k, v in h.items() if k not in ("tokens_per_s", "elapsed_s")}
             for h in straight["history"]]
    assert [{k: v for k, v in h.items() if k not in ("tokens_per_s", "elapsed_s")}
            for h in resumed["history"]] == strip
    assert resumed["best_valid_ppl"] == straight["best_valid_ppl"]


def without_timings(history):
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "elapsed_s")}
            for h in history]


def test_ctrl_c_mid_epoch_writes_a_resume_point_that_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    cfg, network = train_cfg(optimizer="sgd", lr=1.0, epochs=3, bptt=5), net("lstm")
    straight = train_model(network, cfg, TRAIN, VALID, 0, tmp_path / "a")
    last = tmp_path / "b" / "last.pt"
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, say

    def press_ctrl_c_once_training_is_under_way():
        deadline = time.monotonic() + 60
        while not last.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        if last.exists():  # never interrupt the test session itself
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c_once_training_is_under_way, daemon=True).start()
    with pytest.raises(TrainingInterrupted, match="SIGINT"):
        # a resume point after every step, as a long epoch gets one every minute
        train_model(network, cfg, TRAIN, VALID, 0, tmp_path / "b", checkpoint_every_s=1e-9)
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] < 3
    if ckpt["position"] is not None:  # almost always: 75 steps an epoch
        assert 0 < ckpt["position"]["step"] < 75 and ckpt["position"]["count"] > 0
    # training time so far: finished epochs in `elapsed`, the partial one in the position
    assert ckpt["elapsed"] == (ckpt["history"][-1]["elapsed_s"] if ckpt["history"] else 0)
    resumed = train_model(network, cfg, TRAIN, VALID, 0, tmp_path / "b")
    assert without_timings(resumed["history"]) == without_timings(straight["history"])
    assert resumed["best_valid_ppl"] == straight["best_valid_ppl"]
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored


def test_divergence_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train_model(net("rnn", init_range=1.0), train_cfg(optimizer="sgd", lr=1e30, clip=0),
                    TRAIN, VALID, 0, tmp_path)


def test_resume_point_is_ignored_when_data_or_config_changed(tmp_path, capsys):
    torch.set_num_threads(1)
    cfg = train_cfg(epochs=1)
    train_model(net("rnn"), cfg, TRAIN, VALID, 0, tmp_path)
    capsys.readouterr()
    # same everything: the finished run is picked up, not retrained
    train_model(net("rnn"), cfg, TRAIN, VALID, 0, tmp_path)
    assert "resuming from" in capsys.readouterr().out
    # other training data: a fresh start, never a silent continuation
    train_model(net("rnn"), cfg, TRAIN[::-1].copy(), VALID, 0, tmp_path)
    assert "training from scratch" in capsys.readouterr().out
    train_model(net("rnn"), train_cfg(epochs=1, lr=0.02), TRAIN, VALID, 0, tmp_path)
    assert "training from scratch" in capsys.readouterr().out


def test_learning_rate_schedules():
    zaremba = train_cfg(schedule="decay", lr=1.0, lr_decay=1.2, decay_after=6)
    lr, rates = 1.0, []
    for epoch in range(1, 10):
        rates.append(lr)
        lr = next_lr(zaremba, epoch, lr, improved=True)
    # epochs 1-6 at lr 1, then divided by 1.2 each epoch
    assert rates == pytest.approx([1, 1, 1, 1, 1, 1, 1 / 1.2, 1 / 1.2**2, 1 / 1.2**3])
    plateau = train_cfg(schedule="plateau", lr=20.0, lr_decay=4.0)
    assert next_lr(plateau, 3, 20.0, improved=True) == 20.0
    assert next_lr(plateau, 3, 20.0, improved=False) == 5.0
