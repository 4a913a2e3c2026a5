"""One training loop for every neural model (truncated BPTT over the token stream).

The run is planned up front (pipeline/schedule.py: `Plan`, the lr schedule), reads
the training split as columns, one optimizer step at a time (pipeline/steps.py), and
keeps a resume point (pipeline/resume.py; the files: pipeline/checkpoints.py):

    train_model(spec, splits, runtime)
      Plan            steps, validation points
      ResumePoint     last.pt: load at the start, save at validation points,
                      every `checkpoint_every_s` and on Ctrl-C / SIGTERM
                      (pipeline/interrupts.py)
      train_segment   train_step ... up to the next validation point
      validate        exact perplexity of the valid split; best.pt; lr schedule

The same loop runs as one process or as N data-parallel ranks under torchrun
(`world`, pipeline/distributed.py): each rank trains B/N of the columns, and the
N ranks together take the one-process steps; rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.checkpoints import save_checkpoint, wait_for_checkpoints
from pipeline.distributed import RANK_SEED_STRIDE, SINGLE, World, wrap
from pipeline.errors import UserError
from pipeline.interrupts import StopOnSignal, TrainingInterrupted, agreed
from pipeline.model_spec import ModelSpec
from pipeline.networks import LanguageModel, NetworkConfig
from pipeline.perplexity import SplitScore, scoring_setup, stream_nll
from pipeline.precision import products
from pipeline.resume import Progress, ResumePoint, fingerprint
from pipeline.schedule import Plan, TrainConfig, ends_run, improved, next_lr, scheduled_lr
from pipeline.steps import (
    Columns,
    ResidentColumns,
    Step,
    lr_to_device,
    make_optimizer,
    make_step,
    set_lr,
)

CHECK_EVERY = 50  # steps between host-side loss checks (a .item() is a GPU sync)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became non-finite: the message names the lr and the clip to change."""


@dataclass(frozen=True)
class Splits:
    """The token streams one run reads, as ids of the corpus's one vocabulary."""

    train: np.ndarray  # (tokens,) the training split, read as B columns
    valid: np.ndarray  # (tokens,) scored whole, in order, at every validation point
    eos_id: int  # <eos>: predicted and counted like any token


@dataclass(frozen=True)
class Runtime:
    """Where and how a run executes, apart from what it trains (ModelSpec) and on what
    (Splits). `precision` is the training steps' arithmetic (pipeline/precision.py;
    validation is fp32) and `graphs` replays each step as a CUDA graph
    (pipeline/graphed.py; CUDA, one process); the rest changes no number."""

    checkpoint_dir: Path  # last.pt (the resume point) and best.pt
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | tf32 | bf16
    graphs: bool = False
    eval_chunk: int = 512  # tokens per scoring pass
    checkpoint_every_s: float = 0  # seconds between resume points; 0: validation points only
    extra: dict = field(default_factory=dict)  # plain data in the fingerprint and checkpoints
    on_eval: Callable[[list[dict]], None] | None = None  # the curve after each new point
    world: World = SINGLE  # the ranks that train together (pipeline/distributed.py)


@dataclass
class _Run:
    """What train_segment and validate share: the objects of one training run."""

    model: LanguageModel  # the weights: state dicts, scoring
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    plan: Plan
    columns: Columns | ResidentColumns  # this rank's columns (all B in one process)
    step: Callable[..., Step]  # (x, y, state) -> Step: train_step, or its CUDA graph
    resume: ResumePoint
    stop: StopOnSignal
    bar: tqdm
    runtime: Runtime

    @property
    def device(self) -> str:
        return self.runtime.device

    @property
    def world(self) -> World:
        return self.runtime.world


class _Ledger:
    """A segment's bookkeeping between host syncs: the per-step losses and gradient norms
    still on the device, and the clocks of training time and of the last resume point."""

    def __init__(self, run: _Run, progress: Progress) -> None:
        self.run, self.progress = run, progress
        self.pending: list[torch.Tensor] = []  # per-step losses, nats (no host sync yet)
        self.pending_norms: list[torch.Tensor] = []  # per-step gradient norms, likewise
        self.tick = self.last_save = time.perf_counter()  # seconds

    def settle(self) -> None:
        """Move the pending losses and norms to the host, check the loss, book the time."""
        self._check_loss()
        now = time.perf_counter()
        self.progress.seconds += now - self.tick
        self.progress.segment_seconds += now - self.tick
        self.tick = now

    def _check_loss(self) -> None:
        # per-step sums kept as host floats and added with fsum: the segment's loss is
        # the same however a resume point split it; summed over ranks here, not per step
        progress, plan = self.progress, self.run.plan
        if self.pending:
            sums = self.run.world.sum(torch.stack(self.pending).double())  # (steps,) nats
            progress.segment_losses += sums.tolist()
            progress.segment_grad_norms += torch.stack(self.pending_norms).double().tolist()
            self.pending.clear()
            self.pending_norms.clear()
        if not math.isfinite(math.fsum(progress.segment_losses)):
            raise TrainingDiverged(
                f"loss became {math.fsum(progress.segment_losses)} by step {progress.step} "
                f"(epoch {progress.step / plan.steps_per_epoch:.2f}): lower the learning rate "
                f"(lr={self.run.cfg.lr}) or enable gradient clipping")


