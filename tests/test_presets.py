"""The presets: layers resolve as documented, every value is checked with the key (and
layer) that set it, and the published configurations are in the published units."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.corpora import CORPUS_NAMES
from pipeline.model_spec import NETWORK_KEYS, TRAINING_KEYS
from pipeline.networks import KINDS, LanguageModel, NetworkConfig
from pipeline.params import ParamsError, build
from pipeline.presets import TrainParams, show
from pipeline.steps import train_step

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())["train"]


def train_params(edit=None, preset: str | None = None) -> TrainParams:
    raw = copy.deepcopy(RAW)
    if edit:
        edit(raw)
    if preset:
        raw["preset"] = preset
    return build(TrainParams, raw, "train")


def test_layers_apply_in_order_and_name_their_source():
    params = train_params(lambda t: t["presets"]["quick"]["corpora"].update(
        ptb={"epochs": 9}))
    resolved = params.resolve("ptb", "window")
    assert resolved["lr"] == (0.002, "train.presets.quick.models.window")
    assert resolved["epochs"] == (9, "train.presets.quick.corpora.ptb")  # corpus wins
    assert resolved["bptt"] == (35, "train.presets.quick.defaults")
    # another corpus is untouched: brown resolves as it does without the ptb entry
    assert params.resolve("brown", "window") == train_params().resolve("brown", "window")
    assert params.resolve("brown", "window")["epochs"][1] != "train.presets.quick.corpora.ptb"


def test_show_prints_every_resolved_setting_with_its_source():
    text = show("ptb", "lstm2", "small", REPO / "params.yaml")
    assert text.splitlines()[0] == "# lstm2 on ptb, preset small"
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines()[1:]}
    assert lines["lr"] == ["1.0", "train.presets.small.defaults"]
    assert lines["loss"] == ["'time_sum'", "train.presets.small.defaults"]
    assert set(lines) == set(NETWORK_KEYS + TRAINING_KEYS)  # every setting,
    assert len(text.splitlines()) == 1 + len(lines)  # once each


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["presets"]["quick"]["models"]["lstm2"].update(epocs=3),
     r"unknown key train\.presets\.quick\.models\.lstm2\.epocs"),
    (lambda t: t["presets"]["quick"]["corpora"]["brown"].update(lr="fast"),
     r"train\.presets\.quick\.corpora\.brown\.lr: expected a number, got 'fast'"),
    (lambda t: t["presets"]["quick"]["models"]["rnn"].update(hidden_size=300),
     r"train\.presets\.quick\.defaults\.tie_weights: needs embedding_size == hidden_size, "
     r"got 200 and 300"),
    (lambda t: t["presets"]["quick"]["defaults"].update(schedule="linear"),
     r"train\.presets\.quick\.defaults\.schedule: 'linear' is not one of"),
    (lambda t: t["presets"]["quick"]["defaults"].update(lr_min=2),
     r"train\.presets\.quick\.defaults\.lr_min: must be in \[0, 1\], got 2"),
    (lambda t: t["presets"]["quick"]["defaults"].update(warmup=1.0),
     r"train\.presets\.quick\.defaults\.warmup: must be in \[0, 1\), got 1\.0"),
    (lambda t: t["presets"]["quick"]["corpora"].update(ptb3={}),
     r"train\.presets\.quick\.corpora\.ptb3: unknown corpus"),
    (lambda t: t["presets"]["quick"]["models"].pop("lstm"),
     r"train\.presets\.quick\.models: no entry for 'lstm': write `lstm: \{\}`"),
    (lambda t: t["presets"]["quick"].update(overrides={}),
     r"train\.presets\.quick\.overrides: unknown layer"),
    (lambda t: t["presets"]["quick"]["defaults"].pop("seed"),
     r"missing key train\.presets\.quick\.defaults\.seed"),
    (lambda t: t.update(preset="huge"), r"train\.preset: unknown preset 'huge'"),
    (lambda t: t.update(models=["lstm", "transformer"]),
     r"train\.models: unknown model 'transformer'; known: window, rnn, gru, lstm, lstm2"),
    (lambda t: t.update(device="tpu"), r"train\.device: 'tpu' is not one of"),
])
def test_bad_settings_name_the_key_and_layer(edit, message):
    with pytest.raises(ParamsError, match=message):
        train_params(edit)


def test_every_preset_resolves_for_every_model_and_corpus():
    """Loading checks only the chosen preset: spec() raises for a bad value in any other."""
    params = train_params()
    for preset in params.presets:
        for corpus in CORPUS_NAMES:
            for model in KINDS:
                params.spec(corpus, model, preset)


@pytest.mark.parametrize("preset, size, dropout, init, bptt, epochs, lr_decay, after, clip", [
    ("small", 200, 0.0, 0.1, 20, 13, 2.0, 4, 5.0),
    ("medium", 650, 0.5, 0.05, 35, 39, 1.2, 6, 5.0),
    ("large", 1500, 0.65, 0.04, 35, 55, 1.15, 14, 10.0),
])
def test_zaremba_presets_are_the_published_configurations(preset, size, dropout, init, bptt,
                                                          epochs, lr_decay, after, clip):
    """Zaremba et al. 2014, section 4.1, in their units (loss summed over time)."""
    spec = train_params().spec("ptb", "lstm2", preset)
    net, tr = spec.network, spec.training
    assert (net.embedding_size, net.hidden_size, net.dropout, net.init_range,
            net.tie_weights) == (size, size, dropout, init, False)
    assert (tr.batch_size, tr.bptt, tr.epochs, tr.optimizer, tr.lr, tr.loss, tr.schedule,
            tr.lr_decay, tr.decay_after, tr.clip, tr.max_tokens) == \
        (20, bptt, epochs, "sgd", 1.0, "time_sum", "decay", lr_decay, after, clip, 0)


def published_step(model, x, y, lr, clip) -> float:
    """Zaremba et al.'s step, written independently: the loss summed over the unrolled
    steps and averaged over the batch, plain SGD, the global gradient norm clipped.
    Returns the gradient norm before clipping."""
    logits, _, _ = model(x)  # (B, T, V)
    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    loss = per_token.view(y.shape).sum(dim=1).mean()  # sum over T, mean over B
    model.zero_grad()
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()
    scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * scale * p.grad
    return norm


@pytest.mark.parametrize("clip", [5.0, 0.2, 0.0])  # 0.2: clipped; 0: clipping off
def test_one_step_of_the_small_preset_is_the_published_step(clip):
    torch.manual_seed(0)
    spec = train_params().spec("ptb", "lstm2", "small")
    tr = dataclasses.replace(spec.training, clip=clip)
    net = dataclasses.replace(spec.network, vocab_size=50, embedding_size=16, hidden_size=16)
    ours = LanguageModel(net)
    before, theirs, token_mean = (copy.deepcopy(ours) for _ in range(3))
    x, y = torch.randint(0, 50, (2, tr.batch_size, tr.bptt))
    step = train_step(ours, torch.optim.SGD(ours.parameters(), lr=tr.lr), x, y, None,
                      cfg=tr, autocast=False)
    norm = published_step(theirs, x, y, lr=tr.lr, clip=tr.clip)
    assert (0 < clip < norm) == (clip == 0.2)  # both branches of the clip are exercised
    # the norm the learning curve records: before clipping, in the loss's unit, with or
    # without clipping
    assert float(step.grad_norm) == pytest.approx(float(norm), rel=1e-5)
    # the same step with the per-token mean loss: lr x T, clip / T
    as_mean = dataclasses.replace(tr, loss="token_mean", lr=tr.lr * tr.bptt,
                                  clip=tr.clip / tr.bptt)
    train_step(token_mean, torch.optim.SGD(token_mean.parameters(), lr=as_mean.lr), x, y,
               None, cfg=as_mean, autocast=False)
    for a, b, c in zip(ours.parameters(), theirs.parameters(), token_mean.parameters(),
                       strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        # clip_grad_norm_ divides by (norm + 1e-6): a T times smaller norm feels that
        # epsilon T times more, a difference of about 1e-6 in the clipped update
        assert torch.allclose(a, c, atol=1e-5)
    moved = max((a - b).abs().max().item()
                for a, b in zip(ours.parameters(), before.parameters(), strict=True))
    assert moved > 1e-3  # the step did something


def test_network_config_is_built_from_the_spec_not_copied():
    spec = train_params().spec("ptb", "window")
    net = spec.for_vocabulary(10_000)
    assert isinstance(net, NetworkConfig) and net.kind == "window" and net.vocab_size == 10_000
    assert net.context == 4 and net.hidden_size == 256
