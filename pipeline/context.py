"""Context actually used: the truncation method of Khandelwal et al. (2018).

A fixed set of target tokens of a split is scored twice over:

- carried: as the scorer reads a split (pipeline/perplexity.py), the state carried
  from the start of the split, so every earlier token may inform the prediction;
- truncated to k: the state reset (zeros; the window model: a run of <eos>) k tokens
  before each target, so only the k tokens before it can.

      stream inputs:   eos  w1  w2  ...  w(t-k) ... w(t-1)   -> target w(t)
      context k:                         |<---- k tokens --->|

Where the truncated perplexity stops changing is the context the model uses; an
n-gram uses n-1 tokens. A context longer than what precedes the target in the split
is cut at the split's start, where the carried scorer starts too, so the two agree
there exactly (tests/test_context.py). Only the last position of each context goes
through the output layer: reading the rest costs the recurrence alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHANGE = 0.01  # `enough`: perplexity within 1% of the carried state's from this k on


@dataclass(frozen=True)
class ContextUse:
    lengths: list[int]  # k: tokens of context after the reset
    ppl: list[float]  # perplexity of the targets with context k
    carried_ppl: float  # perplexity of the same targets with the carried state
    enough: int | None  # the shortest k from which every ppl is within 1% of carried_ppl
    targets: int  # how many targets

    def record(self) -> dict:
        return asdict(self)


def stream_inputs(ids: np.ndarray, eos_id: int) -> torch.Tensor:
    """(N,) the input before each token of the split: <eos>, then the split shifted."""
    targets = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    return torch.cat([torch.tensor([eos_id]), targets[:-1]])


def target_positions(n_ids: int, *, targets: int, longest: int) -> np.ndarray:
    """`targets` positions spread evenly over the split, each after at least `longest`
    tokens of it (so every context length has its full context)."""
    first = min(longest, n_ids - 1)
    return np.unique(np.linspace(first, n_ids - 1, targets).round().astype(int))


@contextlib.contextmanager
def evaluating(model) -> Iterator[None]:
    """Dropout off inside, the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(R,) NLL in nats (float64) of each row's last position; logits (R, 1, V)."""
    return F.cross_entropy(logits[:, -1].float(), targets, reduction="none").double().numpy()


@torch.no_grad()
def carried_nll(model, ids: np.ndarray, positions: np.ndarray, eos_id: int) -> np.ndarray:
    """NLL (nats) of the tokens at `positions` (ascending) with the state carried from
    the split's start, as pipeline/perplexity.py scores it, reading the stretches
    between targets without the output layer."""
    inputs = stream_inputs(ids, eos_id)[None]  # (1, N)
    targets = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    state, done, out = None, 0, []
    with evaluating(model):
        for t in positions:
            if t > done:
                state = model.read(inputs[:, done:t], state)
            logits, _, state = model(inputs[:, t : t + 1], state=state)  # (1, 1, V)
            out.append(_nll(logits, targets[t : t + 1]))
            done = t + 1
    return np.concatenate(out)  # (len(positions),)


@torch.no_grad()
def truncated_nll(model, ids: np.ndarray, positions: np.ndarray, *, length: int,
                  eos_id: int, batch_tokens: int) -> np.ndarray:
    """NLL (nats) of the tokens at `positions`, each from a fresh state and the
    `length` stream inputs before it (fewer near the split's start), about
    `batch_tokens` context tokens per forward pass."""
    inputs = stream_inputs(ids, eos_id)
    targets = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    spans = np.minimum(length, positions + 1)  # context actually available
    out = np.empty(len(positions))
    batches = [(span, rows[i : i + max(1, batch_tokens // int(span))])
               for span in np.unique(spans)  # rows of one length batch together
               for rows in [np.flatnonzero(spans == span)]
               for i in range(0, len(rows), max(1, batch_tokens // int(span)))]
    with evaluating(model):
        for span, rows in batches:
            ends = torch.from_numpy(positions[rows])  # (R,)
            ctx = inputs[ends[:, None] + torch.arange(1 - int(span), 1)]  # (R, span)
            state = model.read(ctx[:, :-1]) if span > 1 else None
            logits, _, _ = model(ctx[:, -1:], state=state)  # (R, 1, V)
            out[rows] = _nll(logits, targets[ends])
    return out


def enough_context(lengths: list[int], ppl: list[float], carried: float) -> int | None:
    """The shortest length from which every perplexity is within CHANGE of `carried`."""
    enough = None
    for k, p in zip(reversed(lengths), reversed(ppl), strict=True):
        if abs(p / carried - 1) >= CHANGE:
            break
        enough = k
    return enough


def context_use(model, ids: np.ndarray, *, lengths: list[int], targets: int, eos_id: int,
                batch_tokens: int) -> ContextUse:
    """Perplexity of `targets` tokens of the split for each context length, and carried."""
    positions = target_positions(len(ids), targets=targets, longest=max(lengths))
    carried = float(np.exp(carried_nll(model, ids, positions, eos_id).mean()))
    ppl = [float(np.exp(truncated_nll(model, ids, positions, length=k, eos_id=eos_id,
                                      batch_tokens=batch_tokens).mean()))
           for k in lengths]
    return ContextUse(lengths=list(lengths), ppl=ppl, carried_ppl=carried,
                      enough=enough_context(list(lengths), ppl, carried),
                      targets=len(positions))
