"""One training loop for every neural model (truncated BPTT over the token stream).

The run is planned up front (pipeline/schedule.py: `Plan`, the lr schedule), reads
the training split as columns, one optimizer step at a time (pipeline/steps.py), and
keeps a resume point (pipeline/resume.py; the files: pipeline/checkpoints.py):

    train_model
      Plan            steps, validation points
      ResumePoint     last.pt: load at the start, save at validation points,
                      every `checkpoint_every_s` and on Ctrl-C / SIGTERM
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
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.checkpoints import save_checkpoint, wait_for_checkpoints
from pipeline.distributed import RANK_SEED_STRIDE, SINGLE, World, wrap
from pipeline.errors import UserError
from pipeline.networks import LanguageModel, NetworkConfig
from pipeline.perplexity import SplitScore, scoring_setup, stream_nll
from pipeline.precision import products
from pipeline.resume import Progress, ResumePoint, fingerprint
from pipeline.schedule import Plan, TrainConfig, next_lr, scheduled_lr
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


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a resume point was written."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(f"{signal_name}: {message}")
        self.exit_code = 128 + signal.Signals[signal_name].value  # as if the signal killed it


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
