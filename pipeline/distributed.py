"""Data-parallel training (torchrun + DistributedDataParallel), and the one process
it reduces to.

    python -m pipeline.stages.train ...                                 one process (World())
    torchrun --standalone --nproc-per-node 4 -m pipeline.stages.train ...   4 ranks, one machine

(`train.nproc` in params.yaml makes the stage relaunch itself through torchrun.)
The B columns of the training stream (pipeline/steps.py) are split into N
contiguous blocks, one per rank; each rank reads and carries the state of its own
columns only, in the same order as one process does:

    column        0   1   2   3   4   5          B = 6 columns, N = 2 ranks
    one process  [x   x   x   x   x   x]         x[0:6], state[..., 0:6, :]
    rank 0       [x   x   x]                     x[0:3], state[..., 0:3, :]
    rank 1                   [x   x   x]         x[3:6], state[..., 3:6, :]

Each rank's loss is the mean over its (B/N) x T tokens (time_sum: that mean x T);
DistributedDataParallel averages the gradients over the N ranks during backward,
so every rank steps with the gradient of the mean over all B x T tokens: the one-
process step. clip_grad_norm_ runs after that all-reduce, so it measures and clips
the global norm, the same on every rank. Only floating-point summation order differs
from one process (the test: tests/test_distributed.py).

What is shared at run time, besides DDP's gradient all-reduce (every step):
- the training loss: per-step sums (nats) all-reduced at check time, not every step;
- the decision to save a resume point or stop on a signal, agreed at check time;
- the valid perplexity: scored on rank 0 (one stream), broadcast, so every rank
  takes the same best/lr-schedule decisions;
- resume points: rank 0 gathers the carried state of all columns and every rank's
  RNG, and writes last.pt alone; on resume rank 0 reads it and broadcasts it (no
  shared filesystem needed), each rank keeps its own columns.
NCCL on CUDA (one GPU per rank: cuda:<LOCAL_RANK>), gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import UserError

# rank 0 scores the valid split while the other ranks wait in a broadcast: the
# process group's timeout must outlast the longest validation
TIMEOUT = datetime.timedelta(hours=1)
RANK_SEED_STRIDE = 1_000_003  # rank r > 0 draws dropout masks from seed + r x stride


class UnevenColumns(UserError, ValueError):
    """batch_size is not a multiple of the number of ranks."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; World() is the plain single process
    (no process group, every collective below returns its input)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the GPU of this rank on its machine
    distributed: bool = False  # a process group exists (launched by torchrun)
    device: str = "cpu"  # where collectives put their tensors

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, curves and MLflow runs."""
        return self.rank == 0

    def columns(self, batch_size: int, key: str = "batch_size") -> slice:
        """This rank's block of the B columns (see the diagram above)."""
        if batch_size % self.size:
            raise UnevenColumns(
                f"{key}: {batch_size} columns cannot be split evenly across {self.size} "
                f"ranks; make it a multiple of {self.size} (or change train.nproc / "
                "torchrun --nproc-per-node x --nnodes)")
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (a new tensor; the input when alone)."""
        if not self.distributed:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true if it is true on any rank (the same answer everywhere)."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(bool(f)) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (picklable; tensors travel as they are)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def gather_columns(self, state):
        """The carried state of all B columns on rank 0 (CPU tensors), None elsewhere.
        The column (batch) dim of every state tensor is the second to last one:
        (layers, B, h) for the recurrent models, (B, context) for `window`."""
        if not self.distributed:
            return state
        parts = self.gather(_map(state, lambda t: t.detach().cpu()))
        if parts is None or parts[0] is None:
            return None
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(p, dim=-2) for p in zip(*parts, strict=True))
        return torch.cat(parts, dim=-2)

    def own_columns(self, state):
        """This rank's columns of a carried state of all B columns (as saved)."""
        if not self.distributed:
            return state
        return _map(state, lambda t: t[..., self.columns(t.size(-2)), :].contiguous())


SINGLE = World()  # one process: the default of every `world` argument


def _map(state, fn):
    """fn applied to a carried state: None, a tensor or a tuple of tensors."""
    if state is None:
        return None
    if isinstance(state, tuple | list):
        return tuple(fn(t) for t in state)
    return fn(state)


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(device: str, local_rank: int) -> str:
    """The device of one rank: CUDA ranks each take GPU <LOCAL_RANK> of their machine."""
    return f"cuda:{local_rank}" if device == "cuda" else device


@contextlib.contextmanager
def initialised(device: str) -> Iterator[World]:
    """The World of this process: a process group (NCCL for cuda, gloo for cpu) when
    launched by torchrun, torn down on the way out; World() otherwise. `device` is
    the stage's device before it is split across ranks (cpu, cuda, mps)."""
    if not launched():
        yield World(device=device)
        return
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "mps":
        raise UserError("train.device: mps cannot run under torchrun (no collective "
                        "backend); use cpu or cuda")
    backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # collectives and objects go through this GPU
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield World(rank=rank, size=size, local_rank=local_rank, distributed=True,
                    device=rank_device(device, local_rank))
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """The module train_step calls: DistributedDataParallel over `model` when there is
    a process group (its backward all-reduces and averages the gradients), else
    `model` itself. State dicts, scoring and sampling use `model`."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    gpu = [world.local_rank] if world.device.startswith("cuda") else None
    # every parameter gets a gradient every step (find_unused_parameters stays off)
    return DistributedDataParallel(model, device_ids=gpu)


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """This machine, `nproc` ranks: the command that reruns `python -m module args`
    under torchrun (--standalone: a local rendezvous on a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", module, *args]
