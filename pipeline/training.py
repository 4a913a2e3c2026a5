"""One training loop for every neural model (truncated BPTT over the token stream).

The training split is cut into `batch_size` contiguous columns; each step reads the
next `bptt` tokens of every column, with the state carried from the step before
and detached (truncated back-propagation through time):

    stream  a b c d e f g h i j k l          batch_size = 3, bptt = 2
    column 0: a b | c d        step 1 reads [a b], [e f], [i j]
    column 1: e f | g h        step 2 reads [c d], [g h], [k l]
    column 2: i j | k l

A run is bounded by epochs and, optionally, by a number of training tokens
(`max_tokens`), never by wall-clock time: the same commit on the same machine
trains the same model. It is planned up front (`Plan`): how many steps, and
after which steps to validate (`evals_per_epoch` points per epoch, plus the
last step), so a one-epoch run still has a learning curve.

    train_model
      Plan            steps, validation points
      ResumePoint     last.pt: load at the start, save at validation points,
                      every `checkpoint_every_s` and on Ctrl-C / SIGTERM
      train_segment   train_step ... up to the next validation point
      validate        exact perplexity of the valid split; best.pt; lr schedule

`last.pt` is used only when its fingerprint of configuration, data, `extra`
(the vocabulary digest among it) and training code matches; a resumed run
continues exactly (same batches, state, RNG) and ends with the same numbers.
Checkpoints are state dicts plus plain data, loadable with weights_only=True.

The same loop runs as one process or as N data-parallel ranks under torchrun
(`world`, pipeline/distributed.py): each rank trains B/N of the columns, and the
N ranks together take the one-process steps; rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.distributed import RANK_SEED_STRIDE, SINGLE, World, wrap
from pipeline.errors import UserError
from pipeline.graphed import GraphedStep
from pipeline.networks import LanguageModel, NetworkConfig, detach
from pipeline.perplexity import SplitScore, scoring_setup, stream_nll
from pipeline.precision import products

CHECK_EVERY = 50  # steps between host-side loss checks (a .item() is a GPU sync)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became non-finite: the message names the lr and the clip to change."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a resume point was written."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(f"{signal_name}: {message}")
        self.exit_code = 128 + signal.Signals[signal_name].value  # as if the signal killed it


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int  # B: parallel columns of the training stream
    bptt: int  # T: tokens per column per step (truncated back-propagation length)
    epochs: int  # passes over the training split, at most
    max_tokens: int  # stop once this many training tokens are seen (a whole step); 0 = off
    evals_per_epoch: int  # validation points per epoch (learning-curve resolution)
    optimizer: Literal["sgd", "adam"]
    lr: float  # in the unit of `loss`
    # token_mean: loss averaged over B x T tokens; time_sum: summed over the T unrolled
    # steps, averaged over B (Zaremba et al.'s code): the same step as token_mean with
    # lr x T and clip / T
    loss: Literal["token_mean", "time_sum"]
    # decay: lr /= lr_decay after every epoch >= decay_after (Zaremba et al.);
    # plateau: lr /= lr_decay after an epoch that did not improve validation;
    # cosine: from lr down to lr x lr_min over the planned steps, after a linear warm-up
    schedule: Literal["decay", "plateau", "cosine"]
    lr_decay: float
    decay_after: int
    warmup: float  # cosine: fraction of the planned steps spent warming up linearly
    lr_min: float  # cosine: the last step's lr, as a fraction of lr
    clip: float  # gradient-norm clip, in the unit of `loss`; 0 = off
    seed: int

    def check(self) -> list[tuple[str, str]]:
        """(key, problem) pairs; empty when the configuration is usable."""
        problems = [(k, f"must be positive, got {getattr(self, k)}")
                    for k in ("batch_size", "bptt", "epochs", "evals_per_epoch")
                    if getattr(self, k) <= 0]
        problems += [(k, f"must be >= 0, got {getattr(self, k)}")
                     for k in ("max_tokens", "clip", "decay_after") if getattr(self, k) < 0]
        if self.lr <= 0:
            problems.append(("lr", f"must be positive, got {self.lr}"))
        if self.lr_decay < 1:
            problems.append(("lr_decay", f"must be >= 1, got {self.lr_decay}"))
        if not 0 <= self.warmup < 1:
            problems.append(("warmup", f"must be in [0, 1), got {self.warmup}"))
        if not 0 <= self.lr_min <= 1:
            problems.append(("lr_min", f"must be in [0, 1], got {self.lr_min}"))
        return problems


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


@dataclass(frozen=True)
class Plan:
    """How many steps a run takes and after which ones it validates."""

    columns: int  # L: tokens per column of the batched training split
    steps_per_epoch: int
    total_steps: int
    eval_steps: tuple[int, ...]  # validate after these global step counts

    @classmethod
    def make(cls, columns: int, cfg: TrainConfig) -> Plan:
        spe = math.ceil(columns / cfg.bptt)
        total = cfg.epochs * spe
        if cfg.max_tokens:
            per_epoch = cfg.batch_size * columns
            full, rest = divmod(cfg.max_tokens, per_epoch)
            if full < cfg.epochs:  # every step but an epoch's last reads B x T tokens
                total = full * spe + math.ceil(rest / (cfg.batch_size * cfg.bptt))
        total = max(total, 1)
        span = min(spe, total)  # a run shorter than an epoch spreads its points over itself
        points = {e * spe + round(k * span / cfg.evals_per_epoch)
                  for e in range(math.ceil(total / spe))
                  for k in range(1, cfg.evals_per_epoch + 1)}
        evals = tuple(sorted({s for s in points if 0 < s <= total} | {total}))
        return cls(columns, spe, total, evals)

    def chunk(self, step: int, bptt: int) -> slice:
        """Columns read by 0-based global `step`."""
        start = (step % self.steps_per_epoch) * bptt
        return slice(start, min(start + bptt, self.columns))

    def next_eval(self, step: int) -> int:
        return next(s for s in self.eval_steps if s > step)


def scheduled_lr(cfg: TrainConfig, plan: Plan, step: int, epoch_lr: float) -> float:
    """The lr of 0-based global `step`. decay/plateau: `epoch_lr`, which changes only at
    epoch ends (next_lr); cosine: a function of the step alone."""
    if cfg.schedule != "cosine":
        return epoch_lr
    warm = min(round(cfg.warmup * plan.total_steps), plan.total_steps - 1)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    after = plan.total_steps - warm  # steps of the cosine, the first at lr, the last at the floor
    progress = (step - warm) / (after - 1) if after > 1 else 1.0  # 0 .. 1
    return cfg.lr * (cfg.lr_min + (1 - cfg.lr_min) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_lr(cfg: TrainConfig, epoch: int, lr: float, improved: bool) -> float:
    """The epoch-level lr after `epoch`: fixed decay from decay_after on (Zaremba et al.),
    or divide-on-plateau when the epoch did not beat the best validation so far."""
    if (cfg.schedule == "decay" and epoch >= cfg.decay_after) or \
            (cfg.schedule == "plateau" and not improved):
        return lr / cfg.lr_decay
    return lr


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


@dataclass
class Progress:
    """Everything a resumed run needs besides the model and optimizer (plain data)."""

    lr: float  # the epoch-level lr (decay/plateau schedules)
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen
    seconds: float = 0.0  # training time, validation excluded
    best_valid: float = math.inf
    best_step: int = 0
    history: list = field(default_factory=list)
    segment_losses: list = field(default_factory=list)  # per-step nats since the last
    # validation point (summed with math.fsum)
    segment_grad_norms: list = field(default_factory=list)  # per-step norms before clipping
    segment_tokens: int = 0
    segment_seconds: float = 0.0
    state: object = None  # the carried recurrent state (tensors) mid-epoch


def _rng_state() -> dict:
    """Every generator dropout may draw from (CPU, CUDA, MPS)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def _to_device(state, device: str):
    """A carried recurrent state (None, a tensor or a tuple of them) on `device`."""
    if state is None:
        return None
    if isinstance(state, tuple | list):
        return tuple(s.to(device) for s in state)
    return state.to(device)


