"""The neural models' one interface, and the exact stream scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.networks import KINDS, LanguageModel, NetworkConfig
from pipeline.perplexity import score_stream

V = 12


def config(kind, **changes):
    base = dict(kind=kind, vocab_size=V, embedding_size=8, hidden_size=8, context=3,
                dropout=0.0, tie_weights=False, direct_connections=True, init_range=0.1)
    base.update(changes)
    return NetworkConfig(**base)


@pytest.mark.parametrize("kind", KINDS)
def test_interface_shapes_and_loss(kind):
    torch.manual_seed(0)
    model = LanguageModel(config(kind))
    idx = torch.randint(0, V, (4, 9))
    logits, loss, state = model(idx, targets=idx)
    assert logits.shape == (4, 9, V)
    assert loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits.reshape(-1, V), idx.reshape(-1)).item())
    # carrying the state across two chunks equals one pass over the whole sequence
    a, _, s = model(idx[:, :5])
    b, _, _ = model(idx[:, 5:], state=s)
    torch.testing.assert_close(torch.cat([a, b], dim=1), logits)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_score_is_invariant_to_chunk_size(kind):
    torch.manual_seed(1)
    model = LanguageModel(config(kind))
    ids = np.random.default_rng(0).integers(0, V, size=200).astype(np.uint16)
    scores = [score_stream(model, ids, chunk, eos_id=0) for chunk in (1, 7, 35, 200)]
    assert {s.tokens for s in scores} == {200}
    for s in scores[1:]:
        assert s.nll == pytest.approx(scores[0].nll, rel=1e-9)


def test_stream_score_matches_a_direct_computation():
    """Independent check: token by token with explicit softmax."""
    torch.manual_seed(2)
    model = LanguageModel(config("lstm")).eval()
    ids = np.random.default_rng(1).integers(0, V, size=30)
    total, state, prev = 0.0, None, 0
    with torch.no_grad():
        for tok in ids:
            logits, _, state = model(torch.tensor([[prev]]), state=state)
            total -= math.log(torch.softmax(logits[0, 0].double(), -1)[tok].item())
            prev = int(tok)
    # the scorer's log-softmax runs in float32 (summed in float64): equal to rounding
    assert score_stream(model, ids, 8, eos_id=0).nll == pytest.approx(total, rel=1e-6)


def test_window_model_sees_exactly_its_context():
    """Changing a token n positions back must not change the window model's output."""
    torch.manual_seed(3)
    model = LanguageModel(config("window", context=3)).eval()
    idx = torch.randint(1, V, (1, 10))
    other = idx.clone()
    other[0, 5] = 0
    a, _, _ = model(idx)
    b, _, _ = model(other)
    torch.testing.assert_close(a[0, :5], b[0, :5])  # before the change: identical
    assert not torch.allclose(a[0, 5:8], b[0, 5:8])  # the 3 positions that see it: differ
    torch.testing.assert_close(a[0, 8:], b[0, 8:])  # later ones: out of the window again


@pytest.mark.parametrize("changes, message", [
    ({"kind": "transformer"}, "model: unknown model 'transformer'"),
    ({"tie_weights": True, "hidden_size": 16}, "tie_weights: needs embedding_size == hidden"),
    ({"hidden_size": -4}, "hidden_size: must be positive, got -4"),
    ({"dropout": 1.0}, r"dropout: must be in \[0, 1\)"),
])
def test_bad_configurations_name_the_key(changes, message):
    # read, never changed: the dict belongs to the parametrization, and a rerun of this
    # case (or another test sharing it) must see it whole
    kind = changes.get("kind", "lstm")
    with pytest.raises(ValueError, match=message):
        LanguageModel(config(kind, **{k: v for k, v in changes.items() if k != "kind"}))


@pytest.mark.parametrize("kind", ["lstm", "lstm2"])
def test_forget_bias_opens_the_forget_gates_and_nothing_else(kind):
    torch.manual_seed(0)
    plain = LanguageModel(config(kind)).state_dict()
    torch.manual_seed(0)
    opened = LanguageModel(config(kind, forget_bias=1.0)).state_dict()
    H = 8
    layers = 2 if kind == "lstm2" else 1
    for name, value in opened.items():
        if name.startswith("net.rnn.bias_ih"):  # gates i, f, g, o: only f is set
            assert torch.equal(value[H : 2 * H], torch.ones(H))
            assert torch.equal(value[:H], plain[name][:H])
            assert torch.equal(value[2 * H :], plain[name][2 * H :])
        elif name.startswith("net.rnn.bias_hh"):  # the sum of the two biases is 1
            assert torch.equal(value[H : 2 * H], torch.zeros(H))
            assert torch.equal(value[2 * H :], plain[name][2 * H :])
        else:
            assert torch.equal(value, plain[name]), name
    # the forget gate of a fresh cell with zero input and state: sigmoid(1), not 1/2
    model = LanguageModel(config(kind, forget_bias=1.0))
    gates = model.net.rnn.bias_ih_l0 + model.net.rnn.bias_hh_l0
    assert torch.sigmoid(gates[H : 2 * H]).mean().item() == pytest.approx(0.731, abs=1e-3)
    assert sum(n.startswith("net.rnn.bias_ih") for n in opened) == layers


def test_forget_bias_zero_leaves_the_uniform_draw():
    """0 (every preset but longrange's): the forget gates keep init_range's draw."""
    torch.manual_seed(0)
    model = LanguageModel(config("lstm", forget_bias=0.0, init_range=0.1))
    forget = (model.net.rnn.bias_ih_l0 + model.net.rnn.bias_hh_l0)[8:16]
    assert forget.abs().max().item() <= 0.2 and forget.unique().numel() == 8
    with pytest.raises(ValueError, match="forget_bias: must be finite"):
        LanguageModel(config("lstm", forget_bias=math.nan))
