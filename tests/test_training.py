"""The one training loop: every architecture learns; an interrupted run resumes exactly."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import resume
from pipeline.checkpoints import load_checkpoint, load_model
from pipeline.imports import PACKAGE
from pipeline.model_spec import ModelSpec
from pipeline.networks import KINDS, NetworkConfig
from pipeline.precision import bf16_products
from pipeline.resume import LOOP, RESCORED, ResumePoint, training_code
from pipeline.schedule import Plan, TrainConfig, improved, next_lr, scheduled_lr
from pipeline.training import (
    Runtime,
    Splits,
    TrainingDiverged,
    TrainingInterrupted,
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
    base = dict(batch_size=4, bptt=10, epochs=6, max_tokens=0, evals_per_epoch=1,
                optimizer="adam", lr=0.01, loss="token_mean", schedule="decay", lr_decay=1.2,
                decay_after=3, plateau_threshold=0.0, stop_after_plateaus=0, warmup=0.0,
                lr_min=0.0, clip=5.0, seed=0)
    return TrainConfig(**{**base, **changes})


def train(network, cfg, folder, train_ids=TRAIN, **runtime):
    """train_model on TRAIN (or `train_ids`) and VALID; `runtime`: Runtime's fields."""
    return train_model(ModelSpec(network=network, training=cfg),
                       Splits(train=train_ids, valid=VALID, eos_id=0),
                       Runtime(checkpoint_dir=folder, **runtime))


def without_timings(history):
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "elapsed_s", "valid_s")}
            for h in history]


