"""Recall over known gaps: how much of the long-range corpus's key a model carries.

In the `longrange` corpus (pipeline/longrange.py) the answer y repeats the key x
exactly d tokens later. The analyse stage scores every answer position of a prepared
split and reports, per gap d, the mean loss there above the floor (`floor_nats`, the
best possible); a model that forgot x is `forget_nats` above it. Apart from the
corpus generator, so that the download stage does not depend on the scorer.
"""

from __future__ import annotations

import numpy as np

from pipeline.perplexity import stream_token_nll

CARRIED_NATS = 0.5  # a gap is carried when the excess loss there is below this (of 1.9)


def dependent_positions(ids: np.ndarray, *, query_id: int,
                        eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the answers y, their gaps d) in a prepared split: y follows q, and
    its line starts after the previous <eos> (or at the split's start)."""
    ids = np.asarray(ids)
    answers = np.flatnonzero(ids[:-1] == query_id) + 1  # (M,)
    ends = np.flatnonzero(ids == eos_id)
    # the last <eos> before each answer; -1 when the answer is on the split's first line
    previous = np.searchsorted(ends, answers) - 1
    starts = np.where(previous >= 0, ends[np.maximum(previous, 0)] + 1, 0)
    return answers, answers - starts


def dependency_losses(models: dict, ids: np.ndarray, *, vocab, source: dict) -> dict:
    """Per model and gap: mean loss (nats) at the dependent positions, above the floor.
    `models`: name -> model; `source`: the prepared corpus's `source` (vocab.json)."""
    deps = source["dependencies"]
    positions, gaps = dependent_positions(ids, query_id=vocab.tokens.index(deps["query"]),
                                          eos_id=vocab.eos_id)
    out = {"floor_nats": deps["floor_nats"], "forget_nats": deps["forget_nats"],
           "carried_below_nats": CARRIED_NATS,
           "positions": {int(g): int((gaps == g).sum()) for g in deps["gaps"]}, "models": {}}
    for name, model in models.items():
        nll = stream_token_nll(model, ids, chunk=2048, eos_id=vocab.eos_id)[positions]
        means = [float(nll[gaps == g].mean()) for g in deps["gaps"]]
        excess = [m - deps["floor_nats"] for m in means]
        out["models"][name] = {"gaps": list(deps["gaps"]), "loss_nats": means,
                               "excess_nats": excess, "carried_gap": carried_gap(
                                   list(deps["gaps"]), excess)}
    return out


def carried_gap(gaps: list[int], excess_nats: list[float]) -> int | None:
    """The largest gap d (tokens) whose excess loss is below CARRIED_NATS; None if none."""
    carried = [g for g, e in zip(gaps, excess_nats, strict=True) if e < CARRIED_NATS]
    return max(carried) if carried else None