def train_segment(run: _Run, progress: Progress, until: int) -> None:
    """Train from progress.step up to global step `until` (a validation point)."""
    cfg, plan = run.cfg, run.plan
    ledger = _Ledger(run, progress)
    while progress.step < until:
        if progress.step % plan.steps_per_epoch == 0:
            progress.state = None  # a new epoch starts each column afresh
        lr = scheduled_lr(cfg, plan, progress.step, progress.lr)
        set_lr(run.opt, lr)
        cols = plan.chunk(progress.step, cfg.bptt)
        xb, yb = (t.to(run.device) for t in run.columns.chunk(cols))  # (B/N, T) each
        loss, grad_norm, progress.state = run.step(xb, yb, progress.state)
        ledger.pending.append(loss * yb.numel())  # nats summed over this rank's chunk tokens
        ledger.pending_norms.append(grad_norm)  # global already: clipped after the all-reduce
        progress.step += 1
        progress.tokens += yb.numel() * run.world.size  # every rank reads as many
        progress.segment_tokens += yb.numel() * run.world.size
        run.bar.update(1)
        checking = progress.step % CHECK_EVERY == 0
        if checking:
            ledger.settle()
            mean = math.fsum(progress.segment_losses) / progress.segment_tokens
            run.bar.set_postfix(loss=f"{mean:.3f}",
                                tok_s=f"{progress.segment_tokens / progress.segment_seconds:.0f}",
                                lr=f"{lr:.3g}")
        _save_if_due(run, progress, ledger, until=until, checking=checking)
    ledger.settle()


def _save_if_due(run: _Run, progress: Progress, ledger: _Ledger, *, until: int,
                 checking: bool) -> None:
    """Write a resume point when one is due (every checkpoint_every_s) or a signal asked
    for one, then raise TrainingInterrupted if a signal did. Under several ranks only at
    check steps, as the ranks agree (no per-step sync)."""
    every_s = run.runtime.checkpoint_every_s
    due = every_s and time.perf_counter() - ledger.last_save >= every_s
    stop, save = run.stop.requested, bool(run.stop.requested or due)
    if run.world.distributed:
        stop, save = agreed(run.world, stop, save) if checking else (None, False)
    if progress.step < until and save:
        ledger.settle()
        run.resume.save(run.model, run.opt, progress)
        ledger.last_save = time.perf_counter()
        if not run.world.distributed:
            stop = run.stop.requested  # a signal during the save counts too
        if stop:
            raise TrainingInterrupted(
                stop, f"stopped at step {progress.step} of "
                f"{run.plan.total_steps}; the resume point is {run.resume.path}")


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
        _end_epoch(run.cfg, progress, spe)
    progress.segment_losses, progress.segment_tokens, progress.segment_seconds = [], 0, 0.0
    progress.segment_grad_norms = []
    record["valid_s"] = round(time.perf_counter() - started, 3)
    return record


def _end_epoch(cfg: TrainConfig, progress: Progress, steps_per_epoch: int) -> None:
    """The epoch-end decisions: did the epoch improve validation, the next lr."""
    started = progress.step - steps_per_epoch
    best_before = min((r["valid_ppl"] for r in progress.history if r["step"] <= started),
                      default=math.inf)
    better = improved(cfg, best_before, progress.best_valid)
    progress.plateaus += not better
    progress.lr = next_lr(cfg, progress.step // steps_per_epoch, progress.lr, better)


def grad_norm_summary(norms: list[float], clip: float) -> dict:
    """The gradient norms (before clipping, in the unit of the loss back-propagated) of
    the steps since the last validation point: median, max, and the fraction of steps
    whose norm exceeded `clip` (so were scaled down; 0 when clipping is off)."""
    return {"grad_norm_median": statistics.median(norms), "grad_norm_max": max(norms),
            "clipped_fraction": sum(n > clip for n in norms) / len(norms) if clip > 0 else 0.0}


def report_line(plan: Plan, progress: Progress, record: dict, *, may_end_early: bool = False
                ) -> str:
    """One line per validation point, for logs: where the run is, and an ETA from the
    training seconds per step and the validation seconds so far (both measured here);
    `may_end_early`: the plateau rule may end the run first, so the ETA is an upper bound."""
    steps_left = plan.total_steps - progress.step
    evals_left = sum(s > progress.step for s in plan.eval_steps)
    valid_s = statistics.mean(r["valid_s"] for r in progress.history if "valid_s" in r)
    eta = steps_left * progress.seconds / progress.step + evals_left * valid_s
    return (f"step {progress.step}/{plan.total_steps} (epoch {record['epoch']:.2f}): "
            f"valid ppl {record['valid_ppl']:.2f}, train ppl {record['train_ppl']:.2f}, "
            f"{record['tokens_per_s']:,.0f} tok/s, validation {record['valid_s']:.1f} s, "
            f"grad norm median {record['grad_norm_median']:.3g}; "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))} (validation included"
            f"{'; at most: the plateau rule may end the run sooner' if may_end_early else ''})")