def fingerprint(net_cfg: NetworkConfig, cfg: TrainConfig, train_ids: np.ndarray,
                valid_ids: np.ndarray, extra: dict) -> str:
    """What a resume point must match: configuration, data, `extra` and the training code.
    (Scoring code may change: a finished run is then only re-scored, see scoring_setup.)"""
    h = hashlib.sha256()
    h.update(json.dumps([asdict(net_cfg), asdict(cfg), extra], sort_keys=True).encode())
    for ids in (train_ids, valid_ids):  # a memory map, hashed a block at a time
        for start in range(0, len(ids), 1 << 22):
            h.update(np.ascontiguousarray(ids[start : start + (1 << 22)]).tobytes())
    for module in ("networks.py", "training.py", "distributed.py", "graphed.py",
                   "precision.py"):
        h.update((Path(__file__).parent / module).read_bytes())
    return h.hexdigest()[:20]


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: damaged, or from another vocabulary."""


def save_checkpoint(path: Path, payload: dict, background: bool = False) -> None:
    """Write `payload` to `path` atomically. `background` (a GPU run): snapshot its
    tensors to host memory now and write on a thread while training goes on, one file at
    a time; wait_for_checkpoints() returns once written (and raises what the write did)."""
    if not background:
        with atomic_path(path) as tmp:  # synced to disk before it replaces `path`
            torch.save(payload, tmp)
        return
    snapshot = _on_host(payload)  # the weights change at the next step
    wait_for_checkpoints()
    _WRITER["thread"] = threading.Thread(target=_write_in_background,
                                         args=(path, snapshot), name="checkpoint")
    _WRITER["thread"].start()


_WRITER: dict = {"thread": None, "error": None}  # the one background write in flight


def _write_in_background(path: Path, payload: dict) -> None:
    try:
        save_checkpoint(path, payload)
    except BaseException as exc:  # handed to the training thread by wait_for_checkpoints
        _WRITER["error"] = exc


def wait_for_checkpoints() -> None:
    """Block until the background checkpoint write (if any) is on disk."""
    thread, _WRITER["thread"] = _WRITER["thread"], None
    if thread is not None:
        thread.join()
    error, _WRITER["error"] = _WRITER["error"], None
    if error is not None:
        raise error


def _on_host(value):
    """A copy of `value` (nested dicts, lists, tuples of tensors and plain data) whose
    tensors are in host memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_host(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_host(v) for v in value)
    return value


