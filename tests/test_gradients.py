"""Gradient flow over distance (pipeline/gradients.py): the per-step measurement against
an independent Jacobian of the unrolled recurrence, and a linear RNN whose gradient
decays by a known factor per step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.gradients import gradient_flow, gradient_norms, sample_windows, summarise
from pipeline.networks import LanguageModel, NetworkConfig


def tiny(kind: str) -> LanguageModel:
    torch.manual_seed(0)
    cfg = NetworkConfig(kind=kind, vocab_size=7, embedding_size=5, hidden_size=5, context=0,
                        dropout=0.0, tie_weights=False, direct_connections=False,
                        init_range=0.5)
    return LanguageModel(cfg).double()


def loss_from(model, state, window: torch.Tensor, start: int) -> torch.Tensor:
    """The last position's summed loss, run from `state` entering step `start` (no
    retained intermediates: an independent re-computation)."""
    for t in range(start, window.size(1) - 2):
        state = model.read(window[:, t : t + 1], state)
    logits, _, _ = model(window[:, -2:-1], state=state)
    return torch.nn.functional.cross_entropy(logits[:, -1], window[:, -1], reduction="sum")


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm", "lstm2"])
def test_norms_match_the_jacobian_of_the_unrolled_recurrence(kind):
    model = tiny(kind)
    ids = np.random.default_rng(1).integers(0, 7, size=60)
    warm, window = sample_windows(ids, distance=6, windows=3, warmup=4)
    norms = gradient_norms(model, warm, window)  # (3, 7)
    K = window.size(1) - 2
    with torch.no_grad():
        state = model.read(warm)
    for start in range(K + 1):  # the state entering step `start` is at distance K - start
        flat = torch.cat([s.flatten() for s in (state if isinstance(state, tuple)
                                                else (state,))])
        shapes = [s.shape for s in (state if isinstance(state, tuple) else (state,))]

        def f(x, start=start, shapes=shapes):
            parts = torch.split(x, [math.prod(s) for s in shapes])
            s = tuple(p.view(sh) for p, sh in zip(parts, shapes, strict=True))
            return loss_from(model, s if len(s) > 1 else s[0], window, start)

        jac = torch.autograd.functional.jacobian(f, flat)  # d(sum of losses)/d(state)
        parts = torch.split(jac, [math.prod(s) for s in shapes])
        # (layers, N, h) per tensor: the windows are independent, so each one's slice
        # is the gradient of its own loss
        per_window = sum(p.view(sh).pow(2).sum(dim=(0, 2)) for p, sh in
                         zip(parts, shapes, strict=True)).sqrt()
        assert torch.allclose(norms[:, K - start].double(), per_window, rtol=1e-5)
        with torch.no_grad():
            state = model.read(window[:, start : start + 1], state)


class LinearRNN(nn.Module):
    """h_t = W h_{t-1} + E[x_t], logits = U h_t, with W = rho x an orthogonal matrix: the
    gradient of any loss shrinks by exactly rho per step back (||W^T v|| = rho ||v||)."""

    def __init__(self, rho: float, vocab: int = 6, hidden: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
        self.W = nn.Parameter(rho * q)
        self.E = nn.Parameter(torch.randn(vocab, hidden, generator=g, dtype=torch.float64))
        self.U = nn.Parameter(torch.randn(hidden, vocab, generator=g, dtype=torch.float64))

    def read(self, idx, state=None):
        h = torch.zeros(1, idx.size(0), self.W.size(0), dtype=torch.float64) \
            if state is None else state  # (1, B, h), as PyTorch's recurrent layers
        for t in range(idx.size(1)):
            h = h @ self.W.T + self.E[idx[:, t]]  # (1, B, h)
        return h

    def forward(self, idx, targets=None, state=None):
        h = self.read(idx, state)
        return (h[0] @ self.U)[:, None], None, h  # logits (B, 1, V)


@pytest.mark.parametrize("rho", [0.9, 0.7])
def test_linear_rnn_decays_by_its_spectral_radius(rho):
    ids = np.random.default_rng(2).integers(0, 6, size=400)
    flow = gradient_flow(LinearRNN(rho), ids, distance=100, windows=8, warmup=3, batch=5)
    g = np.array(flow.mean_norm)
    assert np.allclose(g / g[0], rho ** np.arange(101), rtol=1e-4)
    assert flow.decay_factor == pytest.approx(rho, rel=1e-4)
    assert flow.reach == math.ceil(math.log(1e-3) / math.log(rho))  # 66 for 0.9, 20 for 0.7
    assert flow.windows == 8 and flow.distances == list(range(101))


def test_summary_of_a_curve_that_never_falls():
    flow = summarise(np.ones(11), windows=1)
    assert flow.decay_factor == pytest.approx(1.0) and flow.reach is None
