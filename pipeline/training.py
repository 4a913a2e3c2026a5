"""One training loop for every neural model (truncated BPTT over the token stream).

The training split is cut into `batch_size` contiguous columns; each step reads the
next `bptt` tokens of every column, with the state carried from the step before
and detached (truncated back-propagation through time):

    stream  a b c d e f g h i j k l          batch_size = 3, bptt = 2
    column 0: a b | c d        step 1 reads [a b], [e f], [i j]
    column 1: e f | g h        step 2 reads [c d], [g h], [k l]
    column 2: i j | k l

Checkpoints (state dicts plus plain data, loadable with weights_only=True):
`last.pt` after every epoch (resume point), `best.pt` at the best validation
perplexity. Validation uses the exact stream scorer of pipeline/perplexity.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.networks import LanguageModel, NetworkConfig, detach
from pipeline.perplexity import SplitScore, score_stream


class TrainingDiverged(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int
    bptt: int
    epochs: int
    optimizer: Literal["sgd", "adam"]
    lr: float
    schedule: Literal["decay", "plateau"]  # decay: lr /= lr_decay each epoch after decay_after
    lr_decay: float
    decay_after: int
    clip: float  # gradient-norm clip; 0 = off
    time_budget_s: float  # stop after the epoch that crosses it; 0 = none
    seed: int
    eval_chunk: int


def batchify(ids: np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch_size, L): contiguous columns of the stream."""
    stream = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    length = (len(stream) - 1) // batch_size
    if length < 1:
        raise ValueError(f"{len(stream)} tokens cannot fill a batch of {batch_size} columns")
    x = stream[: length * batch_size].view(batch_size, length)
    y = stream[1 : length * batch_size + 1].view(batch_size, length)
    return x, y


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def train_model(net_cfg: NetworkConfig, cfg: TrainConfig, train_ids: np.ndarray,
                valid_ids: np.ndarray, eos_id: int, checkpoint_dir: Path, device: str = "cpu",
                on_epoch: Callable[[dict], None] | None = None, bf16: bool = False,
                extra: dict | None = None) -> dict:
    """Train, resuming from checkpoint_dir/last.pt when it was written for the same
    configuration; return a summary. `extra` (plain data) is stored in checkpoints."""
    torch.manual_seed(cfg.seed)
    autocast = bf16 and device.startswith("cuda")
    model = LanguageModel(net_cfg).to(device)
    opt = (torch.optim.SGD(model.parameters(), lr=cfg.lr) if cfg.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=cfg.lr))
    x, y = batchify(train_ids, cfg.batch_size)
    history: list[dict] = []
    start_epoch, best_valid, lr, elapsed = 1, math.inf, cfg.lr, 0.0
    last = checkpoint_dir / "last.pt"
    if last.exists():
        ckpt = torch.load(last, weights_only=True)
    if last.exists() and (ckpt["network"] != asdict(net_cfg) or ckpt["train"] != asdict(cfg)):
        print(f"{last} belongs to another configuration: training from scratch")
    elif last.exists():
        print(f"resuming from {last} (epoch {ckpt['epoch']} done)")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start_epoch, best_valid, lr = ckpt["epoch"] + 1, ckpt["best_valid"], ckpt["lr"]
        history, elapsed = ckpt["history"], ckpt["elapsed"]
    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.time_budget_s and elapsed >= cfg.time_budget_s:
            break
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        t0 = time.perf_counter()
        state, nll, count = None, 0.0, 0
        steps = range(0, x.size(1), cfg.bptt)
        bar = tqdm(steps, desc=f"epoch {epoch}/{cfg.epochs}", unit=" step", leave=False)
        for start in bar:
            xb = x[:, start : start + cfg.bptt].to(device)  # (B, T)
            yb = y[:, start : start + cfg.bptt].to(device)  # (B, T)
            state = detach(state)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                _, loss, state = model(xb, yb, state)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch}, step {start // cfg.bptt}: "
                    f"lower the learning rate (lr={lr}) or enable gradient clipping"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            nll += loss.item() * yb.numel()
            count += yb.numel()
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            tok_s=f"{count / (time.perf_counter() - t0):.0f}")
            if cfg.time_budget_s and elapsed + time.perf_counter() - t0 >= cfg.time_budget_s:
                break  # the budget ends this (possibly partial) epoch
        seconds = time.perf_counter() - t0
        elapsed += seconds
        if nll / count > 700:  # exp() overflows: the perplexity is no longer a number
            raise TrainingDiverged(
                f"mean training loss {nll / count:.3g} nats at epoch {epoch}: the run "
                f"diverged; lower the learning rate (lr={lr}) or enable gradient clipping"
            )
        valid = score_stream(model, valid_ids, cfg.eval_chunk, eos_id, device)
        record = {"epoch": epoch, "train_ppl": math.exp(nll / count),
                  "valid_ppl": valid.perplexity, "lr": lr, "tokens_per_s": count / seconds,
                  "elapsed_s": elapsed}
        history.append(record)
        if valid.perplexity < best_valid:
            best_valid = valid.perplexity
            save_checkpoint(checkpoint_dir / "best.pt", {
                "model": model.state_dict(), "network": asdict(net_cfg),
                "train": asdict(cfg), "epoch": epoch, "valid_ppl": best_valid,
                **(extra or {})})
        if cfg.schedule == "decay" and epoch >= cfg.decay_after:
            lr /= cfg.lr_decay
        elif cfg.schedule == "plateau" and len(history) > 1 \
                and valid.perplexity >= history[-2]["valid_ppl"]:
            lr /= cfg.lr_decay
        save_checkpoint(last, {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(), "network": asdict(net_cfg), "train": asdict(cfg),
            "epoch": epoch, "best_valid": best_valid, "lr": lr, "history": history,
            "elapsed": elapsed, **(extra or {})})
        if on_epoch is not None:
            on_epoch(record)
    if not history:
        raise TrainingDiverged("no epoch finished: raise epochs or time_budget_s")
    return {"history": history, "best_valid_ppl": best_valid,
            "parameters": model.num_parameters(), "seconds": elapsed}


def load_best(checkpoint_dir: Path, device: str = "cpu") -> LanguageModel:
    ckpt = torch.load(checkpoint_dir / "best.pt", weights_only=True)
    model = LanguageModel(NetworkConfig(**ckpt["network"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model


def evaluate_best(checkpoint_dir: Path, ids: np.ndarray, eos_id: int, chunk: int,
                  device: str = "cpu") -> SplitScore:
    return score_stream(load_best(checkpoint_dir, device), ids, chunk, eos_id, device)
