"""Gradient flow over distance: how much one prediction still depends on the hidden
state k steps before it (the vanishing gradient of Bengio et al. 1994, measured).

Each of `windows` windows of K+1 tokens is taken from a split. The model first reads
the `warmup` tokens before it without gradients (the state a stream carries, as far as
`warmup` tokens of past can tell), then unrolls the window one token at a time. Only the
loss of the last position is back-propagated, and for the state s entering each step
we record the norm of dL/ds over the whole state (every layer; an LSTM's h and c
together), per window:

    window tokens:   x_0     x_1    ...  x_{K-1}   x_K  -> predicts the token after x_K
    state entering:  s_0     s_1    ...  s_{K-1}   s_K     (s_0: after the warm-up)
    distance k:      K       K-1    ...  1         0

    g(k) = || dL / ds_{K-k} ||_2    (nats per unit of state), averaged over the windows

so g(k) / g(0) is what survives k steps of the recurrence: a gradient that vanishes
decays like rho^k, rho the per-step decay factor that `summarise` fits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

FALL = 1e-3  # `reach`: the distance where g(k) falls below FALL x g(0)


@dataclass(frozen=True)
class GradientFlow:
    distances: list[int]  # k = 0 .. K
    mean_norm: list[float]  # g(k): ||dL/ds|| averaged over the windows
    decay_factor: float  # per step: exp(slope) of a least-squares fit of log g(k) on k
    reach: int | None  # the first k with g(k) < FALL x g(0); None: not within K
    windows: int  # how many windows the mean is over
    fall: float = FALL  # the fraction of g(0) that `reach` is measured at

    def record(self) -> dict:
        return asdict(self)


def state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a recurrent state: one for rnn/gru, (h, c) for an LSTM."""
    return list(state) if isinstance(state, tuple | list) else [state]


def per_window_norm(grads: list[torch.Tensor | None]) -> torch.Tensor:
    """(N,) norms over the gradients of one state's tensors, each (layers, N, h) with the
    batch on dim 1 as in PyTorch's recurrent layers; None (not reached) counts as 0."""
    total = 0.0
    for g in grads:
        if g is not None:
            total = total + g.double().pow(2).transpose(0, 1).flatten(1).sum(1)  # (N,)
    return torch.as_tensor(total).sqrt()


def sample_windows(ids: np.ndarray, *, distance: int, windows: int,
                   warmup: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(warm (N, warmup), window (N, K+2)): `windows` windows spread evenly over the split,
    each its K+1 input tokens then the token the last one predicts."""
    span = warmup + distance + 2
    if len(ids) < span:
        raise ValueError(f"a split of {len(ids)} tokens cannot hold a window of "
                         f"{distance + 2} tokens after {warmup} of warm-up")
    stream = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    starts = np.linspace(warmup, len(ids) - distance - 2, windows).round().astype(int)
    warm = torch.stack([stream[s - warmup : s] for s in starts])  # (N, warmup)
    window = torch.stack([stream[s : s + distance + 2] for s in starts])  # (N, K+2)
    return warm, window


def gradient_norms(model, warm: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """(N, K+1) norms g(k) per window, column k = distance k (see the module docstring).
    `model` follows pipeline/networks.py (read, forward) with a recurrent state."""
    if warm.size(1) < 1:
        raise ValueError("gradient flow needs at least one warm-up token (a state to start)")
    was_training = model.training
    model.eval()  # no dropout: the gradient of the function the model computes
    K = window.size(1) - 2
    with torch.no_grad():
        state = model.read(warm)  # the carried state before the window
    state = tuple(s.detach().requires_grad_() for s in state_tensors(state))
    entering = [state]  # s_0 .. s_K
    with torch.enable_grad():
        for t in range(K):
            state = tuple(state_tensors(model.read(window[:, t : t + 1], _unpack(state))))
            entering.append(state)
        logits, _, _ = model(window[:, K : K + 1], state=_unpack(state))  # (N, 1, V)
        # summed, not averaged: each window's gradient is that of its own loss
        loss = F.cross_entropy(logits[:, -1].float(), window[:, K + 1], reduction="sum")
        flat = [t for s in entering for t in s]
        # only these gradients are computed (none for the parameters)
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    width = len(entering[0])
    per_state = [per_window_norm(list(grads[i : i + width]))
                 for i in range(0, len(flat), width)]  # s_0 .. s_K, each (N,)
    model.train(was_training)
    return torch.stack(per_state[::-1], dim=1).float()  # (N, K+1), column k = distance k


def _unpack(state: tuple):
    """Back to the form the model takes: a tensor, or an LSTM's (h, c)."""
    return state[0] if len(state) == 1 else state


def summarise(mean_norm: np.ndarray, windows: int) -> GradientFlow:
    """Decay factor and reach of a curve g(k), k = 0..K (zeros, from underflow, left out
    of the fit)."""
    k = np.arange(len(mean_norm))
    ok = np.isfinite(mean_norm) & (mean_norm > 0)
    if ok.sum() >= 2:
        slope = np.polyfit(k[ok], np.log(mean_norm[ok]), deg=1)[0]
        decay = float(math.exp(slope))
    else:
        decay = float("nan")
    below = np.flatnonzero(mean_norm < FALL * mean_norm[0])
    return GradientFlow(distances=k.tolist(), mean_norm=[float(g) for g in mean_norm],
                        decay_factor=decay, reach=int(below[0]) if len(below) else None,
                        windows=windows)


def gradient_flow(model, ids: np.ndarray, *, distance: int, windows: int, warmup: int,
                  batch: int, device: str = "cpu") -> GradientFlow:
    """g(k) for k = 0..distance, averaged over `windows` windows of the split `ids`,
    `batch` windows per backward pass."""
    warm, window = sample_windows(ids, distance=distance, windows=windows, warmup=warmup)
    norms = torch.cat([gradient_norms(model, warm[i : i + batch].to(device),
                                      window[i : i + batch].to(device)).cpu()
                       for i in range(0, windows, batch)])  # (N, K+1)
    return summarise(norms.double().mean(0).numpy(), windows)
