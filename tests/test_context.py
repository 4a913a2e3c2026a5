"""Context use (pipeline/context.py): the truncated scorer against the one scorer of
pipeline/perplexity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.context import carried_nll, context_use, enough_context, truncated_nll
from pipeline.networks import LanguageModel, NetworkConfig
from pipeline.perplexity import stream_token_nll


def tiny(kind: str, context: int = 0) -> LanguageModel:
    torch.manual_seed(0)
    cfg = NetworkConfig(kind=kind, vocab_size=9, embedding_size=6, hidden_size=6,
                        context=context, dropout=0.3, tie_weights=False,
                        direct_connections=False, init_range=0.5)
    return LanguageModel(cfg)


IDS = np.random.default_rng(0).integers(0, 9, size=70)


@pytest.mark.parametrize("kind", ["window", "rnn", "gru", "lstm", "lstm2"])
def test_context_longer_than_the_split_equals_the_full_scorer(kind):
    model = tiny(kind, context=3 if kind == "window" else 0)
    full = stream_token_nll(model, IDS, chunk=16, eos_id=0)  # (70,)
    everywhere = np.arange(len(IDS))
    truncated = truncated_nll(model, IDS, everywhere, length=len(IDS) + 5, eos_id=0,
                              batch_tokens=50)
    assert np.allclose(truncated, full, rtol=1e-5, atol=1e-6)
    assert np.allclose(carried_nll(model, IDS, everywhere, eos_id=0), full, rtol=1e-5,
                       atol=1e-6)
    assert model.training  # context_use and the scorers restore the mode


def test_short_contexts_lose_information_the_window_model_never_had():
    """A window model reads 3 tokens: from k = 3 on it scores as carried, below it not;
    a recurrent model with random weights still changes between k = 3 and k = 20."""
    window = context_use(tiny("window", context=3), IDS, lengths=[1, 2, 3, 5, 20],
                         targets=30, eos_id=0, batch_tokens=40)
    assert window.ppl[2:] == pytest.approx([window.carried_ppl] * 3, rel=1e-5)
    assert abs(window.ppl[0] / window.carried_ppl - 1) > 1e-3
    assert window.enough == 3 and window.targets == 30
    rnn = context_use(tiny("rnn"), IDS, lengths=[3, 20], targets=30, eos_id=0,
                      batch_tokens=40)
    assert rnn.ppl[0] != pytest.approx(rnn.ppl[1], rel=1e-4)


def test_enough_context_needs_every_longer_length_within_one_percent():
    assert enough_context([1, 5, 10, 20], [130, 101.5, 100.5, 100.2], carried=100) == 10
    assert enough_context([1, 5, 10], [100.2, 120, 100.1], carried=100) == 10
    assert enough_context([1, 5], [130, 110], carried=100) is None
