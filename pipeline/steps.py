"""Batching and the optimizer step: the training stream as columns, one step on a chunk.

The training split is cut into `batch_size` contiguous columns; each step reads the
next `bptt` tokens of every column, with the state carried from the step before
and detached (truncated back-propagation through time):

    stream  a b c d e f g h i j k l          batch_size = 3, bptt = 2
    column 0: a b | c d        step 1 reads [a b], [e f], [i j]
    column 1: e f | g h        step 2 reads [c d], [g h], [k l]
    column 2: i j | k l
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from pipeline.graphed import GraphedStep
from pipeline.networks import LanguageModel, detach
from pipeline.schedule import TrainConfig


@dataclass(frozen=True)
class Columns:
    """The training stream as B contiguous columns of L tokens (the diagram above), read
    from the split's id array, a read-only memory map, one chunk at a time: only a
    step's tokens are ever copied, so a split larger than memory trains.
    Column c holds stream[c*L : (c+1)*L]; its targets are shifted by one."""

    ids: np.ndarray  # the split's token ids, in order
    length: int  # L: tokens per column
    rows: range  # the columns this process reads: all B, or one rank's B/N

    @classmethod
    def of(cls, ids: np.ndarray, batch_size: int, rows: slice = slice(None)) -> Columns:
        length = (len(ids) - 1) // batch_size
        if length < 1:
            raise ValueError(f"{len(ids)} tokens cannot fill a batch of {batch_size} columns")
        return cls(ids, length, range(batch_size)[rows])

    def chunk(self, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (rows, T) int64: positions `cols` of every column."""
        starts = np.asarray(self.rows, dtype=np.int64) * self.length  # (R,)
        index = starts[:, None] + np.arange(cols.start, cols.stop)[None, :]  # (R, T)
        x = torch.from_numpy(np.asarray(self.ids[index], dtype=np.int64))  # (R, T)
        y = torch.from_numpy(np.asarray(self.ids[index + 1], dtype=np.int64))  # (R, T)
        return x, y


class ResidentColumns:
    """The same columns held on a GPU whole, inputs and targets each one (R, L) int64
    tensor (16 bytes a token: PTB's 0.9M tokens take 15 MB), so that a step's chunk is a
    slice: no host copy, hence no host-device synchronisation at every step (a copy
    from pageable memory waits for the GPU to finish the step before)."""

    def __init__(self, columns: Columns, device: str):
        x, y = columns.chunk(slice(0, columns.length))  # (R, L) each
        self.x, self.y = x.to(device), y.to(device)
        self.length = columns.length

    def chunk(self, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:, cols], self.y[:, cols]  # (R, T) each, views


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   graphed: bool = False) -> torch.optim.Optimizer:
    """SGD or Adam at cfg.lr. `graphed` (a CUDA graph replays the step): the lr lives in
    a device tensor that set_lr updates in place, SGD is the fused kernel and Adam keeps
    its step count on the device (capturable)."""
    if not graphed:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=cfg.lr)
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    lr = torch.tensor(cfg.lr, device=next(model.parameters()).device)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, fused=True)
    return torch.optim.Adam(model.parameters(), lr=lr, capturable=True)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr; a tensor lr (make_optimizer(graphed=True)) is written in place,
    where a captured graph reads it, and only when it changes (a write is a kernel)."""
    for group in opt.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = lr
        elif group.get("host_lr") != lr:
            group["lr"].fill_(lr)
            group["host_lr"] = lr


def lr_to_device(opt: torch.optim.Optimizer, device: str) -> None:
    """After load_state_dict from a CPU checkpoint: tensor lrs back on the device."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].to(device)
            group.pop("host_lr", None)


def make_step(model: LanguageModel, opt: torch.optim.Optimizer, *, cfg: TrainConfig,
              precision: str, graphs: bool,
              trainer: torch.nn.Module | None = None) -> Callable[..., Step]:
    """The training step the loop calls as step(x, y, state) -> Step: train_step on
    `trainer` (the model, or DDP(model)), or its CUDA graph (`graphs`: the optimizer from
    make_optimizer(graphed=True)). Benchmarks time this same callable."""
    autocast = precision == "bf16"
    if graphs:
        return GraphedStep(model, opt, cfg=cfg, autocast=autocast, step=train_step)
    return functools.partial(train_step, trainer or model, opt, cfg=cfg, autocast=autocast)


class Step(NamedTuple):
    """What one optimizer step returns; tensors stay on the device (no host sync)."""

    loss: torch.Tensor  # mean loss of the chunk, nats per token
    grad_norm: torch.Tensor  # global gradient norm before clipping, in the unit of `loss`
    state: object  # the carried state, detached


def train_step(model: LanguageModel, opt: torch.optim.Optimizer, xb: torch.Tensor,
               yb: torch.Tensor, state, *, cfg: TrainConfig, autocast: bool) -> Step:
    """One optimizer step on a (B, T) chunk."""
    with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=autocast):
        _, loss, state = model(xb, yb, state)  # loss: mean over B x T tokens
    opt.zero_grad(set_to_none=True)
    # time_sum: summed over the T unrolled steps, averaged over the batch
    (loss * yb.size(1) if cfg.loss == "time_sum" else loss).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.clip > 0:  # clip_grad_norm_ returns the norm it measured before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    opt.step()
    return Step(loss.detach(), grad_norm.detach(), detach(state))