def check_checkpoint(path: Path) -> None:
    """Raise CheckpointError if `path` is truncated or damaged (a full disk, a power cut):
    torch.save writes a zip archive whose members carry CRC-32 checksums, all verified
    here. The damaged file is moved aside to `<name>.corrupt`, so that the next run does
    not find it again."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        problem = f"member {bad} fails its CRC check" if bad else None
    except (zipfile.BadZipFile, EOFError) as exc:
        problem = f"not a complete zip archive: {exc}"
    if problem is not None:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({problem}); "
                              f"moved it to {aside}")


def load_checkpoint(path: Path, device: str = "cpu") -> dict:
    """A checkpoint as plain data and tensors (weights_only: no code is unpickled).
    Raises CheckpointError for a damaged file (see check_checkpoint)."""
    check_checkpoint(path)
    return torch.load(path, weights_only=True, map_location=device)


@dataclass
class ResumePoint:
    """checkpoint_dir/last.pt: the model, optimizer, RNG and Progress of a run."""

    path: Path
    key: str  # fingerprint()
    extra: dict  # plain data stored with it (corpus, vocabulary digest, ...)
    world: World = SINGLE  # the ranks that share it
    background: bool = False  # written on a thread (GPU runs: training does not wait)

    def save(self, model: torch.nn.Module, opt: torch.optim.Optimizer,
             progress: Progress) -> None:
        """Write last.pt. Under several ranks every rank calls it (a collective): rank 0
        gathers the state of all B columns and every rank's RNG, and writes alone."""
        world = self.world
        state, rng = world.gather_columns(progress.state), world.gather(_rng_state())
        if not world.is_main:
            return
        plain = asdict(progress) | {"state": detach(state)}
        ranks = {"world_size": world.size, "rng_ranks": rng} if world.distributed else {}
        save_checkpoint(self.path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "rng": rng[0], "fingerprint": self.key,
                                    "progress": plain, **ranks, **self.extra},
                        background=self.background)

    def load(self, model: torch.nn.Module, opt: torch.optim.Optimizer,
             device: str) -> Progress | None:
        """The saved Progress (model, optimizer and RNG restored), or None to start over.
        Under several ranks rank 0 reads last.pt and broadcasts it; each rank keeps its
        own columns of the carried state (saved for all B) and its own RNG."""
        world = self.world
        ckpt = self._read() if world.is_main else None
        ckpt = world.broadcast(ckpt)
        if ckpt is None:
            return None
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        _restore_rng(ckpt, world)
        progress = Progress(**ckpt["progress"])
        progress.state = _to_device(world.own_columns(progress.state), device)
        return progress

    def _read(self) -> dict | None:
        """The checkpoint if it is intact and of this run (on the CPU), else None."""
        if not self.path.exists():
            return None
        try:
            ckpt = load_checkpoint(self.path)  # on the CPU: RNG states must stay there
            if ckpt.get("fingerprint") == self.key and ckpt.get("progress", {}).get("history"):
                check_checkpoint(self.path.with_name("best.pt"))  # validated: the run's best
        except (CheckpointError, FileNotFoundError) as exc:
            print(f"{exc}: training from scratch", flush=True)
            return None
        if ckpt.get("fingerprint") != self.key or "progress" not in ckpt:
            print(f"{self.path} belongs to another configuration, data or code: "
                  "training from scratch")
            return None
        return ckpt


