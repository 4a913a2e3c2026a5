"""A training run's settings, its plan (steps and validation points) and its lr schedule.

A run is bounded by epochs and, optionally, by a number of training tokens
(`max_tokens`), never by wall-clock time: the same commit on the same machine
trains the same model. It is planned up front (`Plan`): how many steps, and
after which steps to validate (`evals_per_epoch` points per epoch, plus the
last step), so a one-epoch run still has a learning curve. Plain Python (no
torch), so that the presets can check settings without the training code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


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
    # plateau: an epoch improves only if it lowers the best validation ppl so far by at
    # least this fraction (0.01 = 1%); 0 = any lowering counts
    plateau_threshold: float
    # plateau: end the run at its k-th epoch without improvement (by then the lr has been
    # divided k - 1 times), before the epoch cap; 0 = train every epoch
    stop_after_plateaus: int
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
                     for k in ("max_tokens", "clip", "decay_after", "stop_after_plateaus")
                     if getattr(self, k) < 0]
        if self.lr <= 0:
            problems.append(("lr", f"must be positive, got {self.lr}"))
        if self.lr_decay < 1:
            problems.append(("lr_decay", f"must be >= 1, got {self.lr_decay}"))
        if not 0 <= self.plateau_threshold < 1:
            problems.append(("plateau_threshold",
                             f"must be in [0, 1), got {self.plateau_threshold}"))
        for key in ("plateau_threshold", "stop_after_plateaus"):
            if getattr(self, key) and self.schedule != "plateau":
                problems.append((key, f"applies to the plateau schedule only (schedule is "
                                      f"{self.schedule}); set it to 0"))
        if not 0 <= self.warmup < 1:
            problems.append(("warmup", f"must be in [0, 1), got {self.warmup}"))
        if not 0 <= self.lr_min <= 1:
            problems.append(("lr_min", f"must be in [0, 1], got {self.lr_min}"))
        return problems


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


def improved(cfg: TrainConfig, best_before: float, best_now: float) -> bool:
    """Whether an epoch improved validation: it lowered the best ppl before it
    (`best_before`, inf for the first epoch) to `best_now` by plateau_threshold at least."""
    return best_now < best_before * (1 - cfg.plateau_threshold)


def ends_run(cfg: TrainConfig, plateaus: int) -> bool:
    """Whether a run that has had `plateaus` epochs without improvement ends now."""
    return cfg.schedule == "plateau" and 0 < cfg.stop_after_plateaus <= plateaus


def next_lr(cfg: TrainConfig, epoch: int, lr: float, improved: bool) -> float:
    """The epoch-level lr after `epoch`: fixed decay from decay_after on (Zaremba et al.),
    or divide-on-plateau when the epoch did not beat the best validation so far."""
    if (cfg.schedule == "decay" and epoch >= cfg.decay_after) or \
            (cfg.schedule == "plateau" and not improved):
        return lr / cfg.lr_decay
    return lr