@pytest.mark.parametrize("kind", KINDS)
def test_each_architecture_learns_the_stream(kind, tmp_path):
    torch.set_num_threads(1)
    result = train(net(kind), train_cfg(), tmp_path)
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
    straight = train(network, cfg, tmp_path / "a")

    def interrupt_after_two(history):
        if history[-1]["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(network, cfg, tmp_path / "b", on_eval=interrupt_after_two)
    resumed = train(network, cfg, tmp_path / "b")
    assert without_timings(resumed["history"]) == without_timings(straight["history"])
    assert resumed["best_valid_ppl"] == straight["best_valid_ppl"]


def test_ctrl_c_mid_epoch_writes_a_resume_point_that_continues_exactly(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    # two validation points an epoch, the lr halved after each epoch: a resume point
    # carries the schedule's state as well as the model's
    cfg = train_cfg(optimizer="sgd", lr=1.0, epochs=3, bptt=5, evals_per_epoch=2,
                    lr_decay=2.0, decay_after=1)
    network = net("lstm")
    straight = train(network, cfg, tmp_path / "a")
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, say
    # a real SIGINT, delivered at a known step: right after the resume point of step 50,
    # mid-epoch (75 steps an epoch) and between validation points (steps 38 and 75)
    ctrl_c_after = 50
    save = ResumePoint.save

    def save_then_press_ctrl_c(self, model, opt, progress):
        save(self, model, opt, progress)
        if progress.step == ctrl_c_after:
            # never interrupt the test session itself: only while training handles SIGINT
            assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler,
                                                           handler_before), \
                "training does not handle SIGINT"
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(ResumePoint, "save", save_then_press_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="SIGINT"):
        # a resume point after every step, as a long epoch gets one every minute
        train(network, cfg, tmp_path / "b", checkpoint_every_s=1e-9)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored
    progress = load_checkpoint(tmp_path / "b" / "last.pt")["progress"]
    assert [r["lr"] for r in straight["history"]] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    # stopped at once, mid-epoch, with the loss since the validation point at step 38 and
    # the recurrent state carried so far (an LSTM: hidden and cell)
    assert progress["step"] == ctrl_c_after
    assert [r["step"] for r in progress["history"]] == [38]
    assert progress["segment_tokens"] == (ctrl_c_after - 38) * 4 * 5
    assert len(progress["segment_losses"]) == ctrl_c_after - 38
    assert progress["state"] is not None and len(progress["state"]) == 2
    resumed = train(network, cfg, tmp_path / "b")
    assert without_timings(resumed["history"]) == without_timings(straight["history"])
    assert resumed["best_valid_ppl"] == straight["best_valid_ppl"]
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored


def test_divergence_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train(net("rnn", init_range=1.0), train_cfg(optimizer="sgd", lr=1e30, clip=0), tmp_path)


def test_resume_point_is_ignored_when_data_or_config_changed(tmp_path, capsys):
    torch.set_num_threads(1)
    # the mismatch's own line, not the damaged checkpoint's (which also starts over)
    another = f"{tmp_path / 'last.pt'} belongs to another configuration, data or code"
    cfg = train_cfg(epochs=1)
    train(net("rnn"), cfg, tmp_path)
    capsys.readouterr()
    # same everything: the finished run is picked up, not retrained
    train(net("rnn"), cfg, tmp_path)
    assert "resuming from" in capsys.readouterr().out
    # other training data: a fresh start, never a silent continuation
    train(net("rnn"), cfg, tmp_path, train_ids=TRAIN[::-1].copy())
    assert another in capsys.readouterr().out
    train(net("rnn"), train_cfg(epochs=1, lr=0.02), tmp_path)
    assert another in capsys.readouterr().out
    # another vocabulary with the same ids (its digest travels in `extra`)
    train(net("rnn"), train_cfg(epochs=1, lr=0.02), tmp_path, extra={"vocab_digest": "b"})
    assert another in capsys.readouterr().out


def copied_training_code(folder, edit: str = "") -> list:
    """The training code's files copied into `folder`, the loop's with `edit` appended."""
    folder.mkdir()
    copies, code = [], training_code()
    assert LOOP in code
    for path in code:
        copy = folder / path.name
        copy.write_bytes(path.read_bytes() + (edit.encode() if path == LOOP else b""))
        copies.append(copy)
    return copies


def test_resume_point_is_ignored_after_a_code_change(tmp_path, capsys, monkeypatch):
    torch.set_num_threads(1)
    folder = tmp_path / "ckpt"
    another = f"{folder / 'last.pt'} belongs to another configuration, data or code"
    train(net("rnn"), train_cfg(epochs=1), folder)
    # the same source read from elsewhere: the fingerprint hashes contents, so it resumes
    same = copied_training_code(tmp_path / "same")
    monkeypatch.setattr(resume, "training_code", lambda: same)
    capsys.readouterr()
    train(net("rnn"), train_cfg(epochs=1), folder)
    assert "resuming from" in capsys.readouterr().out
    # one comment added to the loop: a fresh start, never a continuation by other code
    edited = copied_training_code(tmp_path / "edited", "# an edit\n")
    monkeypatch.setattr(resume, "training_code", lambda: edited)
    train(net("rnn"), train_cfg(epochs=1), folder)
    out = capsys.readouterr().out
    assert another in out and "resuming from" not in out


def test_the_fingerprint_covers_every_module_the_training_loads():
    """The code a resume point must match is read off the imports (pipeline/imports.py):
    every pipeline module that importing the loop loads is hashed, the scorer aside."""
    probe = "import sys, pipeline.training; print(*sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=PACKAGE.parent).stdout.split()
    files = {PACKAGE / f"{name.split('.')[1]}.py" for name in loaded
             if name.startswith("pipeline.")}
    hashed, unhashed = set(training_code()), files - RESCORED
    assert unhashed <= hashed, f"not in the fingerprint: {sorted(unhashed - hashed)}"
    assert not hashed & RESCORED


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


def test_an_epoch_improves_only_by_the_plateau_threshold():
    strict, one_percent = train_cfg(schedule="plateau"), train_cfg(
        schedule="plateau", plateau_threshold=0.01)
    assert improved(strict, best_before=100.0, best_now=99.99)
    assert not improved(strict, best_before=100.0, best_now=100.0)
    assert not improved(one_percent, best_before=100.0, best_now=99.5)  # 0.5%
    assert improved(one_percent, best_before=100.0, best_now=98.9)  # 1.1%
    assert improved(one_percent, best_before=float("inf"), best_now=500.0)  # the first epoch


@pytest.mark.parametrize(("change", "key"), [
    ({"stop_after_plateaus": 2}, "stop_after_plateaus"),  # the decay schedule
    ({"plateau_threshold": 0.01}, "plateau_threshold"),
    ({"schedule": "plateau", "plateau_threshold": 1.0}, "plateau_threshold"),
    ({"schedule": "plateau", "stop_after_plateaus": -1}, "stop_after_plateaus"),
])
def test_plateau_settings_are_checked(change, key):
    assert [k for k, _ in train_cfg(**change).check()] == [key]


def test_plateau_rule_ends_the_run_and_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    # a 99% threshold: no epoch after the first counts as an improvement, so epochs 2 and
    # 3 halve the lr and epoch 4, the third without improvement, ends the 6-epoch run
    cfg = train_cfg(optimizer="sgd", lr=1.0, epochs=6, evals_per_epoch=2, schedule="plateau",
                    lr_decay=2.0, plateau_threshold=0.99, stop_after_plateaus=3)
    network = net("gru")
    straight = train(network, cfg, tmp_path / "a")
    assert straight["epochs"] == 4
    assert [r["lr"] for r in straight["history"]] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]

    def interrupt_after_three(history):  # two epochs without improvement by then
        if history[-1]["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(network, cfg, tmp_path / "b", on_eval=interrupt_after_three)
    resumed = train(network, cfg, tmp_path / "b")  # the count of plateaus carried over
    assert without_timings(resumed["history"]) == without_timings(straight["history"])


def test_cosine_schedule_anneals_inside_the_planned_steps():
    cfg = train_cfg(schedule="cosine", lr=20.0, lr_min=0.05, warmup=0.1)
    plan = Plan.make(columns=1000, cfg=cfg)  # 100 steps an epoch, 6 epochs
    rates = [scheduled_lr(cfg, plan, s, epoch_lr=cfg.lr) for s in range(plan.total_steps)]
    assert rates[0] == pytest.approx(20.0 / 60) and rates[59] == pytest.approx(20.0)  # warm-up
    assert rates[-1] == pytest.approx(20.0 * 0.05)  # the floor, reached at the last step
    assert rates[60] == pytest.approx(20.0)  # the cosine starts at lr
    assert all(a >= b for a, b in zip(rates[60:], rates[61:], strict=False))  # then down only


def test_plan_counts_tokens_and_places_validation_points():
    cfg = train_cfg(batch_size=4, bptt=10, epochs=3, evals_per_epoch=4)
    plan = Plan.make(columns=95, cfg=cfg)  # 10 steps an epoch, the last one 5 columns
    assert plan.steps_per_epoch == 10 and plan.total_steps == 30
    assert plan.eval_steps == (2, 5, 8, 10, 12, 15, 18, 20, 22, 25, 28, 30)
    # a token budget ends mid-epoch: 1.5 epochs of 4 x 95 tokens = 570 -> 15 steps
    budget = Plan.make(columns=95, cfg=train_cfg(batch_size=4, bptt=10, epochs=3,
                                                 max_tokens=570, evals_per_epoch=1))
    assert budget.total_steps == 15 and budget.eval_steps == (10, 15)
    # a run shorter than an epoch spreads its validation points over itself
    short = Plan.make(columns=95, cfg=train_cfg(batch_size=4, bptt=10, epochs=1,
                                                max_tokens=200, evals_per_epoch=4))
    assert short.total_steps == 5 and short.eval_steps == (1, 2, 4, 5)


def test_token_budget_stops_mid_epoch_with_a_curve(tmp_path):
    torch.set_num_threads(1)
    # an epoch: 4 columns of 374 tokens, 38 steps (the last of 4 x 4 tokens)
    cfg = train_cfg(epochs=5, max_tokens=2300, evals_per_epoch=4)
    result = train(net("lstm"), cfg, tmp_path)
    assert result["tokens"] == 4 * 374 + 21 * 4 * 10  # rounded up to a whole step
    assert result["epochs"] == pytest.approx(59 / 38, abs=1e-4)
    assert [r["step"] for r in result["history"]] == [10, 19, 28, 38, 48, 57, 59]
    assert [r["tokens"] for r in result["history"]][3] == 4 * 374


def test_two_runs_give_the_same_numbers(tmp_path):
    """Bounded by steps, not seconds: a rerun is the same run (timings aside)."""
    torch.set_num_threads(1)
    cfg = train_cfg(schedule="cosine", evals_per_epoch=2, epochs=2)
    first = train(net("lstm2"), cfg, tmp_path / "a")
    second = train(net("lstm2"), cfg, tmp_path / "b")
    assert without_timings(first["history"]) == without_timings(second["history"])
    a, b = (load_checkpoint(tmp_path / d / "best.pt")["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_norms_are_summarised_per_validation_point(tmp_path):
    from pipeline.training import grad_norm_summary

    summary = grad_norm_summary([0.1, 3.0, 0.2, 0.5], clip=0.25)
    assert summary == {"grad_norm_median": pytest.approx(0.35), "grad_norm_max": 3.0,
                       "clipped_fraction": 0.5}
    assert grad_norm_summary([9.0], clip=0)["clipped_fraction"] == 0.0  # clipping off
    history = train(net("lstm"), train_cfg(epochs=2, clip=0.5), tmp_path)["history"]
    for record in history:
        assert 0 < record["grad_norm_median"] <= record["grad_norm_max"]
        assert 0 <= record["clipped_fraction"] <= 1
        assert record["valid_s"] > 0


def test_columns_read_a_memory_mapped_stream_chunk_by_chunk(tmp_path):
    from pipeline.steps import Columns

    np.save(tmp_path / "train.npy", TRAIN.astype(np.uint16))
    ids = np.load(tmp_path / "train.npy", mmap_mode="r")  # as the train stage opens it
    stream = torch.from_numpy(TRAIN.astype(np.int64))
    B = 4
    L = (len(stream) - 1) // B
    x_all = stream[: B * L].view(B, L)  # column c = stream[c*L : (c+1)*L]
    y_all = stream[1 : B * L + 1].view(B, L)
    columns = Columns.of(ids, B)
    assert columns.length == L
    for cols in (slice(0, 10), slice(L - 3, L)):
        x, y = columns.chunk(cols)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, x_all[:, cols]) and torch.equal(y, y_all[:, cols])
    x, y = Columns.of(ids, B, slice(2, 4)).chunk(slice(5, 15))  # one rank's half
    assert torch.equal(x, x_all[2:4, 5:15]) and torch.equal(y, y_all[2:4, 5:15])


BF16_CPU = bf16_products("cpu")  # AVX-512 BF16 or AMX


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no bf16 matrix units")
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_training_on_the_cpu_lands_near_fp32(kind, tmp_path):
    torch.set_num_threads(1)
    fp32 = train(net(kind), train_cfg(epochs=3), tmp_path / "fp32")
    bf16 = train(net(kind), train_cfg(epochs=3), tmp_path / "bf16", precision="bf16")
    assert without_timings(bf16["history"]) != without_timings(fp32["history"])  # it ran bf16
    assert bf16["best_valid_ppl"] == pytest.approx(fp32["best_valid_ppl"], rel=0.02)


@pytest.mark.parametrize("units", [True, False], ids=["bf16-units", "no-bf16-units"])
def test_cpu_precision_auto_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, units):
    import dataclasses

    from pipeline import precision
    from pipeline.neural import precision_of
    from pipeline.params import load_section
    from pipeline.presets import TrainParams

    monkeypatch.setattr(precision, "bf16_products", lambda device: units)
    params = load_section("train", TrainParams)
    assert params.cpu_precision == "auto"  # the default
    assert precision_of("cpu", params, "lstm2") == ("bf16" if units else "fp32")
    fp32 = dataclasses.replace(params, cpu_precision="fp32")
    assert precision_of("cpu", fp32, "lstm2") == "fp32"
    bf16 = dataclasses.replace(params, cpu_precision="bf16")
    if units:
        assert precision_of("cpu", bf16, "lstm2") == "bf16"
    else:
        with pytest.raises(precision.PrecisionError,
                           match=r"^train\.cpu_precision: .* emulated"):
            precision_of("cpu", bf16, "lstm2")
    # a GPU follows train.cuda_precision, whatever the CPU setting
    assert precision_of("cuda", fp32, "lstm2") == params.cuda_precision["lstm2"]


def test_precision_choice_is_the_fastest_that_costs_at_most_one_percent():
    from pipeline.precision import choose

    speed = {"fp32": 1.0, "tf32": 2.0, "bf16": 3.0}
    assert choose({"fp32": 100.0, "tf32": 100.9, "bf16": 101.2}, speed) == "tf32"
    assert choose({"fp32": 100.0, "tf32": 101.5, "bf16": 95.0}, speed) == "bf16"  # lower: no loss
    assert choose({"fp32": 100.0, "tf32": 102.0, "bf16": 103.0}, speed) == "fp32"
    with pytest.raises(ValueError, match="fp32"):
        choose({"bf16": 100.0}, {"bf16": 3.0})