def _restore_rng(ckpt: dict, world: World) -> None:
    """This rank's saved RNG. A checkpoint written by another number of ranks continues
    the model exactly but not the dropout masks: ranks > 0 then draw anew."""
    saved = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(saved) == world.size:
        _set_rng_state(saved[world.rank])
        return
    _set_rng_state(saved[0])
    if world.rank > 0:
        torch.manual_seed(RANK_SEED_STRIDE * world.rank + ckpt["progress"]["step"])
    if world.is_main:
        print(f"resume point written by {len(saved)} rank(s), resumed by {world.size}: "
              "dropout masks differ from an uninterrupted run")


class _StopOnSignal:
    """Turns SIGINT/SIGTERM into a request that the loop honours between steps, so the
    resume point it then writes is consistent (never a half-applied optimizer step). A
    second signal acts at once, as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals need it
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Run:
    """What train_segment and validate share: the objects of one training run."""

    model: LanguageModel  # the weights: state dicts, scoring
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    plan: Plan
    columns: Columns | ResidentColumns  # this rank's columns (all B in one process)
    device: str
    precision: str  # fp32 | tf32 | bf16 (pipeline/precision.py)
    step: Callable[..., Step]  # (x, y, state) -> Step: train_step, or its CUDA graph
    resume: ResumePoint
    stop: _StopOnSignal
    bar: tqdm
    world: World = SINGLE


def train_segment(run: _Run, progress: Progress, until: int,
                  checkpoint_every_s: float) -> None:
    """Train from progress.step up to global step `until` (a validation point)."""
    cfg, plan = run.cfg, run.plan
    pending: list[torch.Tensor] = []  # per-step losses still on the device (no host sync)
    pending_norms: list[torch.Tensor] = []  # per-step gradient norms, likewise
    tick = last_save = time.perf_counter()

    def book_time() -> None:
        nonlocal tick
        now = time.perf_counter()
        progress.seconds += now - tick
        progress.segment_seconds += now - tick
        tick = now

    def check_loss() -> None:
        # per-step sums kept as host floats and added with fsum: the segment's loss is
        # the same however a resume point split it; summed over ranks here, not per step
        if pending:
            sums = run.world.sum(torch.stack(pending).double())  # (steps,) nats, all ranks
            progress.segment_losses += sums.tolist()
            progress.segment_grad_norms += torch.stack(pending_norms).double().tolist()
            pending.clear()
            pending_norms.clear()
        if not math.isfinite(math.fsum(progress.segment_losses)):
            raise TrainingDiverged(
                f"loss became {math.fsum(progress.segment_losses)} by step {progress.step} "
                f"(epoch {progress.step / plan.steps_per_epoch:.2f}): lower the learning rate "
                f"(lr={cfg.lr}) or enable gradient clipping")

    while progress.step < until:
        if progress.step % plan.steps_per_epoch == 0:
            progress.state = None  # a new epoch starts each column afresh
        lr = scheduled_lr(cfg, plan, progress.step, progress.lr)
        set_lr(run.opt, lr)
        cols = plan.chunk(progress.step, cfg.bptt)
        xb, yb = (t.to(run.device) for t in run.columns.chunk(cols))  # (B/N, T) each
        loss, grad_norm, progress.state = run.step(xb, yb, progress.state)
        pending.append(loss * yb.numel())  # nats summed over this rank's chunk tokens
        pending_norms.append(grad_norm)  # global already: clipped after the all-reduce
        progress.step += 1
        progress.tokens += yb.numel() * run.world.size  # every rank reads as many
        progress.segment_tokens += yb.numel() * run.world.size
        run.bar.update(1)
        checking = progress.step % CHECK_EVERY == 0
        if checking:
            check_loss()
            book_time()
            mean = math.fsum(progress.segment_losses) / progress.segment_tokens
            run.bar.set_postfix(loss=f"{mean:.3f}",
                                tok_s=f"{progress.segment_tokens / progress.segment_seconds:.0f}",
                                lr=f"{lr:.3g}")
        due = checkpoint_every_s and time.perf_counter() - last_save >= checkpoint_every_s
        stop, save = run.stop.requested, bool(run.stop.requested or due)
        if run.world.distributed:  # ranks agree at check steps only (no per-step sync)
            stop, save = _agreed(run.world, stop, save) if checking else (None, False)
        if progress.step < until and save:
            check_loss()
            book_time()
            run.resume.save(run.model, run.opt, progress)
            last_save = time.perf_counter()
            if not run.world.distributed:
                stop = run.stop.requested  # a signal during the save counts too
            if stop:
                raise TrainingInterrupted(
                    stop, f"stopped at step {progress.step} of "
                    f"{plan.total_steps}; the resume point is {run.resume.path}")
    check_loss()
    book_time()


def _agreed(world: World, stop: str | None, save: bool) -> tuple[str | None, bool]:
    """The signal any rank got (SIGINT over SIGTERM; None: none), and whether any rank
    wants a resume point: every rank then saves and stops alike. A collective."""
    if not world.distributed:
        return stop, save
    sigint, sigterm, save = world.any(stop == "SIGINT", stop == "SIGTERM", save)
    return ("SIGINT" if sigint else "SIGTERM" if sigterm else None), save


def validate(run: _Run, progress: Progress, *, valid_ids: np.ndarray, eos_id: int,
             eval_chunk: int, checkpoint_dir: Path, network: NetworkConfig) -> dict:
    """Score the whole valid split; keep best.pt; the epoch-end lr change; a curve point.
    Under several ranks rank 0 scores (one stream) and broadcasts the score, so every
    rank takes the same decisions; the others wait."""
    started = time.perf_counter()
    score = None
    if run.world.is_main:
        score = stream_nll(run.model, valid_ids, eval_chunk, eos_id, run.device)
    valid_nll, valid_tokens = run.world.broadcast(score)  # nats, tokens
    if not valid_nll / valid_tokens < 700:  # also catches NaN; exp() would overflow
        raise TrainingDiverged(
            f"validation loss {valid_nll / valid_tokens:.3g} nats/token at step "
            f"{progress.step}: the run diverged; lower the learning rate (lr={run.cfg.lr}) "
            "or clip gradients")
    valid = SplitScore(valid_nll, valid_tokens).perplexity
    spe = run.plan.steps_per_epoch
    record = {
        "step": progress.step, "epoch": round(progress.step / spe, 4),
        "tokens": progress.tokens, "elapsed_s": round(progress.seconds, 3),
        "train_ppl": math.exp(min(math.fsum(progress.segment_losses)
                                  / progress.segment_tokens, 700)),
        "valid_ppl": valid,
        "lr": scheduled_lr(run.cfg, run.plan, progress.step - 1, progress.lr),
        "tokens_per_s": progress.segment_tokens / max(progress.segment_seconds, 1e-9),
        **grad_norm_summary(progress.segment_grad_norms, run.cfg.clip),
    }
    progress.history.append(record)
    if valid < progress.best_valid:
        progress.best_valid, progress.best_step = valid, progress.step
        if run.world.is_main:
            save_checkpoint(checkpoint_dir / "best.pt", {
                "model": run.model.state_dict(), "network": asdict(network),
                "train": asdict(run.cfg), "step": progress.step, "valid_ppl": valid,
                # how the valid split scored these weights, and under which setup: the
                # train stage publishes it rather than score the same weights again alike
                "valid_score": {"nll": valid_nll, "tokens": valid_tokens,
                                "setup": scoring_setup(eval_chunk, run.device)},
                **run.resume.extra}, background=run.resume.background)
    if progress.step % spe == 0:  # an epoch ended
        epoch = progress.step // spe
        improved = progress.best_step > progress.step - spe
        progress.lr = next_lr(run.cfg, epoch, progress.lr, improved)
    progress.segment_losses, progress.segment_tokens, progress.segment_seconds = [], 0, 0.0
    progress.segment_grad_norms = []
    record["valid_s"] = round(time.perf_counter() - started, 3)
    return record


def grad_norm_summary(norms: list[float], clip: float) -> dict:
    """The gradient norms (before clipping, in the unit of the loss back-propagated) of
    the steps since the last validation point: median, max, and the fraction of steps
    whose norm exceeded `clip` (so were scaled down; 0 when clipping is off)."""
    return {"grad_norm_median": statistics.median(norms), "grad_norm_max": max(norms),
            "clipped_fraction": sum(n > clip for n in norms) / len(norms) if clip > 0 else 0.0}


def report_line(plan: Plan, progress: Progress, record: dict) -> str:
    """One line per validation point, for logs: where the run is, and an ETA from the
    training seconds per step and the validation seconds so far (both measured here)."""
    steps_left = plan.total_steps - progress.step
    evals_left = sum(s > progress.step for s in plan.eval_steps)
    valid_s = statistics.mean(r["valid_s"] for r in progress.history if "valid_s" in r)
    eta = steps_left * progress.seconds / progress.step + evals_left * valid_s
    return (f"step {progress.step}/{plan.total_steps} (epoch {record['epoch']:.2f}): "
            f"valid ppl {record['valid_ppl']:.2f}, train ppl {record['train_ppl']:.2f}, "
            f"{record['tokens_per_s']:,.0f} tok/s, validation {record['valid_s']:.1f} s, "
            f"grad norm median {record['grad_norm_median']:.3g}; "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))} (validation included)")


def train_model(*, network: NetworkConfig, training: TrainConfig, train_ids: np.ndarray,
                valid_ids: np.ndarray, eos_id: int, checkpoint_dir: Path, device: str = "cpu",
                on_eval: Callable[[list[dict]], None] | None = None,
                precision: str = "fp32", graphs: bool = False, extra: dict | None = None,
                eval_chunk: int = 512, checkpoint_every_s: float = 0,
                world: World = SINGLE) -> dict:
    """Train, resuming from checkpoint_dir/last.pt when it was written for the same
    configuration, data, `extra` and code; return a summary. `on_eval` gets the
    learning curve after each new point; `eval_chunk` (the scorer's pass length) and
    `checkpoint_every_s` (0 = validation points only) do not change the result;
    `precision` is the training steps' arithmetic (pipeline/precision.py; validation is
    fp32); `graphs` replays each step as a CUDA graph (pipeline/graphed.py; CUDA, one
    process), with the training split held on the GPU and checkpoints written on a
    thread.
    Under several ranks (`world`, every rank calls this with the same arguments) each
    trains its B/N columns; rank 0 alone prints, writes files and calls `on_eval`;
    every rank returns the same summary.
    Raises TrainingInterrupted on SIGINT/SIGTERM, after writing a resume point."""
    cfg, extra = training, extra or {}
    say = print if world.is_main else _quiet
    cols = world.columns(cfg.batch_size)  # this rank's columns; UnevenColumns if B % N
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = LanguageModel(network).to(device)
    graphs = graphs and device.startswith("cuda") and not world.distributed
    opt = make_optimizer(model, cfg, graphed=graphs)
    if world.rank > 0:  # dropout masks of their own (rank 0 draws as one process does)
        torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * world.rank)
    columns = Columns.of(train_ids, cfg.batch_size, cols)  # B/N of the B columns of L
    plan = Plan.make(columns.length, cfg)
    if device.startswith("cuda"):
        columns = ResidentColumns(columns, device)
    resume = ResumePoint(checkpoint_dir / "last.pt",
                         fingerprint(network, cfg, train_ids, valid_ids, extra), extra, world,
                         background=device.startswith("cuda"))
    progress = resume.load(model, opt, device)
    lr_to_device(opt, device)
    if progress is not None:
        say(f"resuming from {resume.path} (step {progress.step} of {plan.total_steps})")
    progress = progress or Progress(lr=cfg.lr)
    ranks = f" on {world.size} ranks of {cfg.batch_size // world.size} columns" \
        if world.distributed else ""
    say(f"training {model.num_parameters():,} parameters{ranks}: {plan.total_steps} steps "
        f"({plan.total_steps / plan.steps_per_epoch:.2f} epochs of {plan.steps_per_epoch}), "
        f"{len(plan.eval_steps)} validation points; Ctrl-C saves a resume point", flush=True)
    bar = tqdm(total=plan.total_steps, initial=progress.step, unit=" step", leave=False,
               disable=None if world.is_main else True)  # None: no bar in logs
    step = make_step(model, opt, cfg=cfg, precision=precision, graphs=graphs,
                     trainer=wrap(model, world))  # DDP(model) under several ranks
    with _StopOnSignal() as stop, bar, _finishing_writes():
        run = _Run(model, opt, cfg, plan, columns, device, precision, step, resume, stop, bar,
                   world)
        while progress.step < plan.total_steps:
            with products(precision):  # the segment's products; validation is plain fp32
                train_segment(run, progress, plan.next_eval(progress.step), checkpoint_every_s)
            record = validate(run, progress, valid_ids=valid_ids, eos_id=eos_id,
                              eval_chunk=eval_chunk, checkpoint_dir=checkpoint_dir,
                              network=network)
            resume.save(model, opt, progress)
            if world.is_main:
                bar.write(report_line(plan, progress, record))
                sys.stdout.flush()  # logs see it now
            if on_eval is not None and world.is_main:
                on_eval(progress.history)  # the curve so far, `record` last
            stopped, _ = _agreed(world, stop.requested, False)
            if stopped and progress.step < plan.total_steps:
                raise TrainingInterrupted(stopped, f"stopped at step {progress.step}; "
                                          f"the resume point is {resume.path}")
    return {"history": progress.history, "best_valid_ppl": progress.best_valid,
            "best_step": progress.best_step, "parameters": model.num_parameters(),
            "seconds": progress.seconds, "tokens": progress.tokens,
            "epochs": round(progress.step / plan.steps_per_epoch, 4),
            "plan": dataclasses.asdict(plan) | {"eval_steps": len(plan.eval_steps)}}


@contextlib.contextmanager
def _finishing_writes():
    """On the way out, normal or not, wait until the background checkpoint is on disk."""
    try:
        yield
    finally:
        wait_for_checkpoints()


def _quiet(*args, **kwargs) -> None:
    """print() for ranks other than 0: one log per run."""


def load_model(path: Path, device: str = "cpu",
               vocab_digest: str | None = None) -> LanguageModel:
    """The model of a best checkpoint; refuses one trained on another vocabulary, or a
    damaged one (moved aside: `dvc repro` then sees the output missing and rebuilds it)."""
    try:
        ckpt = load_checkpoint(path, device)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; rerun `dvc repro` to publish it again") from None
    if vocab_digest is not None and ckpt.get("vocab_digest") != vocab_digest:
        raise CheckpointError(f"{path} was trained on another vocabulary; retrain it")
    model = LanguageModel(NetworkConfig(**ckpt["network"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model
