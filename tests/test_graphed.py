"""The CUDA-graph training step (pipeline/graphed.py) against the eager one.

The capture itself needs a GPU (these tests are skipped without one; benchmarks/gpu.py
runs them first on a lent GPU machine). What runs everywhere: the optimizer a graph
needs (a device-tensor lr, fused SGD, capturable Adam) takes the eager optimizer's
steps, and set_lr writes its lr in place."""

from __future__ import annotations

import pytest
import torch

from pipeline.graphed import WARMUP, GraphedStep
from pipeline.networks import LanguageModel
from pipeline.steps import make_optimizer, set_lr, train_step
from tests.test_training import TRAIN, net, train, train_cfg, without_timings

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("optimizer, device", [
    ("sgd", "cpu"), ("sgd", "cuda"),
    ("adam", "cuda"),  # capturable Adam runs on accelerators only
])
def test_the_graph_ready_optimizer_takes_the_eager_steps(optimizer, device):
    if device == "cuda" and not CUDA:
        pytest.skip("needs a GPU")
    torch.manual_seed(0)
    cfg = train_cfg(optimizer=optimizer, lr=0.05)
    models = [LanguageModel(net("lstm", dropout=0.0)).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(models[0], cfg), make_optimizer(models[1], cfg, graphed=True)]
    assert isinstance(opts[1].param_groups[0]["lr"], torch.Tensor)
    x = torch.as_tensor(TRAIN[:40], device=device).view(4, 10)
    y = torch.as_tensor(TRAIN[1:41], device=device).view(4, 10)
    for lr in (0.05, 0.05, 0.02):  # a change of lr reaches the tensor, in place
        for model, opt in zip(models, opts, strict=True):
            set_lr(opt, lr)
            train_step(model, opt, x, y, None, cfg=cfg, autocast=False)
    assert opts[1].param_groups[0]["lr"].item() == pytest.approx(0.02)
    # capturable Adam computes its update in another order (on an H200 weights 5e-5 apart
    # after three steps of lr 0.05: 0.1% of one step); SGD is the same product
    atol = 2e-4 if optimizer == "adam" else 1e-6
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def gpu_run(kind, tmp_path, graphs, **changes):
    return train(net(kind, **changes.pop("network", {})), train_cfg(epochs=3, **changes),
                 tmp_path, device="cuda", graphs=graphs)


@needs_cuda
@pytest.mark.parametrize("kind", ["window", "rnn", "gru", "lstm", "lstm2"])
def test_a_replayed_step_gives_the_eager_numbers(kind, tmp_path):
    """No dropout: the same arithmetic, so the same curve within rounding."""
    eager = gpu_run(kind, tmp_path / "eager", False, network={"dropout": 0.0})
    graphed = gpu_run(kind, tmp_path / "graphed", True, network={"dropout": 0.0})
    for a, b in zip(without_timings(eager["history"]), without_timings(graphed["history"]),
                    strict=True):
        assert a["step"] == b["step"]
        assert b["valid_ppl"] == pytest.approx(a["valid_ppl"], rel=1e-4)
        assert b["train_ppl"] == pytest.approx(a["train_ppl"], rel=1e-4)


@needs_cuda
def test_replays_draw_new_dropout_masks_between_lstm_layers():
    """cuDNN's dropout between the two LSTM layers, and torch's around them, must draw
    fresh masks at every replay, not the captured ones again: with the weights held
    still (lr 0) the same chunk then gives a different loss at every replay."""
    torch.manual_seed(0)
    cfg = train_cfg(optimizer="sgd", lr=1e-30)
    model = LanguageModel(net("lstm2", dropout=0.5)).cuda()
    step = GraphedStep(model, make_optimizer(model, cfg, graphed=True), cfg=cfg,
                       autocast=False, step=train_step)
    x = torch.as_tensor(TRAIN[:40], device="cuda").view(4, 10)
    y = torch.as_tensor(TRAIN[1:41], device="cuda").view(4, 10)
    losses = [step(x, y, None).loss.item() for _ in range(WARMUP + 4)]
    assert step.graph is not None
    replayed = losses[WARMUP:]
    assert len(set(replayed)) == len(replayed), replayed


@needs_cuda
def test_a_graphed_run_resumes_to_the_same_numbers(tmp_path):
    whole = gpu_run("lstm", tmp_path / "whole", True, network={"dropout": 0.0})
    first = train(net("lstm", dropout=0.0), train_cfg(epochs=2), tmp_path / "cut",
                  device="cuda", graphs=True)
    assert len(first["history"]) == 2
    # the same run asked for 3 epochs is another configuration: it starts over; so the
    # resume is checked on the 2-epoch run found finished, then on the 3-epoch curve
    again = train(net("lstm", dropout=0.0), train_cfg(epochs=2), tmp_path / "cut",
                  device="cuda", graphs=True)
    assert without_timings(again["history"]) == without_timings(first["history"])
    assert whole["history"][1]["valid_ppl"] == pytest.approx(first["history"][1]["valid_ppl"],
                                                             rel=1e-4)