def train_model(spec: ModelSpec, splits: Splits, runtime: Runtime) -> dict:
    """Train `spec` (its network sized for the vocabulary) on `splits`, resuming from
    runtime.checkpoint_dir/last.pt when it was written for the same configuration, data,
    `runtime.extra` and code; return a summary. `runtime.on_eval` gets the learning curve
    after each new point; with `graphs` the training split is held on the GPU and
    checkpoints are written on a thread.
    Under several ranks (`runtime.world`, every rank calls this with the same arguments)
    each trains its B/N columns; rank 0 alone prints, writes files and calls `on_eval`;
    every rank returns the same summary.
    Raises TrainingInterrupted on SIGINT/SIGTERM, after writing a resume point."""
    run, progress = _start(spec, splits, runtime)
    plan, world = run.plan, runtime.world
    with run.stop, run.bar, _finishing_writes():
        while not _finished(run, progress):
            with products(runtime.precision):  # the segment's products; validation is fp32
                train_segment(run, progress, plan.next_eval(progress.step))
            record = validate(run, progress, valid_ids=splits.valid, eos_id=splits.eos_id,
                              eval_chunk=runtime.eval_chunk,
                              checkpoint_dir=runtime.checkpoint_dir, network=spec.network)
            run.resume.save(run.model, run.opt, progress)
            if world.is_main:
                run.bar.write(report_line(plan, progress, record,
                                          may_end_early=spec.training.stop_after_plateaus > 0))
                sys.stdout.flush()  # logs see it now
            if runtime.on_eval is not None and world.is_main:
                runtime.on_eval(progress.history)  # the curve so far, `record` last
            stopped, _ = agreed(world, run.stop.requested, False)
            if stopped and not _finished(run, progress):
                raise TrainingInterrupted(stopped, f"stopped at step {progress.step}; "
                                          f"the resume point is {run.resume.path}")
    return {"history": progress.history, "best_valid_ppl": progress.best_valid,
            "best_step": progress.best_step, "parameters": run.model.num_parameters(),
            "seconds": progress.seconds, "tokens": progress.tokens,
            "epochs": round(progress.step / plan.steps_per_epoch, 4),
            "plan": dataclasses.asdict(plan) | {"eval_steps": len(plan.eval_steps)}}


def _finished(run: _Run, progress: Progress) -> bool:
    """Whether the run is over: every planned step taken, or the plateau rule ended it."""
    return progress.step >= run.plan.total_steps or ends_run(run.cfg, progress.plateaus)


def _start(spec: ModelSpec, splits: Splits, runtime: Runtime) -> tuple[_Run, Progress]:
    """The run's objects, in the order that draws the same random numbers every time: the
    initial weights, this rank's columns and plan, and the resume point's progress."""
    cfg, network, world, device = spec.training, spec.network, runtime.world, runtime.device
    say = print if world.is_main else _quiet
    cols = world.columns(cfg.batch_size)  # this rank's columns; UnevenColumns if B % N
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = LanguageModel(network).to(device)
    graphs = runtime.graphs and device.startswith("cuda") and not world.distributed
    opt = make_optimizer(model, cfg, graphed=graphs)
    if world.rank > 0:  # dropout masks of their own (rank 0 draws as one process does)
        torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * world.rank)
    columns = Columns.of(splits.train, cfg.batch_size, cols)  # B/N of the B columns of L
    plan = Plan.make(columns.length, cfg)
    if device.startswith("cuda"):
        columns = ResidentColumns(columns, device)
    resume = ResumePoint(runtime.checkpoint_dir / "last.pt",
                         fingerprint(network, cfg, splits.train, splits.valid, runtime.extra),
                         runtime.extra, world, background=device.startswith("cuda"))
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
    step = make_step(model, opt, cfg=cfg, precision=runtime.precision, graphs=graphs,
                     trainer=wrap(model, world))  # DDP(model) under several ranks
    run = _Run(model=model, opt=opt, cfg=cfg, plan=plan, columns=columns, step=step,
               resume=resume, stop=StopOnSignal(), bar=bar, runtime=runtime)
    return run, progress


@contextlib.contextmanager
def _finishing_writes():
    """On the way out, normal or not, wait until the background checkpoint is on disk."""
    try:
        yield
    finally:
        wait_for_checkpoints()


def _quiet(*args, **kwargs) -> None:
    """print() for ranks other than 0: one log per run."""
